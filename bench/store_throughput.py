"""Disk tier put/get throughput, fsync on and off.

    .venv/bin/python bench/store_throughput.py [--dir DIR] [--blocks 400] [--sizes 43000 262144]
                                               [--threads 1 4]

Puts ``--blocks`` distinct blocks of each size into a fresh DiskTier from each number of threads
(the tier fsyncs outside its lock, so concurrent puts overlap their flushes), then gets them all
back in random order from one thread. Gets are served from the page cache (just written, never
evicted from it), so they measure read + checksum verification, not the device; puts with fsync
measure the device's flush latency. 43 000 B is about one compressed 32-token SmolLM2 block
(737 280 B fp16 at ~17x).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kvbm_codec.store.base import BlockKey
from kvbm_codec.store.disk import DiskTier


def run(root: Path, size: int, blocks: int, fsync: bool, threads: int) -> dict[str, object]:
    d = root / f"tier-{size}-{int(fsync)}-{threads}"
    shutil.rmtree(d, ignore_errors=True)
    rnd = random.Random(size)
    payloads = [rnd.randbytes(size) for _ in range(min(blocks, 32))]  # content does not matter
    keys = [BlockKey("bench", "m", i) for i in range(blocks)]
    with DiskTier(d, size * blocks * 2, fsync=fsync) as tier:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda i: tier.put(keys[i], payloads[i % len(payloads)]), range(blocks)))
        put_s = time.perf_counter() - t0
        order = keys[:]
        rnd.shuffle(order)
        t0 = time.perf_counter()
        for k in order:
            if tier.get(k) is None:
                raise RuntimeError(f"{k} missing")
        get_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    with DiskTier(d, size * blocks * 2, fsync=fsync) as tier:
        reopen_s = time.perf_counter() - t0
        assert tier.stats().blocks == blocks
    shutil.rmtree(d, ignore_errors=True)
    mb = size * blocks / 1e6
    return {
        "block_bytes": size,
        "blocks": blocks,
        "fsync": fsync,
        "put_threads": threads,
        "put_MB_s": round(mb / put_s, 1),
        "put_ms_per_block": round(1e3 * put_s / blocks, 3),
        "get_MB_s": round(mb / get_s, 1),
        "get_ms_per_block": round(1e3 * get_s / blocks, 3),
        "reopen_ms": round(1e3 * reopen_s, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp dir in /tmp)")
    p.add_argument("--blocks", type=int, default=400)
    p.add_argument("--sizes", type=int, nargs="+", default=[43_000, 262_144])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 4])
    a = p.parse_args()
    root = a.dir or Path(tempfile.mkdtemp(prefix="kvbm-store-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        for size in a.sizes:
            for fsync in (True, False):
                for threads in a.threads:
                    print(json.dumps(run(root, size, a.blocks, fsync, threads)), flush=True)
    finally:
        if a.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
