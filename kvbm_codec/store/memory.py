"""Host-memory tier: a byte-capacity cache of frames, evicting least recently (LRU) or least
frequently (LFU, ties broken by recency) used blocks.

LFU keeps blocks that are read again and again (a shared system prompt's KV) when a burst of
one-off blocks passes through; LRU lets that burst push them out. Both evict in O(1) per block.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from typing import Literal

from kvbm_codec.store.base import BlockKey, BlockTooLargeError, TierStats
from kvbm_codec.store.quota import TenantQuota

EvictionPolicy = Literal["lru", "lfu"]


class _LfuOrder:
    """Keys bucketed by access count; within a bucket, insertion order is recency (oldest first).

    A frequency only grows while the key lives; a re-put counts as an access, a new key starts at 1.
    """

    def __init__(self) -> None:
        self._freq: dict[BlockKey, int] = {}
        self._buckets: dict[int, OrderedDict[BlockKey, None]] = {}
        self._min = 0

    def __contains__(self, key: BlockKey) -> bool:
        return key in self._freq

    def __len__(self) -> int:
        return len(self._freq)

    def _unlink(self, key: BlockKey, f: int) -> None:
        bucket = self._buckets[f]
        del bucket[key]
        if not bucket:
            del self._buckets[f]
            if self._min == f:
                self._min = min(self._buckets, default=0)

    def touch(self, key: BlockKey) -> None:
        """Count one access of ``key``, inserting it at frequency 1 if new."""
        f = self._freq.get(key)
        if f is None:
            self._freq[key] = 1
            self._buckets.setdefault(1, OrderedDict())[key] = None
            self._min = 1
            return
        self._unlink(key, f)
        self._freq[key] = f + 1
        self._buckets.setdefault(f + 1, OrderedDict())[key] = None
        if self._min == 0 or f + 1 < self._min:
            self._min = f + 1

    def remove(self, key: BlockKey) -> None:
        f = self._freq.pop(key)
        self._unlink(key, f)

    def victim(self) -> BlockKey:
        """The least frequently used key, the least recently used among equals."""
        return next(iter(self._buckets[self._min]))

    def frequency(self, key: BlockKey) -> int:
        return self._freq[key]


class MemoryTier:
    def __init__(
        self,
        capacity_bytes: int,
        name: str = "memory",
        *,
        policy: EvictionPolicy = "lru",
        quota_bytes: int | None = None,
    ) -> None:
        """``quota_bytes``: per-tenant bytes (``store.quota``); over it a put evicts its own tenant's
        least recently used blocks (by recency also under LFU: the tenant's oldest first)."""
        if capacity_bytes <= 0:
            raise ValueError("capacity_bytes must be positive")
        if policy not in ("lru", "lfu"):
            raise ValueError(f"policy must be 'lru' or 'lfu', got {policy!r}")
        self.name = name
        self.capacity_bytes = capacity_bytes
        self.policy: EvictionPolicy = policy
        # In LRU mode the dict's order is the recency order; in LFU mode _lfu holds the order.
        self._items: OrderedDict[BlockKey, bytes] = OrderedDict()
        self._lfu = _LfuOrder() if policy == "lfu" else None
        self._used = 0
        self._evictions = 0
        self._quota = TenantQuota(quota_bytes, name) if quota_bytes is not None else None
        self._lock = threading.Lock()

    def _touch(self, key: BlockKey) -> None:
        if self._lfu is not None:
            self._lfu.touch(key)
        else:
            self._items.move_to_end(key)
        if self._quota is not None:
            self._quota.touch(key)

    def _pop_victim(self) -> tuple[BlockKey, bytes]:
        if self._lfu is not None:
            k = self._lfu.victim()
            self._lfu.remove(k)
            v = self._items.pop(k)
        else:
            k, v = self._items.popitem(last=False)
        if self._quota is not None:
            self._quota.remove(k)
        return k, v

    def _evict_own(self, tenant: str, incoming: int, evicted: list[tuple[BlockKey, bytes]]) -> None:
        """Evict ``tenant``'s oldest blocks until ``incoming`` more bytes fit its quota: first, so
        the capacity eviction after it never takes another tenant's block for this tenant's excess."""
        q = self._quota
        while q is not None and q.over(tenant, incoming):
            k = q.oldest(tenant)
            q.remove(k)
            v = self._items.pop(k)
            if self._lfu is not None:
                self._lfu.remove(k)
            self._used -= len(v)
            self._evictions += 1
            evicted.append((k, v))

    def put(self, key: BlockKey, data: bytes) -> list[tuple[BlockKey, bytes]]:
        if len(data) > self.capacity_bytes:
            raise BlockTooLargeError(
                f"{len(data)} B block exceeds tier {self.name} ({self.capacity_bytes} B)"
            )
        if self._quota is not None:
            self._quota.check(len(data))
        evicted: list[tuple[BlockKey, bytes]] = []
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._used -= len(old)
                if self._quota is not None:
                    self._quota.remove(key)
            self._evict_own(key.tenant, len(data), evicted)
            # An overwritten key keeps its place in the LFU order (and gains an access) while the
            # others are evicted around it, so it can never be its own victim.
            while self._used + len(data) > self.capacity_bytes:
                if self._lfu is not None and self._lfu.victim() == key:
                    self._lfu.remove(key)  # the only way: every other block is already gone
                    continue
                k, v = self._pop_victim()
                self._used -= len(v)
                self._evictions += 1
                evicted.append((k, v))
            self._items[key] = data
            self._used += len(data)
            if self._quota is not None:
                self._quota.add(key, len(data))
            self._touch(key)
        return evicted

    def get(self, key: BlockKey) -> bytes | None:
        with self._lock:
            v = self._items.get(key)
            if v is not None:
                self._touch(key)
            return v

    def contains(self, key: BlockKey) -> bool:
        with self._lock:
            return key in self._items

    def delete(self, key: BlockKey) -> bool:
        with self._lock:
            v = self._items.pop(key, None)
            if v is None:
                return False
            if self._lfu is not None:
                self._lfu.remove(key)
            if self._quota is not None:
                self._quota.remove(key)
            self._used -= len(v)
            return True

    def keys(self) -> Iterator[BlockKey]:
        with self._lock:
            return iter(list(self._items))

    def frequency(self, key: BlockKey) -> int | None:
        """Access count under LFU (None under LRU or for an absent key): for tests and debugging."""
        with self._lock:
            if self._lfu is None or key not in self._lfu:
                return None
            return self._lfu.frequency(key)

    def largest_block(self) -> int:
        """Size of the largest block held (O(n)); the tiered store's refuse check needs it once."""
        with self._lock:
            return max(map(len, self._items.values()), default=0)

    @property
    def quota_bytes(self) -> int | None:
        return self._quota.limit if self._quota is not None else None

    def tenant_usage(self) -> dict[str, int]:
        """Bytes per tenant in this tier (empty without a quota): for the quota metrics."""
        with self._lock:
            return self._quota.usage() if self._quota is not None else {}

    def stats(self) -> TierStats:
        with self._lock:
            return TierStats(self.name, self._used, self.capacity_bytes, len(self._items), self._evictions)

    def close(self) -> None:
        with self._lock:
            self._items.clear()
            if self._lfu is not None:
                self._lfu = _LfuOrder()
            self._used = 0
            if self._quota is not None:
                self._quota.clear()
