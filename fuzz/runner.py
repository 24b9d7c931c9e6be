"""Start atheris on one oracle: instrument kvbm_codec, load calibration + seeds, hand over to libFuzzer.

libFuzzer owns the command line (``-runs``, ``-timeout``, ``-max_total_time``, corpus dirs, ...).
Two settings come from the environment instead: ``KVBM_FUZZ_DIR`` (calibration + seeds, default
``<cache>/fuzz`` as written by ``python -m fuzz.build_corpus``) and ``KVBM_FUZZ_REPORT_EVERY``
(print the outcome counts every N executions, default 20000). libFuzzer exits without running
Python's atexit handlers, so counts are printed as the run goes, and at the last execution when
``-runs=N`` is given.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["kvbm_codec"]):
    from kvbm_codec.calibration.artifact import load_calibration
    from kvbm_codec.codec import deflate, ecsq, entropy, frame, kvtc, quantize  # noqa: F401  (instrumented here)

from fuzz.build_corpus import calibration_path, default_dir, seeds_dir
from fuzz.harness import DecodeOracle, ParseOracle


def _runs(argv: list[str]) -> int | None:
    for a in argv:
        if a.startswith("-runs="):
            return int(a.split("=", 1)[1])
    return None


def main(target: str) -> None:
    import torch

    torch.set_num_threads(1)  # single core: the box is shared, and decode must be deterministic
    root = Path(os.environ.get("KVBM_FUZZ_DIR", default_dir()))
    seeds = [p.read_bytes() for p in sorted(seeds_dir(root).glob("*.kvtc"))]
    if not seeds:
        sys.exit(f"no seeds in {seeds_dir(root)}: run `python -m fuzz.build_corpus` first")
    if target == "decode":
        cal = load_calibration(calibration_path(root))
        oracle: ParseOracle | DecodeOracle = DecodeOracle(kvtc.KVTCCodec(cal, 20.0), seeds)
    else:
        oracle = ParseOracle(seeds)
    every = int(os.environ.get("KVBM_FUZZ_REPORT_EVERY", "20000"))
    last = _runs(sys.argv)

    def one_input(data: bytes) -> None:
        oracle(data)
        if oracle.executions % every == 0 or oracle.executions == last:
            oracle.report()

    print(f"#kvbm-fuzz target={target} seeds={len(seeds)} dir={root}", file=sys.stderr, flush=True)
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
