"""Paired differences between two harness runs of the same prompts (two calibrations, same methods).

`bench/accuracy_harness.py` pairs each KVTC row against fp16 *within* one run; whether a new
calibration moved retrieval needs the same prompts *across* runs: prompt for prompt, new minus old,
with the harness' own paired statistics (bootstrap interval, exact McNemar on correctness). Prompts
are matched by item key (the prompt's content), so only prompts both runs scored are compared and
the count says how many that is.

    python bench/pair_harness_runs.py NEW/bench.json OLD/bench.json --methods fp16,kvtc@16,kvtc@20 \
        --out bench/results/accuracy_harness_sized_vs_old.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from kvbm_codec.bench.report import paired


def pair_runs(new: dict[str, Any], old: dict[str, Any], methods: list[str]) -> dict[str, Any]:
    """{method: paired(new, old) on the prompts both runs scored}, each with its prompt count."""
    out: dict[str, Any] = {}
    for m in methods:
        rows = [r for r in new["results"] if r["method"] == m]
        rows += [{**r, "method": f"old:{m}"} for r in old["results"] if r["method"] == m]
        if not any(r["method"] == m for r in rows) or not any(r["method"] == f"old:{m}" for r in rows):
            raise SystemExit(f"method {m!r} is not in both runs")
        out[m] = paired({"results": rows}, m, f"old:{m}")
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("new", type=Path, help="bench.json of the new run")
    p.add_argument("old", type=Path, help="bench.json of the earlier run (same prompts, other calibration)")
    p.add_argument("--methods", default="fp16,kvtc@16,kvtc@20")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    new, old = json.loads(a.new.read_text()), json.loads(a.old.read_text())
    if new["model"] != old["model"]:
        raise SystemExit(f"runs of different models: {new['model']} vs {old['model']}")
    report = {
        "new": {"bench": str(a.new), "calibration_id": new.get("calibration_id")},
        "old": {"bench": str(a.old), "calibration_id": old.get("calibration_id")},
        "new_minus_old": pair_runs(new, old, a.methods.split(",")),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
