"""The measurement behind `kvbm-codec eval` and `demo`: compress a real context's KV, restore it,
continue the text teacher-forced, and compare against the uncompressed model on the same tokens.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kvbm_codec.codec.kvtc import EncodeStats, KVTCCodec, default_raw_mask
from kvbm_codec.codec.params import Calibration
from kvbm_codec.eval.metrics import kl_divergence_mean, perplexity, top1_agreement
from kvbm_codec.kv import KVCache


@dataclass
class EvalResult:
    model: str
    calibration_id: str
    allocation_id: str
    target_cr: float
    achieved_cr: float  # compressed tokens only: fp16 bytes / frame bytes (headers included)
    achieved_cr_total: float  # sinks and window counted, stored fp16 inside the frame
    ppl_baseline: float
    ppl_codec: float
    ppl_increase_pct: float
    top1_agreement: float
    kl_mean: float
    context_tokens: int
    continuation_tokens: int
    compressed_tokens: int
    raw_tokens: int
    frame_bytes: int
    fp16_bytes: int
    key_rel_mse: float
    value_rel_mse: float
    encode_s: float
    restore_s: float
    prefill_s: float
    restore_speedup: float  # prefill time / restore time, same machine, same run

    def as_dict(self) -> dict:
        return asdict(self)


def relative_mse(ref: torch.Tensor, test: torch.Tensor) -> float:
    ref = ref.to(torch.float64)
    return float(((test.to(torch.float64) - ref) ** 2).sum() / (ref**2).sum().clamp_min(1e-30))


@dataclass
class RoundTrip:
    """One context through the codec and back, timed: what the eval and the demo both report."""

    codec: KVTCCodec
    frame: bytes
    stats: EncodeStats
    restored: KVCache
    encode_s: float
    restore_s: float


def context_codec(cal: Calibration, target_cr: float, kv: KVCache) -> KVTCCodec:
    """The codec for one whole-context frame of ``kv`` (default sinks and window kept exact): at the
    allocation sized on frames of its compressed length (``Calibration.context_allocation``), so a
    short context meets the target too and a long one does not overshoot it."""
    cfg = cal.config
    n = int((~default_raw_mask(kv.positions, cfg.sink_tokens, cfg.window_tokens)).sum())
    return KVTCCodec(cal, cal.context_allocation(target_cr, n))


def round_trip(cal: Calibration, target_cr: float, kv: KVCache) -> RoundTrip:
    codec = context_codec(cal, target_cr, kv)
    t0 = time.perf_counter()
    frame, stats = codec.encode_with_stats(kv)
    encode_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    restored = codec.decode(frame)
    return RoundTrip(codec, frame, stats, restored, encode_s, time.perf_counter() - t0)


def timed_prefill(lm: object, ids: torch.Tensor) -> tuple[KVCache, float]:
    t0 = time.perf_counter()
    kv, _ = lm.prefill(ids, return_logits=False)  # type: ignore[attr-defined]
    return kv, time.perf_counter() - t0


def run_eval(
    lm: object,
    cal: Calibration,
    text: str,
    target_cr: float,
    *,
    context_tokens: int = 2048,
    continuation_tokens: int = 256,
    save_frames: Path | None = None,
) -> EvalResult:
    ids = lm.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]  # type: ignore[attr-defined]
    need = context_tokens + continuation_tokens
    if ids.shape[1] < need:
        raise ValueError(f"text has {ids.shape[1]} tokens, eval needs {need} (context + continuation)")
    ctx, cont = ids[:, :context_tokens], ids[:, context_tokens:need]
    kv, prefill_s = timed_prefill(lm, ctx)

    rt = round_trip(cal, target_cr, kv)
    codec, frame, stats, restored = rt.codec, rt.frame, rt.stats, rt.restored
    encode_s, restore_s = rt.encode_s, rt.restore_s
    if save_frames is not None:
        save_frames.mkdir(parents=True, exist_ok=True)
        (save_frames / f"context{context_tokens}-cr{target_cr:g}.kvtc").write_bytes(frame)

    ref_logits = lm.logits_with_cache(kv, cont)  # type: ignore[attr-defined]
    test_logits = lm.logits_with_cache(restored.to(torch.float32), cont)  # type: ignore[attr-defined]
    targets = cont[0, 1:]
    mask = ~default_raw_mask(kv.positions, cal.config.sink_tokens, cal.config.window_tokens)
    ppl_ref = perplexity(ref_logits[:-1], targets)
    ppl_test = perplexity(test_logits[:-1], targets)
    return EvalResult(
        model=cal.model_name,
        calibration_id=cal.calibration_id,
        allocation_id=codec.alloc.allocation_id,
        target_cr=target_cr,
        achieved_cr=stats.achieved_cr,
        achieved_cr_total=stats.achieved_cr_total,
        ppl_baseline=ppl_ref,
        ppl_codec=ppl_test,
        ppl_increase_pct=100.0 * (ppl_test / ppl_ref - 1.0),
        top1_agreement=top1_agreement(ref_logits[:-1], test_logits[:-1]),
        kl_mean=kl_divergence_mean(ref_logits[:-1], test_logits[:-1]),
        context_tokens=context_tokens,
        continuation_tokens=continuation_tokens,
        compressed_tokens=stats.compressed_tokens,
        raw_tokens=stats.raw_tokens,
        frame_bytes=stats.frame_bytes,
        fp16_bytes=kv.nbytes(2),
        key_rel_mse=relative_mse(kv.keys[:, :, mask], restored.keys[:, :, mask]),
        value_rel_mse=relative_mse(kv.values[:, :, mask], restored.values[:, :, mask]),
        encode_s=encode_s,
        restore_s=restore_s,
        prefill_s=prefill_s,
        restore_speedup=prefill_s / restore_s,
    )
