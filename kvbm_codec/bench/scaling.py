"""The service on 1 core against 2 (or any core sets): `kvbm-codec serve` pinned, the same clients.

The in-process figures of `bench throughput` share one process between clients and server, so a
`taskset` of the whole run narrows both. Here the service is its own `kvbm-codec serve` process, its
CPU affinity set before it starts (so the torch, gRPC, codec-split and UCX threads it creates all
inherit it, and ``batch_threads``' default, one per core, follows the mask), while the clients run in
this process with the affinity this process has. The S3 path is measured the same way: the endpoint
in the `serve` process, its boto3 clients here, so they do not share the server's GIL as they do in
the in-process figures (vLLM's OBJ tier is such a client, in its own process). Each core set gets a
fresh server with the same configuration and calibration; levels run in the same order for each,
and the whole sequence of core sets is repeated ``rounds`` times, alternating, keeping each level's
best, so that a load change on a shared machine hits both sides alike.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from kvbm_codec.api.blocks import BlockSpec
from kvbm_codec.codec.params import Calibration
from kvbm_codec.frontends.grpc.client import CodecClient
from kvbm_codec.server.process import ServiceProcess, free_port

STARTUP_TIMEOUT_S = 120.0
S3_TENANT = "bench"
S3_PATHS = ("s3", "obj")  # both reach the S3 endpoint: boto3, and NIXL's OBJ backend (vLLM's OBJ tier)


def pinned_service(
    registry: Path, cal: Calibration, spec: BlockSpec, target_cr: float, cores: Sequence[int],
    settings: dict[str, str], log_path: Path,
) -> ServiceProcess:  # fmt: skip
    """`kvbm-codec serve` on ``cores``, serving ``cal`` from a registry directory."""
    model = {
        "name": cal.model_name or "model",
        "fingerprint": cal.model_fingerprint,
        "registry": str(registry),
        "calibration": cal.calibration_id,
        "target_cr": target_cr,
        "page_size": spec.page_size,
        "dtype": spec.dtype,
    }
    return ServiceProcess(target_cr, log_path, models=[model], settings=settings, cores=cores)


Level = Callable[[dict[str, Any], str, int], Any]
"""(targets, path, clients) -> a level with ``open()``, ``run(op, round)`` (seconds) and ``close()``: the
throughput bench's own clients, handed in so that both benches drive the service the same way."""


