"""The codec on the service's threads or in worker processes (`codec_processes`), side by side.

Threads share one GIL: the codec releases it in its matmuls, DEFLATE and checksums, but between
those a few hundred small torch ops per batch convoy on it (docs/benchmarks.md, session 23).
Worker processes have no shared GIL. Instead, a batch's raw blocks (encode) or decoded blocks
(decode) cross a pipe. This script says which wins on this machine. Three pinned `kvbm-codec serve`
layouts get the same real SmolLM2 blocks from clients in this process, the throughput bench's own
levels (gRPC, NIXL, S3 with boto3, S3 with NIXL's OBJ client):
- the codec on threads, on every core;
- one worker process per core;
- threads on one core, issue 15's 1-core reference.
The layouts alternate round by round, so a load change on a shared machine hits each of them.
The report gives each level's median and best, and the CPU cores the service and the clients used.

    python bench/codec_processes_ab.py --rounds 3 --json bench/results/codec_processes_ab_s31.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

from kvbm_codec.bench.scaling import (
    S3_PATHS,
    STARTUP_TIMEOUT_S,
    _levels,
    _s3_endpoint,
    _wait_listening,
    pinned_service,
)
from kvbm_codec.bench.throughput import _S3_KEY, _Level, default_model_blocks, obj_unavailable
from kvbm_codec.calibration.registry import Registry
from kvbm_codec.core.matmul import configure_fp32_matmul
from kvbm_codec.frontends.grpc.client import CodecClient

PER_CLIENT = 8


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of the layouts")
    ap.add_argument("--paths", default="grpc,nixl,s3,obj")
    ap.add_argument("--json", type=Path, required=True)
    a = ap.parse_args()
    mode = configure_fp32_matmul()
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise SystemExit("needs 2+ cores")
    paths = [p for p in a.paths.split(",") if p]
    if "obj" in paths and (why := obj_unavailable()) is not None:
        print(f"obj skipped: {why}")
        paths.remove("obj")
    cal, rb = default_model_blocks()
    spec = rb.spec
    n = a.clients
    settings = {
        "DYN_KVBM_CODEC_MAX_INFLIGHT_REQUESTS": str(max(64, 2 * n)),
        "DYN_KVBM_CODEC_NIXL__STAGING_BYTES": str(2 * n * PER_CLIENT * spec.nbytes),
        "DYN_KVBM_CODEC_NIXL__SLOT_BYTES": str(PER_CLIENT * spec.nbytes),
    }
    layouts = {  # name: (cores, codec worker processes)
        "threads, every core": (cores, 0),
        "processes, every core": (cores, len(cores)),
        "threads, one core": (cores[:1], 0),
    }
    seen: dict[tuple[str, str, str], list[tuple[float, dict[str, float]]]] = {}
    with tempfile.TemporaryDirectory(prefix="kvbm-codec-procs-ab-") as d:
        registry = Path(d) / "registry"
        Registry.from_url(registry).publish(cal, promote=True)
        for rnd in range(a.rounds):
            for li, (name, (cs, procs)) in enumerate(layouts.items()):
                s3_env, s3_targets = _s3_endpoint(cal, n, _S3_KEY) if set(S3_PATHS) & set(paths) else ({}, {})
                env = settings | s3_env | {"DYN_KVBM_CODEC_CODEC_PROCESSES": str(procs)}
                svc = pinned_service(registry, cal, spec, 20.0, cs, env, Path(d) / f"serve-{rnd}-{li}.log")
                try:
                    with CodecClient(svc.target, model=svc.model, timeout_s=5.0) as c:
                        svc.wait_healthy(c, STARTUP_TIMEOUT_S)
                    if s3_targets:
                        _wait_listening(int(s3_env["DYN_KVBM_CODEC_S3__PORT"]), STARTUP_TIMEOUT_S)
                    level_of = lambda targets, path, k: _Level(targets, path, k, rb, PER_CLIENT)  # noqa: E731
                    for (path, op, _), mbps, used in _levels(
                        svc, level_of, spec, [n], paths, PER_CLIENT, s3_targets
                    ):
                        seen.setdefault((name, path, op), []).append((mbps, used))
                        print(
                            f"round {rnd + 1} {name:22s} {path:4} {op}: {mbps:7.1f} MB/s (cores used: "
                            f"service {used['server_cores']:.2f}, clients {used['client_cores']:.2f})",
                            flush=True,
                        )
                finally:
                    svc.stop()
    rows: list[dict[str, Any]] = []
    for (name, path, op), got in sorted(seen.items()):
        mbps = [g[0] for g in got]
        rows.append({
            "layout": name, "path": path, "op": op, "clients": n, "mbps_median": statistics.median(mbps),
            "mbps_best": max(mbps), "rounds": mbps,
            "server_cores_median": statistics.median(g[1]["server_cores"] for g in got),
            "client_cores_median": statistics.median(g[1]["client_cores"] for g in got),
        })  # fmt: skip
    by = {(r["layout"], r["path"], r["op"]): r for r in rows}
    for path in paths:
        for op in ("put", "get"):
            t, p, one = (by[(k, path, op)]["mbps_median"] for k in layouts)
            print(
                f"{path:4} {op} {n} clients, medians: threads {t:.1f}, processes {p:.1f} MB/s "
                f"(processes / threads {p / t:.2f}x); of one core: threads {t / one:.2f}x, "
                f"processes {p / one:.2f}x"
            )
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(
        json.dumps(
            {"cores": cores, "fp32_matmul": mode, "calibration_id": cal.calibration_id, "rounds": a.rounds,
             "clients": n, "blocks_per_client": PER_CLIENT, "rows": rows},
            indent=1,
        )
    )  # fmt: skip


if __name__ == "__main__":
    main()
