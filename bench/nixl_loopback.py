"""NIXL READ throughput on one host vs a memcpy of the same spans, measured in the same run.

The service pulls a request's blocks from a client's registered block pool in one NIXL transfer
(``NixlAgent.read_many``). This times that for 64 blocks of 737280 bytes (one SmolLM2-135M fp16 KVBM
block: 30 layers x K,V x 32 tokens x 3 heads x 64 dims x 2 bytes) scattered over a pool twice as large,
read into a contiguous staging buffer:

* ``nixl in-process``: client and server agents in this process (UCX ``cma`` zero-copy get);
* ``nixl cross-process``: the client agent and its pool in a spawned child (UCX ``cma`` zero-copy);
* ``nixl cross-process tcp``: the same with the server agent limited to ``UCX_TLS=tcp,self`` on ``lo``
  (UCX emulates the get in software over tcp);
* ``memcpy spans``: libc ``memmove`` of the same 64 spans in this process, one thread;
  ``memcpy contiguous``: one ``memmove`` of the same number of bytes. What a loopback transport's
  copy competes with.

Every timed READ is checked bit-identical once. Reports the median of ``--reps`` runs (after one
warm-up) and the best, in MB/s (10^6 bytes/s). The client side is the transfer's target; UCX needs
its progress thread (connection setup, and every tcp transfer), whose pause between polls is
``--progress-delay-us`` (NixlAgent's default 1000; nixl's own default is 0).
Usage: python bench/nixl_loopback.py [--blocks 64] [--block-bytes 737280] [--reps 20]
       [--progress-delay-us 1000] [--json OUT]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import multiprocessing as mp
import os
import statistics
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path

import torch

from kvbm_codec.transport import NixlAgent, RemoteRegion

TCP_LOOPBACK = {"UCX_TLS": "tcp,self", "UCX_NET_DEVICES": "lo"}


def _pool(n_slots: int, block_bytes: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n_slots * block_bytes,), dtype=torch.uint8, generator=g)


def _spans(n_blocks: int, n_slots: int, block_bytes: int) -> list[tuple[int, int, int]]:
    slots = torch.randperm(n_slots, generator=torch.Generator().manual_seed(1))[:n_blocks].tolist()
    return [(s * block_bytes, i * block_bytes, block_bytes) for i, s in enumerate(slots)]


def _time(fn: Callable[[], None], reps: int) -> list[float]:
    fn()  # warm-up: connection setup, page faults
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _check(staging: torch.Tensor, pool: torch.Tensor, spans: list[tuple[int, int, int]]) -> None:
    for r, loc, n in spans:
        if not torch.equal(staging[loc : loc + n], pool[r : r + n]):
            raise SystemExit("READ was not bit-identical")


def _child(conn: Connection, n_slots: int, block_bytes: int, delay_us: int) -> None:
    with (
        NixlAgent("bench-client-child", progress_delay_us=delay_us) as agent,
        agent.register(_pool(n_slots, block_bytes)) as reg,
    ):
        conn.send(reg.remote().to_dict())
        conn.recv()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=64)
    ap.add_argument("--block-bytes", type=int, default=737280)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--progress-delay-us", type=int, default=1000, help="every agent's progress-thread delay")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    n_slots = 2 * args.blocks
    spans = _spans(args.blocks, n_slots, args.block_bytes)
    total = args.blocks * args.block_bytes
    pool = _pool(n_slots, args.block_bytes)
    results: dict[str, dict[str, float]] = {}

    def report(name: str, times: list[float]) -> None:
        med, best = statistics.median(times), min(times)
        results[name] = {"median_mb_s": total / med / 1e6, "best_mb_s": total / best / 1e6}
        print(
            f"{name:<24} median {med * 1e3:7.2f} ms {total / med / 1e6:7.0f} MB/s"
            f"   best {best * 1e3:7.2f} ms {total / best / 1e6:7.0f} MB/s",
            flush=True,
        )

    print(
        f"READ {args.blocks} x {args.block_bytes} B = {total / 1e6:.1f} MB in one transfer,"
        f" median of {args.reps}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    staging = torch.zeros(total, dtype=torch.uint8)

    dst, src = staging.data_ptr(), pool.data_ptr()

    def spans_copy() -> None:
        for r, loc, n in spans:
            ctypes.memmove(dst + loc, src + r, n)

    report("memcpy spans", _time(spans_copy, args.reps))
    _check(staging, pool, spans)
    report("memcpy contiguous", _time(lambda: ctypes.memmove(dst, src, total), args.reps))

    with (
        NixlAgent("bench-server", progress_delay_us=args.progress_delay_us) as server,
        server.register(staging) as sreg,
    ):
        with (
            NixlAgent("bench-client", progress_delay_us=args.progress_delay_us) as client,
            client.register(pool) as creg,
        ):
            remote = creg.remote()
            staging.zero_()
            report("nixl in-process", _time(lambda: server.read_many(remote, spans, sreg), args.reps))
            _check(staging, pool, spans)

        ctx = mp.get_context("spawn")
        conn, child_conn = ctx.Pipe()
        proc = ctx.Process(
            target=_child, args=(child_conn, n_slots, args.block_bytes, args.progress_delay_us), daemon=True
        )
        proc.start()
        try:
            if not conn.poll(120):
                raise SystemExit("child NIXL agent did not start")
            child_region = RemoteRegion.from_dict(conn.recv())
            staging.zero_()
            report(
                "nixl cross-process", _time(lambda: server.read_many(child_region, spans, sreg), args.reps)
            )
            _check(staging, pool, spans)

            saved = {k: os.environ.get(k) for k in TCP_LOOPBACK}
            os.environ.update(TCP_LOOPBACK)  # UCX reads these when the agent is created
            try:
                tcp_server = NixlAgent("bench-server-tcp", progress_delay_us=args.progress_delay_us)
            finally:
                for k, v in saved.items():
                    if v is None:
                        del os.environ[k]
                    else:
                        os.environ[k] = v
            with tcp_server, tcp_server.register(torch.zeros(total, dtype=torch.uint8)) as treg:
                report(
                    "nixl cross-process tcp",
                    _time(lambda: tcp_server.read_many(child_region, spans, treg, timeout_s=60), args.reps),
                )
                _check(treg.tensor, pool, spans)
        finally:
            conn.send("exit")
            proc.join(30)
            if proc.is_alive():
                proc.kill()

    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "blocks": args.blocks,
                    "block_bytes": args.block_bytes,
                    "reps": args.reps,
                    "progress_delay_us": args.progress_delay_us,
                    "load_average_1min": os.getloadavg()[0],
                    "cpus": os.cpu_count(),
                    "results": results,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
