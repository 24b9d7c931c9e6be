"""`kvbm-codec serve` and `kvbm-codec client ...`: run the service, and talk to one with real KV."""

from __future__ import annotations

import contextlib
import json
import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from kvbm_codec.api.types import DEFAULT_MODEL
from kvbm_codec.cli_errors import host_port, set_json
from kvbm_codec.core.parallel import available_cores, cgroup_cpu_quota


class LogFormat(StrEnum):
    json = "json"
    text = "text"


class LogLevel(StrEnum):
    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"


client_app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Talk to a running kvbm-codec service."
)

TargetOpt = Annotated[
    str, typer.Option("--target", callback=host_port, help="HOST:PORT of the gRPC endpoint (port required)")
]
ModelOpt = Annotated[str, typer.Option("--model", help="served model name (also loaded locally for KV)")]
TextOpt = Annotated[
    Path | None, typer.Option("--text", help="UTF-8 text whose KV is put/fetched (default: the demo text)")
]
TokensOpt = Annotated[int, typer.Option("--max-tokens", help="tokens of the text to use (whole blocks)")]
TenantOpt = Annotated[str | None, typer.Option("--tenant", help="tenant metadata sent with each call")]
TokenOpt = Annotated[
    str | None, typer.Option("--token", envvar="KVBM_CODEC_TOKEN", help="bearer token (or $KVBM_CODEC_TOKEN)")
]
RootCertOpt = Annotated[Path | None, typer.Option("--root-cert", help="CA bundle to verify the server (TLS)")]


def serve(
    config: Annotated[Path | None, typer.Option("--config", help="TOML or YAML ServiceConfig file")] = None,
    host: Annotated[str | None, typer.Option(help="bind address (overrides config/env)")] = None,
    port: Annotated[int | None, typer.Option("--port", help="gRPC port; 0 picks a free one")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="Prometheus port; 0 picks a free one")] = None,
    workers: Annotated[int | None, typer.Option(help="gRPC handler threads")] = None,
    s3_port: Annotated[
        int | None,
        typer.Option("--s3-port", help="also serve the S3-compatible endpoint (KVBM's NIXL OBJ tier) here"),
    ] = None,
    log_format: Annotated[LogFormat | None, typer.Option(help="json or text")] = None,
    log_level: Annotated[LogLevel | None, typer.Option(case_sensitive=False, help="minimum level")] = None,
) -> None:
    """Run the gRPC service until SIGTERM/SIGINT, then drain in-flight requests and exit."""
    from kvbm_codec.core.matmul import fp32_matmul_mode
    from kvbm_codec.frontends.grpc.server import CodecServer
    from kvbm_codec.server.app import apply_codec_threads, build_service
    from kvbm_codec.service import logging as slog
    from kvbm_codec.service.config import ServiceConfig

    set_json(log_format != LogFormat.text)  # config errors are a JSON line unless text was asked for
    cfg = ServiceConfig.load(config, host=host, grpc_port=port, metrics_port=metrics_port, workers=workers)
    if log_format is not None:
        cfg.logging.format = log_format.value  # type: ignore[assignment]
    if log_level is not None:
        cfg.logging.level = log_level.value  # type: ignore[assignment]
    set_json(cfg.logging.format == "json")
    slog.configure(cfg.logging.format, cfg.logging.level)
    log = slog.get_logger("kvbm_codec.service")
    log.info(
        "starting",
        extra=slog.fields(
            models=[m.name for m in cfg.models],
            config=str(config or ""),
            # what batch_threads 0 splits across: the affinity mask capped by a cgroup CPU limit
            cores=available_cores(),
            cpu_quota=cgroup_cpu_quota(),
            batch_threads=cfg.batch_threads,
            codec_processes=cfg.codec_processes,
            fp32_matmul=fp32_matmul_mode(),  # ieee, onednn-bf16 or bf16-rounded (core/matmul.py)
        ),
    )
    from kvbm_codec.frontends.grpc.security import from_config as security_from_config

    credentials, authenticate = security_from_config(cfg)  # before the model loads: fail fast
    if s3_port is not None:
        cfg.s3.enabled, cfg.s3.port = True, s3_port
    apply_codec_threads(cfg)
    svc = build_service(cfg)
    server = CodecServer(svc, cfg, authenticate=authenticate, credentials=credentials).start()
    s3 = None
    if cfg.s3.enabled:
        from kvbm_codec.frontends.s3.server import start_s3_server

        s3 = start_s3_server(svc, cfg.s3)  # credentials from KVBM_CODEC_S3_ACCESS_KEY / _SECRET_KEY
        log.info("s3 endpoint listening", extra=slog.fields(url=s3.url))
    registration = None
    if cfg.dynamo.enabled:
        from kvbm_codec.cluster.discovery import register_server

        registration = register_server(cfg, server.port)
    server.install_signal_handlers()
    while not server.wait(0.5):
        pass
    if registration is not None:
        registration.close()
    if s3 is not None:
        s3.stop()
    raise typer.Exit(0 if server.drained else 1)


def _client(target: str, model: str, tenant: str | None, token: str | None, root_cert: Path | None):  # type: ignore[no-untyped-def]
    from kvbm_codec.frontends.grpc.client import CodecClient

    return CodecClient(target, model=model, tenant=tenant, token=token, root_cert=root_cert)


