"""The disk tier under process death and full media.

A writer subprocess (tests/_store_writer.py) puts, overwrites and deletes blocks and reports each
operation before starting it and after it returned; we SIGKILL it at seeded random moments, reopen
the directory, and check the rebuilt index against what was acknowledged. SIGKILL tests atomicity
(no partial block ever visible, temp files cleaned up, index rebuilt from the files); it cannot
test power loss, which fsync addresses and only a real power cut would exercise.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvbm_codec.store.base import BlockKey, StoreFullError
from kvbm_codec.store.disk import DiskTier
from kvbm_codec.store.memory import MemoryTier
from kvbm_codec.store.tiered import TieredStore

WRITER = Path(__file__).with_name("_store_writer.py")
_spec = importlib.util.spec_from_file_location("_store_writer", WRITER)
assert _spec is not None and _spec.loader is not None
writer = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(writer)

KILLS = 20


def keys_of(tier: DiskTier) -> list[int]:
    held = tier.keys()
    return [k.sequence_hash for k in held]


def _run_until_killed(
    d: Path, start: int, seed: int, fsync: bool, delay: float
) -> tuple[list[tuple[str, str, int]], int]:
    """Run one writer, kill it ``delay`` s after it is ready; returns its complete report lines and
    how many blocks it found at open."""
    p = subprocess.Popen(
        [
            sys.executable,
            str(WRITER),
            "crash",
            str(d),
            f"--start={start}",
            f"--seed={seed}",
            f"--fsync={int(fsync)}",
        ],
        stdout=subprocess.PIPE,
    )
    assert p.stdout is not None
    ready = p.stdout.readline().split()
    assert ready and ready[0] == b"ready", f"writer did not start: {ready!r} (rc {p.poll()})"
    time.sleep(delay)
    p.send_signal(signal.SIGKILL)
    rest = p.stdout.read()
    p.wait(timeout=10)
    assert p.returncode == -signal.SIGKILL, "the writer finished before it was killed: raise --ops"
    lines = rest.split(b"\n")[:-1]  # the last piece is empty or a line cut by the kill
    return [(a.decode(), op.decode(), int(i)) for a, op, i in (ln.split() for ln in lines)], int(ready[1])


def test_sigkill_never_loses_an_acknowledged_block_nor_serves_a_partial_one(tmp_path: Path) -> None:
    rng = random.Random(20261126)
    d = tmp_path / "tier"
    present: dict[int, bool] = {}  # what the acknowledged operations say each key's state is
    nxt = 0
    blocks_at_last_open = 0
    stats = {"ops_acked": 0, "killed_mid_op": 0, "temp_files_found": 0, "blocks_verified": 0}
    t0 = time.monotonic()
    for kill in range(KILLS):
        lines, found_at_open = _run_until_killed(
            d, nxt, seed=kill, fsync=kill % 2 == 0, delay=rng.uniform(0.02, 0.4)
        )
        assert found_at_open == blocks_at_last_open, "the writer's own rebuild disagrees with ours"
        in_flight: tuple[str, int] | None = None
        for kind, op, i in lines:
            if kind == "B":
                in_flight = (op, i)
                continue
            assert in_flight == (op, i)
            in_flight = None
            present[i] = op == "P"
            stats["ops_acked"] += 1
            nxt = max(nxt, i + 1)
        if in_flight is not None:
            stats["killed_mid_op"] += 1
            nxt = max(nxt, in_flight[1] + 1)
        stats["temp_files_found"] += len(list(d.rglob("*.tmp")))

        with DiskTier(d, 1 << 30) as tier:
            rebuilt = set(keys_of(tier))
            assert tier.rebuild_report.blocks == len(rebuilt)
            assert not list(d.rglob("*.tmp")), "temp files survived the reopen"
            # Atomic writes mean a crash leaves whole files or temp files, never a damaged block file.
            assert tier.rebuild_report.bad_files_removed == 0, (
                f"kill {kill}: a partial block file was visible"
            )
            expected = {i for i, there in present.items() if there}
            uncertain = {in_flight[1]} if in_flight is not None else set()
            assert rebuilt - uncertain == expected - uncertain, (
                f"kill {kill}: lost {sorted(expected - rebuilt - uncertain)}, "
                f"resurrected {sorted(rebuilt - expected - uncertain)}"
            )
            for i in rebuilt:  # every block served is exactly what was written, never a partial one
                assert tier.get(writer.key_of(i)) == writer.content(i), f"kill {kill}: block {i} differs"
                stats["blocks_verified"] += 1
            assert tier.stats().corrupt == 0
            blocks_at_last_open = len(rebuilt)
            if in_flight is not None:  # the in-flight operation either happened or it did not
                present[in_flight[1]] = in_flight[1] in rebuilt
    elapsed = time.monotonic() - t0
    print(f"\ncrash test: {KILLS} kills in {elapsed:.1f} s, {stats}")
    assert stats["ops_acked"] >= KILLS, "the writer hardly ran: the test would prove nothing"
    assert elapsed < 60


def _try_mount_tmpfs(path: Path, size: str) -> str | None:
    """Mount a small tmpfs at ``path``; returns None on success or why it could not."""
    if shutil.which("mount") is None:
        return "no mount command"
    path.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True
    )
    return None if r.returncode == 0 else f"mount -t tmpfs failed: {r.stderr.strip() or r.returncode}"


@pytest.fixture
def small_fs(tmp_path: Path):
    mnt = tmp_path / "mnt"
    why = _try_mount_tmpfs(mnt, "2m")
    if why is not None:
        pytest.skip(f"cannot mount a 2 MiB tmpfs here ({why}); test_rlimit_fsize covers EFBIG instead")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)  # -l: even if a failed test left a file open


def _blk(i: int, n: int = 200_000) -> bytes:
    return random.Random(i).randbytes(n)


def test_disk_full_gives_store_full_error_and_keeps_what_was_stored(small_fs: Path) -> None:
    key = lambda i: BlockKey("t", "m", i)  # noqa: E731
    with DiskTier(small_fs, 64 << 20) as tier:  # configured far above what the medium holds
        stored = []
        with pytest.raises(StoreFullError, match="No space left"):
            for i in range(100):
                tier.put(key(i), _blk(i))
                stored.append(i)
        assert 5 <= len(stored) < 11
        assert not list(small_fs.rglob("*.tmp")), "a temp file was left behind"
        assert not tier.contains(key(len(stored)))
        assert tier.stats().blocks == len(stored)
        for i in stored:
            assert tier.get(key(i)) == _blk(i)
        tier.delete(key(stored[0]))
        tier.delete(key(stored[1]))
        tier.put(key(500), _blk(500))  # room again
        assert tier.get(key(500)) == _blk(500)
        expected = {*stored[2:], 500}
    with DiskTier(small_fs, 64 << 20) as tier:
        assert set(keys_of(tier)) == expected
        assert tier.rebuild_report.bad_files_removed == 0


def test_full_disk_behind_memory_drops_spills_but_keeps_serving(small_fs: Path) -> None:
    dropped: list[BlockKey] = []
    store = TieredStore(
        [MemoryTier(1_000_000), DiskTier(small_fs, 64 << 20)], on_drop=lambda k, n: dropped.append(k)
    )
    keys = [BlockKey("t", "m", i) for i in range(30)]
    for i, k in enumerate(keys):
        store.put(k, _blk(i))  # never raises: the memory tier takes it, the disk takes what fits
    c = store.counters()
    assert c.spill_failures > 0 and c.dropped == len(dropped) == c.spill_failures
    assert c.spills + c.spill_failures == 30 - store.stats()[0].blocks
    for i, k in enumerate(keys):
        got = store.get(k)
        assert got is None if k in dropped else got == _blk(i)
    assert not list(small_fs.rglob("*.tmp"))
    store.close()


def test_rlimit_fsize_gives_store_full_error(tmp_path: Path) -> None:
    """A file-size limit (EFBIG) is the same condition to a caller as a full disk; runs anywhere."""
    r = subprocess.run(
        [sys.executable, str(WRITER), "fsize", str(tmp_path / "tier"), "--limit=262144"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["error"] is not None and res["error"].startswith("StoreFullError")
    assert "File too large" in res["error"]
    assert res == {**res, "big_present": False, "temp_files": 0, "readback_ok": True, "put_after_ok": True}
    assert res["blocks"] == 3
    with DiskTier(tmp_path / "tier", 1 << 30) as tier:
        assert tier.stats().blocks == 3 and tier.rebuild_report.bad_files_removed == 0
    assert os.path.isdir(tmp_path / "tier")
