"""Local-directory backend: the embedded default, one machine (or one shared POSIX filesystem).

Atomicity comes from the filesystem: data is written to a temp file and fsynced, then published with
``os.replace`` (overwrite) or ``os.link`` (create-only: fails if the name exists, atomically, where
``open(O_EXCL)`` + write would expose a half-written file). An entry is assembled in a staging
directory and renamed into place as a whole, so a reader never sees a partial entry even without the
manifest rule. Compare-and-swap holds an ``flock`` on a sidecar lock file for the read-compare-replace.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from kvbm_codec.calibration.backends import ProgressFn, StoredObject

STAGING = ".staging"


def _fsync_dir(path: Path) -> None:
    # The rename itself is only durable once the directory entry is on disk.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _etag(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class LocalBackend:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser()

    def describe(self) -> str:
        return str(self.root)

    def path(self, key: str) -> Path:
        """Where ``key`` lives on disk (the CLI's callers want a file path, e.g. for ``--calibration``)."""
        parts = key.split("/")
        if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"invalid registry key {key!r}")
        return self.root.joinpath(*parts)

    # ---- reads ---------------------------------------------------------------------------------------

    def get(self, key: str) -> bytes | None:
        try:
            return self.path(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def get_versioned(self, key: str) -> tuple[bytes, str] | None:
        data = self.get(key)
        return None if data is None else (data, _etag(data))

    def list(self, prefix: str) -> list[StoredObject]:
        base = self.root
        out: list[StoredObject] = []
        if not base.exists():
            return out
        for dirpath, dirnames, filenames in os.walk(base):
            rel_dir = Path(dirpath).relative_to(base).as_posix()
            if rel_dir == ".":
                rel_dir = ""
            # Staging dirs and temp files are invisible to readers by construction.
            dirnames[:] = [d for d in dirnames if d != STAGING]
            for name in filenames:
                if name.startswith(".") or name.endswith(".lock"):
                    continue
                key = f"{rel_dir}/{name}" if rel_dir else name
                if key.startswith(prefix):
                    try:
                        st = os.stat(os.path.join(dirpath, name))
                    except FileNotFoundError:
                        continue
                    out.append(StoredObject(key, st.st_size, st.st_mtime))
        return sorted(out, key=lambda o: o.key)

    # ---- writes --------------------------------------------------------------------------------------

    def _temp_copy(self, target: Path, data: bytes) -> str:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            os.unlink(tmp)
            raise
        return tmp

    def put(self, key: str, data: bytes) -> None:
        target = self.path(key)
        tmp = self._temp_copy(target, data)
        try:
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        _fsync_dir(target.parent)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        target = self.path(key)
        tmp = self._temp_copy(target, data)
        try:
            os.link(tmp, target)
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
        _fsync_dir(target.parent)
        return True

    @contextlib.contextmanager
    def _locked(self, target: Path) -> Iterator[None]:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target.with_name(target.name + ".lock"), "a+b") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def compare_and_swap(self, key: str, data: bytes, etag: str | None) -> bool:
        target = self.path(key)
        with self._locked(target):
            current = self.get_versioned(key)
            if (current[1] if current else None) != etag:
                return False
            self.put(key, data)
            return True

    def commit_files(
        self, prefix: str, files: dict[str, bytes], marker: str, progress: ProgressFn | None
    ) -> bool:
        final = self.path(prefix)
        if (final / marker).exists():
            return False
        staging = self.root / STAGING / f"{final.name}-{uuid.uuid4().hex}"
        staging.mkdir(parents=True)
        try:
            names = [n for n in files if n != marker] + [marker]
            for i, name in enumerate(names):
                with open(staging / name, "wb") as f:
                    f.write(files[name])
                    f.flush()
                    os.fsync(f.fileno())
                if progress:
                    progress(name, i + 1, len(names))
            _fsync_dir(staging)
            final.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(staging, final)  # atomic; fails if another publisher got there first
            except OSError:
                if (final / marker).exists():
                    return False
                # A directory without a manifest is not ours to replace (only rename creates these).
                raise
            _fsync_dir(final.parent)
            return True
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(key).unlink()
        # Remove now-empty directories up to the root so gc leaves no husks behind.
        parent = self.path(key).parent
        while parent != self.root and parent.is_relative_to(self.root):
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    def stale_staging(self) -> list[StoredObject]:
        """Staging dirs of publishers that died before their rename (gc removes the old ones)."""
        d = self.root / STAGING
        if not d.exists():
            return []
        out = []
        for p in d.iterdir():
            with contextlib.suppress(FileNotFoundError):
                out.append(StoredObject(f"{STAGING}/{p.name}", 0, p.stat().st_mtime))
        return out

    def delete_staging(self, key: str) -> None:
        shutil.rmtree(self.root / key, ignore_errors=True)
