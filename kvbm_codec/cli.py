"""`kvbm-codec` command line: serve, client, demo, calibrate, eval, inspect, registry, bench."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from kvbm_codec import __version__
from kvbm_codec.api.types import DEFAULT_MODEL
from kvbm_codec.bench.cli import bench_app
from kvbm_codec.calibration.registry_cli import registry_app
from kvbm_codec.cli_errors import ReportingTyper, set_debug
from kvbm_codec.codec.config import CodecConfig
from kvbm_codec.server.cli import client_app, serve

app = ReportingTyper(add_completion=False, no_args_is_help=True, help=__doc__)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"kvbm-codec {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="show tracebacks of errors")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version and exit")
    ] = False,
) -> None:
    """KV-cache transform coding (KVTC) as a KVBM storage tier."""
    from kvbm_codec.core.matmul import configure_fp32_matmul

    set_debug(debug)
    try:
        configure_fp32_matmul()  # every command: float32 matmuls on oneDNN's bf16 path where exact
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e


app.add_typer(registry_app, name="registry")
app.add_typer(bench_app, name="bench")
app.command("serve")(serve)
app.add_typer(client_app, name="client")

ModelOpt = Annotated[str, typer.Option("--model", help=f"registered name ({DEFAULT_MODEL}) or a path")]


def _load(model: str):
    from kvbm_codec.models.hf import CausalLM

    typer.echo(f"loading model {model} ...", err=True)
    return CausalLM.load(model)


def _calibration(lm, calibration: Path | None, layer_group_size: int, fit_sequences: int | None):
    from kvbm_codec.calibration.artifact import load_calibration
    from kvbm_codec.calibration.cache import load_or_calibrate

    if calibration is not None:
        return load_calibration(calibration, expected_fingerprint=lm.info.fingerprint)
    cal, path, fresh = load_or_calibrate(
        lm, CodecConfig(layer_group_size=layer_group_size), fit_sequences=fit_sequences
    )
    typer.echo(
        f"calibration {cal.calibration_id} {'computed and saved to' if fresh else 'loaded from'} {path}",
        err=True,
    )
    return cal


@app.command()
def calibrate(
    model: ModelOpt = DEFAULT_MODEL,
    out: Annotated[Path | None, typer.Option(help="write here instead of the local cache")] = None,
    layer_group_size: Annotated[
        int, typer.Option(help="layers per PCA basis")
    ] = CodecConfig().layer_group_size,
    fit_sequences: Annotated[
        int | None, typer.Option(help="1024-token calibration sequences for the PCA (default: the corpus')")
    ] = None,
    corpus: Annotated[
        str, typer.Option(help="broad (six domains, the default) or pydoc (the old one)")
    ] = "broad",
    distortion: Annotated[
        str, typer.Option(help="what the codec minimises: mse, attention, attention_shape")
    ] = CodecConfig().distortion,
    layer_sensitivity: Annotated[
        str,
        typer.Option(
            help="analytic, or measured: probe each layer's real codec error end to end (slower calibration)"
        ),
    ] = CodecConfig().layer_sensitivity,
    registry: Annotated[
        str | None,
        typer.Option(help="also publish into this registry (directory or s3://bucket/prefix)"),
    ] = None,
    promote: Annotated[bool, typer.Option(help="make the published calibration `latest`")] = False,
    undo_rope: Annotated[
        bool, typer.Option(help="de-rotate keys before PCA (disable only to ablate)")
    ] = True,
    prefill_dtype: Annotated[
        str,
        typer.Option(
            help="the covariance prefills' dtype: float32 (the default recipe), bfloat16 (faster where "
            "the CPU has native bf16; docs/benchmarks.md), auto (bfloat16 there, float32 elsewhere)"
        ),
    ] = "float32",
    quantizer: Annotated[
        str,
        typer.Option(
            help="minmax (the paper's fp16 shift + scale per group, the default), symmetric (+-max|x|, "
            "the scale only: half the side information; docs/benchmarks.md 'Session 24') or ecsq (a "
            "uniform step per basis and token, ANS-coded with calibrated tables; 'Session 25')"
        ),
    ] = "minmax",
    twin_of: Annotated[
        Path | None,
        typer.Option(
            help="with --quantizer ecsq: derive the entropy-coded twin of this min/max calibration "
            "(same corpus) in one held-out prefill instead of a whole calibration"
        ),
    ] = None,
) -> None:
    """Compute PCA bases, measured error tables and DP bit allocations for a model."""
    from kvbm_codec.calibration.artifact import save_calibration
    from kvbm_codec.calibration.cache import DEFAULT_FIT_SEQUENCES, corpus_texts, fit_plan, load_or_calibrate
    from kvbm_codec.calibration.calibrate import calibrate as run_calibration
    from kvbm_codec.models.hf import resolve_prefill_dtype

    try:
        dtype = resolve_prefill_dtype(prefill_dtype)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    lm = _load(model)
    if corpus not in DEFAULT_FIT_SEQUENCES:
        raise typer.BadParameter(f"--corpus must be one of {', '.join(DEFAULT_FIT_SEQUENCES)}")
    try:
        cfg = CodecConfig(
            layer_group_size=layer_group_size,
            undo_rope=undo_rope,
            distortion=distortion,  # type: ignore[arg-type]
            layer_sensitivity=layer_sensitivity,  # type: ignore[arg-type]
            quantizer=quantizer,  # type: ignore[arg-type]
        )
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    fit = fit_sequences or DEFAULT_FIT_SEQUENCES[corpus]
    if twin_of is not None:
        cal, path = _entropy_twin(lm, twin_of, quantizer, corpus, out)
    elif out is None:
        cal, path, _ = load_or_calibrate(lm, cfg, corpus=corpus, fit_sequences=fit, prefill_dtype=dtype)
    else:
        texts, corpus_name = corpus_texts(lm.tokenizer, corpus)
        cal = run_calibration(
            lm, texts, cfg, fit_sequences=fit_plan(corpus, fit), text_source=corpus_name, prefill_dtype=dtype
        )
        save_calibration(cal, out)
        path = out
    if registry is not None:
        from kvbm_codec.calibration.registry_cli import publish_calibration

        published = publish_calibration(cal, registry, promote=promote)
        typer.echo(f"published as version {published.version} in {registry}", err=True)
    typer.echo(
        json.dumps(
            {
                "calibration_id": cal.calibration_id,
                "path": str(path),
                "allocations": {
                    n: {**a.meta, "allocation_id": a.allocation_id} for n, a in cal.allocations.items()
                },
            },
            indent=2,
        )
    )


def _entropy_twin(lm, source: Path, quantizer: str, corpus: str, out: Path | None):  # type: ignore[no-untyped-def]
    from kvbm_codec.calibration.artifact import load_calibration, save_calibration
    from kvbm_codec.calibration.cache import corpus_texts
    from kvbm_codec.calibration.entropy_twin import entropy_calibration_from

    if quantizer != "ecsq" or out is None:
        raise typer.BadParameter("--twin-of derives an entropy-coded twin: needs --quantizer ecsq, --out")
    texts, _ = corpus_texts(lm.tokenizer, corpus)
    try:
        source_cal = load_calibration(source, expected_fingerprint=lm.info.fingerprint)
        cal = entropy_calibration_from(lm, source_cal, texts)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    save_calibration(cal, out)
    return cal, out


@app.command("eval")
def eval_cmd(
    text: Annotated[Path, typer.Option(help="any UTF-8 text file (held out from calibration)")],
    model: ModelOpt = DEFAULT_MODEL,
    target_cr: Annotated[list[float], typer.Option(help="repeat for a curve")] = [20.0],  # noqa: B006
    context_tokens: int = 2048,
    continuation_tokens: int = 256,
    json_out: Annotated[Path | None, typer.Option("--json", help="write results here")] = None,
    save_frames: Annotated[Path | None, typer.Option(help="directory to write the frames into")] = None,
    calibration: Annotated[Path | None, typer.Option(help="calibration file (default: local cache)")] = None,
    layer_group_size: int = CodecConfig().layer_group_size,
    fit_sequences: int | None = None,
) -> None:
    """Compress a context's KV, continue teacher-forced, compare with the uncompressed model."""
    from kvbm_codec.eval.run import run_eval

    lm = _load(model)
    cal = _calibration(lm, calibration, layer_group_size, fit_sequences)
    body = text.read_text(encoding="utf-8", errors="replace")
    results = []
    for cr in target_cr:
        r = run_eval(
            lm,
            cal,
            body,
            cr,
            context_tokens=context_tokens,
            continuation_tokens=continuation_tokens,
            save_frames=save_frames,
        ).as_dict()
        results.append(r)
        typer.echo(json.dumps(r))
    if json_out is not None:
        json_out.write_text(json.dumps(results[0] if len(results) == 1 else results, indent=2))


