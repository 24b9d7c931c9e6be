"""The S3 position search of a base revision vs this tree's, side by side on the same real blocks.

Loads ``kvbm_codec/codec/positions.py`` of ``--base`` from git as its own module, then on the blocks
``bench throughput`` uses (the first 1024 tokens of the demo text as 32 blocks, default calibration
unless ``--calibration``): checks both find the same first positions (and key residuals / energies
within float rounding) on real keys, on values read as keys and on noise, and times both searches
and a batch-8 encode in interleaved rounds, one thread, batches of 8 as the endpoint places
concurrent PUTs (each round converts the batch's keys from fp16 as ``Bucket._part`` does).

    python bench/position_search_ab.py --base 0dc58a3 --rounds 6 --json OUT.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def load_base(rev: str, into: Path) -> object:
    src = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{rev}:kvbm_codec/codec/positions.py"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    path = into / "base_positions.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("base_positions", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["base_positions"] = mod
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True)
    ap.add_argument("--calibration", type=Path, default=None)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()

    from kvbm_codec.api.blocks import BlockSpec
    from kvbm_codec.bench.throughput import _best as best
    from kvbm_codec.bench.throughput import real_blocks
    from kvbm_codec.calibration.cache import given_or_default
    from kvbm_codec.codec import positions as new_mod
    from kvbm_codec.codec.block import KVTCBlockCodec
    from kvbm_codec.models.hf import CausalLM

    torch.set_num_threads(1)
    lm = CausalLM.load()
    cal = given_or_default(lm, a.calibration)
    s = cal.shape
    spec = BlockSpec(s.n_layers, 32, s.n_kv_heads, s.key_head_dim)
    rb = real_blocks(lm, spec, 32)
    with tempfile.TemporaryDirectory() as tmp:
        old_mod = load_base(a.base, Path(tmp))
        old = old_mod.PositionEstimator(cal, old_mod.PositionSearch(alignment=32))  # type: ignore[attr-defined]
        new = new_mod.PositionEstimator(cal, new_mod.PositionSearch(alignment=32))

        def part(i: int, which: int) -> torch.Tensor:
            return torch.stack(
                [t.reshape(s.n_layers, 2, 32, s.n_kv_heads, s.key_head_dim)[:, which].float()
                 for t in rb.tensors[i : i + 8]]
            )  # fmt: skip

        checks = {}
        for what, batches in {
            "real keys": [part(i, 0) for i in range(0, 32, 8)],
            "values read as keys": [part(i, 1) for i in range(0, 16, 8)],
            "noise": [torch.randn(8, s.n_layers, 32, s.n_kv_heads, s.key_head_dim) for _ in range(2)],
        }.items():
            same, worst, right = True, 0.0, 0
            for bi, keys in enumerate(batches):
                for j, (x, y) in enumerate(zip(old.place_many(keys), new.place_many(keys), strict=True)):
                    same &= x.position == y.position
                    right += what == "real keys" and y.position == int(rb.positions[bi * 8 + j][0])
                    for f in ("key_residual", "key_energy"):
                        worst = max(worst, abs(getattr(x, f) - getattr(y, f)) / abs(getattr(x, f)))
            checks[what] = {"same_positions": same, "worst_relative_difference": worst}
            if what == "real keys":
                checks[what]["positions_right"] = f"{right}/32"
            print(what, checks[what], flush=True)
        codec = KVTCBlockCodec.create(cal, spec, 20.0)
        spans = range(0, 32, 8)

        def enc() -> object:
            return [
                codec.encode_many(rb.tensors[i : i + 8], rb.positions[i : i + 8], [True] * 8) for i in spans
            ]

        rows = []
        for r in range(a.rounds):
            te = best(enc, 3) / 32
            to = best(lambda: [old.place_many(part(i, 0)) for i in spans], 5) / 32
            tn = best(lambda: [new.place_many(part(i, 0)) for i in spans], 5) / 32
            rows.append({"encode_ms": te * 1e3, "base_ms": to * 1e3, "new_ms": tn * 1e3})
            print(
                f"round {r}: encode {te * 1e3:.2f} ms/block; search base {to * 1e3:.2f}, new {tn * 1e3:.2f} "
                f"(new/base {tn / to:.2f}); share of encode + search: base {to / (te + to):.1%}, "
                f"new {tn / (te + tn):.1%}",
                flush=True,
            )
    te, to, tn = (min(x[k] for x in rows) for k in ("encode_ms", "base_ms", "new_ms"))
    summary = {"encode_ms": te, "base_ms": to, "new_ms": tn, "new_over_base": tn / to,
               "base_share": to / (te + to), "new_share": tn / (te + tn)}  # fmt: skip
    print("best of rounds:", json.dumps({k: round(v, 4) for k, v in summary.items()}))
    if a.json is not None:
        out = {"base": a.base, "checks": checks, "rounds": rows, "best": summary}
        a.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
