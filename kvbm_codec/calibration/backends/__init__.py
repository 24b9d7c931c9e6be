"""Storage backends of the calibration registry.

The registry needs only a handful of primitives from a store (read, create-if-absent, compare-and-swap,
list, delete, and an atomic "commit a set of files" step), so a new store (GCS, NFS, ...) is one small
class; the integrity and versioning rules live once, in ``registry.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

# Called once per file as an entry is committed: (file name, files done, files total). The CLI turns it
# into a progress bar; tests use it to crash a publisher at a chosen point.
ProgressFn = Callable[[str, int, int], None]


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int
    modified: float  # unix seconds; lets gc age out half-written uploads that never got a manifest


@runtime_checkable
class Backend(Protocol):
    """A flat key -> bytes store. Keys use ``/`` separators and never start with ``/``."""

    def describe(self) -> str:
        """Human-readable location (for messages and ``registry list``)."""
        ...

    def get(self, key: str) -> bytes | None:
        """The object's bytes, or None if it does not exist."""
        ...

    def get_versioned(self, key: str) -> tuple[bytes, str] | None:
        """(bytes, etag) for a later ``compare_and_swap``; None if absent."""
        ...

    def put(self, key: str, data: bytes) -> None:
        """Unconditional, atomic (never visible half-written) write."""
        ...

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Create the object only if no object has that key; False if one already did."""
        ...

    def compare_and_swap(self, key: str, data: bytes, etag: str | None) -> bool:
        """Replace the object only if its etag is still ``etag`` (None: only if absent)."""
        ...

    def commit_files(
        self, prefix: str, files: dict[str, bytes], marker: str, progress: ProgressFn | None
    ) -> bool:
        """Make ``prefix/<name>`` for every file visible with ``prefix/<marker>`` strictly last.

        Returns False (and changes nothing visible) if ``prefix/<marker>`` already exists: entries are
        immutable, the first committer wins.
        """
        ...

    def list(self, prefix: str) -> list[StoredObject]:
        """Every object whose key starts with ``prefix`` (recursive)."""
        ...

    def delete(self, key: str) -> None:
        """Remove the object; absent is not an error."""
        ...
