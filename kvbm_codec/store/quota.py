"""Per-tenant byte quota of one tier: what each tenant holds there, and its blocks in recency order.

Why per tier and per tenant: the tiers are shared caches, and under plain LRU one tenant that writes
fast enough pushes every other tenant's blocks out. With a quota, a put that takes its tenant past
the quota evicts that tenant's own least recently used blocks from the tier (cache semantics: the put
succeeds), so a tenant filling a tier only ever displaces itself. Capacity eviction (the tier as a
whole full) still takes the tier's global victim; with ``tenants x quota <= capacity`` it never runs,
and no tenant can evict another's block at all. The owning tier calls every method under its own lock.
"""

from __future__ import annotations

from collections import OrderedDict

from kvbm_codec.store.base import BlockKey, BlockTooLargeError


class TenantQuota:
    def __init__(self, limit: int, tier: str) -> None:
        if limit <= 0:
            raise ValueError("a tenant quota must be positive")
        self.limit = limit
        self.tier = tier
        self._used: dict[str, int] = {}
        self._order: dict[str, OrderedDict[BlockKey, int]] = {}

    def check(self, n: int) -> None:
        """A block larger than the quota could never be held: refuse it, as a block over capacity is."""
        if n > self.limit:
            raise BlockTooLargeError(
                f"{n} B block exceeds the per-tenant quota of tier {self.tier} ({self.limit} B)"
            )

    def add(self, key: BlockKey, n: int) -> None:
        """Record ``key`` (absent: the tier removed any old copy first) as its tenant's newest block."""
        self._order.setdefault(key.tenant, OrderedDict())[key] = n
        self._used[key.tenant] = self._used.get(key.tenant, 0) + n

    def remove(self, key: BlockKey) -> None:
        order = self._order.get(key.tenant)
        if order is None or key not in order:
            return
        n = order.pop(key)
        left = self._used[key.tenant] - n
        if order:
            self._used[key.tenant] = left
        else:
            del self._order[key.tenant]
            del self._used[key.tenant]

    def touch(self, key: BlockKey) -> None:
        order = self._order.get(key.tenant)
        if order is not None and key in order:
            order.move_to_end(key)

    def over(self, tenant: str, incoming: int = 0) -> bool:
        """Would ``incoming`` more bytes take ``tenant`` past its quota?"""
        return self._used.get(tenant, 0) + incoming > self.limit

    def oldest(self, tenant: str) -> BlockKey:
        return next(iter(self._order[tenant]))

    def usage(self) -> dict[str, int]:
        return dict(self._used)

    def clear(self) -> None:
        self._used.clear()
        self._order.clear()