def _local_blocks(client, model: str, text: Path | None, max_tokens: int):  # type: ignore[no-untyped-def]
    from kvbm_codec.adapters.kv_blocks import kv_blocks
    from kvbm_codec.models.hf import CausalLM
    from kvbm_codec.texts import demo_document

    spec = client.spec()
    body = text.read_text(encoding="utf-8", errors="replace") if text is not None else demo_document()
    typer.echo(f"loading model {model} for its KV ...", err=True)
    lm = CausalLM.load(model)
    return spec, kv_blocks(lm, body, spec, max_tokens)


def _fail(e: Exception) -> None:
    typer.echo(json.dumps({"ok": False, "error": getattr(e, "code", "error"), "message": str(e)}), err=True)
    raise typer.Exit(2) from e


@contextlib.contextmanager
def _session(  # type: ignore[no-untyped-def]
    target: str,
    model: str,
    tenant: str | None,
    token: str | None,
    root_cert: Path | None,
    text: Path | None,
    max_tokens: int,
):
    """(client, block spec, the text's blocks) for the client commands that work on a text's KV; a
    service refusal inside ends the command with its JSON error (exit 2)."""
    from kvbm_codec.api.errors import ServiceError

    with _client(target, model, tenant, token, root_cert) as c:
        try:
            spec, blocks = _local_blocks(c, model, text, max_tokens)
            yield c, spec, blocks
        except ServiceError as e:
            _fail(e)


@client_app.command("put")
def client_put(
    target: TargetOpt = "127.0.0.1:50151",
    model: ModelOpt = DEFAULT_MODEL,
    text: TextOpt = None,
    max_tokens: TokensOpt = 512,
    tenant: TenantOpt = None,
    token: TokenOpt = None,
    root_cert: RootCertOpt = None,
) -> None:
    """Prefill the text with the real model, cut its KV into KVBM blocks, store them."""
    from kvbm_codec.api.types import PutItem

    with _session(target, model, tenant, token, root_cert, text, max_tokens) as (c, spec, blocks):
        t0 = time.perf_counter()
        items = [PutItem(b.sequence_hash, b.data, first_position=b.first_position) for b in blocks]
        res = c.put_blocks(items)
        dt = time.perf_counter() - t0
    stored = sum(r.stored_bytes for r in res)
    raw = sum(r.raw_bytes for r in res)
    typer.echo(
        json.dumps(
            {
                "ok": True,
                "blocks": len(res),
                "tokens": len(res) * spec.page_size,
                "raw_bytes": raw,
                "stored_bytes": stored,
                "compression_ratio": round(raw / max(1, stored), 2),
                "seconds": round(dt, 3),
                "first_hash": f"{blocks[0].sequence_hash:#018x}",
            }
        )
    )


@client_app.command("get")
def client_get(
    target: TargetOpt = "127.0.0.1:50151",
    model: ModelOpt = DEFAULT_MODEL,
    text: TextOpt = None,
    max_tokens: TokensOpt = 512,
    tenant: TenantOpt = None,
    token: TokenOpt = None,
    root_cert: RootCertOpt = None,
) -> None:
    """Fetch the text's blocks back; report hits, compression ratio and error against the real KV."""
    with _session(target, model, tenant, token, root_cert, text, max_tokens) as (c, spec, blocks):
        hashes = [b.sequence_hash for b in blocks]
        t0 = time.perf_counter()
        got = c.get_blocks(hashes)
        dt = time.perf_counter() - t0
        look = c.lookup(hashes)
    errs = []
    for b, g in zip(blocks, got, strict=True):
        if g.data is None:
            continue
        orig, back = spec.from_bytes(b.data).float(), spec.from_bytes(g.data).float()
        errs.append(((back - orig).norm() / orig.norm()).item())
    stored = sum(e.stored_bytes for e in look if e.stored)
    raw = sum(e.raw_bytes for e in look if e.stored)
    hits = sum(g.status == "hit" for g in got)
    typer.echo(
        json.dumps(
            {
                "ok": hits == len(blocks),
                "blocks": len(blocks),
                "hits": hits,
                "compression_ratio": round(raw / stored, 2) if stored else None,
                "rel_error_mean": round(sum(errs) / len(errs), 5) if errs else None,
                "rel_error_max": round(max(errs), 5) if errs else None,
                "seconds": round(dt, 3),
            }
        )
    )
    if hits != len(blocks):
        raise typer.Exit(1)


@client_app.command("stats")
def client_stats(
    target: TargetOpt = "127.0.0.1:50151",
    tenant: TenantOpt = None,
    token: TokenOpt = None,
    root_cert: RootCertOpt = None,
) -> None:
    """Served models (block specs, calibrations), tiers and limits, as JSON."""
    from google.protobuf.json_format import MessageToDict

    from kvbm_codec.api.errors import ServiceError

    with _client(target, "", tenant, token, root_cert) as c:
        try:
            st = c.stats()
        except ServiceError as e:
            _fail(e)
    typer.echo(json.dumps(MessageToDict(st, preserving_proto_field_name=True), indent=2))


@client_app.command("health")
def client_health(
    target: TargetOpt = "127.0.0.1:50151",
    service: Annotated[str, typer.Option(help="service name; empty: the whole server")] = "",
    root_cert: RootCertOpt = None,
) -> None:
    """Standard gRPC health check; exit 0 only when SERVING."""
    from kvbm_codec.api.errors import ServiceError

    with _client(target, "", None, None, root_cert) as c:
        try:
            status = c.health(service)
        except ServiceError as e:
            _fail(e)
    typer.echo(status)
    if status != "SERVING":
        raise typer.Exit(1)
