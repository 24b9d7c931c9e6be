"""Calibration speed of the default recipe, before vs after, side by side in one process on the same KV.

Both pipelines see the same prefills (the default broad corpus, attention-aware distortion, context
and 32-token block allocations): each fit sequence is prefilled once with the statistics hooks, and
its KV is streamed into both pipelines' covariance accumulators, each timed. Then each pipeline's
eigendecomposition, error tables and bit allocation run and are timed, and both calibrations are
scored on a validation text at every allocation, so any change in quality shows next to the change
in time. "before" is the previous pipeline: torch's general ``x.T @ x`` for the covariance products
and a cold lambda bisection (from [1e-12, 1e12]) for every context allocation; "after" is the
current one (numpy's symmetric ``a.T @ a``; bisection started from the nominal-ratio lambda).

Usage: python bench/calibration_speed.py [--model M] [--per-domain N] --text FILE --out J
(--per-domain N fits N sequences per domain instead of the default plan: the phases after the
prefill cost the same at any fit size, the covariance accumulation scales with it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import psutil
import torch

import kvbm_codec.calibration.calibrate as calib
from kvbm_codec.calibration.cache import corpus_texts
from kvbm_codec.calibration.corpus import FIT_SEQUENCES
from kvbm_codec.calibration.statistics import gather_statistics
from kvbm_codec.codec.allocation import allocate_for_ratio
from kvbm_codec.codec.config import CodecConfig
from kvbm_codec.codec.kvtc import KVTCCodec
from kvbm_codec.codec.params import Calibration, ModelShape, allocation_name
from kvbm_codec.codec.pca import CovarianceAccumulator
from kvbm_codec.eval.metrics import kl_divergence_mean, perplexity, top1_agreement
from kvbm_codec.models.hf import CausalLM


class _TorchProductAccumulator(CovarianceAccumulator):
    """The previous accumulator: the same centring and float64 sums, torch's general matmul."""

    @staticmethod
    def _gram(xc: torch.Tensor) -> torch.Tensor:
        return (xc.T @ xc).to(torch.float64)


def _cold_context_allocations(
    cal: Calibration, probe: calib.RatioProbe, targets: Sequence[float], progress: bool = False
) -> None:
    for target in targets:
        cal.allocations[allocation_name(target)] = allocate_for_ratio(
            cal.error_tables, target, cal.config.scale_bits, probe.measure
        )


@contextlib.contextmanager
def legacy() -> Iterator[None]:
    saved = (calib.CovarianceAccumulator, calib.context_allocations)
    calib.CovarianceAccumulator = _TorchProductAccumulator  # type: ignore[misc]
    calib.context_allocations = _cold_context_allocations
    try:
        yield
    finally:
        calib.CovarianceAccumulator, calib.context_allocations = saved  # type: ignore[misc]