@app.command()
def demo(
    model: ModelOpt = DEFAULT_MODEL,
    target_cr: float = 20.0,
    layer_group_size: int = CodecConfig().layer_group_size,
    fit_sequences: int | None = None,
    codec_only: Annotated[
        bool, typer.Option(help="compress/restore in this process only, without starting the service")
    ] = False,
    engine: Annotated[
        str,
        typer.Option(
            help="`vllm`: a real vLLM (CPU) engine offloads to the service, native tier and OBJ tier "
            "(needs scripts/bootstrap-vllm.sh; docs/vllm.md)"
        ),
    ] = "none",
    engine_paths: Annotated[
        str,
        typer.Option(
            help="with --engine vllm: native,obj (native-grpc: the tier without NIXL; native-sharded: the "
            "tier over two replicas; none: no offload)"
        ),
    ] = "native,obj",
    prompt_tokens: Annotated[int, typer.Option(help="with --engine vllm: conversation length")] = 1500,
    stream_requests: Annotated[
        int, typer.Option(help="with --engine vllm: then a stream of this many distinct 256-token requests")
    ] = 0,
) -> None:
    """Start the service, offload a long conversation's KV to it as KVBM blocks, onboard it, continue.

    The calibration is computed first if the local registry has none (the service then loads it).
    """
    lm = _load(model)
    cal = _calibration(lm, None, layer_group_size, fit_sequences)
    if engine not in ("none", "vllm"):
        raise typer.BadParameter(f"unknown engine {engine!r}: `vllm` or none")
    if engine == "vllm":
        from kvbm_codec.demos.vllm import run_vllm_demo

        paths = [p for p in engine_paths.split(",") if p]
        known = ("native", "native-grpc", "native-sharded", "obj", "none")
        if not paths or any(p not in known for p in paths):
            raise typer.BadParameter(f"--engine-paths takes {', '.join(known)}, got {engine_paths!r}")
        stream = {"requests": stream_requests, "tokens": 256, "batch": 4} if stream_requests else None
        result = run_vllm_demo(target_cr=target_cr, paths=paths, prompt_tokens=prompt_tokens, stream=stream)
        if result["service_exit_code"] != 0:
            raise typer.Exit(1)
        return
    if codec_only:
        from kvbm_codec.demos.codec import run_demo

        run_demo(lm, cal, target_cr)
        return
    from kvbm_codec.models.registry import registered_names

    if model not in registered_names():
        raise typer.BadParameter(
            f"the service demo serves a registered model ({', '.join(registered_names())}); "
            "use --codec-only for other models"
        )
    if layer_group_size != CodecConfig().layer_group_size or fit_sequences is not None:
        raise typer.BadParameter("the service demo runs the embedded defaults; use --codec-only to vary them")
    from kvbm_codec.demos.offload import run_service_demo

    result = run_service_demo(lm, target_cr, calibration_id=cal.calibration_id)
    if result["service_exit_code"] != 0:
        raise typer.Exit(1)


@app.command()
def inspect(frame: Path) -> None:
    """Print a frame's header as JSON after verifying every checksum; non-zero exit if damaged."""
    from kvbm_codec.codec.errors import CodecError
    from kvbm_codec.codec.frame import inspect_frame

    try:
        info = inspect_frame(frame.read_bytes())  # a missing file: cli_errors reports it in one line
    except CodecError as e:
        typer.echo(json.dumps({"ok": False, "error": e.code, "message": str(e)}), err=True)
        raise typer.Exit(2) from e
    typer.echo(json.dumps({"ok": True, **info}, indent=2))


def main() -> None:  # pragma: no cover
    app(sys.argv[1:])
