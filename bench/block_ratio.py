"""Block frames vs the whole-context frame, per text: where a block allocation's ratio comes from.

For every text (the calibration's held-out sequence of each domain, the validation texts: the next
sequence of each domain, the Apache licence, The Tempest; with --report also GPL v3 and Hamlet) and
every allocation asked for, it encodes the text's compressible tokens once as one whole-context
frame (v1) and once as 32-token block frames (v2), every token compressed, and prints the stored
ratios, the block / context ratio, the bytes per token of codes, scales and everything outside the
payload, and the allocation's nominal bits per token. It also re-derives the block allocations with
``block_allocations`` on the calibration's own held-out mix with ``--rederive`` (no new
calibration: the same error tables, this code's probe), so old and new compare on the same KV.

    python bench/block_ratio.py --json bench/results/block_ratio.json [--report]

Prefills are cached under --cache (keyed by the tokens), so a second run only encodes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import torch

from kvbm_codec.calibration import calibrate as C
from kvbm_codec.calibration.cache import corpus_texts, fit_plan, given_or_default
from kvbm_codec.codec import frame as fr
from kvbm_codec.codec.allocation import Allocation, predicted_error
from kvbm_codec.codec.kvtc import KVTCCodec
from kvbm_codec.kv import KVCache
from kvbm_codec.models.hf import CausalLM

TEXTS = Path("/tmp/kvbm-codec-texts")  # bench/fetch_texts.sh
APACHE = Path("/usr/share/common-licenses/Apache-2.0")
CTX = 2048
PAGE = 32


def _prefill(lm: CausalLM, ids: torch.Tensor, cache: Path) -> KVCache:
    digest = hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16]
    path = cache / f"kv-{digest}.pt"
    if path.exists():
        return torch.load(path, weights_only=False)
    kv, _ = lm.prefill(ids, return_logits=False)
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(kv, path)
    return kv


def _texts(lm: CausalLM, cache: Path, report: bool) -> tuple[dict[str, tuple[str, KVCache]], list[KVCache]]:
    """{name: (role, compressible fp16-rounded KV)} and the held-out KVs calibration mixes."""
    corpus, _ = corpus_texts(lm.tokenizer, "broad")
    assert isinstance(corpus, dict)
    plan = fit_plan("broad", 66)
    assert isinstance(plan, dict)
    out: dict[str, tuple[str, KVCache]] = {}
    held: list[KVCache] = []
    for d, docs in corpus.items():
        seqs = C.token_sequences(lm.tokenizer, docs, 1024, plan[d] + 2)
        kv_h = _prefill(lm, seqs[plan[d]], cache)
        held.append(kv_h)
        out[f"cal:{d}"] = ("calibration", kv_h)
        if len(seqs) > plan[d] + 1:
            out[f"val:{d}"] = ("validation", _prefill(lm, seqs[plan[d] + 1], cache))

    def tok(text: str) -> torch.Tensor:
        return lm.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][:, :CTX]

    out["val:apache"] = ("validation", _prefill(lm, tok(APACHE.read_text()), cache))
    out["val:tempest"] = ("validation", _prefill(lm, tok((TEXTS / "tempest.txt").read_text()), cache))
    if report:
        from importlib import resources

        gpl = resources.files("kvbm_codec.data").joinpath("gpl-3.0.txt").read_text("utf-8")
        out["report:gpl"] = ("report", _prefill(lm, tok(gpl), cache))
        out["report:hamlet"] = ("report", _prefill(lm, tok((TEXTS / "hamlet.txt").read_text()), cache))
    return out, held


def _fp16(kv: KVCache) -> KVCache:
    return KVCache(kv.keys.half().float(), kv.values.half().float(), kv.positions)


def _bytes_by_stream(frames: list[bytes]) -> dict[str, int]:
    out = {"codes": 0, "scales": 0, "framing": 0}
    for data in frames:
        h = fr.read_frame(data).header
        payload = 0
        for s in h.sections:
            kind = s.name.rsplit(".", 1)[-1]
            out[kind if kind in out else "framing"] += s.compressed_size
            payload += s.compressed_size
        out["framing"] += len(data) - payload
    return out


def measure(cal, alloc: Allocation, kv: KVCache) -> dict[str, float]:
    """Whole-context and block ratios of one text at one allocation, every token compressed."""
    codec = KVTCCodec(cal, alloc)
    n_blocks = kv.n_tokens // PAGE
    kv = kv.select_tokens(torch.arange(n_blocks * PAGE))
    ctx = codec.encode(kv, raw_mask=torch.zeros(kv.n_tokens, dtype=torch.bool))
    blocks = [kv.select_tokens(torch.arange(i * PAGE, (i + 1) * PAGE)) for i in range(n_blocks)]
    frames = [f for f, _ in codec.encode_batch(blocks, [torch.zeros(PAGE, dtype=torch.bool)] * n_blocks)]
    raw = kv.nbytes(2)
    ctx_r, blk_r = raw / len(ctx), raw / sum(map(len, frames))
    bs, cs = _bytes_by_stream(frames), _bytes_by_stream([ctx])
    t = kv.n_tokens
    return {
        "tokens": t,
        "context_ratio": round(ctx_r, 3),
        "block_ratio": round(blk_r, 3),
        "block_of_context": round(blk_r / ctx_r, 4),
        **{f"block_{k}_B_per_token": round(v / t, 2) for k, v in bs.items()},
        **{f"context_{k}_B_per_token": round(v / t, 2) for k, v in cs.items()},
    }


def distortion(cal, alloc: Allocation) -> float:
    """Weighted calibration error per token the allocation is expected to give (what the DP trades
    against bits), summed over bases."""
    err = predicted_error(cal.error_tables, alloc)
    return sum(cal.error_tables[n].weight * e for n, e in err.items())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--calibration", type=Path, default=None, help="artifact (default: the cached default)")
    p.add_argument("--targets", default="16,20")
    p.add_argument("--report", action="store_true", help="also GPL v3 and Hamlet (evaluation texts)")
    p.add_argument("--rederive", action="store_true", help="re-derive the block allocations here")
    p.add_argument(
        "--save",
        type=Path,
        default=None,
        help="with --rederive: write the calibration with every target's"
        " re-derived block allocation here (a new calibration id)",
    )
    p.add_argument("--cache", type=Path, default=Path("bench/results/cache/block_ratio"))
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()
    torch.set_num_threads(1)
    lm = CausalLM.load()
    cal = given_or_default(lm, a.calibration)
    texts, held = _texts(lm, a.cache, a.report)
    targets = [float(x) for x in a.targets.split(",")]
    allocs: dict[str, Allocation] = {}
    for t in targets:
        name = C.allocation_name(t)
        allocs[name] = cal.allocations[name]
        bname = C.block_allocation_name(t, PAGE)
        if bname in cal.allocations:
            allocs[bname] = cal.allocations[bname]
    if a.rederive:
        # the held-out mix calibration measured its allocations on (calibrate(), seq_len 1024)
        mixed = C.mixed_held_out(held, cal.config, 1024)
        saved, cal.allocations = cal.allocations, dict(cal.allocations)
        every = sorted({float(al.meta["target_cr"]) for al in saved.values()}) if a.save else targets
        C.block_allocations(cal, mixed, every, (PAGE,))
        for t in targets:
            name = C.block_allocation_name(t, PAGE)
            allocs[name + ":new"] = cal.allocations[name]
        if a.save is not None:
            from kvbm_codec.calibration.artifact import save_calibration

            old_id = cal.calibration_id
            cal.provenance["block_allocations_rederived_from"] = old_id
            print(f"saved {save_calibration(cal, a.save)} (from {old_id}) to {a.save}", flush=True)
        cal.allocations = saved
    rows = []
    bits = cal.config.scale_bits
    for name, alloc in allocs.items():
        for tname, (role, kv) in texts.items():
            row = {
                "allocation": name,
                "allocation_id": alloc.allocation_id,
                "nominal_bits_per_token": alloc.bits_per_token(bits),
                # the calibration's own distortion estimate (weighted as the allocator weighs it)
                "predicted_distortion": round(distortion(cal, alloc), 6),
                "text": tname,
                "role": role,
                **measure(cal, alloc, _fp16(C.compressible(kv, cal.config))),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    if a.json is not None:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"calibration_id": cal.calibration_id, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
