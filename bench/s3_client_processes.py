"""S3 throughput of a pinned 2-core `kvbm-codec serve` with its boto3 clients in separate processes.

`bench throughput` drives S3 from boto3 clients that are threads of one Python process. There,
the service used 1.1-1.25 of its 2 cores and the GIL was held in 32% of its samples, while the
clients took 0.3 of a core (docs/benchmarks.md, session 31). This script asks whether the bench's
clients are the limit. A layout PxC runs P client processes of C boto3 clients each (1x4 is the
bench's layout), every client with 8 objects in flight, open loop (no barrier between clients) for
``--seconds``. The codec-only batch-8 figure is
measured in the same run, so the ratio is issue 15's "S3 >= 50% of codec-only".

    python bench/s3_client_processes.py --op put --layouts 1x4,4x1,8x1 --seconds 15 \
        --json bench/results/s3_client_processes_put_s31.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IN_FLIGHT = 8  # objects each client process keeps in flight
START_DELAY_S = 8.0  # every process imports boto3 and connects before the clock starts


@dataclass(frozen=True)
class Job:
    """What every client of a run does: ``op`` on ``data`` against the endpoint's bucket, from
    ``start`` (wall clock) for ``seconds``."""

    url: str
    bucket: str
    key: tuple[str, str]
    data: list[bytes]
    op: str
    start: float
    seconds: float


def _process(job: Job, idx: int, clients: int, out: Any) -> None:
    """``clients`` boto3 clients on threads of this process (the bench's layout when it is all of
    them); the objects they moved go to ``out``."""
    import threading

    done: list[int] = []
    threads = [
        threading.Thread(target=lambda k: done.append(_client(job, idx * 64 + k)), args=(k,))
        for k in range(clients)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.put(sum(done) if len(done) == clients else -1)


def _client(job: Job, idx: int) -> int:
    import boto3
    from botocore.config import Config

    config = Config(
        s3={"addressing_style": "path"}, max_pool_connections=IN_FLIGHT, retries={"max_attempts": 1}
    )
    bucket, data = job.bucket, job.data
    c = boto3.client(
        "s3",
        endpoint_url=job.url,
        aws_access_key_id=job.key[0],
        aws_secret_access_key=job.key[1],
        region_name="us-east-1",
        config=config,
    )
    base = 10_000_000 * (idx + 1)  # decimal keys: the endpoint takes them as sequence hashes

    def put(keys: list[str]) -> None:
        list(pool.map(lambda i: c.put_object(Bucket=bucket, Key=keys[i], Body=data[i]), range(IN_FLIGHT)))

    def get() -> list[int]:
        read = lambda i: len(c.get_object(Bucket=bucket, Key=str(base + i))["Body"].read())  # noqa: E731
        return list(pool.map(read, range(IN_FLIGHT)))

    with ThreadPoolExecutor(IN_FLIGHT) as pool:
        if job.op == "get":
            put([str(base + i) for i in range(IN_FLIGHT)])
        while time.time() < job.start:
            time.sleep(0.001)
        n = rnd = 0
        while time.time() < job.start + job.seconds:
            if job.op == "put":  # every round stores new objects
                put([str(base + 1000 * (rnd + 1) + i) for i in range(IN_FLIGHT)])
            elif (got := get()) != [len(d) for d in data]:
                raise RuntimeError(f"a GET returned {got} bytes")
            n += IN_FLIGHT
            rnd += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--op", choices=("put", "get"), default="put")
    ap.add_argument(
        "--layouts", default="1x4,4x1,8x1", help="client processes x boto3 clients per process, e.g. 1x4,4x1"
    )
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--json", type=Path, required=True)
    a = ap.parse_args()
    from kvbm_codec.bench.scaling import (
        STARTUP_TIMEOUT_S,
        _s3_endpoint,
        _wait_listening,
        pinned_service,
        tree_cpu_seconds,
    )
    from kvbm_codec.bench.throughput import _S3_KEY, codec_only, default_model_blocks
    from kvbm_codec.calibration.registry import Registry
    from kvbm_codec.codec.block import KVTCBlockCodec
    from kvbm_codec.codec.kvtc import KVTCCodec
    from kvbm_codec.core.matmul import configure_fp32_matmul
    from kvbm_codec.frontends.grpc.client import CodecClient

    mode = configure_fp32_matmul()
    cores = sorted(os.sched_getaffinity(0))
    cal, rb = default_model_blocks()
    spec = rb.spec
    ctx = mp.get_context("spawn")
    rows = []
    with tempfile.TemporaryDirectory(prefix="kvbm-codec-s3-procs-") as d:
        registry = Path(d) / "registry"
        Registry.from_url(registry).publish(cal, promote=True)
        for layout in a.layouts.split(","):
            procs, per = (int(x) for x in layout.split("x"))
            env, targets = _s3_endpoint(cal, 4, _S3_KEY)
            env["DYN_KVBM_CODEC_MAX_INFLIGHT_REQUESTS"] = str(max(64, 2 * procs * per * IN_FLIGHT))
            svc = pinned_service(registry, cal, spec, 20.0, cores, env, Path(d) / f"serve-{layout}.log")
            try:
                with CodecClient(svc.target, model=svc.model, timeout_s=5.0) as c:
                    svc.wait_healthy(c, STARTUP_TIMEOUT_S)
                _wait_listening(int(env["DYN_KVBM_CODEC_S3__PORT"]), STARTUP_TIMEOUT_S)
                out = ctx.Queue()
                start = time.time() + START_DELAY_S
                workers = []
                for i in range(procs):
                    data = [rb.data[(IN_FLIGHT * i + k) % len(rb.data)] for k in range(IN_FLIGHT)]
                    job = Job(targets["s3"], targets["bucket"], _S3_KEY, data, a.op, start, a.seconds)
                    workers.append(ctx.Process(target=_process, args=(job, i, per, out)))
                for w in workers:
                    w.start()
                while time.time() < start:
                    time.sleep(0.01)
                cpu0 = tree_cpu_seconds(svc.proc.pid)
                moved = [out.get(timeout=a.seconds + 120) for _ in workers]
                if min(moved) < 0:
                    raise RuntimeError("a client failed (see its traceback above)")
                objects = sum(moved)
                cpu1 = tree_cpu_seconds(svc.proc.pid)
                for w in workers:
                    w.join(30)
                mbps = objects * spec.nbytes / 1e6 / a.seconds
                used = (cpu1 - cpu0) / a.seconds
                rows.append(
                    {"processes": procs, "clients_per_process": per, "mbps": mbps, "service_cores": used}
                )
                print(
                    f"{a.op} {procs} process(es) x {per} client(s) x {IN_FLIGHT} in flight: {mbps:.1f} MB/s "
                    f"(service cores {used:.2f})",
                    flush=True,
                )
            finally:
                svc.stop()
    co = codec_only(KVTCBlockCodec.create(cal, spec, 20.0), rb, (8,), 3, KVTCCodec(cal, 20.0))
    ref = co["encode" if a.op == "put" else "decode"]["8"]
    print(f"codec-only batch-8 {'encode' if a.op == 'put' else 'decode'} per core, same run: {ref:.1f} MB/s")
    for r in rows:
        r["ratio_to_codec"] = r["mbps"] / ref
        print(f"  {r['processes']}x{r['clients_per_process']}: {r['ratio_to_codec']:.0%} of codec-only")
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(
        json.dumps(
            {"op": a.op, "cores": cores, "fp32_matmul": mode, "calibration_id": cal.calibration_id,
             "seconds": a.seconds, "in_flight_per_process": IN_FLIGHT, "codec_mbps_per_core": ref,
             "rows": rows},
            indent=1,
        )
    )  # fmt: skip


if __name__ == "__main__":
    main()
