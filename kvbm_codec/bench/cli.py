"""`kvbm-codec bench`: KVTC against every baseline on the same KV, one table and one Pareto plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from kvbm_codec.api.types import DEFAULT_MODEL


def bench(
    model: Annotated[
        str, typer.Option("--model", help=f"registered name ({DEFAULT_MODEL}) or a path")
    ] = DEFAULT_MODEL,
    text: Annotated[
        Path | None, typer.Option(help="UTF-8 text for ppl/top-1 windows (default: the bundled GNU GPL)")
    ] = None,
    suite: Annotated[
        str, typer.Option(help="quick (< 5 min on 2 cores), default (< 30 min) or large (hours, on demand)")
    ] = "default",
    methods: Annotated[
        str | None,
        typer.Option(help="comma list overriding the suite's, e.g. fp16,kivi4,kvtc@20,kvtc@16+tova@4"),
    ] = None,
    out: Annotated[Path, typer.Option(help="directory for bench.json, bench.md, pareto.png")] = Path(
        "bench-out"
    ),
    cache_dir: Annotated[
        Path | None, typer.Option(help="per-method result cache (default: <kvbm-codec cache>/bench)")
    ] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="recompute every method")] = False,
    calibration: Annotated[Path | None, typer.Option(help="KVTC calibration file (default: suite's)")] = None,
    throughput: Annotated[
        bool, typer.Option(help="measure restore-vs-recompute at the suite's contexts")
    ] = True,
    stop_after: Annotated[
        float | None,
        typer.Option(help="wall-time budget (s): past it only fully cached contexts are reported"),
    ] = None,
) -> None:
    """Run every method on the same real KV; write the JSON, a markdown table and a Pareto PNG."""
    from kvbm_codec.bench.report import write_report
    from kvbm_codec.bench.runner import SUITES, run_bench
    from kvbm_codec.calibration.artifact import load_calibration
    from kvbm_codec.calibration.cache import cache_dir as default_cache_dir
    from kvbm_codec.models.hf import CausalLM

    if suite not in SUITES:
        raise typer.BadParameter(f"suite must be one of {', '.join(SUITES)}")
    typer.echo(f"loading model {model} ...", err=True)
    lm = CausalLM.load(model)
    cal = load_calibration(calibration, expected_fingerprint=lm.info.fingerprint) if calibration else None
    result = run_bench(
        lm,
        SUITES[suite],
        text=text.read_text(encoding="utf-8", errors="replace") if text else None,
        methods=[m for m in methods.split(",") if m] if methods else None,
        cache_dir=None if no_cache else (cache_dir or default_cache_dir() / "bench"),
        calibration=cal,
        throughput=throughput,
        stop_after_s=stop_after,
    )
    paths = write_report(result.as_dict(), out)
    typer.echo(paths["markdown"].read_text())
    typer.echo(json.dumps({k: str(v) for k, v in paths.items()}), err=True)
