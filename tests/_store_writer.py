"""Child process for tests/test_store_crash.py: drives a DiskTier and says what it did on stdout.

``crash`` mode writes, overwrites and deletes blocks until killed (or ``--ops`` run out), printing
``B <op> <i>`` before each operation and ``A <op> <i>`` once it has returned, so the parent knows
exactly which operations were acknowledged and which one, at most, was in flight when it killed us.
``fsize`` mode sets RLIMIT_FSIZE and checks that a block whose file would exceed it is refused with
StoreFullError while the blocks already stored stay readable; it prints one JSON line.

Block content is a pure function of the key, so the parent can check any block it finds."""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvbm_codec.store.base import BlockKey, StoreFullError
from kvbm_codec.store.disk import DiskTier


def key_of(i: int) -> BlockKey:
    return BlockKey("crash-tenant", "crash-model", i)


def content(i: int, max_size: int = 256 * 1024) -> bytes:
    rnd = random.Random(i * 7919 + 1)
    return rnd.randbytes(rnd.randrange(1, max_size))


def crash(a: argparse.Namespace) -> None:
    rnd = random.Random(a.seed)
    tier = DiskTier(a.dir, a.capacity, fsync=a.fsync)
    out = sys.stdout
    out.write(f"ready {tier.rebuild_report.blocks}\n")
    out.flush()
    nxt = a.start
    for _ in range(a.ops):
        r = rnd.random()
        if r < 0.7 or nxt == 0:
            op, i = "P", nxt
            nxt += 1
        elif r < 0.85:
            op, i = "P", rnd.randrange(nxt)  # overwrite (or re-create) an older block
        else:
            op, i = "D", rnd.randrange(nxt)
        out.write(f"B {op} {i}\n")
        out.flush()
        if op == "P":
            tier.put(key_of(i), content(i))
        else:
            tier.delete(key_of(i))
        out.write(f"A {op} {i}\n")
        out.flush()
    tier.close()


def fsize(a: argparse.Namespace) -> None:
    # Python ignores SIGXFSZ, so a write past the limit fails with EFBIG instead of killing us.
    resource.setrlimit(resource.RLIMIT_FSIZE, (a.limit, a.limit))
    tier = DiskTier(a.dir, a.capacity, fsync=a.fsync)
    small = {n: random.Random(n).randbytes(a.limit // (n + 3)) for n in range(2)}
    for n, data in small.items():
        tier.put(key_of(n), data)
    result: dict[str, object] = {"stored": len(small)}
    try:
        tier.put(key_of(99), random.Random(99).randbytes(a.limit * 2))
        result["error"] = None
    except StoreFullError as e:
        result["error"] = f"{type(e).__name__}: {e}"
    result["big_present"] = tier.contains(key_of(99))
    result["temp_files"] = len(list(Path(a.dir).rglob("*.tmp")))
    result["readback_ok"] = all(tier.get(key_of(n)) == data for n, data in small.items())
    tier.put(key_of(3), b"after the refusal")
    result["put_after_ok"] = tier.get(key_of(3)) == b"after the refusal"
    result["blocks"] = tier.stats().blocks
    tier.close()
    print(json.dumps(result), flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["crash", "fsize"])
    p.add_argument("dir")
    p.add_argument("--capacity", type=int, default=1 << 30)
    p.add_argument("--fsync", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--ops", type=int, default=100_000)  # a bound, so a lost parent never leaves us running
    p.add_argument("--limit", type=int, default=256 * 1024)
    a = p.parse_args()
    a.fsync = bool(a.fsync)
    {"crash": crash, "fsize": fsize}[a.mode](a)


if __name__ == "__main__":
    main()
