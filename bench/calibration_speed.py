"""Calibration speed, before vs after, side by side in one process on the same prefills.

"before" is the previous pipeline: torch (MKL) eigh, error tables recomputing each group's min/max for
every code width, and a full encode (projection included) per bisection step; "after" is the current
one. Both fit the same KV (one set of prefills, timed once), then each calibration is scored on a
held-out text at every target, so any change in quality shows next to the change in time.
Usage: python bench/calibration_speed.py [--model M] --text FILE --out bench/results/calibration_speed.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

import kvbm_codec.calibration.calibrate as calib
import kvbm_codec.codec.pca as pca
from kvbm_codec.calibration.calibrate import DEFAULT_TARGETS, calibrate_from_kv, token_sequences
from kvbm_codec.codec.config import CodecConfig
from kvbm_codec.codec.kvtc import KVTCCodec
from kvbm_codec.codec.quantize import dequantize_groups, quantize_groups
from kvbm_codec.eval.metrics import perplexity, top1_agreement
from kvbm_codec.models.hf import CausalLM
from kvbm_codec.texts import calibration_texts


def _legacy_eigh(cov: torch.Tensor, k: int, oversample: int = 128, iterations: int = 4) -> tuple:
    return torch.linalg.eigh(cov)


def _legacy_error_table(coeffs: torch.Tensor, group_sizes: tuple[int, ...], max_bits: int) -> dict:
    n_tokens, rank = coeffs.shape
    tables = {}
    for g in group_sizes:
        nblk = rank // g
        if nblk == 0:
            continue
        x = coeffs[:, : nblk * g].reshape(n_tokens, nblk, g).to(torch.float32)
        table = np.empty((max_bits + 1, nblk), dtype=np.float64)
        table[0] = (x.to(torch.float64) ** 2).sum(-1).mean(0).numpy()
        for bits in range(1, max_bits + 1):
            codes, shift, scale = quantize_groups(x, bits)
            err = (dequantize_groups(codes, shift, scale) - x).to(torch.float64) ** 2
            table[bits] = err.sum(-1).mean(0).numpy()
        tables[g] = table
    return tables


class _LegacyProbe:
    def __init__(self, cal: object, kv: object) -> None:
        self.cal, self.kv = cal, kv

    def measure(self, alloc: object) -> float:
        return calib.measure_ratio(self.cal, alloc, self.kv)  # type: ignore[arg-type]


@contextlib.contextmanager
def legacy() -> Iterator[None]:
    saved = (pca.top_eigenpairs, calib.block_error_table, calib.RatioProbe)
    pca.top_eigenpairs, calib.block_error_table, calib.RatioProbe = (  # type: ignore[assignment]
        _legacy_eigh,
        _legacy_error_table,
        _LegacyProbe,
    )
    try:
        yield
    finally:
        pca.top_eigenpairs, calib.block_error_table, calib.RatioProbe = saved  # type: ignore[assignment]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--text", type=Path, required=True, help="held-out text (not the calibration corpus)")
    p.add_argument("--fit-sequences", type=int, default=16)
    p.add_argument("--out", type=Path, default=Path("bench/results/calibration_speed.json"))
    a = p.parse_args()
    lm = CausalLM.load(a.model)
    seqs = token_sequences(lm.tokenizer, calibration_texts(), 1024, a.fit_sequences + 1)
    t0 = time.perf_counter()
    fit = [lm.prefill(s, return_logits=False)[0] for s in seqs[: a.fit_sequences]]
    held = lm.prefill(seqs[a.fit_sequences], return_logits=False)[0]
    prefill_s = time.perf_counter() - t0
    print(json.dumps({"prefill_s": round(prefill_s, 1), "sequences": a.fit_sequences + 1}), flush=True)

    ids = lm.tokenizer(a.text.read_text(), add_special_tokens=False, return_tensors="pt")["input_ids"]
    ctx, cont = ids[:, :2048], ids[:, 2048 : 2048 + 256]
    kv = lm.prefill(ctx, return_logits=False)[0]
    ref = lm.logits_with_cache(kv, cont)

    report: dict = {"model": a.model, "prefill_s": prefill_s, "runs": {}}
    for label in ("before", "after"):
        ctxm = legacy() if label == "before" else contextlib.nullcontext()
        clock = calib.PhaseClock(progress=False)
        with ctxm:
            t = time.perf_counter()
            cal = calibrate_from_kv(
                lm.info,
                fit,
                held,
                CodecConfig(distortion="mse"),
                targets=DEFAULT_TARGETS,
                progress=False,
                clock=clock,
            )
            total = time.perf_counter() - t
        rows = []
        for name in cal.allocations:
            codec = KVTCCodec(cal, name)
            frame, st = codec.encode_with_stats(kv)
            out = lm.logits_with_cache(codec.decode(frame).to(torch.float32), cont)
            pr, pt = perplexity(ref[:-1], cont[0, 1:]), perplexity(out[:-1], cont[0, 1:])
            rows.append(
                {
                    "allocation": name,
                    "allocation_id": cal.allocations[name].allocation_id,
                    "achieved_cr": round(st.achieved_cr, 2),
                    "ppl_increase_pct": round(100 * (pt / pr - 1), 2),
                    "top1": round(top1_agreement(ref[:-1], out[:-1]), 4),
                }
            )
        report["runs"][label] = {"non_prefill_s": total, "phases": clock.rounded(), "eval": rows}
        print(json.dumps({label: report["runs"][label]}), flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
