"""What the calibration's fit phase costs per sequence, and what a corpus plan therefore needs.

Calibration time is dominated by its prefills (docs/benchmarks.md, "Calibration speed"), so the
2-minute target and the corpus size trade directly. This measures, on the real model and the
default corpus' first sequences, the CPU-seconds and wall seconds of (a) a plain 1024-token prefill
and (b) the calibration's own fit step (the KV-only prefill with the attention-aware statistics hooks,
plus the covariance accumulation), and projects the fit + held-out prefill phase for a plan of sequences
onto an idle machine (CPU-seconds / cores). CPU-seconds are what a loaded machine does not inflate
much; the wall times are printed with the load average they were measured under.

    python bench/calibration_budget.py --sequences 3 --out bench/results/calibration_budget.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from kvbm_codec.calibration.cache import DEFAULT_FIT_SEQUENCES
from kvbm_codec.calibration.calibrate import accumulate_covariances, token_sequences
from kvbm_codec.calibration.corpus import FIT_SEQUENCES, broad_corpus
from kvbm_codec.calibration.statistics import gather_statistics
from kvbm_codec.codec.config import CodecConfig
from kvbm_codec.codec.params import ModelShape
from kvbm_codec.models.hf import CausalLM

SEQ = 1024


def _timed(fn) -> tuple[float, float]:
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--sequences", type=int, default=3, help="sequences timed per variant")
    p.add_argument("--cores", type=int, default=2, help="cores of the machine the projection is for")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    lm = CausalLM.load(a.model)
    info = lm.info
    seqs = token_sequences(lm.tokenizer, broad_corpus(lm.tokenizer)["docs"], SEQ, a.sequences)
    cfg = CodecConfig()
    shape = ModelShape(info.n_layers, info.n_kv_heads, info.key_head_dim, info.value_head_dim)
    lm.prefill(seqs[0][:, :64], return_logits=False)  # warm-up: first-call allocations
    load0 = os.getloadavg()[0]
    plain = [_timed(lambda s=s: lm.prefill(s, return_logits=False)) for s in seqs]
    n_q = int(lm.model.config.num_attention_heads)
    fit = []
    with gather_statistics(lm.model, n_q, info.key_head_dim):
        for s in seqs:
            fit.append(_timed(lambda s=s: accumulate_covariances([lm.prefill_kv(s)], cfg, info.rope, shape)))
    load1 = os.getloadavg()[0]

    def per_seq(rows: list[tuple[float, float]]) -> dict[str, float]:
        return {"wall_s": sum(r[0] for r in rows) / len(rows), "cpu_s": sum(r[1] for r in rows) / len(rows)}

    plain_s, fit_s = per_seq(plain), per_seq(fit)
    plans = {
        "broad default (66 fit + 6 held-out)": (sum(FIT_SEQUENCES.values()), len(FIT_SEQUENCES)),
        "pydoc (16 fit + 1 held-out)": (DEFAULT_FIT_SEQUENCES["pydoc"], 1),
        **{f"broad, {k} per domain ({6 * k} fit + 6 held-out)": (6 * k, 6) for k in (2, 3, 4, 6)},
    }
    projection = {
        name: {
            "fit_sequences": n_fit,
            "tokens": (n_fit + n_held) * SEQ,
            "idle_s_on_cores": (n_fit * fit_s["cpu_s"] + n_held * plain_s["cpu_s"]) / a.cores,
        }
        for name, (n_fit, n_held) in plans.items()
    }
    out = {
        "model": a.model,
        "torch_threads": torch.get_num_threads(),
        "load_average_1m": [load0, load1],
        "plain_prefill_per_1024": plain_s,
        "fit_step_per_1024": fit_s,
        "plain_prefill_tokens_per_cpu_s": SEQ / plain_s["cpu_s"],
        "cores": a.cores,
        "projection": projection,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=1), flush=True)


if __name__ == "__main__":
    main()
