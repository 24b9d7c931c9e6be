"""A request's batch is split across idle cores, never beyond them, in order, and fails as a whole."""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import _smollm2
import pytest
from _smollm2 import MODEL, SPEC

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


def test_a_core_is_kept_free_for_each_request_in_flight() -> None:
    sizes: list[int] = []

    def record(part: Sequence[int]) -> list[int]:
        sizes.append(len(part))
        return list(part)

    two, four = BatchSplitter(2), BatchSplitter(4)
    try:
        assert two.map(record, list(range(8)), peers=1) == list(range(8)) and sizes == [8]
        sizes.clear()
        assert four.map(record, list(range(8)), peers=1) == list(range(8))
        assert sorted(sizes) == [2, 3, 3]  # 4 threads, one peer: it keeps one, this request takes three
        sizes.clear()
        assert four.map(record, list(range(8)), peers=0) == list(range(8)) and sorted(sizes) == [2, 2, 2, 2]
    finally:
        two.close()
        four.close()


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


def test_the_service_splits_only_while_no_other_request_is_admitted(smollm, small_calibration) -> None:  # type: ignore[no-untyped-def]
    """The service hands the splitter the requests it has admitted besides the caller's: a real put
    and get of eight blocks see no peer alone and one peer while another request holds a slot."""
    from prometheus_client import generate_latest

    from kvbm_codec.adapters.kv_blocks import kv_blocks
    from kvbm_codec.api.types import PutItem
    from kvbm_codec.core.service import BlockService, Limits
    from kvbm_codec.store.memory import MemoryTier
    from kvbm_codec.store.tiered import TieredStore
    from kvbm_codec.texts import demo_document

    blocks = kv_blocks(smollm, demo_document(), SPEC, max_tokens=8 * SPEC.page_size)
    items = [PutItem(b.sequence_hash, b.data, first_position=b.first_position) for b in blocks]
    svc = BlockService(
        [_smollm2.served(small_calibration)],
        TieredStore([MemoryTier(64 << 20)]),
        limits=Limits(batch_threads=2),
    )
    seen: list[tuple[int, int]] = []
    real_map = svc._split.map

    def spy(fn, part, *, peers: int = 0):  # type: ignore[no-untyped-def]
        seen.append((len(part), peers))
        return real_map(fn, part, peers=peers)

    svc._split.map = spy  # type: ignore[method-assign]
    try:
        svc.put_blocks("t", MODEL, items)
        with svc.request("held-by-another-client"):
            got = svc.get_blocks("t", MODEL, [i.sequence_hash for i in items])
        assert seen == [(8, 0), (8, 1)]
        assert all(g.data is not None for g in got)
        # what an operator reads: the put ran as two parts, the get (a peer in flight) whole
        page = generate_latest(svc.metrics.registry).decode()
        for line in (
            "kvbm_codec_codec_split_threads 2.0",
            "kvbm_codec_codec_batches_total 2.0",
            "kvbm_codec_codec_batches_split_total 1.0",
            "kvbm_codec_codec_batch_parts_total 3.0",
        ):
            assert line in page.splitlines(), line
    finally:
        svc.close()
