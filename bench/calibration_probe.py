"""The sensitivity probe's execution, before vs after, side by side on the same inputs: the
straightforward path (a second prefill of each context, then one whole continuation per variant) and
the layerwise one (the context KV sliced from the sequence's own prefill, layer l's variants run from
layer l on, batched), rounds alternated so load drift hits both alike; wall seconds and the largest
relative difference between their KLs.

Inputs are real: SmolLM2 (or --model), the small test calibration's 20x allocation, 1024-token
sequences of the pydoc calibration text past that calibration's fit sequences, a flat metric (the
predicted cost does not enter the timing or the KLs).

    python bench/calibration_probe.py --sequences 3 --layer-step 3 --rounds 2 \
        --out bench/results/calibration_probe.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from kvbm_codec.calibration.calibrate import calibrate_small, token_sequences
from kvbm_codec.calibration.sensitivity import PROBE_BATCH_ROWS, measure_layer_sensitivity
from kvbm_codec.codec.kvtc import KVTCCodec
from kvbm_codec.models.hf import CausalLM
from kvbm_codec.texts import calibration_texts


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--sequences", type=int, default=3)
    p.add_argument("--layer-step", type=int, default=3, help="probe every n-th layer (1: all)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--continuation", type=int, default=64)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    lm = CausalLM.load(a.model)
    cal = calibrate_small(lm)
    seqs = token_sequences(lm.tokenizer, calibration_texts(), 1024, 4 + a.sequences)[4:]
    groups = cal.config.layer_groups(lm.info.n_layers)
    flat = {n: (torch.ones(b.dim, dtype=torch.float64), 1.0) for n, b in cal.bases.items()}
    codec = KVTCCodec(cal, 20.0)
    layers = list(range(0, lm.info.n_layers, a.layer_step))
    full = [lm.prefill_kv(s) for s in seqs]  # the held-out prefill calibration has already done

    def plain() -> dict[str, torch.Tensor]:
        return measure_layer_sensitivity(
            lm, codec, flat, groups, seqs, continuation=a.continuation, layers=layers, layerwise=False
        )

    def fast() -> dict[str, torch.Tensor]:
        return measure_layer_sensitivity(
            lm, codec, flat, groups, seqs, continuation=a.continuation, layers=layers, prefilled=full
        )

    times: dict[str, list[float]] = {"straightforward": [], "layerwise": []}
    results: dict[str, dict[str, torch.Tensor]] = {}
    load = [os.getloadavg()[0]]
    for r in range(a.rounds):
        order = [("layerwise", fast), ("straightforward", plain)]
        for name, fn in order if r % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - t0)
        load.append(os.getloadavg()[0])
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in times.items()), flush=True)
    a_kl, b_kl = results["straightforward"]["kl"][layers], results["layerwise"]["kl"][layers]
    res = {
        "model": a.model,
        "sequences": a.sequences,
        "layers": layers,
        "rows_per_forward": min(PROBE_BATCH_ROWS, 2 * a.sequences),
        "load_average_1m": load,
        "seconds": times,
        "speedup_per_round": [
            s / f for s, f in zip(times["straightforward"], times["layerwise"], strict=True)
        ],
        "max_rel_kl_diff": float(((a_kl - b_kl).abs() / a_kl.abs()).max()),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
