"""What ``KVBM_CODEC_FP32_MATMUL=bf16`` trades on a CPU whose oneDNN bf16 path rounds the operands (AMX):
the codec's own speed against the accuracy the model feels, side by side in one process.

Per validation text (never a held-out one) and target: one whole-context frame written on the
exact path (``ieee``) and one written with bf16 math (``bf16``, whatever this CPU gives: the row
says ``bf16-rounded`` or ``onednn-bf16``), each decoded on its own path and scored on the exact
path (teacher-forced continuation: KL, top-1 agreement, perplexity against the uncompressed cache);
the rounding's own share (the two decodes' difference over the codec's error); encode and decode
on one thread, the two modes interleaved, best of ``--repeats`` after a warm-up.

    python bench/bf16_codec.py --val apache,tempest --targets 8,16,20,32 \
        --out bench/results/bf16_codec_s23.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from kvbm_codec.bench.throughput import _best  # warm-up, then the best of n (as bench throughput)
from kvbm_codec.calibration.cache import given_or_default
from kvbm_codec.codec.kvtc import KVTCCodec, default_raw_mask
from kvbm_codec.core.matmul import configure_fp32_matmul, native_bf16
from kvbm_codec.eval.metrics import kl_divergence_mean, perplexity, top1_agreement
from kvbm_codec.eval.run import context_codec, relative_mse
from kvbm_codec.kv import KVCache
from kvbm_codec.models.hf import CausalLM

VALIDATION = {"apache": Path("/usr/share/common-licenses/Apache-2.0")}


def _text(name: str, texts_dir: Path) -> str:
    path = VALIDATION.get(name, texts_dir / f"{name}.txt")
    return path.read_text(encoding="utf-8", errors="replace")


def _sq_diff(a: KVCache, b: KVCache, kind: str, mask: torch.Tensor) -> float:
    """Squared difference of a's and b's keys or values over the tokens ``mask`` selects."""
    return float((getattr(a, kind)[:, :, mask] - getattr(b, kind)[:, :, mask]).pow(2).sum())


def _timed_frames(codec: KVTCCodec, kv: KVCache, repeats: int, out: dict[str, dict]) -> tuple[dict, dict]:
    """Each mode's frame, and its (encode, decode) seconds on one thread per interleaved round: the
    machine's drift hits both modes alike."""
    frames: dict[str, bytes] = {}
    times: dict[str, list[tuple[float, float]]] = {"ieee": [], "bf16": []}
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            for _ in range(repeats):
                for mode in ("ieee", "bf16"):
                    out.setdefault(mode, {"in_effect": configure_fp32_matmul(mode)})
                    frames[mode] = frame = codec.encode(kv)
                    enc = _best(lambda: codec.encode(kv), 1)
                    dec = _best(lambda frame=frame: codec.decode(frame), 1)
                    times[mode].append((enc, dec))
    finally:
        torch.set_num_threads(prev)
        configure_fp32_matmul("ieee")
    return frames, times


def _print_row(name: str, target: float, i: dict, b: dict) -> None:
    r = b["rounding_over_codec_error"]
    print(
        f"{name:8s} {target:4.0f}x cr {i['cr_total']:.2f}/{b['cr_total']:.2f} "
        f"KL {i['kl']:.4f}/{b['kl']:.4f} top1 {i['top1']:.3f}/{b['top1']:.3f} "
        f"ppl {i['ppl_pct']:+.2f}/{b['ppl_pct']:+.2f}% "
        f"rounding/codec err K {r['keys']:.1e} V {r['values']:.1e} "
        f"encode {i['encode_mbps']:.0f}->{b['encode_mbps']:.0f} MB/s ({i['encode_s'] / b['encode_s']:.2f}x) "
        f"decode {i['decode_mbps']:.0f}->{b['decode_mbps']:.0f} ({i['decode_s'] / b['decode_s']:.2f}x) "
        f"[{b['in_effect']}]",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--val", default="apache,tempest")
    ap.add_argument(
        "--texts-dir", type=Path, default=Path("/tmp/kvbm-codec-texts"), help="bench/fetch_texts.sh"
    )
    ap.add_argument("--targets", default="8,16,20,32")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--continuation", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--calibration", type=Path, default=None, help="default: the registry's (or calibrate)")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    if not native_bf16():
        raise SystemExit("no native bf16 on this CPU: 'bf16' keeps the default path, nothing to compare")
    configure_fp32_matmul("ieee")
    lm = CausalLM.load()
    cal = given_or_default(lm, a.calibration)
    rows = []
    for name in a.val.split(","):
        ids = lm.encode(_text(name, a.texts_dir))[:, : a.context + a.continuation]
        ctx, cont = ids[:, : a.context], ids[:, a.context :]
        configure_fp32_matmul("ieee")
        kv = lm.prefill_kv(ctx)
        ref = lm.logits_with_cache(kv, cont)[:-1]
        targets = cont[0, 1:]
        ppl_ref = perplexity(ref, targets)
        mask = ~default_raw_mask(kv.positions, cal.config.sink_tokens, cal.config.window_tokens)
        for target in (float(t) for t in a.targets.split(",")):
            codec = context_codec(cal, target, kv)
            out: dict[str, dict] = {}
            frames, times = _timed_frames(codec, kv, a.repeats, out)
            decoded = {}
            for mode in ("ieee", "bf16"):
                configure_fp32_matmul(mode)
                decoded[mode] = codec.decode(frames[mode]).to(torch.float32)
            configure_fp32_matmul("ieee")
            err = {kind: _sq_diff(decoded["ieee"], kv, kind, mask) for kind in ("keys", "values")}
            for mode in ("ieee", "bf16"):
                rec = decoded[mode]
                logits = lm.logits_with_cache(rec, cont)[:-1]
                enc = min(t[0] for t in times[mode])
                dec = min(t[1] for t in times[mode])
                fp16_mb = kv.nbytes(2) / 1e6
                out[mode] |= {
                    "frame_bytes": len(frames[mode]),
                    "cr_total": kv.nbytes(2) / len(frames[mode]),
                    "kl": kl_divergence_mean(ref, logits),
                    "top1": top1_agreement(ref, logits),
                    "ppl_pct": 100 * (perplexity(logits, targets) / ppl_ref - 1),
                    "key_rel_mse": relative_mse(kv.keys[:, :, mask], rec.keys[:, :, mask]),
                    "value_rel_mse": relative_mse(kv.values[:, :, mask], rec.values[:, :, mask]),
                    "rounding_over_codec_error": {
                        kind: _sq_diff(rec, decoded["ieee"], kind, mask) / err[kind]
                        for kind in ("keys", "values")
                    },
                    "encode_s": enc,
                    "decode_s": dec,
                    "encode_mbps": fp16_mb / enc,
                    "decode_mbps": fp16_mb / dec,
                }
            row = {"val": name, "target": target, **out}
            rows.append(row)
            _print_row(name, target, out["ieee"], out["bf16"])
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"calibration_id": cal.calibration_id, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
