"""One `serve` on every core, or one `serve` per core behind a ShardedClient: which gets more out of a node?

A `kvbm-codec serve` process runs its codec's small ops under one GIL, and on the session-23 VM two
threads of them convoy (docs/benchmarks.md). Replicas are shards already (cluster/sharding.py), so a
node's cores can instead run one 1-core replica each, the clients spreading blocks over them by the
consistent-hash ring. Both layouts get the same real SmolLM2 blocks from clients in this process, gRPC
on 127.0.0.1, 8 blocks per request; the layouts alternate for ``--rounds`` rounds and each level
keeps its best round (every put round stores new blocks; each get round reads its own round's).
One `serve` on one core is measured beside them: issue 15's scaling target is 2 cores >= 1.7x of 1.

    python bench/replicas_per_core.py --clients 1,4,8 --rounds 3 \
        --json bench/results/replicas_per_core_s24b.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from kvbm_codec.bench.scaling import STARTUP_TIMEOUT_S, pinned_service
from kvbm_codec.bench.throughput import RealBlocks, _Level, default_model_blocks
from kvbm_codec.calibration.registry import Registry
from kvbm_codec.cluster.sharding import ShardedClient, StaticMembership
from kvbm_codec.core.matmul import configure_fp32_matmul
from kvbm_codec.frontends.grpc.client import CodecClient
from kvbm_codec.server.process import ServiceProcess

PER_REQUEST = 8


def _client(services: list[ServiceProcess], fanout: int, c: int, spread: bool) -> Any:
    """Client c's transport: a ShardedClient over every replica (``spread``), or a CodecClient of
    replica c mod N (each client keeps to one replica, with whole requests)."""
    if not spread or len(services) == 1:
        svc = services[c % len(services)]
        return CodecClient(svc.target, model=svc.model, timeout_s=600)
    return ShardedClient(
        StaticMembership({s.target: s for s in services}),
        lambda key, svc: CodecClient(svc.target, model=svc.model, timeout_s=600),
        refresh_interval_s=3600,
        fanout=fanout,
    )


def _level(
    services: list[ServiceProcess], rb: RealBlocks, n: int, rounds: int, fanout: int, spread: bool
) -> dict[str, float]:
    """Best MB/s of n clients putting, then getting, 8 blocks each, over ``rounds`` rounds: the
    throughput bench's own gRPC level (warm-up at the timed size, new blocks every put round)."""
    level = _Level({}, "grpc", n, rb, PER_REQUEST, connect=lambda c: _client(services, fanout, c, spread))
    level.open()
    try:
        mb = n * PER_REQUEST * rb.spec.nbytes / 1e6
        return {op: mb / min(level.run(op, r) for r in range(rounds)) for op in ("put", "get")}
    finally:
        level.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", default="1,4")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of both layouts")
    ap.add_argument("--repeats", type=int, default=3, help="timed put/get rounds per level and layout")
    ap.add_argument("--fanout", type=int, default=16, help="ShardedClient fanout (1: shares in turn)")
    ap.add_argument("--json", type=Path, required=True)
    a = ap.parse_args()
    mode = configure_fp32_matmul()
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise SystemExit("needs 2+ cores")
    cal, rb = default_model_blocks()
    spec = rb.spec
    clients = [int(c) for c in a.clients.split(",")]
    most = max(clients)
    settings = {"DYN_KVBM_CODEC_MAX_INFLIGHT_REQUESTS": str(max(64, 2 * most))}
    per_core = [[c] for c in cores]
    layouts = {  # name: (core sets, clients spread over every replica by the ring)
        "one serve on every core": ([cores], True),
        "one serve on one core": ([cores[:1]], True),  # the 1-core baseline of issue 15's scaling
        "one serve per core, sharded": (per_core, True),
        "one serve per core, one each": (per_core, False),  # client c keeps to replica c mod N
    }
    best: dict[tuple[str, int, str], float] = {}
    with tempfile.TemporaryDirectory(prefix="kvbm-codec-replicas-") as d:
        registry = Path(d) / "registry"
        Registry.from_url(registry).publish(cal, promote=True)
        for rnd in range(a.rounds):
            for li, (name, (core_sets, spread)) in enumerate(layouts.items()):
                services = [
                    pinned_service(
                        registry, cal, spec, 20.0, cs, settings, Path(d) / f"serve-{rnd}-{li}-{i}.log"
                    )
                    for i, cs in enumerate(core_sets)
                ]
                try:
                    for svc in services:
                        with CodecClient(svc.target, model=svc.model, timeout_s=5.0) as c:
                            svc.wait_healthy(c, STARTUP_TIMEOUT_S)
                    for n in clients:
                        got = _level(services, rb, n, a.repeats, a.fanout, spread)
                        for op, v in got.items():
                            best[(name, n, op)] = max(best.get((name, n, op), 0.0), v)
                            print(
                                f"round {rnd + 1} {name:30s} {n:2d} clients {op}: {v:7.1f} MB/s", flush=True
                            )
                finally:
                    for svc in services:
                        svc.stop()
    rows = [{"layout": k[0], "clients": k[1], "op": k[2], "mbps": v} for k, v in sorted(best.items())]
    names = [m for m in layouts if m != "one serve on one core"]
    for n in clients:
        for op in ("put", "get"):
            base, one = best[(names[0], n, op)], best[("one serve on one core", n, op)]
            vs = ", ".join(f"{m} {best[(m, n, op)]:.1f} ({best[(m, n, op)] / base:.2f}x)" for m in names[1:])
            of_one = ", ".join(f"{m} {best[(m, n, op)] / one:.2f}x" for m in names)
            print(f"{n:2d} clients {op}: {names[0]} {base:.1f} MB/s; {vs}")
            print(f"{n:2d} clients {op}: against one serve on one core ({one:.1f} MB/s): {of_one}")
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(
        json.dumps(
            {"cores": cores, "fp32_matmul": mode, "fanout": a.fanout, "calibration_id": cal.calibration_id,
             "rounds": a.rounds, "repeats": a.repeats, "blocks_per_request": PER_REQUEST, "rows": rows},
            indent=1,
        )
    )  # fmt: skip


if __name__ == "__main__":
    main()
