"""A chain of tiers behind the BlockStore interface: puts land in the first tier, evictions spill
down the chain, a hit in a lower tier is promoted back to the first, and what falls out of the last
tier is dropped (it is a cache: a dropped block is a miss, never wrong data) or refused, by policy."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Literal

from kvbm_codec.store.base import BlockKey, BlockTooLargeError, StoreFullError, Tier, TierStats

FullPolicy = Literal["evict", "refuse"]


class TieredStore:
    def __init__(
        self,
        tiers: list[Tier],
        *,
        when_full: FullPolicy = "evict",
        on_drop: Callable[[BlockKey, int], None] | None = None,
    ) -> None:
        if not tiers:
            raise ValueError("a store needs at least one tier")
        self.tiers = tiers
        self.when_full = when_full
        self._on_drop = on_drop
        self._lock = threading.RLock()

    def _free_bytes(self) -> int:
        return sum(s.capacity_bytes - s.used_bytes for s in self.stats())

    def put(self, key: BlockKey, data: bytes) -> None:
        with self._lock:
            if len(data) > min(t.capacity_bytes for t in self.tiers):
                raise BlockTooLargeError(f"{len(data)} B block is larger than a tier's capacity")
            if self.when_full == "refuse" and not self.contains(key) and self._free_bytes() < len(data):
                raise StoreFullError(
                    f"all tiers full ({sum(s.used_bytes for s in self.stats())} B used); "
                    "policy when_full=refuse"
                )
            for t in self.tiers[1:]:
                t.delete(key)
            self._put_at(0, key, data)

    def _put_at(self, level: int, key: BlockKey, data: bytes) -> None:
        evicted = self.tiers[level].put(key, data)
        for k, v in evicted:
            if level + 1 < len(self.tiers):
                self._put_at(level + 1, k, v)
            elif self._on_drop is not None:
                self._on_drop(k, len(v))

    def get(self, key: BlockKey) -> bytes | None:
        with self._lock:
            for level, t in enumerate(self.tiers):
                v = t.get(key)
                if v is None:
                    continue
                if level > 0:  # promote: the next get is served from the fastest tier
                    t.delete(key)
                    self._put_at(0, key, v)
                return v
            return None

    def contains(self, key: BlockKey) -> bool:
        return any(t.contains(key) for t in self.tiers)

    def delete(self, key: BlockKey) -> bool:
        with self._lock:
            return any([t.delete(key) for t in self.tiers])

    def stats(self) -> list[TierStats]:
        return [t.stats() for t in self.tiers]

    def close(self) -> None:
        for t in self.tiers:
            close = getattr(t, "close", None)
            if close is not None:
                close()
