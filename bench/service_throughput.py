"""Service throughput: put/get blocks/s and MB/s at 1, 4, 16 concurrent clients, gRPC bytes path and
NIXL path side by side, with p50/p99 latency of get (restore) requests.

Real parts only: SmolLM2-135M KV of the demo text cut into 32-token KVBM blocks, the local default
calibration (`load_or_calibrate`, as `kvbm-codec serve` uses), a real gRPC server on 127.0.0.1 and,
for the NIXL path, real NIXL agents (UCX) on both sides. The server runs in this process (its own
thread pool); clients are threads with one channel each. MB/s counts raw fp16 block bytes (what
the engine moves), not compressed bytes.

    nice -n 10 .venv/bin/python bench/service_throughput.py --json bench/results/service_throughput.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import threading
import time
from pathlib import Path

import torch

from kvbm_codec.adapters.kv_blocks import kv_blocks
from kvbm_codec.api.blocks import BlockSpec
from kvbm_codec.api.types import PutItem
from kvbm_codec.calibration.cache import load_or_calibrate
from kvbm_codec.core.service import ServedModel
from kvbm_codec.frontends.grpc.client import CodecClient
from kvbm_codec.frontends.grpc.server import CodecServer
from kvbm_codec.models.hf import CausalLM
from kvbm_codec.server.app import build_service
from kvbm_codec.service.config import ModelConfig, NixlConfig, ServiceConfig
from kvbm_codec.texts import demo_document


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]  # nearest rank


def run_level(target: str, path: str, n_clients: int, blocks, spec, get_batch: int, rounds: int) -> dict:  # type: ignore[no-untyped-def]
    clients = [
        CodecClient(target, model="smollm2-135m", timeout_s=600, max_attempts=5) for _ in range(n_clients)
    ]
    regs: list[tuple] = []
    # each client stores its own copy of the blocks under its own hashes
    hashes = [
        [(b.sequence_hash ^ (0x9E3779B97F4A7C15 * (i + 1))) & (2**64 - 1) for b in blocks]
        for i in range(n_clients)
    ]
    if path == "nixl":
        for c in clients:
            agent = c.nixl_agent()
            src = torch.frombuffer(bytearray(b"".join(b.data for b in blocks)), dtype=torch.uint8)
            dst = torch.zeros_like(src)
            regs.append((agent.register(src), agent.register(dst)))
    # Warm up outside the timed region: channel, batch size, and for NIXL the peers' metadata
    # exchange and UCX connection (one put and one get of a block under a throwaway hash).
    for i, c in enumerate(clients):
        warm = (hashes[i][0] ^ 0xFFFF) & (2**64 - 1)
        if path == "grpc":
            c.put_blocks([PutItem(warm, blocks[0].data)])
            c.get_blocks([warm])
        else:
            c.put_blocks_nixl(regs[i][0], [(warm, 0, 0)])
            c.get_blocks_nixl(regs[i][1], [warm], [0])
        c.delete([warm])
    barrier = threading.Barrier(n_clients + 1)
    put_lat: list[float] = []
    get_lat: list[float] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def put_worker(i: int) -> None:
        c = clients[i]
        barrier.wait()
        try:
            for _ in range(rounds):
                t0 = time.perf_counter()
                if path == "grpc":
                    c.put_blocks(
                        [
                            PutItem(h, b.data, first_position=b.first_position)
                            for h, b in zip(hashes[i], blocks, strict=True)
                        ]
                    )
                else:
                    c.put_blocks_nixl(
                        regs[i][0],
                        [
                            (h, b.first_position, k * spec.nbytes)
                            for k, (h, b) in enumerate(zip(hashes[i], blocks, strict=True))
                        ],
                    )
                with lock:
                    put_lat.append(time.perf_counter() - t0)
        except BaseException as e:
            errors.append(e)
        barrier.wait()

    def get_worker(i: int) -> None:
        c = clients[i]
        barrier.wait()
        try:
            for _ in range(rounds):
                for s in range(0, len(blocks), get_batch):
                    hs = hashes[i][s : s + get_batch]
                    t0 = time.perf_counter()
                    if path == "grpc":
                        got = c.get_blocks(hs)
                    else:
                        got = c.get_blocks_nixl(
                            regs[i][1], hs, [k * spec.nbytes for k in range(s, s + len(hs))]
                        )
                    dt = time.perf_counter() - t0
                    if any(g.status != "hit" for g in got):
                        raise RuntimeError("miss during bench")
                    with lock:
                        get_lat.append(dt)
        except BaseException as e:
            errors.append(e)
        barrier.wait()

    out = {"path": path, "clients": n_clients}
    for phase, worker in (("put", put_worker), ("get", get_worker)):
        threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(n_clients)]
        for t in threads:
            t.start()
        barrier.wait()
        t0 = time.perf_counter()
        barrier.wait()
        dt = time.perf_counter() - t0
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        n = n_clients * rounds * len(blocks)
        out[f"{phase}_blocks_per_s"] = round(n / dt, 1)
        out[f"{phase}_raw_MB_per_s"] = round(n * spec.nbytes / dt / 1e6, 2)
    if path == "nixl":  # the restored bytes really landed in the client's memory
        ok = bytes(regs[0][1].tensor[: spec.nbytes].numpy()) != bytes(spec.nbytes)
        out["nixl_landed"] = ok
    out["get_p50_ms"] = round(statistics.median(get_lat) * 1000, 2)
    out["get_p99_ms"] = round(_pct(get_lat, 0.99) * 1000, 2)
    out["put_p50_ms"] = round(statistics.median(put_lat) * 1000, 2)
    for rs, rd in regs:
        rs.close()
        rd.close()
    for c in clients:
        c.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", default="1,4,16", help="comma-separated concurrency levels")
    ap.add_argument("--blocks", type=int, default=8, help="32-token blocks per client (distinct real KV)")
    ap.add_argument("--rounds", type=int, default=1, help="puts and gets of all blocks per client")
    ap.add_argument("--get-batch", type=int, default=4, help="blocks per get (restore) request")
    ap.add_argument("--paths", default="grpc,nixl")
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    lm = CausalLM.load()
    cal, _, _ = load_or_calibrate(lm, progress=False)  # what `kvbm-codec serve` encodes with by default
    mc = ModelConfig()
    spec = BlockSpec(cal.shape.n_layers, mc.page_size, cal.shape.n_kv_heads, cal.shape.key_head_dim, mc.dtype)
    served = ServedModel(mc.name, cal, spec, mc.target_cr)
    blocks = kv_blocks(lm, demo_document(), spec, max_tokens=args.blocks * spec.page_size)
    del lm
    cfg = ServiceConfig.load(
        grpc_port=0,
        metrics_port=None,
        workers=args.workers,
        max_inflight_requests=256,
        nixl=NixlConfig(staging_bytes=64 * spec.nbytes, slot_bytes=4 * spec.nbytes),
    )
    svc = build_service(cfg, models=[served])
    server = CodecServer(svc, cfg).start()
    target = f"127.0.0.1:{server.port}"
    rows = []
    try:
        for level in [int(x) for x in args.clients.split(",")]:
            for path in args.paths.split(","):
                if path == "nixl" and server.staging is None:
                    print("NIXL unavailable; skipping nixl path")
                    continue
                row = run_level(target, path, level, blocks, spec, args.get_batch, args.rounds)
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        server.stop(5.0)
    result = {
        "calibration_id": served.calibration.calibration_id,
        "block_bytes": spec.nbytes,
        "blocks_per_client": len(blocks),
        "rounds": args.rounds,
        "get_batch": args.get_batch,
        "workers": args.workers,
        "torch_threads": torch.get_num_threads(),
        "rows": rows,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    print("| path | clients | put blocks/s | put MB/s | get blocks/s | get MB/s | get p50 ms | get p99 ms |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['path']} | {r['clients']} | {r['put_blocks_per_s']} | {r['put_raw_MB_per_s']} | "
            f"{r['get_blocks_per_s']} | {r['get_raw_MB_per_s']} | {r['get_p50_ms']} | {r['get_p99_ms']} |"
        )


if __name__ == "__main__":
    main()
