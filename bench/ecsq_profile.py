"""Where an entropy-coded (ecsq) batch of blocks spends its time: cProfile of one batched encode and
one batched decode of 63 real 32-token blocks (SmolLM2, GPL v3's first 2048 tokens), by own time.

    python bench/ecsq_profile.py --calibration /tmp/s26/ecsq_c.kvtc [--target 20] [--top 14]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from pathlib import Path

import torch

from kvbm_codec.calibration.artifact import load_calibration
from kvbm_codec.codec.kvtc import KVTCCodec
from kvbm_codec.models.hf import CausalLM

TEXT = Path(__file__).resolve().parents[1] / "kvbm_codec" / "data" / "gpl-3.0.txt"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calibration", type=Path, required=True)
    ap.add_argument("--target", type=float, default=20.0)
    ap.add_argument("--top", type=int, default=14)
    a = ap.parse_args()
    cal = load_calibration(a.calibration)
    lm = CausalLM.load()
    kv = lm.prefill_kv(lm.encode(TEXT.read_text())[:, :2048])
    codec = KVTCCodec(cal, a.target)
    blocks = [kv.select_tokens(torch.arange(s, s + 32)) for s in range(32, 2048, 32)]
    masks = [torch.zeros(32, dtype=torch.bool)] * len(blocks)
    frames = [f for f, _ in codec.encode_batch(blocks, masks)]
    codec.decode_batch(frames)  # warm: weights, layouts, tables
    for what, run in (
        ("encode", lambda: codec.encode_batch(blocks, masks)),
        ("decode", lambda: codec.decode_batch(frames)),
    ):
        prof = cProfile.Profile()
        prof.enable()
        t0 = time.perf_counter()
        run()
        dt = time.perf_counter() - t0
        prof.disable()
        print(f"{what}: {len(blocks)} blocks in {dt:.3f} s (under cProfile)")
        pstats.Stats(prof).sort_stats("tottime").print_stats(a.top)


if __name__ == "__main__":
    main()
