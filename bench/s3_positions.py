"""What the S3 path loses by not knowing token positions, measured against the path that knows them.

An S3 object key (a sequence hash) carries no token position, but KVTC undoes RoPE on keys. Three
ways to encode the same KVBM blocks, each decoded and compared with the exact KV:

* ``known``: the true first position (what the gRPC path sends);
* ``recovered``: the position the S3 endpoint recovers from the keys alone
  (kvbm_codec/codec/positions.py), with the default calibration;
* ``post-rope``: a calibration fitted on keys *with* RoPE (``kvbm-codec calibrate --no-undo-rope``,
  bench/results/calibration_post_rope.kvtc), which needs no position for the transform; the recovered
  position is still used to keep sink tokens (positions < 4) exact.

Reports position recovery rate, key/value relative error, stored ratio, and teacher-forced top-1
agreement (and perplexity) of a continuation after each restored cache vs the exact one.
Usage: python bench/s3_positions.py [--contexts 2] [--context-tokens 2048] [--continuation 128]
       [--offsets 0,6000] [--post-rope bench/results/calibration_post_rope.kvtc] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--context-tokens", type=int, default=2048)
    ap.add_argument("--continuation", type=int, default=128)
    ap.add_argument("--offsets", default="0,6000", help="token offsets into the GPL text, one context each")
    ap.add_argument("--post-rope", type=Path, default=Path("bench/results/calibration_post_rope.kvtc"))
    ap.add_argument("--target-cr", type=float, default=20.0)
    ap.add_argument("--max-position", type=int, default=32768)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from kvbm_codec.api.blocks import BlockSpec, block_positions, kv_to_block
    from kvbm_codec.calibration.artifact import load_calibration
    from kvbm_codec.calibration.cache import load_or_calibrate
    from kvbm_codec.codec.block import KVTCBlockCodec
    from kvbm_codec.codec.kvtc import KVTCCodec
    from kvbm_codec.codec.positions import PositionEstimator, PositionSearch
    from kvbm_codec.kv import KVCache
    from kvbm_codec.models.hf import CausalLM
    from kvbm_codec.texts import demo_document

    spec = BlockSpec(30, 32, 3, 64)
    lm = CausalLM.load()
    cal, _, _ = load_or_calibrate(lm, progress=False)
    codecs = {"known": KVTCBlockCodec(KVTCCodec(cal, args.target_cr), spec)}
    codecs["recovered"] = codecs["known"]
    if args.post_rope.is_file():
        post = load_calibration(args.post_rope, expected_fingerprint=cal.model_fingerprint)
        codecs["post-rope"] = KVTCBlockCodec(KVTCCodec(post, args.target_cr), spec)
    est = PositionEstimator(cal, PositionSearch(max_position=args.max_position, alignment=spec.page_size))
    ids = lm.tokenizer(demo_document(), return_tensors="pt")["input_ids"]
    n_blocks = args.context_tokens // spec.page_size
    totals: dict[str, dict[str, float]] = {
        k: {"top1": 0.0, "nll": 0.0, "kerr": 0.0, "verr": 0.0, "bytes": 0.0} for k in codecs
    }
    found = n = 0
    search_s = 0.0
    for off in (int(o) for o in args.offsets.split(",")):
        ctx = ids[:, off : off + n_blocks * spec.page_size]
        cont = ids[:, off + ctx.shape[1] : off + ctx.shape[1] + args.continuation]
        kv, _ = lm.prefill(ctx, return_logits=False)
        ref = lm.logits_with_cache(kv, cont)
        restored: dict[str, list[torch.Tensor]] = {k: [] for k in codecs}
        for b in range(n_blocks):
            block = kv_to_block(kv.select_tokens(torch.arange(b * 32, (b + 1) * 32)), spec)
            t0 = time.perf_counter()
            keys = block[:, 0].reshape(spec.n_layers, spec.page_size, spec.n_kv_heads, spec.head_dim)
            p_hat = est.estimate(keys.permute(0, 2, 1, 3))
            search_s += time.perf_counter() - t0
            found += p_hat == b * 32
            n += 1
            for name, codec in codecs.items():
                p = b * 32 if name == "known" else p_hat
                frame, _ = codec.encode(block, block_positions(p, spec.page_size))
                out, _ = codec.decode(frame)
                restored[name].append(out)
                totals[name]["bytes"] += len(frame)
                x, y = out.float(), block.float()
                totals[name]["kerr"] += float((x[:, 0] - y[:, 0]).norm() ** 2 / y[:, 0].norm() ** 2)
                totals[name]["verr"] += float((x[:, 1] - y[:, 1]).norm() ** 2 / y[:, 1].norm() ** 2)
        for name, blocks in restored.items():
            full = torch.cat(blocks, 2)  # [L, 2, T, inner]
            L, _, T, _ = full.shape
            kvf = full.float().reshape(L, 2, T, spec.n_kv_heads, spec.head_dim).permute(1, 0, 3, 2, 4)
            cache = KVCache(kvf[0], kvf[1], torch.arange(T, dtype=torch.int64))
            logits = lm.logits_with_cache(cache, cont)
            totals[name]["top1"] += float((logits.argmax(-1) == ref.argmax(-1)).float().mean())
            tgt = cont[0, 1:]
            totals[name]["nll"] += float(torch.nn.functional.cross_entropy(logits[:-1], tgt))
    n_ctx = len(args.offsets.split(","))
    raw = spec.nbytes * n
    print(
        f"{n} blocks of {n_ctx} contexts x {args.context_tokens} tokens; positions recovered {found}/{n}; "
        f"search {search_s / n * 1e3:.1f} ms/block"
    )
    rows = {}
    for name, t in totals.items():
        rows[name] = {
            "key_rel_err": (t["kerr"] / n) ** 0.5,
            "value_rel_err": (t["verr"] / n) ** 0.5,
            "ratio": raw / t["bytes"],
            "top1": t["top1"] / n_ctx,
            "ppl": float(torch.tensor(t["nll"] / n_ctx).exp()),
        }
        r = rows[name]
        print(
            f"{name:<10} key err {r['key_rel_err']:.4f}  value err {r['value_rel_err']:.4f}  "
            f"ratio {r['ratio']:.1f}x  top-1 {r['top1']:.3f}  ppl {r['ppl']:.3f}"
        )
    if args.json:
        args.json.write_text(json.dumps({"blocks": n, "recovered": found, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
