"""The service on 1 core against 2 (or any core sets): `kvbm-codec serve` pinned, the same clients.

The in-process figures of `bench throughput` share one process between clients and server, so a
`taskset` of the whole run narrows both. Here the service is its own `kvbm-codec serve` process, its
CPU affinity set before it starts (so the torch, gRPC, codec-split and UCX threads it creates all
inherit it, and ``batch_threads``' default, one per core, follows the mask), while the clients run in
this process with the affinity this process has. Each core set gets a fresh server with the same
configuration and calibration; levels run in the same order for each, and the whole sequence of core
sets is repeated ``rounds`` times, alternating, keeping each level's best, so that a load change on a
shared machine hits both sides alike.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from kvbm_codec.api.blocks import BlockSpec
from kvbm_codec.codec.params import Calibration
from kvbm_codec.frontends.grpc.client import CodecClient
from kvbm_codec.server.process import ServiceProcess

STARTUP_TIMEOUT_S = 120.0


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
) -> Iterator[tuple[tuple[str, str, int], float]]:
    """((path, op, clients), MB/s) of each level against one running service, in a fixed order."""
    targets = {"grpc": svc.target, "model": svc.model}
    for n in clients:
        for path in paths:
            level = level_of(targets, path, n)
            try:
                level.open()
                for op in ("put", "get"):
                    yield (path, op, n), n * per_client * spec.nbytes / level.run(op, 0) / 1e6
            finally:
                level.close()


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
) -> dict[str, Any]:
    """put/get MB/s of a pinned service per (cores, path, clients), best of ``rounds``, and each
    level's ratio of the largest core set to the smallest."""
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
    with tempfile.TemporaryDirectory(prefix="kvbm-codec-scaling-") as d:
        registry = Path(d) / "registry"
        Registry.from_url(registry).publish(cal, promote=True)
        for rnd in range(rounds):
            for cores in core_sets:
                log_path = Path(d) / f"serve-{rnd}-{len(cores)}.log"
                svc = pinned_service(registry, cal, spec, target_cr, cores, settings, log_path)
                try:
                    with CodecClient(svc.target, model=svc.model, timeout_s=5.0) as client:
                        svc.wait_healthy(client, STARTUP_TIMEOUT_S)
                    levels = _levels(svc, level_of, spec, clients, paths, blocks_per_client)
                    for (path, op, n), mbps in levels:
                        key = (len(cores), path, op, n)
                        best[key] = max(best.get(key, 0.0), mbps)
                        what = f"round {rnd + 1}, {len(cores)} core(s): {path:4} {op} {n:2} clients"
                        log(f"  {what}: {mbps:7.2f} MB/s")
                finally:
                    svc.stop()
    rows = [
        {"cores": c, "path": p, "op": op, "clients": n, "mbps": v}
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
    }
