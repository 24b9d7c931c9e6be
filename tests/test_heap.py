"""core/heap.py on this machine's glibc: inside ``heap_kept`` a freed large tensor's memory is reused,
not returned to the kernel and faulted in again; afterwards the heap is trimmed again."""

from __future__ import annotations

import resource
import sys

import numpy as np
import pytest

from kvbm_codec.core.heap import heap_kept

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux's")

_MB = 1 << 20


def _faults_of_churn(size: int, rounds: int) -> int:
    """Minor page faults of allocating, touching and freeing ``size`` bytes ``rounds`` times, with a
    second live buffer on top of each so the freed one sits below the heap top, where a trim releases it."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(rounds):
        a = np.ones(size, dtype=np.uint8)
        b = np.ones(size, dtype=np.uint8)
        del b, a
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_freed_memory_is_reused_inside_heap_kept() -> None:
    size, rounds = 20 * _MB, 20
    pages = 2 * size // resource.getpagesize()  # one round's two buffers
    with heap_kept() as ok:
        assert ok, "mallopt refused on this glibc"
        _faults_of_churn(size, 1)  # the heap grows once
        kept = _faults_of_churn(size, rounds)
    # every round's buffers come back from the heap: a small fraction of one round's pages, against
    # ~`rounds` rounds' worth when each free went back to the kernel
    assert kept < pages // 2, f"{kept} page faults over {rounds} rounds of {pages} pages"
