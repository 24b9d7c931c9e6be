"""Retrieval tasks at kvtc@16/kvtc@20 against fp16 with paired intervals, for a given calibration.

The harness' default suite with its LM windows left out (the held-out curves cover perplexity and
top-1; `--lm-windows 3` puts the default suite's back) and `--prompts-per-task` retrieval prompts per
task, only the rows the issue's targets need (`--methods default`: every baseline, for the Pareto
check; `--task-seed 1`: the tuning prompts, where a recipe knob may be chosen):

    python bench/accuracy_harness.py --calibration broad-attention.kvtc --prompts-per-task 22 \
        --cache-dir /tmp/acc-harness --out bench/results/accuracy_harness.json

With --cache-dir every (method, prompt) row is kept as it finishes, so a run stopped by its timeout
resumes where it stopped, and a later run with more --methods (the baselines a Pareto claim needs)
computes only the new rows; --report-dir then writes the harness' full report (bench.md with the
paired comparisons against the ratio-matched KVTC row, dominance in bench.json, the Pareto plot).
`--reuse-rows OLD/bench.json` puts an earlier run's rows of the methods that need no calibration into
the cache first (keyed as this run keys them), so a Pareto check of a new calibration computes only
the calibrated rows; the baselines' rows depend on the model, the prompt and the method alone.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from kvbm_codec.bench.methods import build_method
from kvbm_codec.bench.report import paired, summarize, write_report
from kvbm_codec.bench.runner import (
    SUITES,
    ResultCache,
    Suite,
    lm_items,
    result_key,
    run_bench,
    task_items,
)
from kvbm_codec.calibration.artifact import load_calibration
from kvbm_codec.models.hf import CausalLM
from kvbm_codec.texts import demo_document


def _prefill_rate(res: dict) -> float | None:
    """Prompt tokens per second of the prefills this run computed (cached prompts have none): the
    figure calibration time scales with, measured under the same load."""
    tokens = {r["item"]: r["context_tokens"] for r in res["results"] if r["method"] == "fp16"}
    done = [t for t in res["item_timings"] if "prefill_s" in t]
    secs = sum(t["prefill_s"] for t in done)
    return sum(tokens[t["item"]] for t in done) / secs if secs else None


def reuse_rows(lm: CausalLM, suite: Suite, bench_json: Path, cache_dir: Path) -> int:
    """Cache an earlier run's rows of calibration-free methods for this suite's contexts (rows already
    cached are kept). Rows of another model, or of contexts this suite does not have, are skipped."""
    old = json.loads(bench_json.read_text())
    if old["model"] != lm.info.name:
        raise SystemExit(f"{bench_json} is a run of {old['model']}, not {lm.info.name}")
    items = {
        i.key: i for i in (*lm_items(lm.tokenizer, demo_document(), suite), *task_items(lm.tokenizer, suite))
    }
    cache, n = ResultCache(cache_dir), 0
    for r in old["results"]:
        m, item = build_method(r["method"]), items.get(r["item"])
        if m.needs_calibration or item is None:
            continue
        key = result_key(m, item, lm.info.fingerprint, None, suite)  # type: ignore[arg-type]
        if cache.get(key) is None:
            cache.put(key, {k: v for k, v in r.items() if k != "cached"})
            n += 1
    return n


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--calibration", type=Path, action="append", required=True)
    p.add_argument("--prompts-per-task", type=int, default=22)
    p.add_argument(
        "--methods", default="fp16,kvtc@16,kvtc@20", help="comma list, or 'default' (every method)"
    )
    p.add_argument(
        "--lm-windows",
        type=int,
        default=0,
        help="GPL windows for ppl/top-1/KL (the default suite: 4, fits 3)",
    )
    p.add_argument(
        "--task-seed",
        type=int,
        default=0,
        help="0: the reported prompts; 1: the tuning draw of tune_tasks (choose knobs on it, never on 0)",
    )
    p.add_argument("--tasks", default="", help="comma list of retrieval tasks (default: all)")
    p.add_argument("--stop-after", type=float, default=None)
    p.add_argument(
        "--reuse-rows",
        type=Path,
        default=None,
        help="an earlier bench.json whose calibration-free rows enter --cache-dir first",
    )
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--report-dir", type=Path, default=None, help="also write bench.md/json/png here")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    # the model the (first) calibration was made for: its registered name
    lm = CausalLM.load(load_calibration(a.calibration[0]).model_name)
    suite = replace(
        SUITES["default"],
        name="accuracy",
        lm_windows=a.lm_windows,
        task_instances=a.prompts_per_task,
        task_seed=a.task_seed,
        tasks=tuple(t for t in a.tasks.split(",") if t) or SUITES["default"].tasks,
    )
    methods = (suite.methods if a.methods == "default" else a.methods).split(",")
    if a.reuse_rows is not None:
        if a.cache_dir is None:
            raise SystemExit("--reuse-rows needs --cache-dir")
        print(f"reused {reuse_rows(lm, suite, a.reuse_rows, a.cache_dir)} rows of {a.reuse_rows}", flush=True)
    report = []
    for path in a.calibration:
        cal = load_calibration(path, expected_fingerprint=lm.info.fingerprint)
        res = run_bench(
            lm,
            suite,
            methods=methods,
            cache_dir=a.cache_dir,
            calibration=cal,
            throughput=False,
            stop_after_s=a.stop_after,
        ).as_dict()
        rows = summarize(res)
        kinds = [r["kind"] for r in res["results"] if r["method"] == "fp16"]
        kvtc = [m for m in res["methods"] if m.startswith("kvtc")]
        entry = {
            "calibration": path.name,
            "calibration_id": cal.calibration_id,
            "prompts": sum(k != "lm" for k in kinds),
            "lm_windows": sum(k == "lm" for k in kinds),
            "task_seed": a.task_seed,
            "summary": rows,
            "paired_vs_fp16": {m: paired(res, m, "fp16") for m in kvtc},
            "wall_s": res["wall_s"],
            "load_average": res["load_average"],
            "prefill_tokens_per_s": _prefill_rate(res),
        }
        if a.report_dir is not None:
            write_report(res, a.report_dir / cal.calibration_id)
        report.append(entry)
        print(json.dumps({k: v for k, v in entry.items() if k != "summary"}, indent=1), flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
