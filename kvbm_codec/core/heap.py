"""glibc's heap kept for reuse while a batch job churns through large tensors.

glibc returns the top of its heap to the kernel once more than its trim threshold lies free there,
and maps anything above its mmap threshold fresh from the kernel. Calibration's sensitivity probe
builds and drops ~9 MB context caches for every layer restart, so with glibc's defaults its freed
memory went back to the kernel and came back as fresh pages, each faulted in and zeroed again: 1.0M
minor page faults and 8.7 s of kernel time in a 31.6 s probe, and about 2 s of the prefills
(docs/benchmarks.md, "Session 27"). Keeping freed memory for the job's duration turns that into plain
reuse; the job's peak resident memory is what it was.

Process-wide and Linux/glibc only (a no-op elsewhere). Afterwards the heap is trimmed and the trim
threshold set to what glibc's own heuristic reaches under large tensors, so a service that calibrates
at start does not keep the calibration's peak.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Iterator
from contextlib import contextmanager

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 << 20
"""Allocations above this are mapped on their own: glibc's own ceiling for its sliding threshold."""
KEPT_TRIM_THRESHOLD = (1 << 31) - 1
"""Free heap top glibc keeps inside ``heap_kept``: never trimmed in practice."""
AFTER_TRIM_THRESHOLD = 2 * MMAP_THRESHOLD
"""The trim threshold left behind: the value glibc's heuristic sets beside a 32 MB mmap threshold."""


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt  # noqa: B018  (glibc, or a libc that has mallopt)
        libc.malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


@contextmanager
def heap_kept() -> Iterator[bool]:
    """Inside the block freed memory stays in the process for reuse; yields whether it could be set."""
    libc = _libc()
    ok = libc is not None and bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    ok = ok and libc is not None and bool(libc.mallopt(_M_TRIM_THRESHOLD, KEPT_TRIM_THRESHOLD))
    try:
        yield ok
    finally:
        if ok and libc is not None:
            libc.mallopt(_M_TRIM_THRESHOLD, AFTER_TRIM_THRESHOLD)
            libc.malloc_trim(0)
