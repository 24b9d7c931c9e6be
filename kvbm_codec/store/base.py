"""The tier interface every store implements, and the key blocks are stored under.

A tier stores opaque bytes (a KVTC frame); it never decodes them. It verifies its own integrity
(the disk tier checksums what it wrote) but the frame's own checksums are the last line of defence,
checked again by the codec on decode.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


class StoreError(Exception):
    code = "store_error"


class StoreFullError(StoreError):
    """Every tier is full and the policy is to refuse rather than evict."""

    code = "store_full"


class BlockTooLargeError(StoreError):
    """One block exceeds what a tier may hold at all (its capacity or the per-block limit)."""

    code = "block_too_large"


class StoreCorruptionError(StoreError):
    """What a tier read back is not what it wrote (checksum mismatch); the entry was dropped."""

    code = "store_corruption"


class StoreClosedError(StoreError):
    """The tier was closed; a use after close is a bug in the caller, not a miss."""

    code = "store_closed"


@dataclass(frozen=True, order=True)
class BlockKey:
    """(tenant, model fingerprint, KVBM sequence hash). The tenant is part of the key, so one tenant
    can never address another's block, whatever hash it guesses."""

    tenant: str
    model: str
    sequence_hash: int

    def __post_init__(self) -> None:
        if not (0 <= self.sequence_hash < 2**64):
            raise ValueError(f"sequence_hash must be an unsigned 64-bit integer, got {self.sequence_hash}")
        for name in ("tenant", "model"):
            v = getattr(self, name)
            if not v or len(v) > 128 or not v.isascii() or any(c in v for c in "/\\\0") or v in (".", ".."):
                raise ValueError(f"{name} must be 1-128 ASCII characters without path separators, got {v!r}")

    def digest(self) -> str:
        """Stable file-system-safe name (tenants and models may contain characters files cannot)."""
        raw = f"{self.tenant}\0{self.model}\0{self.sequence_hash}".encode()
        return hashlib.sha256(raw).hexdigest()


@dataclass(frozen=True)
class TierStats:
    """Occupancy counts frame bytes (what callers stored), not a tier's own per-block overhead, so
    the same block weighs the same in every tier and spill arithmetic across tiers is exact.
    ``evictions`` counts blocks pushed out to make room; ``corrupt`` counts entries found damaged
    on read (and removed) since the tier was opened."""

    name: str
    used_bytes: int
    capacity_bytes: int
    blocks: int
    evictions: int
    corrupt: int = 0


@runtime_checkable
class Tier(Protocol):
    """One level of the store. ``put`` returns what it evicted so the caller can spill it onward.

    Errors a tier may raise: ``put`` raises ``BlockTooLargeError`` for a block over its capacity and
    ``StoreFullError`` when the medium itself is full (a disk below its configured capacity);
    ``get`` raises ``StoreCorruptionError`` when what it read back is damaged (the entry is already
    removed, so the next ``get`` is a plain miss). A tier that can evict without handing the
    evicted bytes back (a disk tier would have to read them) may also offer
    ``put_discard(key, data) -> list[tuple[BlockKey, int]]`` (evicted keys and sizes); the tiered
    store uses it for its last tier, whose evictions are dropped anyway.
    """

    name: str
    capacity_bytes: int

    def put(self, key: BlockKey, data: bytes) -> list[tuple[BlockKey, bytes]]: ...

    def get(self, key: BlockKey) -> bytes | None: ...

    def contains(self, key: BlockKey) -> bool: ...

    def delete(self, key: BlockKey) -> bool: ...

    def keys(self) -> Iterator[BlockKey]: ...

    def stats(self) -> TierStats: ...


@runtime_checkable
class BlockStore(Protocol):
    """What the service talks to: the whole tier chain as one store."""

    def put(self, key: BlockKey, data: bytes) -> None: ...

    def get(self, key: BlockKey) -> bytes | None: ...

    def contains(self, key: BlockKey) -> bool: ...

    def delete(self, key: BlockKey) -> bool: ...

    def stats(self) -> list[TierStats]: ...

    def close(self) -> None: ...
