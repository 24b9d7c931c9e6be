"""Host-memory tier: a byte-capacity LRU of frames."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator

from kvbm_codec.store.base import BlockKey, BlockTooLargeError, TierStats


class MemoryTier:
    def __init__(self, capacity_bytes: int, name: str = "memory") -> None:
        if capacity_bytes <= 0:
            raise ValueError("capacity_bytes must be positive")
        self.name = name
        self.capacity_bytes = capacity_bytes
        self._items: OrderedDict[BlockKey, bytes] = OrderedDict()
        self._used = 0
        self._evictions = 0
        self._lock = threading.Lock()

    def put(self, key: BlockKey, data: bytes) -> list[tuple[BlockKey, bytes]]:
        if len(data) > self.capacity_bytes:
            raise BlockTooLargeError(
                f"{len(data)} B block exceeds tier {self.name} ({self.capacity_bytes} B)"
            )
        evicted: list[tuple[BlockKey, bytes]] = []
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._used -= len(old)
            while self._used + len(data) > self.capacity_bytes:
                k, v = self._items.popitem(last=False)
                self._used -= len(v)
                self._evictions += 1
                evicted.append((k, v))
            self._items[key] = data
            self._used += len(data)
        return evicted

    def get(self, key: BlockKey) -> bytes | None:
        with self._lock:
            v = self._items.get(key)
            if v is not None:
                self._items.move_to_end(key)
            return v

    def contains(self, key: BlockKey) -> bool:
        with self._lock:
            return key in self._items

    def delete(self, key: BlockKey) -> bool:
        with self._lock:
            v = self._items.pop(key, None)
            if v is None:
                return False
            self._used -= len(v)
            return True

    def keys(self) -> Iterator[BlockKey]:
        with self._lock:
            return iter(list(self._items))

    def stats(self) -> TierStats:
        with self._lock:
            return TierStats(self.name, self._used, self.capacity_bytes, len(self._items), self._evictions)