def _levels(
    svc: ServiceProcess,
    level_of: Level,
    spec: BlockSpec,
    clients: Sequence[int],
    paths: Sequence[str],
    per_client: int,
    s3_targets: dict[str, str],
) -> Iterator[tuple[tuple[str, str, int], float, dict[str, float]]]:
    """((path, op, clients), MB/s, cores used) of each level against one running service, in a fixed
    order. Cores used: CPU-seconds per wall second of the service (its codec workers included) and
    of this process (the clients), over the timed run: on a machine whose clients share the
    service's cores, what the clients take is what the service could not have. CPU times come in
    clock ticks (10 ms): for runs of a second or less, read them as estimates."""
    targets = {"grpc": svc.target, "model": svc.model, **s3_targets}
    for n in clients:
        for path in paths:
            level = level_of(targets, path, n)
            try:
                level.open()
                for op in ("put", "get"):
                    server0, client0 = tree_cpu_seconds(svc.proc.pid), _own_cpu_seconds()
                    dt = level.run(op, 0)
                    cores = {
                        "server_cores": (tree_cpu_seconds(svc.proc.pid) - server0) / dt,
                        "client_cores": (_own_cpu_seconds() - client0) / dt,
                    }
                    yield (path, op, n), n * per_client * spec.nbytes / dt / 1e6, cores
            finally:
                level.close()


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU-seconds of a process and its live descendants (codec worker processes)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
        except psutil.NoSuchProcess:  # a worker gone between the listing and the read
            continue
        total += t.user + t.system
    return total


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def core_scaling(
    cal: Calibration,
    spec: BlockSpec,
    level_of: Level,
    *,
    core_sets: Sequence[Sequence[int]],
    clients: Sequence[int],
    paths: Sequence[str],
    blocks_per_client: int,
    target_cr: float,
    rounds: int,
    log: Callable[[str], None],
    batch_threads: int | None = None,
    s3_key: tuple[str, str] | None = None,
    codec_processes: int = 0,
) -> dict[str, Any]:
    """put/get MB/s of a pinned service per (cores, path, clients), best of ``rounds``, and each
    level's ratio of the largest core set to the smallest. The s3 and obj paths need ``s3_key`` (access key,
    secret): the credential the service's endpoint accepts and the level's clients sign with.
    ``codec_processes``: the service's codec worker processes on a core set of 2+ cores (at most one
    per core); a 1-core service always runs its codec on its own threads, the reference as before."""
    needs_s3 = bool(set(S3_PATHS) & set(paths))
    if needs_s3 and s3_key is None:
        raise ValueError("the s3 and obj paths need the endpoint's credential (s3_key)")
    from kvbm_codec.calibration.registry import Registry

    most = max(clients)
    settings = {
        "DYN_KVBM_CODEC_MAX_INFLIGHT_REQUESTS": str(max(64, 2 * most)),
        "DYN_KVBM_CODEC_NIXL__STAGING_BYTES": str(2 * most * blocks_per_client * spec.nbytes),
        "DYN_KVBM_CODEC_NIXL__SLOT_BYTES": str(blocks_per_client * spec.nbytes),
    }
    if batch_threads is not None:
        settings["DYN_KVBM_CODEC_BATCH_THREADS"] = str(batch_threads)
    best: dict[tuple[int, str, str, int], float] = {}
    cores_of: dict[tuple[int, str, str, int], dict[str, float]] = {}  # those of the best round
    with tempfile.TemporaryDirectory(prefix="kvbm-codec-scaling-") as d:
        registry = Path(d) / "registry"
        Registry.from_url(registry).publish(cal, promote=True)
        for rnd in range(rounds):
            for cores in core_sets:
                log_path = Path(d) / f"serve-{rnd}-{len(cores)}.log"
                s3_settings, s3_targets = _s3_endpoint(cal, most, s3_key) if needs_s3 else ({}, {})
                procs = min(codec_processes, len(cores)) if len(cores) > 1 else 0
                env = settings | s3_settings | {"DYN_KVBM_CODEC_CODEC_PROCESSES": str(procs)}
                svc = pinned_service(registry, cal, spec, target_cr, cores, env, log_path)
                try:
                    with CodecClient(svc.target, model=svc.model, timeout_s=5.0) as client:
                        svc.wait_healthy(client, STARTUP_TIMEOUT_S)
                    if s3_targets:  # `serve` starts its S3 endpoint after the gRPC server
                        _wait_listening(int(s3_settings["DYN_KVBM_CODEC_S3__PORT"]), STARTUP_TIMEOUT_S)
                    levels = _levels(svc, level_of, spec, clients, paths, blocks_per_client, s3_targets)
                    for (path, op, n), mbps, used in levels:
                        key = (len(cores), path, op, n)
                        if mbps > best.get(key, 0.0):
                            best[key], cores_of[key] = mbps, used
                        what = f"round {rnd + 1}, {len(cores)} core(s): {path:4} {op} {n:2} clients"
                        log(
                            f"  {what}: {mbps:7.2f} MB/s  (cores used: service {used['server_cores']:.2f}, "
                            f"clients {used['client_cores']:.2f})"
                        )
                finally:
                    svc.stop()
    rows = [
        {"cores": c, "path": p, "op": op, "clients": n, "mbps": v, **cores_of[(c, p, op, n)]}
        for (c, p, op, n), v in sorted(best.items())
    ]
    lo, hi = min(len(c) for c in core_sets), max(len(c) for c in core_sets)
    ratios = []
    for (c, p, op, n), v in sorted(best.items()):
        if c == hi and (lo, p, op, n) in best:
            ratios.append({"path": p, "op": op, "clients": n, "ratio": v / best[(lo, p, op, n)]})
    total = {c: sum(v for (cc, *_), v in best.items() if cc == c) for c in (lo, hi)}
    return {
        "core_sets": [list(c) for c in core_sets],
        "rounds": rounds,
        "rows": rows,
        "ratios": ratios,
        "sum_ratio": total[hi] / total[lo] if total[lo] else float("nan"),
        "client_cpus": sorted(os.sched_getaffinity(0)),
        "codec_processes": codec_processes,
    }


def _s3_endpoint(
    cal: Calibration, workers: int, key: tuple[str, str] | None
) -> tuple[dict[str, str], dict[str, str]]:
    """(the environment that gives a `serve` its S3 endpoint on a fresh port, with the default
    bucket of the served model, the level's targets: endpoint URL and bucket)."""
    assert key is not None
    port = free_port()
    settings = {
        "DYN_KVBM_CODEC_S3__ENABLED": "true",
        "DYN_KVBM_CODEC_S3__PORT": str(port),
        "DYN_KVBM_CODEC_S3__WORKERS": str(max(4, workers)),
        "KVBM_CODEC_S3_ACCESS_KEY": key[0],
        "KVBM_CODEC_S3_SECRET_KEY": key[1],
        "KVBM_CODEC_S3_TENANT": S3_TENANT,
    }
    from kvbm_codec.frontends.s3.server import default_bucket_name

    bucket = default_bucket_name(cal.model_name or "model")  # the model name pinned_service serves
    return settings, {"s3": f"http://127.0.0.1:{port}", "bucket": bucket}


def _wait_listening(port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"the service's S3 endpoint did not listen on port {port} within {timeout_s:.0f} s")
