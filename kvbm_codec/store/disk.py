"""Disk tier: one checksummed file per block, written crash-safely, indexed in memory.

Why the file format carries the key: the index is rebuilt from the files alone at start, so a
restarted service finds its blocks without a separate index file that could disagree with them.

Layout: ``ROOT/ab/cd/<sha256 hex of the key>.blk`` (two levels of 256 shards, so ten million
blocks make about 150 files per directory). A write goes to ``.<name>.<unique>.tmp`` in the same
directory, is fsynced, renamed over the final name (atomic on POSIX) and the directory is fsynced;
a reader therefore sees the old file, the new file or no file, never a partial one. Temp files
left by a crash are removed at open.

File format (little-endian)::

    0   4   magic b"KVDB"
    4   1   version (1)
    5   1   flags (0)
    6   2   tenant length T
    8   2   model length M
    10  8   sequence hash
    18  8   payload length P
    26  8   XXH3-64 of the payload
    34  T   tenant (ASCII)
    ..  M   model (ASCII)
    ..  8   XXH3-64 of every header byte before it
    ..  P   payload (the frame, as the caller gave it)

Opening checks each header and that the file is exactly header + P bytes long (cheap: it does not
read payloads); every ``get`` checks the payload checksum. A damaged file found by ``get`` is
deleted and ``StoreCorruptionError`` is raised (counted in ``TierStats.corrupt``); the tiered store
turns that into a miss. A damaged file found at open is deleted and counted in ``RebuildReport``.

Capacity counts payload bytes (the frames), like every tier, not the ~50 B header or file-system
block rounding. LRU order is kept in memory; a ``get`` also sets the file's mtime so the order
survives a restart (open sorts by mtime).

What fsync guards against: with ``fsync=True`` an acknowledged put survives a power loss; with
``fsync=False`` it survives a process crash (the page cache outlives the process) but not a power
loss. Atomicity (never a partial block) holds either way.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import logging
import os
import stat
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import xxhash

from kvbm_codec.store.base import (
    BlockKey,
    BlockTooLargeError,
    StoreClosedError,
    StoreCorruptionError,
    StoreError,
    StoreFullError,
    TierStats,
)
from kvbm_codec.store.quota import TenantQuota

log = logging.getLogger(__name__)

MAGIC = b"KVDB"
VERSION = 1
_FIXED = struct.Struct("<4sBBHHQQQ")  # magic, version, flags, T, M, sequence hash, P, payload xxh3
_HCHECK = struct.Struct("<Q")
MAX_HEADER = _FIXED.size + 2 * 128 + _HCHECK.size
BLOCK_SUFFIX = ".blk"
TEMP_SUFFIX = ".tmp"
# Errors that mean "the medium is full", whatever the reason: no space, quota, file-size limit.
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class _BadFile(Exception):
    """A block file that is not a complete, intact file of this format."""

    stat: os.stat_result | None = None


@dataclass(frozen=True)
class RebuildReport:
    """What opening found on disk: kept blocks, and what it removed and why."""

    blocks: int
    bytes: int
    temp_files_removed: int
    bad_files_removed: int
    over_capacity_evicted: int
    seconds: float


def encode_header(key: BlockKey, payload: bytes | memoryview) -> bytes:
    t, m = key.tenant.encode("ascii"), key.model.encode("ascii")
    head = (
        _FIXED.pack(
            MAGIC,
            VERSION,
            0,
            len(t),
            len(m),
            key.sequence_hash,
            len(payload),
            xxhash.xxh3_64_intdigest(payload),
        )
        + t
        + m
    )
    return head + _HCHECK.pack(xxhash.xxh3_64_intdigest(head))


def decode_header(buf: bytes | memoryview) -> tuple[BlockKey, int, int, int]:
    """Parse and check a header; returns (key, header length, payload length, payload xxh3)."""
    if len(buf) < _FIXED.size:
        raise _BadFile(f"{len(buf)} B is shorter than a header")
    magic, version, flags, tl, ml, seq, plen, pxx = _FIXED.unpack_from(buf)
    if magic != MAGIC:
        raise _BadFile(f"bad magic {bytes(magic)!r}")
    if version != VERSION or flags != 0:
        raise _BadFile(f"unsupported version {version} / flags {flags}")
    end = _FIXED.size + tl + ml
    if tl > 128 or ml > 128 or len(buf) < end + _HCHECK.size:
        raise _BadFile("truncated header")
    (hxx,) = _HCHECK.unpack_from(buf, end)
    if xxhash.xxh3_64_intdigest(buf[:end]) != hxx:
        raise _BadFile("header checksum mismatch")
    try:
        key = BlockKey(
            bytes(buf[_FIXED.size : _FIXED.size + tl]).decode("ascii"),
            bytes(buf[_FIXED.size + tl : end]).decode("ascii"),
            seq,
        )
    except (UnicodeDecodeError, ValueError) as e:
        raise _BadFile(f"bad key: {e}") from e
    return key, end + _HCHECK.size, plen, pxx


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_shard(name: str) -> bool:
    return len(name) == 2 and all(c in "0123456789abcdef" for c in name)


class DiskTier:
    def __init__(
        self,
        path: str | Path,
        capacity_bytes: int,
        name: str = "disk",
        *,
        fsync: bool = True,
        quota_bytes: int | None = None,
    ) -> None:
        """``quota_bytes``: per-tenant bytes (``store.quota``); over it a put drops its own tenant's
        least recently used blocks, and a reopen with a lower quota trims each tenant to it."""
        if capacity_bytes <= 0:
            raise ValueError("capacity_bytes must be positive")
        self.name = name
        self.capacity_bytes = capacity_bytes
        self.root = Path(path)
        self.fsync = fsync
        self.root.mkdir(parents=True, exist_ok=True)
        # One process per directory: two indexes over the same files would each evict the other's
        # blocks and miscount capacity. flock is released by the kernel when a process dies.
        self._lock_fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            os.close(self._lock_fd)
            raise StoreError(f"{self.root} is in use by another process") from e
        self._lock = threading.Lock()
        self._index: OrderedDict[BlockKey, int] = OrderedDict()  # key -> payload bytes, LRU first
        self._used = 0
        self._evictions = 0
        self._corrupt = 0
        self._quota = TenantQuota(quota_bytes, name) if quota_bytes is not None else None
        self._closed = False
        self._dirs: set[Path] = set()
        self._seq = itertools.count()
        try:
            self.rebuild_report = self._rebuild()
        except BaseException:
            self.close()
            raise

    # ---- paths ----------------------------------------------------------------------------------

    def path_of(self, key: BlockKey) -> Path:
        d = key.digest()
        return self.root / d[:2] / d[2:4] / (d + BLOCK_SUFFIX)

    def _ensure_dir(self, d: Path) -> None:
        if d in self._dirs:
            return
        for sub in (d.parent, d):
            if not sub.is_dir():
                try:
                    sub.mkdir(exist_ok=True)
                except OSError as e:
                    if e.errno in _FULL_ERRNOS:
                        raise StoreFullError(f"tier {self.name}: cannot create {sub}: {e.strerror}") from e
                    raise
                if self.fsync:
                    _fsync_dir(sub.parent)
        self._dirs.add(d)

    # ---- open -----------------------------------------------------------------------------------

    def _rebuild(self) -> RebuildReport:
        t0 = time.perf_counter()
        found: list[tuple[int, BlockKey, int]] = []
        temp = bad = 0
        changed: set[str] = set()  # directories we removed files from: to fsync
        for top in sorted(os.scandir(self.root), key=lambda e: e.name):
            if not (top.is_dir(follow_symlinks=False) and _is_shard(top.name)):
                continue
            for sub in os.scandir(top.path):
                if not (sub.is_dir(follow_symlinks=False) and _is_shard(sub.name)):
                    continue
                self._dirs.add(Path(sub.path))
                for entry in os.scandir(sub.path):
                    if entry.name.endswith(TEMP_SUFFIX):
                        # We hold the directory lock, so no live writer owns it: a crash left it.
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(entry.path)
                        temp += 1
                        changed.add(sub.path)
                    elif entry.name.endswith(BLOCK_SUFFIX):
                        if not entry.is_file(follow_symlinks=False):
                            # a FIFO would hang the open, a symlink points outside the tier: not ours
                            log.warning("tier %s: ignoring %s (not a regular file)", self.name, entry.path)
                            continue
                        try:
                            key, size, mtime = self._scan_file(entry.path, entry.name)
                        except _BadFile as e:
                            log.warning(
                                "tier %s: removing unreadable block file %s: %s", self.name, entry.path, e
                            )
                            with contextlib.suppress(FileNotFoundError):
                                os.unlink(entry.path)
                            bad += 1
                            changed.add(sub.path)
                            continue
                        found.append((mtime, key, size))
        found.sort(key=lambda t: t[0])
        over = 0
        for _, key, size in found:
            self._index[key] = size
            self._used += size
            if self._quota is not None:
                self._quota.add(key, size)
        while self._quota is not None and (
            heavy := [t for t, n in self._quota.usage().items() if n > self._quota.limit]
        ):  # quota lowered since last run: each tenant keeps its most recent blocks
            k = self._quota.oldest(heavy[0])
            self._quota.remove(k)
            self._used -= self._index.pop(k)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path_of(k))
            over += 1
            changed.add(str(self.path_of(k).parent))
        while self._used > self.capacity_bytes:  # capacity lowered since last run, or a crash mid-evict
            k, size = self._index.popitem(last=False)
            if self._quota is not None:
                self._quota.remove(k)
            self._used -= size
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path_of(k))
            over += 1
            changed.add(str(self.path_of(k).parent))
        if self.fsync:
            for d in sorted(changed):
                _fsync_dir(Path(d))
        return RebuildReport(len(self._index), self._used, temp, bad, over, time.perf_counter() - t0)

    def _scan_file(self, path: str, name: str) -> tuple[BlockKey, int, int]:
        try:
            # O_NOFOLLOW | O_NONBLOCK: a file swapped for a symlink or FIFO after the scan saw it
            # neither follows the link nor blocks; fstat then refuses anything not regular
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            with open(fd, "rb", buffering=0) as f:
                st = os.fstat(f.fileno())
                if not stat.S_ISREG(st.st_mode):
                    raise _BadFile("not a regular file")
                head = f.read(MAX_HEADER)
        except OSError as e:
            raise _BadFile(f"cannot read: {e}") from e
        key, hlen, plen, _ = decode_header(head)
        if key.digest() + BLOCK_SUFFIX != name:
            raise _BadFile(f"holds key {key}, which belongs under another name")
        if st.st_size != hlen + plen:
            raise _BadFile(f"{st.st_size} B on disk, header says {hlen + plen} B")
        return key, plen, st.st_mtime_ns

    # ---- Tier -----------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError(f"tier {self.name} is closed")

    def _write_temp(self, key: BlockKey, data: bytes, final: Path) -> Path:
        self._ensure_dir(final.parent)
        tmp = final.parent / f".{final.name}.{os.getpid()}.{next(self._seq)}{TEMP_SUFFIX}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except OSError as e:
            if e.errno in _FULL_ERRNOS:
                raise StoreFullError(f"tier {self.name}: cannot create a file: {e.strerror}") from e
            raise
        try:
            try:
                _write_all(fd, encode_header(key, data))
                _write_all(fd, data)
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException as e:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            if isinstance(e, OSError) and e.errno in _FULL_ERRNOS:
                raise StoreFullError(
                    f"tier {self.name}: medium full writing {len(data)} B: {e.strerror}"
                ) from e
            raise
        return tmp

    def put(self, key: BlockKey, data: bytes) -> list[tuple[BlockKey, bytes]]:
        """Store ``data``; evicted blocks are read back (and checked) so they can be spilled onward;
        an evicted block found damaged is dropped, counted as corrupt, and not returned."""
        out: list[tuple[BlockKey, bytes]] = []
        self._put(key, data, keep=out)
        return out

    def put_discard(self, key: BlockKey, data: bytes) -> list[tuple[BlockKey, int]]:
        """As ``put``, but evicted blocks are deleted unread; returns their keys and sizes."""
        return self._put(key, data, keep=None)

    def _put(
        self, key: BlockKey, data: bytes, keep: list[tuple[BlockKey, bytes]] | None
    ) -> list[tuple[BlockKey, int]]:
        data = bytes(data)
        if len(data) > self.capacity_bytes:
            raise BlockTooLargeError(
                f"{len(data)} B block exceeds tier {self.name} ({self.capacity_bytes} B)"
            )
        if self._quota is not None:
            self._quota.check(len(data))
        self._check_open()
        final = self.path_of(key)
        tmp = self._write_temp(key, data, final)  # the slow part, outside the lock
        victims: list[tuple[BlockKey, int]] = []
        try:
            with self._lock:
                self._check_open()
                try:
                    os.replace(tmp, final)
                except OSError as e:
                    if e.errno in _FULL_ERRNOS:
                        raise StoreFullError(
                            f"tier {self.name}: cannot rename into place: {e.strerror}"
                        ) from e
                    raise
                old = self._index.pop(key, None)
                if old is not None:
                    self._used -= old
                q = self._quota
                if q is not None:
                    q.remove(key)
                    while q.over(key.tenant, len(data)):  # own blocks first: never another's
                        k = q.oldest(key.tenant)
                        q.remove(k)
                        self._evict(k, self._index.pop(k), keep, victims)
                    q.add(key, len(data))
                self._index[key] = len(data)
                self._used += len(data)
                while self._used > self.capacity_bytes:
                    k, size = self._index.popitem(last=False)
                    if q is not None:
                        q.remove(k)
                    self._evict(k, size, keep, victims)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        if self.fsync:
            _fsync_dir(final.parent)  # makes the rename (and so the put) durable before we return
        return victims

    def _evict(
        self,
        k: BlockKey,
        size: int,
        keep: list[tuple[BlockKey, bytes]] | None,
        victims: list[tuple[BlockKey, int]],
    ) -> None:
        """Remove one block already taken out of the index (lock held), reading it back first when
        the caller spills evictions onward."""
        self._used -= size
        self._evictions += 1
        p = self.path_of(k)
        if keep is not None:
            try:
                keep.append((k, self._read_checked(p, k)))
            except (_BadFile, FileNotFoundError) as e:
                self._corrupt += 1
                log.warning("tier %s: evicted block %s was damaged, dropped: %s", self.name, k, e)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)
        victims.append((k, size))

    def _forget(self, key: BlockKey) -> int | None:
        """Drop ``key`` from the index and the quota (lock held); its size, or None if absent."""
        size = self._index.pop(key, None)
        if size is not None:
            self._used -= size
            if self._quota is not None:
                self._quota.remove(key)
        return size

    def _read_checked(self, path: Path, key: BlockKey, *, touch: bool = False) -> bytes:
        with open(path, "rb", buffering=0) as f:
            buf = f.read()
            st = os.fstat(f.fileno())
            if touch:
                # Keep the on-disk LRU order for the next open; best effort (read-only media).
                with contextlib.suppress(OSError):
                    os.utime(f.fileno())
        try:
            got, hlen, plen, pxx = decode_header(buf)
            if got != key:
                raise _BadFile(f"holds {got}, expected {key}")
            if len(buf) != hlen + plen:
                raise _BadFile(f"{len(buf)} B on disk, header says {hlen + plen} B")
            payload = buf[hlen:]
            if xxhash.xxh3_64_intdigest(payload) != pxx:
                raise _BadFile("payload checksum mismatch")
        except _BadFile as e:
            e.stat = st
            raise
        return payload

    def get(self, key: BlockKey) -> bytes | None:
        with self._lock:
            self._check_open()
            if key not in self._index:
                return None
            self._index.move_to_end(key)
            if self._quota is not None:
                self._quota.touch(key)
        path = self.path_of(key)
        try:
            data = self._read_checked(path, key, touch=True)
        except FileNotFoundError:
            # Evicted or deleted since the lookup (a miss), or removed behind our back (forget it).
            with self._lock:
                if key in self._index and not path.exists():
                    self._forget(key)
            return None
        except _BadFile as e:
            self._drop_damaged(key, path, e.stat)
            raise StoreCorruptionError(f"tier {self.name}: block {key} damaged on disk ({e}); removed") from e
        return data

    def _drop_damaged(self, key: BlockKey, path: Path, seen: os.stat_result | None) -> None:
        with self._lock:
            self._corrupt += 1
            try:
                now = os.stat(path)
            except FileNotFoundError:
                return
            if seen is not None and (now.st_ino, now.st_dev) != (seen.st_ino, seen.st_dev):
                return  # a concurrent put already replaced the damaged file with a good one
            os.unlink(path)
            self._forget(key)
        if self.fsync:
            _fsync_dir(path.parent)

    def contains(self, key: BlockKey) -> bool:
        with self._lock:
            self._check_open()
            return key in self._index

    def delete(self, key: BlockKey) -> bool:
        path = self.path_of(key)
        with self._lock:
            self._check_open()
            if self._forget(key) is None:
                return False
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        if self.fsync:
            _fsync_dir(path.parent)
        return True

    def keys(self) -> Iterator[BlockKey]:
        with self._lock:
            return iter(list(self._index))

    def largest_block(self) -> int:
        """Size of the largest block held (O(n)); the tiered store's refuse check needs it once."""
        with self._lock:
            return max(self._index.values(), default=0)

    @property
    def quota_bytes(self) -> int | None:
        return self._quota.limit if self._quota is not None else None

    def tenant_usage(self) -> dict[str, int]:
        """Bytes per tenant in this tier (empty without a quota): for the quota metrics."""
        with self._lock:
            return self._quota.usage() if self._quota is not None else {}

    def stats(self) -> TierStats:
        with self._lock:
            return TierStats(
                self.name, self._used, self.capacity_bytes, len(self._index), self._evictions, self._corrupt
            )

    def close(self) -> None:
        """Release the directory lock. Files are already durable; nothing is flushed here."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._index.clear()
            if self._quota is not None:
                self._quota.clear()
        with contextlib.suppress(OSError):
            os.close(self._lock_fd)

    def __enter__(self) -> DiskTier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
