"""One request's batch of blocks split across the cores the rest of the service leaves idle.

Each request's codec work runs on its front end's handler thread. Under many clients that keeps every
core busy, but a single client's batch used one core while the other idled: a 1-client gRPC put of 8
blocks measured 40-51% of the one-core codec, while 4 clients reached 100% (docs/benchmarks.md). The
codec releases the GIL in its matmuls, DEFLATE and checksums, so parts of one batch encoded or decoded
on separate threads run side by side; between those it runs a few hundred small torch ops per batch,
each a GIL hand-off, where two threads convoy. On the session-23 VM (``bench/two_threads.py``) two
halves of an 8-block batch gained 1.12-1.20x (encode) and 1.32-1.49x (decode) over one call, against
1.61-1.70x for two threads' plain matmuls there. A part is handed to a helper only while fewer codec
parts run in the process than ``threads``: under load every request already has a core, and
splitting then would only shrink the batches (a batched call costs less per block than its halves do).

Splitting never changes a frame or a decoded block: the batched codec's output for a block does not
depend on the batch it came in (``tests/test_block_frames.py::test_batch_equals_single_calls``).
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def available_cores(cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int:
    """The cores this process may keep busy: its affinity mask (``taskset``, cpusets), capped by its
    cgroup's CPU quota (a Kubernetes CPU limit). A pod limited to 1 CPU on a 64-core node sees 64 in
    its mask; splitting one batch 64 ways there would only be throttled by the quota."""
    try:
        cores = max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity API on this platform
        cores = max(1, os.cpu_count() or 1)
    quota = cgroup_cpu_quota(cgroup_root, proc_cgroup)
    return cores if quota is None else max(1, min(cores, math.floor(quota)))


def cgroup_cpu_quota(cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> float | None:
    """The CPU quota, in cores, of this process' cgroup and its ancestors (the smallest applies);
    None when no level sets one or the files cannot be read. cgroup v2 (``cpu.max``: "QUOTA PERIOD"
    or "max PERIOD") and v1 (``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``, -1: none) are read."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    quotas: list[float] = []
    for line in lines:
        _, controllers, path = [*line.split(":", 2), "", ""][:3]
        if controllers == "" and path:  # cgroup v2, unified hierarchy
            quotas += _quotas_up(cgroup_root, path, _v2_quota)
        elif "cpu" in controllers.split(","):  # cgroup v1, mounted by controller name
            for mount in (controllers, "cpu", "cpu,cpuacct"):
                if (cgroup_root / mount).is_dir():
                    quotas += _quotas_up(cgroup_root / mount, path, _v1_quota)
                    break
    return min(quotas) if quotas else None


def _quotas_up(mount: Path, path: str, read: Callable[[Path], float | None]) -> list[float]:
    """The quotas set on ``path`` and each ancestor below ``mount``. Inside a cgroup namespace the
    process' path is "/" and the mount is its own cgroup; outside one a path not under this mount is
    skipped, and the mount's own level still counts."""
    found: list[float] = []
    rel = PurePosixPath(path.strip() or "/")
    for level in [rel, *rel.parents]:
        d = mount / str(level).lstrip("/")
        if d.is_dir():
            q = read(d)
            if q is not None:
                found.append(q)
    return found


def _v2_quota(d: Path) -> float | None:
    try:
        quota, period = (d / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else _cores(int(quota), int(period))
    except (OSError, ValueError):  # absent at the root cgroup, or not the expected format
        return None


def _v1_quota(d: Path) -> float | None:
    try:
        quota = int((d / "cpu.cfs_quota_us").read_text())
        period = int((d / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota < 0 else _cores(quota, period)


def _cores(quota: int, period: int) -> float | None:
    return quota / period if quota > 0 and period > 0 else None


class BatchSplitter:
    """Runs ``fn`` over contiguous parts of a batch: the first part on the calling thread, the others
    on helper threads taken only when idle (never waited for). ``threads`` bounds the codec parts
    running at once through this splitter, the caller's own included; 1 never splits."""

    def __init__(self, threads: int, *, min_part: int = 1) -> None:
        if threads < 1 or min_part < 1:
            raise ValueError(f"threads ({threads}) and min_part ({min_part}) must be at least 1")
        self.threads = threads
        self.min_part = min_part
        self._busy = 0
        self._batches = 0  # map calls, and those run as more than one part (for the metrics)
        self._batches_split = 0
        self._parts = 0
        self._lock = threading.Lock()
        self._pool = (
            ThreadPoolExecutor(threads - 1, thread_name_prefix="kvbm-codec-split") if threads > 1 else None
        )

    def busy(self) -> int:
        """Codec parts running now (a test and the metrics may read it)."""
        with self._lock:
            return self._busy

    def counts(self) -> tuple[int, int, int]:
        """(batches, batches split, parts run) since start: what the metrics export, so an operator
        sees whether requests are split at all (under load none are, by design)."""
        with self._lock:
            return self._batches, self._batches_split, self._parts

    def map(self, fn: Callable[[Sequence[T]], list[R]], items: Sequence[T], *, peers: int = 0) -> list[R]:
        """``fn(items)``, computed as ``fn`` of up to ``threads`` contiguous parts, concatenated in order.

        ``peers``: other requests in flight that are not (yet) in the codec, e.g. receiving their
        payload; each will want a core within milliseconds. Counting only the running codec parts
        split a batch whenever the others were between codec calls, and under 4 clients the halves
        then shared 2 cores with the next request's batch (7-11% less throughput than never
        splitting, docs/benchmarks.md). A core is kept free for each peer instead.

        Every part has finished when this returns or raises (no work outlives the request); the first
        failure, in part order, is raised."""
        n = len(items)
        with self._lock:
            idle = self.threads - max(self._busy, peers) - 1
            parts = max(1, min(1 + max(0, idle), n // self.min_part))
            self._busy += parts
            self._batches += 1
            self._batches_split += parts > 1
            self._parts += parts
        try:
            if parts == 1 or self._pool is None:
                return fn(items)
            bounds = [n * i // parts for i in range(parts + 1)]
            futures: list[Future[list[R]]] = [
                self._pool.submit(fn, items[bounds[i] : bounds[i + 1]]) for i in range(1, parts)
            ]
            try:
                first: list[R] | BaseException = fn(items[bounds[0] : bounds[1]])
            except BaseException as e:  # the helpers' parts still finish before this is raised
                first = e
            rest = []
            errors: list[BaseException] = [first] if isinstance(first, BaseException) else []
            for fut in futures:
                try:
                    rest.append(fut.result())
                except BaseException as e:
                    errors.append(e)
            if errors:
                raise errors[0]
            out = list(first)  # type: ignore[arg-type]
            for part in rest:
                out += part
            return out
        finally:
            with self._lock:
                self._busy -= parts

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
