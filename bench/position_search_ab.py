"""The S3 position search and layout check of a base revision vs this tree's, side by side on the
same real blocks.

Loads ``kvbm_codec/codec/positions.py`` and ``layout_check.py`` of ``--base`` from git as modules of
their own, then:

* checks, on real keys at their true positions (``position_blocks.py``: validation and evaluation
  texts, positions 0 to 8160), on values read as keys and on noise, that both find the same first
  positions and key energies within float rounding, and that the absolute layout test (key and value
  energy against the default ``layout_energy_limit``) decides every block the same way;
* times, in interleaved rounds on one thread, a batch encode, both searches and both layout checks
  on the blocks ``bench throughput`` uses (the first 1024 tokens of the demo text as 32 blocks), in
  batches of ``--batch`` as the endpoint places concurrent PUTs: the base as the base's
  ``Bucket.place`` / ``misfit_many`` ran it (every block's keys and values copied from fp16, the
  one-pass refine, the values projected), this tree through ``Bucket.place`` / ``misfit_many``
  themselves (default binding: absolute test only).

    python bench/position_search_ab.py --base 5d50f63 --rounds 8 --json OUT.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import torch
from position_blocks import keys_of, spans, text_blocks

ROOT = Path(__file__).resolve().parent.parent


def load_base(rev: str, into: Path) -> tuple[ModuleType, ModuleType]:
    """(positions, layout_check) of revision ``rev``, the first importing the second."""
    mods = []
    for name in ("layout_check", "positions"):
        src = subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{rev}:kvbm_codec/codec/{name}.py"],
            check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip
        src = src.replace("from kvbm_codec.codec.layout_check import", "from base_layout_check import")
        path = into / f"base_{name}.py"
        path.write_text(src)
        spec = importlib.util.spec_from_file_location(f"base_{name}", path)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[f"base_{name}"] = mod
        spec.loader.exec_module(mod)
        mods.append(mod)
    return mods[1], mods[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True)
    ap.add_argument("--calibration", type=Path, default=None)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--spans", default="validation,evaluation")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/kvbm-codec-position-blocks"))
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()

    from kvbm_codec.api.blocks import BlockSpec
    from kvbm_codec.bench.throughput import _best as best
    from kvbm_codec.bench.throughput import real_blocks
    from kvbm_codec.calibration.cache import given_or_default
    from kvbm_codec.codec.block import KVTCBlockCodec
    from kvbm_codec.core.service import ServedModel
    from kvbm_codec.frontends.s3.buckets import Bucket
    from kvbm_codec.models.hf import CausalLM
    from kvbm_codec.service.config import BucketBinding

    torch.set_num_threads(1)
    lm = CausalLM.load()
    cal = given_or_default(lm, a.calibration)
    s = cal.shape
    spec = BlockSpec(s.n_layers, 32, s.n_kv_heads, s.key_head_dim)
    binding = BucketBinding(page_size=32, dtype=spec.dtype)
    limit = binding.layout_energy_limit
    assert limit is not None
    bucket = Bucket(binding, ServedModel("ab", cal, spec, 20.0))
    new = bucket.estimator()
    with tempfile.TemporaryDirectory() as tmp:
        old_mod, old_lc = load_base(a.base, Path(tmp))
        old = old_mod.PositionEstimator(cal, old_mod.PositionSearch(alignment=32))  # type: ignore[attr-defined]
        old_chk = old_lc.LayoutChecker(cal, tokens=old.search.refine_tokens)  # type: ignore[attr-defined]

        def compare(what: str, keys: torch.Tensor, values: torch.Tensor, first: torch.Tensor | None) -> dict:
            x, y = old.place_many(keys), new.place_many(keys, residual=False)
            ve_old = old_chk.value_stats(values)[1]
            ve_new = bucket.checker().value_energy(
                values[:, :, torch.tensor(sorted(set(old_lc.sample_tokens(32, old_chk.tokens).tolist())))]
            )
            fit_old = [p.key_energy <= limit and float(e) <= limit for p, e in zip(x, ve_old, strict=True)]
            fit_new = [q.key_energy <= limit and float(e) <= limit for q, e in zip(y, ve_new, strict=True)]
            truth = [] if first is None else [int(f) for f in first]
            return {
                "same": sum(p.position == q.position for p, q in zip(x, y, strict=True)),
                "right": sum(q.position == f for q, f in zip(y, truth, strict=False)),
                "energy_diff": max(
                    abs(p.key_energy - q.key_energy) / p.key_energy for p, q in zip(x, y, strict=True)
                ),
                "value_energy_diff": float(((ve_old - ve_new).abs() / ve_old).max()),
                "same_decision": sum(f == h for f, h in zip(fit_old, fit_new, strict=True)),
                "refused": sum(not h for h in fit_new),
                "n": len(y),
            }

        checks: dict[str, dict] = {}
        g = torch.Generator().manual_seed(0)

        def add(key: str, r: dict) -> None:
            c = checks.setdefault(key, {k: 0 for k in r} | {"energy_diff": 0.0, "value_energy_diff": 0.0})
            for k, v in r.items():
                c[k] = max(c[k], v) if k.endswith("diff") else c[k] + v

        for w in a.spans.split(","):
            for name, skip, tokens, first in spans(w):
                tb = text_blocks(lm, spec, name, tokens, a.cache, skip, first)
                label = f"{w}: {name} {int(tb.first[0])}-{int(tb.first[-1])}"
                for i in range(0, tb.blocks.shape[0], 8):
                    k, v = keys_of(spec, tb.blocks[i : i + 8], 0), keys_of(spec, tb.blocks[i : i + 8], 1)
                    add(f"real keys, {label}", compare("real", k, v, tb.first[i : i + 8]))
                    if i % 32 == 0:  # K and V swapped: values read as keys, keys as values
                        add(f"values read as keys ({w})", compare("swap", v, k, None))
                noise = torch.randn(8, s.n_layers, 32, s.n_kv_heads, s.key_head_dim, generator=g)
                add(f"noise ({w})", compare("noise", noise, torch.randn(noise.shape, generator=g), None))
                print(label, checks[f"real keys, {label}"], flush=True)
        for key, c in checks.items():
            if not key.startswith("real keys"):
                print(key, c, flush=True)

        rb = real_blocks(lm, spec, 32)
        codec = KVTCBlockCodec.create(cal, spec, 20.0)
        bs = a.batch
        spans_ = range(0, 32, bs)

        def part(i: int, which: int) -> torch.Tensor:  # the base's Bucket._part
            return torch.stack(
                [t.reshape(s.n_layers, 2, 32, s.n_kv_heads, s.key_head_dim)[:, which].float()
                 for t in rb.tensors[i : i + bs]]
            )  # fmt: skip

        def enc() -> object:
            return [
                codec.encode_many(rb.tensors[i : i + 8], rb.positions[i : i + 8], [True] * 8)
                for i in range(0, 32, 8)
            ]

        def base_place() -> list:
            return [old.place_many(part(i, 0)) for i in spans_]

        def base_check() -> list:
            return [old_chk.value_stats(part(i, 1)) for i in spans_]

        placed = [bucket.place(rb.tensors[i : i + bs], [None] * bs) for i in spans_]

        def new_place() -> list:
            return [bucket.place(rb.tensors[i : i + bs], [None] * bs) for i in spans_]

        def new_check() -> list:
            return [
                bucket.misfit_many(rb.data[i : i + bs], rb.tensors[i : i + bs], placed[j])
                for j, i in enumerate(spans_)
            ]

        rows = []
        for r in range(a.rounds):
            te = best(enc, 3) / 32
            tb_, tn = best(base_place, 5) / 32, best(new_place, 5) / 32
            cb, cn = best(base_check, 5) / 32, best(new_check, 5) / 32
            row = {"encode_ms": te, "base_ms": tb_, "new_ms": tn, "base_check_ms": cb, "new_check_ms": cn}
            row = {k: v * 1e3 for k, v in row.items()}
            rows.append(row)
            print(
                f"round {r}: encode {te * 1e3:.2f} ms/block; search base {tb_ * 1e3:.3f}, new {tn * 1e3:.3f} "
                f"(new/base {tn / tb_:.2f}); check base {cb * 1e3:.3f}, new {cn * 1e3:.3f}; "
                f"share of encode + search: base {tb_ / (te + tb_):.1%}, new {tn / (te + tn):.1%}; "
                f"with the check: base {(tb_ + cb) / (te + tb_ + cb):.1%}, "
                f"new {(tn + cn) / (te + tn + cn):.1%}",
                flush=True,
            )

    def shares(rs: list[dict]) -> dict[str, float]:
        e, b, n = (rs[0][k] for k in ("encode_ms", "base_ms", "new_ms"))
        cb, cn = rs[0]["base_check_ms"], rs[0]["new_check_ms"]
        return {
            "base_share": b / (e + b),
            "new_share": n / (e + n),
            "base_share_with_check": (b + cb) / (e + b + cb),
            "new_share_with_check": (n + cn) / (e + n + cn),
        }

    keys = rows[0].keys()
    best_row = {k: min(x[k] for x in rows) for k in keys}
    median_row = {k: statistics.median(x[k] for x in rows) for k in keys}
    per_round = [shares([x]) for x in rows]
    summary = {
        "best": best_row | shares([best_row]) | {"new_over_base": best_row["new_ms"] / best_row["base_ms"]},
        "median": median_row | shares([median_row]),
        "per_round_share_median": {k: statistics.median(p[k] for p in per_round) for k in per_round[0]},
        "per_round_share_best": {k: min(p[k] for p in per_round) for k in per_round[0]},
    }
    print("summary:", json.dumps(summary, indent=1))
    if a.json is not None:
        out = {"base": a.base, "batch": bs, "checks": checks, "rounds": rows, "summary": summary}
        a.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