@contextlib.contextmanager
def counting_encodes(counter: dict[str, int]) -> Iterator[None]:
    """Counts the probes' real encodes (the bisection steps)."""
    saved = (calib.RatioProbe.measure, calib.BlockRatioProbe.measure)

    def wrap(fn, key):  # type: ignore[no-untyped-def]
        def measured(self, alloc):  # type: ignore[no-untyped-def]
            counter[key] = counter.get(key, 0) + 1
            return fn(self, alloc)

        return measured

    calib.RatioProbe.measure = wrap(saved[0], "context")  # type: ignore[method-assign]
    calib.BlockRatioProbe.measure = wrap(saved[1], "block")  # type: ignore[method-assign]
    try:
        yield
    finally:
        calib.RatioProbe.measure, calib.BlockRatioProbe.measure = saved  # type: ignore[method-assign]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--text", type=Path, required=True, help="validation text (not a calibration text)")
    p.add_argument("--per-domain", type=int, default=None, help="fit sequences per domain (default: plan)")
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--continuation", type=int, default=256)
    p.add_argument("--out", type=Path, default=Path("bench/results/calibration_speed.json"))
    a = p.parse_args()
    lm = CausalLM.load(a.model)
    info, cfg = lm.info, CodecConfig()
    shape = ModelShape(info.n_layers, info.n_kv_heads, info.key_head_dim, info.value_head_dim)
    texts, corpus_name = corpus_texts(lm.tokenizer, "broad")
    assert isinstance(texts, dict)
    counts = {d: (a.per_domain if a.per_domain is not None else FIT_SEQUENCES[d]) for d in texts}
    by_domain = {d: calib.token_sequences(lm.tokenizer, t, 1024, counts[d] + 1) for d, t in texts.items()}
    fit = [s for d, seqs in by_domain.items() for s in seqs[: counts[d]]]
    load = [psutil.getloadavg()[0]]

    t0 = time.perf_counter()
    held = calib.mixed_held_out([lm.prefill_kv(seqs[counts[d]]) for d, seqs in by_domain.items()], cfg, 1024)
    prefill_s = time.perf_counter() - t0
    accs: dict[str, dict] = {"before": {}, "after": {}}
    cov_s = {"before": 0.0, "after": 0.0}
    n_q = int(lm.model.config.num_attention_heads)
    with gather_statistics(lm.model, n_q, info.key_head_dim) as stats:
        for i, seq in enumerate(fit):
            t0 = time.perf_counter()
            kv = lm.prefill_kv(seq)
            prefill_s += time.perf_counter() - t0
            order = ("before", "after") if i % 2 == 0 else ("after", "before")  # drift hits both alike
            for label in order:
                ctx = legacy() if label == "before" else contextlib.nullcontext()
                t0 = time.perf_counter()
                with ctx:
                    calib.accumulate_covariances([kv], cfg, info.rope, shape, into=accs[label])
                cov_s[label] += time.perf_counter() - t0
            if i % 10 == 0:
                load.append(psutil.getloadavg()[0])
    print(json.dumps({"prefills": len(fit) + len(texts), "prefill_s": round(prefill_s, 1), "cov_s": cov_s}))

    ids = lm.tokenizer(a.text.read_text(), add_special_tokens=False, return_tensors="pt")["input_ids"]
    ctx_ids = ids[:, : a.context]
    cont = ids[:, a.context : a.context + a.continuation]
    if cont.shape[1] < 16:
        raise SystemExit(f"{a.text} has {ids.shape[1]} tokens: too few for a {a.context}-token context")
    ref_kv = lm.prefill_kv(ctx_ids)
    ref = lm.logits_with_cache(ref_kv, cont)

    report: dict = {
        "model": a.model,
        "corpus": corpus_name,
        "fit_sequences": len(fit),
        "prefill_s": prefill_s,
        "validation_text": a.text.name,
        "continuation_tokens": int(cont.shape[1]),
        "threads": torch.get_num_threads(),
        "runs": {},
    }
    for label in ("before", "after"):
        ctx = legacy() if label == "before" else contextlib.nullcontext()
        clock = calib.PhaseClock(progress=False)
        encodes: dict[str, int] = {}
        with ctx, counting_encodes(encodes):
            t = time.perf_counter()
            cal = calib.calibrate_from_kv(
                info,
                accs[label],
                held,
                cfg,
                progress=False,
                clock=clock,
                statistics=stats,
                held_out_compressible=True,
                block_tokens=calib.DEFAULT_BLOCK_TOKENS,
            )
            total = time.perf_counter() - t
        load.append(psutil.getloadavg()[0])
        rows = []
        for name, alloc in cal.allocations.items():
            codec = KVTCCodec(cal, name)
            frame, st = codec.encode_with_stats(ref_kv)
            out = lm.logits_with_cache(codec.decode(frame).to(torch.float32), cont)
            pr, pt = perplexity(ref[:-1], cont[0, 1:]), perplexity(out[:-1], cont[0, 1:])
            rows.append(
                {
                    "allocation": name,
                    "allocation_id": alloc.allocation_id,
                    "lambda": alloc.meta.get("lambda"),
                    "calibration_cr": round(alloc.meta.get("calibration_cr", 0.0), 3),
                    "achieved_cr": round(st.achieved_cr, 2),
                    "ppl_increase_pct": round(100 * (pt / pr - 1), 2),
                    "top1": round(top1_agreement(ref[:-1], out[:-1]), 4),
                    "kl": round(kl_divergence_mean(ref[:-1], out[:-1]), 4),
                }
            )
        report["runs"][label] = {
            "covariance_s": cov_s[label],
            "after_prefill_s": total,
            "phases": clock.rounded(),
            "probe_encodes": encodes,
            "eval": rows,
        }
        print(json.dumps({label: report["runs"][label]}), flush=True)
    report["load_average_1m"] = load
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
