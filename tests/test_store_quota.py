"""Per-tenant storage quotas in the memory and disk tiers (issue 18): a tenant filling a tier only
ever evicts its own oldest blocks, never another tenant's; quota use is exposed per tenant class,
never per tenant name."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from kvbm_codec.core.metrics import ServiceMetrics
from kvbm_codec.store.base import BlockKey, BlockTooLargeError
from kvbm_codec.store.disk import DiskTier
from kvbm_codec.store.memory import MemoryTier
from kvbm_codec.store.tiered import TieredStore

BLOCK = 100


def _key(tenant: str, i: int) -> BlockKey:
    return BlockKey(tenant, "m", i)


def _data(tenant: str, i: int) -> bytes:
    return (f"{tenant}:{i}:".encode() * BLOCK)[:BLOCK]


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_memory_quota_evicts_only_the_flooding_tenants_own_oldest_blocks(policy: str) -> None:
    tier = MemoryTier(10 * BLOCK, policy=policy, quota_bytes=4 * BLOCK)  # type: ignore[arg-type]
    for i in range(4):
        assert tier.put(_key("b", i), _data("b", i)) == []
    evicted = []
    for i in range(50):  # tenant a writes 12x its quota
        evicted += tier.put(_key("a", i), _data("a", i))
    assert {k.tenant for k, _ in evicted} == {"a"}
    assert [k.sequence_hash for k, _ in evicted] == list(range(46))  # oldest first
    assert all(tier.get(_key("b", i)) == _data("b", i) for i in range(4))
    assert sorted(k.sequence_hash for k in list(tier.keys()) if k.tenant == "a") == [46, 47, 48, 49]
    assert tier.tenant_usage() == {"a": 4 * BLOCK, "b": 4 * BLOCK}
    # a re-put of a held key replaces it in place, it is not counted twice
    tier.put(_key("a", 49), _data("a", 49))
    assert tier.tenant_usage()["a"] == 4 * BLOCK
    tier.delete(_key("a", 49))
    assert tier.tenant_usage()["a"] == 3 * BLOCK


def test_a_read_keeps_a_block_within_its_tenants_quota() -> None:
    tier = MemoryTier(10 * BLOCK, quota_bytes=3 * BLOCK)
    for i in range(3):
        tier.put(_key("a", i), _data("a", i))
    tier.get(_key("a", 0))  # now the tenant's most recent
    (victim,) = tier.put(_key("a", 3), _data("a", 3))
    assert victim[0] == _key("a", 1)


def test_a_block_over_the_quota_is_refused_not_stored() -> None:
    tier = MemoryTier(10 * BLOCK, quota_bytes=BLOCK)
    with pytest.raises(BlockTooLargeError, match="per-tenant quota"):
        tier.put(_key("a", 1), b"x" * (BLOCK + 1))
    assert tier.stats().blocks == 0


def test_tiered_flood_spills_and_drops_only_the_flooders_blocks(tmp_path: Path) -> None:
    mem = MemoryTier(8 * BLOCK, quota_bytes=3 * BLOCK)
    disk = DiskTier(tmp_path, 20 * BLOCK, fsync=False, quota_bytes=5 * BLOCK)
    dropped: list[BlockKey] = []
    store = TieredStore([mem, disk], on_drop=lambda k, _n: dropped.append(k))
    for i in range(6):
        store.put(_key("b", i), _data("b", i))  # 3 in memory, 3 spilled to disk
    for i in range(100):
        store.put(_key("a", i), _data("a", i))
    assert dropped and {k.tenant for k in dropped} == {"a"}
    assert all(store.get(_key("b", i)) == _data("b", i) for i in range(6))
    # a holds its newest 3 in memory and the 5 before them on disk; nothing older
    held = sorted(i for i in range(100) if store.contains(_key("a", i)))
    assert held == list(range(92, 100))
    usage = {tier: u for tier, _q, u in store.quota_usage()}
    assert usage["memory"]["a"] <= 3 * BLOCK and usage["disk"]["a"] <= 5 * BLOCK
    store.close()


def test_disk_reopen_with_a_lower_quota_keeps_each_tenants_newest(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path, 100 * BLOCK, fsync=False)
    for t in ("a", "b"):
        for i in range(6):
            disk.put(_key(t, i), _data(t, i))
            ns = (1_700_000_000 + i) * 10**9  # the recency a reopen reads (mtime), one second apart
            os.utime(disk.path_of(_key(t, i)), ns=(ns, ns))
    disk.close()
    disk = DiskTier(tmp_path, 100 * BLOCK, fsync=False, quota_bytes=2 * BLOCK)
    assert disk.rebuild_report.over_capacity_evicted == 8
    for t in ("a", "b"):
        assert sorted(k.sequence_hash for k in list(disk.keys()) if k.tenant == t) == [4, 5]
        assert disk.get(_key(t, 5)) == _data(t, 5)
    assert disk.tenant_usage() == {"a": 2 * BLOCK, "b": 2 * BLOCK}
    disk.close()


def test_quota_use_is_exposed_per_tenant_class_never_per_tenant() -> None:
    store = TieredStore([MemoryTier(20 * BLOCK, quota_bytes=4 * BLOCK)])
    for t, n in (("secret-tenant-1", 3), ("secret-tenant-2", 1), ("other", 2)):
        for i in range(n):
            store.put(_key(t, i), _data(t, i))
    m = ServiceMetrics()
    classes = {"secret-tenant-1": "gold", "secret-tenant-2": "gold"}
    m.watch_quotas(store.quota_usage, lambda t: classes.get(t, "default"))
    text = generate_latest(m.registry).decode()
    assert "secret-tenant" not in text
    r = m.registry.get_sample_value
    assert r("kvbm_codec_tier_quota_bytes", {"tier": "memory"}) == 4 * BLOCK
    assert r("kvbm_codec_tier_tenant_used_bytes", {"tier": "memory", "tenant_class": "gold"}) == 4 * BLOCK
    assert r("kvbm_codec_tier_tenant_max_used_bytes", {"tier": "memory", "tenant_class": "gold"}) == 3 * BLOCK
    assert r("kvbm_codec_tier_tenant_used_bytes", {"tier": "memory", "tenant_class": "default"}) == 2 * BLOCK
