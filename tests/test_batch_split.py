"""A request's batch is split across idle cores, never beyond them, in order, and fails as a whole."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import pytest

from kvbm_codec.core.parallel import BatchSplitter


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
