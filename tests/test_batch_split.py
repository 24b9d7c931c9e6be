"""A request's batch is split across idle cores, never beyond them, in order, and fails as a whole."""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest

from kvbm_codec.core.parallel import BatchSplitter, available_cores, cgroup_cpu_quota


def test_parts_run_side_by_side_and_keep_order() -> None:
    split = BatchSplitter(2)
    both = threading.Barrier(2, timeout=10)  # passes only if two parts run at the same time
    seen: list[str] = []

    def fn(part: Sequence[int]) -> list[int]:
        seen.append(threading.current_thread().name)
        both.wait()
        return [x * 10 for x in part]

    try:
        assert split.map(fn, list(range(7))) == [x * 10 for x in range(7)]
        assert len(set(seen)) == 2 and split.busy() == 0
    finally:
        split.close()


def test_nothing_is_split_while_every_thread_is_busy() -> None:
    split = BatchSplitter(2)
    inside, release = threading.Event(), threading.Event()
    sizes: list[int] = []

    def hold(part: Sequence[int]) -> list[int]:
        inside.set()
        release.wait(10)
        return list(part)

    def record(part: Sequence[int]) -> list[int]:
        sizes.append(len(part))
        return list(part)

    other = threading.Thread(target=split.map, args=(hold, [1]))  # one item: one part, one thread
    other.start()
    try:
        assert inside.wait(10)
        assert split.busy() == 1
        assert split.map(record, list(range(8))) == list(range(8))
        assert sizes == [8]  # the one idle thread was this call's own
    finally:
        release.set()
        other.join(10)
        split.close()
    sizes.clear()
    one = BatchSplitter(1)
    assert one.map(record, [1, 2, 3]) == [1, 2, 3] and sizes == [3]


def test_a_failing_part_fails_the_call_after_every_part_finished() -> None:
    split = BatchSplitter(3)
    finished: list[int] = []

    def fn(part: Sequence[int]) -> list[int]:
        if 0 in part:
            raise ValueError("part with 0")
        finished.append(part[0])
        return list(part)

    try:
        with pytest.raises(ValueError, match="part with 0"):
            split.map(fn, list(range(9)))
        assert sorted(finished) == [3, 6] and split.busy() == 0
    finally:
        split.close()
    with pytest.raises(ValueError):
        BatchSplitter(0)


def _cgroup_v2(root: Path, path: str, levels: dict[str, str]) -> Path:
    """A cgroup v2 tree as the kernel lays it out: ``cpu.max`` per level (none at the root)."""
    for rel, cpu_max in levels.items():
        d = root / rel.lstrip("/")
        d.mkdir(parents=True, exist_ok=True)
        (d / "cpu.max").write_text(cpu_max + "\n")
    proc = root / "proc-self-cgroup"
    proc.write_text(f"0::{path}\n")
    return proc


def test_a_cgroup_v2_cpu_limit_caps_the_cores() -> None:
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # a pod's limit of 1.5 CPUs on its parent, none on the container itself
        proc = _cgroup_v2(
            root,
            "/kubepods/pod1/ctr",
            {"/kubepods/pod1": "150000 100000", "/kubepods/pod1/ctr": "max 100000"},
        )
        assert cgroup_cpu_quota(root, proc) == pytest.approx(1.5)
        assert available_cores(root, proc) == 1  # a fraction of a core is not a core to split onto
        # inside a cgroup namespace the path is "/" and the mount is the container's own cgroup
        (root / "cpu.max").write_text("800000 100000\n")
        ns = root / "ns"
        ns.write_text("0::/\n")
        assert cgroup_cpu_quota(root, ns) == pytest.approx(8.0)
        assert available_cores(root, ns) == min(cores, 8)


def test_cgroup_v1_quota_and_unlimited_or_unreadable_files() -> None:
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cpu = root / "cpu,cpuacct" / "docker" / "abc"
        cpu.mkdir(parents=True)
        (cpu / "cpu.cfs_quota_us").write_text("200000\n")
        (cpu / "cpu.cfs_period_us").write_text("100000\n")
        proc = root / "proc"
        proc.write_text("12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n")
        assert cgroup_cpu_quota(root, proc) == pytest.approx(2.0)
        (cpu / "cpu.cfs_quota_us").write_text("-1\n")  # v1's "no limit"
        assert cgroup_cpu_quota(root, proc) is None and available_cores(root, proc) == cores
        (cpu / "cpu.cfs_quota_us").write_text("garbage\n")  # never fatal: the mask alone counts
        assert cgroup_cpu_quota(root, proc) is None
        assert cgroup_cpu_quota(root, root / "absent") is None


def test_this_machine_never_gets_more_cores_than_its_mask() -> None:
    assert 1 <= available_cores() <= len(os.sched_getaffinity(0))
