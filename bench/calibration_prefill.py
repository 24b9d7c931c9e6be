"""Where the calibration prefill's time goes, and what each saving is worth, measured side by side.

Variants, run round-robin on the same 1024-token sequences of the default corpus (so load drift on a
shared machine hits every variant alike), each timed in wall and CPU seconds:

- ``logits_all``: prefill with the LM head over every position (what a plain forward pass does);
- ``logits_last``: ``prefill(return_logits=False)``, the LM head on the last position only (the
  calibration prefill before ``prefill_kv``);
- ``kv_only``: ``prefill_kv``, which stops once the last layer has stored its KV (no last-layer
  attention/MLP, final norm or LM head);
- ``kv_only+stats``: with the attention-statistics hooks of the default distortion;
- ``kv_only+stats+cov``: plus the covariance accumulation: the calibration's whole fit step;
- ``kv_only@2threads``: ``kv_only`` with two torch threads.

Every other variant runs on ``--threads`` (default 1) torch threads: on a machine shared with other
jobs a descheduled OpenMP thread leaves its partner spinning at the barrier, which inflates the
CPU-seconds of multi-threaded runs by an amount that varies with the load; one thread keeps the
CPU-seconds comparable between variants (and is what an idle 2-core machine's wall time divides).

    python bench/calibration_prefill.py --rounds 4 --out bench/results/calibration_prefill.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from kvbm_codec.calibration.calibrate import accumulate_covariances, token_sequences
from kvbm_codec.calibration.corpus import broad_corpus
from kvbm_codec.calibration.statistics import gather_statistics
from kvbm_codec.codec.config import CodecConfig
from kvbm_codec.codec.params import ModelShape
from kvbm_codec.models.hf import CausalLM

SEQ = 1024


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rounds", type=int, default=4, help="sequences; every variant runs once on each")
    p.add_argument("--threads", type=int, default=1, help="torch threads of every variant but @2threads")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    lm = CausalLM.load(a.model)
    info = lm.info
    seqs = token_sequences(lm.tokenizer, broad_corpus(lm.tokenizer)["docs"], SEQ, a.rounds)
    cfg = CodecConfig()
    shape = ModelShape(info.n_layers, info.n_kv_heads, info.key_head_dim, info.value_head_dim)
    n_q = int(lm.model.config.num_attention_heads)
    threads = torch.get_num_threads()

    def stats_run(s: torch.Tensor, cov: bool) -> None:
        with gather_statistics(lm.model, n_q, info.key_head_dim):
            kv = lm.prefill_kv(s)
            if cov:
                accumulate_covariances([kv], cfg, info.rope, shape)

    def two_threads(s: torch.Tensor) -> None:
        torch.set_num_threads(2)
        try:
            lm.prefill_kv(s)
        finally:
            torch.set_num_threads(threads)

    variants: dict[str, Callable[[torch.Tensor], object]] = {
        "logits_all": lambda s: lm.prefill(s, return_logits=True),
        "logits_last": lambda s: lm.prefill(s, return_logits=False),
        "kv_only": lm.prefill_kv,
        "kv_only+stats": lambda s: stats_run(s, False),
        "kv_only+stats+cov": lambda s: stats_run(s, True),
        "kv_only@2threads": two_threads,
    }
    lm.prefill_kv(seqs[0][:, :64])  # warm-up: first-call allocations
    rows: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
    load = [os.getloadavg()[0]]
    for r, s in enumerate(seqs):
        order = list(variants)
        order = order[r % len(order) :] + order[: r % len(order)]  # rotate: no variant always goes first
        for name in order:
            w, c = time.perf_counter(), time.process_time()
            variants[name](s)
            rows[name].append((time.perf_counter() - w, time.process_time() - c))
        load.append(os.getloadavg()[0])
        print(f"round {r + 1}/{len(seqs)} done, load {load[-1]:.1f}", flush=True)

    def summary(name: str) -> dict[str, float]:
        wall = [x[0] for x in rows[name]]
        cpu = [x[1] for x in rows[name]]
        return {
            "wall_s_median": statistics.median(wall),
            "cpu_s_median": statistics.median(cpu),
            "tokens_per_cpu_s": SEQ / statistics.median(cpu),
        }

    res = {k: summary(k) for k in variants}
    base = res["logits_last"]
    for v in res.values():
        v["cpu_vs_logits_last"] = v["cpu_s_median"] / base["cpu_s_median"]
        v["wall_vs_logits_last"] = v["wall_s_median"] / base["wall_s_median"]
    out = {
        "model": a.model,
        "torch_threads": threads,
        "load_average_1m": load,
        "rounds": len(seqs),
        "per_1024_tokens": res,
        "raw": rows,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2))
    print(json.dumps({k: out[k] for k in ("model", "torch_threads", "load_average_1m")}), flush=True)
    for k, v in res.items():
        print(
            f"{k:20s} wall {v['wall_s_median']:6.2f} s ({v['wall_vs_logits_last']:.3f}x)  "
            f"cpu {v['cpu_s_median']:6.2f} s ({v['cpu_vs_logits_last']:.3f}x)",
            flush=True,
        )


if __name__ == "__main__":
    main()
