"""The block codec of this tree against the one of an earlier commit, side by side in one process.

Loads the codec modules (kvtc, block, frame, quantize, deflate, rope) of ``--base`` from git into a
private package, encodes the same real blocks with both and checks that frames and decoded blocks are
identical byte for byte, then times encode and decode of each, and the matmul roofline (the bench's
own, ``roofline_work``), in interleaved rounds, best of each, so that a load change on a shared
machine hits all of them alike:

    python bench/codec_ab.py --base 4bc005e --calibration CAL.kvtc --rounds 15 --json OUT.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

MODULES = ("kvtc", "block", "frame", "quantize", "deflate", "rope")
ROOT = Path(__file__).resolve().parents[1]


def load_base(rev: str, into: Path) -> Any:
    """The base revision's block codec module, its codec imports pointed at its own copies."""
    pkg = into / "basecodec"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    names = "|".join(MODULES)
    for m in MODULES:
        src = subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{rev}:kvbm_codec/codec/{m}.py"],
            check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip
        src = re.sub(rf"kvbm_codec\.codec\.({names})\b", r"basecodec.\1", src)
        src = src.replace("from kvbm_codec.codec import frame as fr", "import basecodec.frame as fr")
        src = src.replace("register_codec(CODEC_NAME, KVTCBlockCodec.create)", "")  # "kvtc" is taken
        (pkg / f"{m}.py").write_text(src)
    sys.path.insert(0, str(into))
    return importlib.import_module("basecodec.block"), importlib.import_module("basecodec.kvtc")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="git revision whose codec is the reference")
    ap.add_argument("--calibration", type=Path, required=True)
    ap.add_argument("--blocks", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument(
        "--batch",
        type=int,
        default=0,
        help="blocks per codec call (0: all); the first call holds the sinks",
    )
    ap.add_argument("--target-cr", type=float, default=20.0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from kvbm_codec.bench.throughput import decode_flop_per_byte, real_blocks, roofline_work
    from kvbm_codec.calibration.artifact import load_calibration
    from kvbm_codec.codec.block import KVTCBlockCodec
    from kvbm_codec.models.hf import CausalLM
    from kvbm_codec.service.config import ModelConfig

    torch.set_num_threads(1)
    lm = CausalLM.load()
    cal = load_calibration(args.calibration, expected_fingerprint=lm.info.fingerprint)
    spec = ModelConfig().block_spec(cal.shape)
    rb = real_blocks(lm, spec, args.blocks)
    new = KVTCBlockCodec.create(cal, spec, args.target_cr)
    with tempfile.TemporaryDirectory() as d:
        base_block, base_kvtc = load_base(args.base, Path(d))
        old = base_block.KVTCBlockCodec(base_kvtc.KVTCCodec(cal, new.codec.alloc), spec)
        blocks, pos, flags = rb.tensors, rb.positions, [True] * len(rb.tensors)
        step = args.batch or len(blocks)
        spans = [range(s, min(len(blocks), s + step)) for s in range(0, len(blocks), step)]

        def encode_all(codec: Any) -> list[bytes]:
            return [
                f
                for r in spans
                for f, _ in codec.encode_many(
                    [blocks[i] for i in r], [pos[i] for i in r], [flags[i] for i in r]
                )
            ]

        def decode_all(codec: Any, frames: list[bytes]) -> list[Any]:
            return [d for r in spans for d in codec.decode_many([frames[i] for i in r])]

        f_new = encode_all(new)
        f_old = encode_all(old)
        same_frames = f_new == f_old
        same_blocks = all(
            torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
            for a, b in zip(decode_all(new, f_new), decode_all(old, f_old), strict=True)
        )
        print(f"frames identical: {same_frames}; decoded blocks identical: {same_blocks}", flush=True)
        matmuls, flop = roofline_work(new.codec, len(blocks) * spec.page_size - cal.config.sink_tokens)
        runs = {
            "roofline": matmuls,
            "decode_base": lambda: decode_all(old, f_old),
            "decode_new": lambda: decode_all(new, f_new),
            "encode_base": lambda: encode_all(old),
            "encode_new": lambda: encode_all(new),
        }
        best = dict.fromkeys(runs, float("inf"))
        for _ in range(args.rounds):
            for k, fn in runs.items():
                t0 = time.perf_counter()
                fn()
                best[k] = min(best[k], time.perf_counter() - t0)
    gflops = flop / best["roofline"] / 1e9  # the best round, as for every other figure
    roof = {"gflops": gflops, "implied_decode_mbps": gflops * 1e3 / decode_flop_per_byte(new.codec)}
    nbytes = len(blocks) * spec.nbytes
    out: dict[str, Any] = {
        "base": args.base,
        "frames_identical": same_frames,
        "blocks_identical": same_blocks,
        "blocks": len(blocks),
        "batch": step,
    }
    out["roofline_gflops"], out["roofline_decode_mbps"] = roof["gflops"], roof["implied_decode_mbps"]
    for k in ("decode_base", "decode_new", "encode_base", "encode_new"):
        mbps = nbytes / best[k] / 1e6
        out[k] = {"mbps": mbps, "of_roofline": mbps / roof["implied_decode_mbps"]}
        print(f"{k:12} {mbps:7.1f} MB/s per core = {mbps / roof['implied_decode_mbps']:.0%} of roofline")
    out["decode_speedup"] = best["decode_base"] / best["decode_new"]
    out["encode_speedup"] = best["encode_base"] / best["encode_new"]
    print(f"roofline {roof['gflops']:.1f} GFLOP/s -> {roof['implied_decode_mbps']:.1f} MB/s; new / base: "
          f"decode {out['decode_speedup']:.3f}x, encode {out['encode_speedup']:.3f}x")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
