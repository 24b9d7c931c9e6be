"""A chain of tiers behind the BlockStore interface.

Puts land in the first tier; what it evicts spills into the next tier, and so on; what falls out
of the last tier is dropped (it is a cache: a dropped block is a later miss, never wrong data) and
reported through ``on_drop``. A hit in a lower tier is promoted to the first tier. ``promote``:

- ``"copy"`` (default): the lower copy stays where it is, so a read never removes the durable (disk)
  copy of a block: a crash after reads loses nothing that was on disk. The block then counts in both
  tiers' used bytes until the first tier evicts it (its spill finds the copy already there and
  writes nothing).
- ``"move"``: the block is removed from the lower tier (it lives in exactly one tier; the lower
  tier's space is freed, at the price of durability of read blocks).

A damaged block found on read is removed, reported through ``on_corrupt`` and served as a miss.

``when_full``:

- ``"evict"`` (default): a put always succeeds (unless the block is larger than a tier); the least
  valuable blocks are evicted down the chain and out of its end.
- ``"refuse"``: a put or promotion that could push any block out of the last tier is refused
  (``StoreFullError`` for a put; a promotion is skipped and the block served from where it is).
  The check is conservative: a tier evicts whole blocks, so it may free up to one block more than
  it needs, and the check allows for that at every spill step; it may therefore refuse up to
  (tiers - 1) x the largest block early, but it never drops a block because of the configured
  capacities. Overwriting an existing key is checked the same way (its old size is not credited).

Per-tenant quotas (``store.quota``) live in the tiers: a put past its tenant's quota in a tier evicts
that tenant's own oldest blocks there first, which spill down or drop like any eviction, under either
``when_full`` (they are the putting tenant's own blocks, so ``refuse`` does not protect them).

A lower tier whose medium is full below its configured capacity (``StoreFullError`` from a real
disk) cannot take a spilled block; the block goes on down the chain or, past the end, is dropped
and reported like any other drop, whatever ``when_full`` says: that is a fault, not the policy.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from kvbm_codec.store.base import (
    BlockKey,
    BlockTooLargeError,
    StoreClosedError,
    StoreCorruptionError,
    StoreFullError,
    Tier,
    TierStats,
)

log = logging.getLogger(__name__)

FullPolicy = Literal["evict", "refuse"]
PromotePolicy = Literal["copy", "move"]


@dataclass(frozen=True)
class StoreCounters:
    """What moved between tiers since the store was built (per-tier counts are in ``stats()``)."""

    spills: int  # blocks moved one tier down by an eviction
    promotions: int  # blocks moved from a lower tier to the first on a hit
    dropped: int  # blocks lost out of the end of the chain (on_drop was called for each)
    spill_failures: int  # spills a tier could not take (medium full); the block went further down
    corrupt: int  # damaged blocks found on read, removed and served as misses
    refused: int  # puts refused under when_full="refuse"


def _largest_block(t: Tier) -> int:
    f = getattr(t, "largest_block", None)
    # A tier that cannot say is assumed to hold blocks as large as itself: safe, if pessimistic.
    return int(f()) if f is not None else t.capacity_bytes


class TieredStore:
    def __init__(
        self,
        tiers: list[Tier],
        *,
        when_full: FullPolicy = "evict",
        promote: PromotePolicy = "copy",
        on_drop: Callable[[BlockKey, int], None] | None = None,
        on_corrupt: Callable[[BlockKey, str], None] | None = None,
    ) -> None:
        """``on_drop(key, nbytes)`` and ``on_corrupt(key, tier_name)`` are called with the store's
        lock held; they may read counters but should not block."""
        if not tiers:
            raise ValueError("a store needs at least one tier")
        if when_full not in ("evict", "refuse"):
            raise ValueError(f"when_full must be 'evict' or 'refuse', got {when_full!r}")
        names = [t.name for t in tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"tier names must be unique (they label metrics), got {names}")
        self.tiers = list(tiers)
        self.when_full = when_full
        if promote not in ("copy", "move"):
            raise ValueError(f"promote must be 'copy' or 'move', got {promote!r}")
        self.promote = promote
        self._on_drop = on_drop
        self._on_corrupt = on_corrupt
        self._lock = threading.RLock()
        self._closed = False
        self._max_block = max(_largest_block(t) for t in self.tiers)
        self._spills = self._promotions = self._dropped = 0
        self._spill_failures = self._corrupt = self._refused = 0

    # ---- BlockStore -----------------------------------------------------------------------------

    def put(self, key: BlockKey, data: bytes) -> None:
        n = len(data)
        with self._lock:
            self._check_open()
            limit = min(t.capacity_bytes for t in self.tiers)
            if n > limit:
                raise BlockTooLargeError(f"{n} B block is larger than the smallest tier ({limit} B)")
            if self.when_full == "refuse" and self._would_drop(n, level=None):
                self._refused += 1
                used = sum(s.used_bytes for s in self.stats())
                cap = sum(s.capacity_bytes for s in self.stats())
                raise StoreFullError(
                    f"store full ({used} of {cap} B used); a {n} B block would push blocks out of "
                    "the last tier and the policy is when_full=refuse"
                )
            # The new block supersedes any copy below: a stale copy must never be promoted later.
            for t in self.tiers[1:]:
                t.delete(key)
            self._max_block = max(self._max_block, n)
            self._put_at(0, key, data)

    def get(self, key: BlockKey) -> bytes | None:
        # Fast path: a first-tier hit needs no store lock (tiers lock themselves), so it is not
        # held up behind a spill to disk.
        self._check_open()
        v = self._get_from(0, key)
        if v is not None:
            return v
        with self._lock:
            self._check_open()
            for level in range(len(self.tiers)):
                v = self._get_from(level, key)
                if v is None:
                    continue
                if level > 0:
                    self._promote(level, key, v)
                return v
            return None

    def contains(self, key: BlockKey) -> bool:
        self._check_open()
        if self.tiers[0].contains(key):
            return True
        with self._lock:  # a block being promoted is briefly in no tier; wait it out
            return any(t.contains(key) for t in self.tiers)

    def delete(self, key: BlockKey) -> bool:
        with self._lock:
            self._check_open()
            return any([t.delete(key) for t in self.tiers])

    def stats(self) -> list[TierStats]:
        return [t.stats() for t in self.tiers]

    def quota_usage(self) -> list[tuple[str, int, dict[str, int]]]:
        """(tier, per-tenant quota, bytes per tenant) for each tier with a quota (``store.quota``)."""
        out = []
        for t in self.tiers:
            limit = getattr(t, "quota_bytes", None)
            if limit is not None:
                out.append((t.name, int(limit), t.tenant_usage()))  # type: ignore[attr-defined]
        return out

    def counters(self) -> StoreCounters:
        with self._lock:
            return StoreCounters(
                self._spills,
                self._promotions,
                self._dropped,
                self._spill_failures,
                self._corrupt,
                self._refused,
            )

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for t in self.tiers:
                close = getattr(t, "close", None)
                if close is not None:
                    close()

    # ---- internals ------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError("store is closed")

    def _get_from(self, level: int, key: BlockKey) -> bytes | None:
        t = self.tiers[level]
        try:
            return t.get(key)
        except StoreCorruptionError as e:
            log.warning("%s", e)
            with self._lock:
                self._corrupt += 1
                if self._on_corrupt is not None:
                    self._call(self._on_corrupt, key, t.name)
            return None

    def _put_at(self, level: int, key: BlockKey, data: bytes) -> None:
        """Put into one tier and cascade its evictions; errors from this tier itself propagate."""
        t = self.tiers[level]
        last = level == len(self.tiers) - 1
        discard = getattr(t, "put_discard", None)
        if last and discard is not None:
            for k, size in discard(key, data):
                self._drop(k, size)
            return
        for k, v in t.put(key, data):
            if last:
                self._drop(k, len(v))
            else:
                self._spill(level + 1, k, v)

    def _spill(self, level: int, key: BlockKey, data: bytes) -> None:
        if self.promote == "copy" and self.tiers[level].contains(key):
            return  # a promoted copy going back down: the tier still holds these very bytes
        try:
            self._put_at(level, key, data)
        except (StoreFullError, BlockTooLargeError) as e:
            self._spill_failures += 1
            log.warning("spill of %s into tier %s failed: %s", key, self.tiers[level].name, e)
            if level + 1 < len(self.tiers):
                self._spill(level + 1, key, data)
            else:
                self._drop(key, len(data))
            return
        self._spills += 1

    def _promote(self, level: int, key: BlockKey, data: bytes) -> None:
        keep = self.promote == "copy"
        if self.when_full == "refuse" and self._would_drop(len(data), level=None if keep else level):
            return  # serve it from where it is rather than push another block out
        if keep:
            try:
                self._put_at(0, key, data)
            except (StoreFullError, BlockTooLargeError) as e:
                log.warning("promotion of %s failed, served from tier %s: %s", key, self.tiers[level].name, e)
                return
            self._promotions += 1
            return
        self.tiers[level].delete(key)
        try:
            self._put_at(0, key, data)
        except (StoreFullError, BlockTooLargeError) as e:
            log.warning("promotion of %s failed, kept in tier %s: %s", key, self.tiers[level].name, e)
            try:
                self._put_at(level, key, data)
            except (StoreFullError, BlockTooLargeError):
                self._drop(key, len(data))
            return
        self._promotions += 1

    def _would_drop(self, n: int, level: int | None) -> bool:
        """Could putting ``n`` bytes into the first tier push a block out of the last one?
        ``level``: the tier the block is being promoted from (its bytes are freed there first)."""
        incoming = n
        last = len(self.tiers) - 1
        for k, t in enumerate(self.tiers):
            s = t.stats()
            free = s.capacity_bytes - s.used_bytes + (n if k == level else 0)
            if incoming <= free:
                return False
            if k == last:
                return True
            # Evicting whole blocks until the incoming bytes fit frees less than one block extra.
            incoming = incoming - free + self._max_block
        return True

    def _drop(self, key: BlockKey, nbytes: int) -> None:
        self._dropped += 1
        if self._on_drop is not None:
            self._call(self._on_drop, key, nbytes)

    @staticmethod
    def _call(cb: Callable[..., None], key: BlockKey, arg: object) -> None:
        # A failing callback (a metrics hook) must not leave a cascade half done.
        try:
            cb(key, arg)
        except Exception:
            log.exception("store callback %r failed", cb)
