"""What a second Python thread buys on this machine: plain matmuls, small torch ops, and the batched
block codec split in halves (as ``core/parallel.BatchSplitter`` does) or given 2 torch intra-op threads.

One torch thread per Python thread unless said; each figure the best of ``--repeats`` after a
warm-up (the throughput bench's ``_best``). Real SmolLM2 blocks of the bench's text, the default
calibration's 20x block codec.

    python bench/two_threads.py --json bench/results/two_threads_s23.json
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from kvbm_codec.bench.throughput import _best, real_blocks
from kvbm_codec.calibration.cache import given_or_default
from kvbm_codec.codec.block import KVTCBlockCodec
from kvbm_codec.core.matmul import configure_fp32_matmul
from kvbm_codec.models.hf import CausalLM
from kvbm_codec.service.config import ModelConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--json", type=Path, required=True)
    a = ap.parse_args()
    mode = configure_fp32_matmul()
    torch.set_num_threads(1)
    pool = ThreadPoolExecutor(1)

    def pair(fn):  # type: ignore[no-untyped-def]
        """fn on this thread and on a helper at once."""

        def both() -> None:
            f = pool.submit(fn)
            fn()
            f.result()

        return both

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(1024, 1920, generator=g), torch.randn(1920, 1400, generator=g)
    small = torch.randn(96, 64, generator=g)

    def matmuls() -> None:
        for _ in range(20):
            x @ w

    def small_ops() -> None:
        for _ in range(20_000):
            (small * 2).clamp_(-1, 1)

    lm = CausalLM.load()
    cal = given_or_default(lm, None)
    spec = ModelConfig().block_spec(cal.shape)
    rb = real_blocks(lm, spec, 64)
    codec = KVTCBlockCodec.create(cal, spec, 20.0)
    blocks, pos = rb.tensors[8:16], rb.positions[8:16]  # 8 blocks without the attention sinks
    frames = [f for f, _ in codec.encode_many(blocks, pos, [True] * 8)]

    def enc(lo: int, hi: int) -> object:
        return codec.encode_many(blocks[lo:hi], pos[lo:hi], [True] * (hi - lo))

    def dec(lo: int, hi: int) -> object:
        return codec.decode_many(frames[lo:hi])

    def halves(fn):  # type: ignore[no-untyped-def]
        def run() -> None:
            f = pool.submit(fn, 4, 8)
            fn(0, 4)
            f.result()

        return run

    r = a.repeats
    ms = {
        "matmuls_one_thread": _best(matmuls, r),
        "matmuls_two_threads": _best(pair(matmuls), r),
        "small_ops_one_thread": _best(small_ops, r),
        "small_ops_two_threads": _best(pair(small_ops), r),
        "encode_8_one_call": _best(lambda: enc(0, 8), r),
        "encode_8_two_halves": _best(halves(enc), r),
        "decode_8_one_call": _best(lambda: dec(0, 8), r),
        "decode_8_two_halves": _best(halves(dec), r),
    }
    torch.set_num_threads(2)  # for the whole measurement: switching per call costs a thread-pool resize
    ms["encode_8_two_intra_op_threads"] = _best(lambda: enc(0, 8), r)
    ms["decode_8_two_intra_op_threads"] = _best(lambda: dec(0, 8), r)
    torch.set_num_threads(1)
    ms = {k: v * 1e3 for k, v in ms.items()}
    scaling = {
        "matmuls": 2 * ms["matmuls_one_thread"] / ms["matmuls_two_threads"],
        "small_ops": 2 * ms["small_ops_one_thread"] / ms["small_ops_two_threads"],
        **{
            f"{op}_{how}": ms[f"{op}_8_one_call"] / ms[f"{op}_8_two_{how}"]
            for op in ("encode", "decode")
            for how in ("halves", "intra_op_threads")
        },
    }
    for k, v in ms.items():
        print(f"{k:32s} {v:8.2f} ms")
    for k, v in scaling.items():
        print(f"scaling {k:24s} {v:.2f}x")
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps({"fp32_matmul": mode, "ms": ms, "scaling": scaling}, indent=1))
    pool.shutdown()


if __name__ == "__main__":
    main()
