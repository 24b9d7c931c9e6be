"""`kvbm-codec bench`: KVTC against every baseline on the same KV, one table and one Pareto plot;
`kvbm-codec bench throughput`: the block path's speed against the codec's and the CPU's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from kvbm_codec.api.types import DEFAULT_MODEL

bench_app = typer.Typer(add_completion=False, help=__doc__)


@bench_app.callback(invoke_without_command=True)
def bench(
    ctx: typer.Context,
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
    if ctx.invoked_subcommand is not None:
        return
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


def _ints(value: str, what: str) -> tuple[int, ...]:
    try:
        out = tuple(int(x) for x in value.split(",") if x.strip())
    except ValueError:
        raise typer.BadParameter(f"{what} must be comma-separated integers, got {value!r}") from None
    if not out:
        raise typer.BadParameter(f"{what} is empty")
    return out


@bench_app.command("throughput")
def throughput(
    json_out: Annotated[Path | None, typer.Option("--json", help="write the figures as JSON here")] = None,
    quick: Annotated[
        bool, typer.Option("--quick", help="8 blocks, batches 1,8, 1-2 clients: a smoke run")
    ] = False,
    model: Annotated[
        str, typer.Option("--model", help="registered name (smollm2-135m) or a path")
    ] = DEFAULT_MODEL,
    calibration: Annotated[
        Path | None, typer.Option(help="KVTC calibration file (default: the one `serve` uses)")
    ] = None,
    blocks: Annotated[int | None, typer.Option(help="32-token blocks of context (default 64)")] = None,
    batches: Annotated[str | None, typer.Option(help="codec batch sizes, e.g. 1,8,64")] = None,
    clients: Annotated[str | None, typer.Option(help="service concurrency levels, e.g. 1,4,16")] = None,
    paths: Annotated[
        str | None,
        typer.Option(help="service paths: grpc,nixl,s3,obj (obj: NIXL's OBJ client, on S3; empty: none)"),
    ] = None,
    blocks_per_client: Annotated[
        int | None, typer.Option(help="blocks per client request (default 8)")
    ] = None,
    repeats: Annotated[
        int | None, typer.Option(help="codec timings and service levels keep the best of this many")
    ] = None,
    target_cr: Annotated[float, typer.Option(help="target compression ratio")] = 20.0,
    service_threads: Annotated[
        int | None, typer.Option(help="torch threads of the service's codec (default: its config's)")
    ] = None,
    s3_window: Annotated[
        float | None, typer.Option(help="the S3 endpoint's coalesce_window_s (default: its config's)")
    ] = None,
    batch_threads: Annotated[
        int | None,
        typer.Option(help="the service's batch_threads; 1 never splits a request's batch (default: config)"),
    ] = None,
    codec_processes: Annotated[
        int | None,
        typer.Option(help="the service's codec worker processes (0: its threads; 1-core `serve`: always 0)"),
    ] = None,
    scaling_clients: Annotated[
        str | None,
        typer.Option(help="also run `serve` pinned to 1 core vs all cores at these client levels, e.g. 4,16"),
    ] = None,
    scaling_rounds: Annotated[
        int | None, typer.Option(help="alternating rounds of that run (best per level kept)")
    ] = None,
) -> None:
    """Matmul roofline, codec-only MB/s per core and service put/get MB/s, on the same real blocks."""
    from kvbm_codec.bench.throughput import ThroughputOptions, run_throughput, write_json
    from kvbm_codec.calibration.cache import given_or_default
    from kvbm_codec.models.hf import CausalLM

    base = ThroughputOptions.quick() if quick else ThroughputOptions()
    given: dict[str, object] = {
        "blocks": blocks,
        "batches": _ints(batches, "--batches") if batches is not None else None,
        "clients": _ints(clients, "--clients") if clients is not None else None,
        "paths": tuple(p for p in paths.split(",") if p) if paths is not None else None,
        "blocks_per_client": blocks_per_client,
        "repeats": repeats,
        "service_threads": service_threads,
        "s3_window_s": s3_window,
        "scaling_clients": _ints(scaling_clients, "--scaling-clients") if scaling_clients else None,
        "scaling_rounds": scaling_rounds,
        "batch_threads": batch_threads,
        "codec_processes": codec_processes,
    }
    fields = {**base.__dict__, **{k: v for k, v in given.items() if v is not None}, "target_cr": target_cr}
    try:
        opts = ThroughputOptions(**fields)  # type: ignore[arg-type]
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    typer.echo(f"loading model {model} ...", err=True)
    lm = CausalLM.load(model)
    cal = given_or_default(lm, calibration)
    result = run_throughput(lm, cal, opts, log=lambda line: typer.echo(line))
    if json_out is not None:
        write_json(result, json_out)
        typer.echo(f"wrote {json_out}", err=True)
