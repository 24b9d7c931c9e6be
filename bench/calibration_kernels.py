"""The kernels behind the calibration phases after the prefill, timed on real SmolLM2 KV.

- the covariance product of one sequence's features for one basis: torch's ``x.T @ x`` against
  numpy's ``a.T @ a`` (a symmetric rank-k update), mean of 5 after a warm-up;
- the whole accumulation of a sequence (token selection, RoPE undo, features, centring, sums, the
  product) with the previous (torch) and the current (numpy) accumulator, interleaved, per round;
- one basis' eigendecomposition: numpy float64 (what runs), numpy float32, eigenvalues only, torch
  float64, and two numpy ones at once in two threads (does overlapping phases help on 2 cores?).

    python bench/calibration_kernels.py --out bench/results/calibration_kernels.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil
import torch

sys.path.insert(0, str(Path(__file__).parent))
import calibration_speed as speed

import kvbm_codec.calibration.calibrate as calib
from kvbm_codec.calibration.cache import corpus_texts
from kvbm_codec.codec.config import CodecConfig
from kvbm_codec.codec.params import ModelShape
from kvbm_codec.codec.pca import to_features
from kvbm_codec.codec.rope import undo_rope
from kvbm_codec.models.hf import CausalLM


def mean_time(fn: Callable[[], object], n: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sequences", type=int, default=4)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--out", type=Path, default=Path("bench/results/calibration_kernels.json"))
    a = p.parse_args()
    lm = CausalLM.load("smollm2-135m")
    info, cfg = lm.info, CodecConfig()
    shape = ModelShape(info.n_layers, info.n_kv_heads, info.key_head_dim, info.value_head_dim)
    texts, _ = corpus_texts(lm.tokenizer, "broad")
    assert isinstance(texts, dict)
    kvs = [lm.prefill_kv(s) for s in calib.token_sequences(lm.tokenizer, texts["docs"], 1024, a.sequences)]
    out: dict = {"threads": torch.get_num_threads(), "load_average_1m": [psutil.getloadavg()[0]]}

    kv = calib.compressible(kvs[0], cfg)
    a0, b0 = cfg.layer_groups(shape.n_layers)[0]
    f = to_features(undo_rope(kv.keys, kv.positions, info.rope)[a0:b0]).contiguous()
    x = f.numpy()
    out["product_s"] = {
        "features": list(f.shape),
        "torch": mean_time(lambda: (f.T @ f).to(torch.float64), 5),
        "numpy": mean_time(lambda: x.T @ x, 5),
    }
    per_seq: dict[str, list[float]] = {"before": [], "after": []}
    for r in range(a.rounds):
        for label in ("before", "after") if r % 2 == 0 else ("after", "before"):
            ctx = speed.legacy() if label == "before" else contextlib.nullcontext()
            t = time.perf_counter()
            with ctx:
                accs = calib.accumulate_covariances(kvs, cfg, info.rope, shape)
            per_seq[label].append((time.perf_counter() - t) / len(kvs))
    out["accumulate_s_per_sequence"] = {
        k: {"rounds": v, "median": statistics.median(v)} for k, v in per_seq.items()
    }
    cov = accs[calib.basis_name(0, "k")].covariance()[1].numpy()

    def two_at_once() -> None:
        threads = [threading.Thread(target=np.linalg.eigh, args=(cov,)) for _ in range(2)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()

    out["eigh_s"] = {
        "dim": cov.shape[0],
        "numpy_float64": mean_time(lambda: np.linalg.eigh(cov), 2),
        "numpy_float32": mean_time(lambda: np.linalg.eigh(cov.astype(np.float32)), 2),
        "numpy_eigvalsh_float64": mean_time(lambda: np.linalg.eigvalsh(cov), 2),
        "torch_float64": mean_time(lambda: torch.linalg.eigh(torch.from_numpy(cov)), 1),
        "numpy_float64_two_threads_each": mean_time(two_at_once, 2) / 2,
    }
    out["load_average_1m"].append(psutil.getloadavg()[0])
    print(json.dumps(out, indent=2))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
