"""Store tiers: capacity and eviction order, spill and promotion, refusal, on-disk integrity, reopen,
threads. Fast (no model); every block's content is derived from its key, so any wrong byte shows."""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvbm_codec.store.base import (
    BlockKey,
    BlockStore,
    BlockTooLargeError,
    StoreClosedError,
    StoreCorruptionError,
    StoreError,
    StoreFullError,
    Tier,
)
from kvbm_codec.store.disk import DiskTier, decode_header
from kvbm_codec.store.memory import MemoryTier
from kvbm_codec.store.tiered import TieredStore


def k(i: int, tenant: str = "t") -> BlockKey:
    return BlockKey(tenant, "m", i)


def blob(key: BlockKey, n: int = 100) -> bytes:
    return random.Random(f"{key.tenant}/{key.model}/{key.sequence_hash}/{n}").randbytes(n)


def keys_of(t: Tier) -> list[int]:
    held = t.keys()
    return [x.sequence_hash for x in held]


# ---- memory tier ---------------------------------------------------------------------------------


def test_protocols_are_implemented(tmp_path: Path) -> None:
    with DiskTier(tmp_path, 1000) as d:
        assert isinstance(d, Tier)
        assert isinstance(MemoryTier(10), Tier)
        assert isinstance(TieredStore([MemoryTier(10), d]), BlockStore)


def test_memory_lru_evicts_least_recently_used() -> None:
    t = MemoryTier(300)
    for i in range(3):
        assert t.put(k(i), blob(k(i))) == []
    assert t.get(k(0)) == blob(k(0))  # 0 is now the most recent; 1 is the oldest
    evicted = t.put(k(3), blob(k(3)))
    assert evicted == [(k(1), blob(k(1)))]
    assert keys_of(t) == [2, 0, 3]
    evicted = t.put(k(4), blob(k(4), 200))  # needs two slots: 2 then 0
    assert [e[0].sequence_hash for e in evicted] == [2, 0]
    s = t.stats()
    assert (s.used_bytes, s.blocks, s.evictions) == (300, 2, 3)


def test_memory_lfu_keeps_frequently_read_blocks_and_breaks_ties_by_recency() -> None:
    t = MemoryTier(400, policy="lfu")
    for i in range(4):
        t.put(k(i), blob(k(i)))
    for _ in range(3):
        t.get(k(0))  # 0 is hot
    t.get(k(2))
    t.get(k(3))  # 2 and 3: two accesses each, 3 the more recent; 1: one access
    assert [x[0].sequence_hash for x in t.put(k(4), blob(k(4)))] == [1]
    assert [x[0].sequence_hash for x in t.put(k(5), blob(k(5)))] == [4]  # the new block, freq 1
    # a burst of one-off blocks never pushes the hot block out
    for i in range(6, 30):
        t.put(k(i), blob(k(i)))
    assert t.contains(k(0)) and t.frequency(k(0)) == 4
    assert [x[0].sequence_hash for x in t.put(k(99), blob(k(99), 300))] == [29, 2, 3]
    assert keys_of(t) == [0, 99]
    assert t.stats().used_bytes == 400


def test_memory_lfu_overwrite_counts_as_access_and_delete_forgets() -> None:
    t = MemoryTier(300, policy="lfu")
    for i in range(3):
        t.put(k(i), blob(k(i)))
    t.put(k(0), blob(k(0), 50))  # overwrite: frequency 2, smaller
    assert t.frequency(k(0)) == 2 and t.stats().used_bytes == 250
    assert t.delete(k(1)) and t.frequency(k(1)) is None and not t.delete(k(1))
    assert t.put(k(5), blob(k(5), 160)) == [(k(2), blob(k(2)))]
    # an overwrite that needs room evicts others, never itself
    t2 = MemoryTier(200, policy="lfu")
    t2.put(k(0), blob(k(0)))
    t2.put(k(1), blob(k(1)))
    assert t2.put(k(0), blob(k(0), 150)) == [(k(1), blob(k(1)))]
    assert t2.get(k(0)) == blob(k(0), 150)


def test_memory_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        MemoryTier(0)
    with pytest.raises(ValueError):
        MemoryTier(10, policy="fifo")  # type: ignore[arg-type]
    with pytest.raises(BlockTooLargeError):
        MemoryTier(10).put(k(1), b"x" * 11)


# ---- disk tier -----------------------------------------------------------------------------------


def test_disk_roundtrip_layout_and_header(tmp_path: Path) -> None:
    with DiskTier(tmp_path, 10_000, fsync=False) as d:
        key = BlockKey("tenant-a", "model:x", 2**64 - 1)
        assert d.put(key, blob(key)) == []
        assert d.get(key) == blob(key) and d.contains(key)
        assert d.get(k(1)) is None and not d.contains(k(1))
        p = d.path_of(key)
        digest = key.digest()
        assert p.relative_to(tmp_path).parts == (digest[:2], digest[2:4], digest + ".blk")
        raw = p.read_bytes()
        got, hlen, plen, _ = decode_header(raw)
        assert got == key and plen == 100 and raw[hlen:] == blob(key)
        s = d.stats()
        assert (s.used_bytes, s.blocks, s.capacity_bytes, s.name) == (100, 1, 10_000, "disk")
        assert d.delete(key) and not p.exists() and not d.delete(key)
        assert d.stats().used_bytes == 0


def test_disk_lru_capacity_and_eviction_order(tmp_path: Path) -> None:
    with DiskTier(tmp_path, 300) as d:
        for i in range(3):
            d.put(k(i), blob(k(i)))
        d.get(k(0))
        assert d.put(k(3), blob(k(3))) == [(k(1), blob(k(1)))]
        assert not d.path_of(k(1)).exists()
        assert d.put_discard(k(4), blob(k(4), 200)) == [(k(2), 100), (k(0), 100)]
        assert keys_of(d) == [3, 4]
        assert d.stats().evictions == 3 and d.stats().used_bytes == 300
        with pytest.raises(BlockTooLargeError):
            d.put(k(9), b"x" * 301)
        assert keys_of(d) == [3, 4]  # a refused block changes nothing
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == sorted(
        [".lock", d.path_of(k(3)).name, d.path_of(k(4)).name]
    )


def _flip(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x10
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("where", ["payload_first", "payload_last", "header_key", "header_len"])
def test_disk_bit_flip_is_detected_on_read_and_file_removed(tmp_path: Path, where: str) -> None:
    with DiskTier(tmp_path, 10_000) as d:
        d.put(k(1), blob(k(1)))
        d.put(k(2), blob(k(2)))
        p = d.path_of(k(1))
        hlen = len(p.read_bytes()) - 100
        offset = {"payload_first": hlen, "payload_last": hlen + 99, "header_key": 34, "header_len": 18}[where]
        _flip(p, offset)
        with pytest.raises(StoreCorruptionError):
            d.get(k(1))
        assert not p.exists() and not d.contains(k(1))
        assert d.get(k(1)) is None  # now a plain miss
        assert d.get(k(2)) == blob(k(2))
        s = d.stats()
        assert (s.corrupt, s.blocks, s.used_bytes) == (1, 1, 100)


def test_disk_truncated_file_detected_on_read_and_at_reopen(tmp_path: Path) -> None:
    with DiskTier(tmp_path, 10_000) as d:
        for i in range(3):
            d.put(k(i), blob(k(i)))
        for i, cut in ((0, 99), (1, 10)):
            p = d.path_of(k(i))
            p.write_bytes(p.read_bytes()[: len(p.read_bytes()) - cut])
        with pytest.raises(StoreCorruptionError):
            d.get(k(0))
    with DiskTier(tmp_path, 10_000) as d:  # 1 is truncated, never read: found at open
        r = d.rebuild_report
        assert (r.blocks, r.bad_files_removed, r.bytes) == (1, 1, 100)
        assert keys_of(d) == [2] and d.get(k(2)) == blob(k(2))
        assert not d.path_of(k(1)).exists()


def test_disk_reopen_rebuilds_index_drops_temp_and_foreign_files(tmp_path: Path) -> None:
    with DiskTier(tmp_path, 10_000) as d:
        for i in range(5):
            d.put(k(i), blob(k(i), 100 + i))
        os.utime(d.path_of(k(0)), ns=(1, 1))  # make the on-disk order unambiguous
        for i in (1, 2, 3, 4):
            os.utime(d.path_of(k(i)), ns=(10 + i, 10 + i))
        d.get(k(0))  # a read refreshes the mtime: 0 becomes the most recent after reopen
        shard = d.path_of(k(3)).parent
        (shard / f".{d.path_of(k(3)).name}.123.0.tmp").write_bytes(b"half a block")
        (shard / "stray.tmp").write_bytes(b"")
        misplaced = d.path_of(k(4)).read_bytes()
        d.path_of(k(4)).unlink()
        (shard / ("0" * 64 + ".blk")).write_bytes(misplaced)  # a valid file under the wrong name
        (shard / ("1" * 64 + ".blk")).write_bytes(b"")  # an empty block file
    with DiskTier(tmp_path, 10_000) as d:
        r = d.rebuild_report
        assert (r.blocks, r.temp_files_removed, r.bad_files_removed, r.over_capacity_evicted) == (4, 2, 2, 0)
        assert keys_of(d) == [1, 2, 3, 0]
        assert d.stats().used_bytes == 100 + 101 + 102 + 103
        for i in range(4):
            assert d.get(k(i)) == blob(k(i), 100 + i)
        assert not any(p.name.endswith(".tmp") for p in tmp_path.rglob("*"))
        for t, i in enumerate((2, 0, 3, 1)):  # mtime ticks are coarse: set an unambiguous order
            os.utime(d.path_of(k(i)), ns=(10**9 * (t + 1),) * 2)
    with DiskTier(tmp_path, 250) as d:  # capacity lowered: the oldest go
        assert d.rebuild_report.over_capacity_evicted == 2
        assert keys_of(d) == [3, 1]


def test_disk_directory_is_locked_to_one_process_and_closed_tier_refuses(tmp_path: Path) -> None:
    d = DiskTier(tmp_path, 1000)
    with pytest.raises(StoreError, match="in use"):
        DiskTier(tmp_path, 1000)
    d.close()
    d.close()  # idempotent
    with pytest.raises(StoreClosedError):
        d.put(k(1), b"x")
    with pytest.raises(StoreClosedError):
        d.get(k(1))
    DiskTier(tmp_path, 1000).close()


def test_disk_threads_put_get_delete(tmp_path: Path) -> None:
    with DiskTier(tmp_path, 40 * 2000, fsync=False) as d:
        errors: list[str] = []

        def work(seed: int) -> None:
            rnd = random.Random(seed)
            for _ in range(300):
                i = rnd.randrange(60)
                op = rnd.random()
                try:
                    if op < 0.5:
                        d.put(k(i), blob(k(i), 1000 + i * 10))
                    elif op < 0.9:
                        v = d.get(k(i))
                        if v is not None and v != blob(k(i), 1000 + i * 10):
                            errors.append(f"wrong bytes for {i}")
                    else:
                        d.delete(k(i))
                except Exception as e:
                    errors.append(repr(e))

        threads = [threading.Thread(target=work, args=(s,)) for s in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        s = d.stats()
        assert s.used_bytes <= s.capacity_bytes and s.corrupt == 0
        held = list(d.keys())
        assert s.used_bytes == sum(1000 + x.sequence_hash * 10 for x in held)
        on_disk = {p.name for p in tmp_path.rglob("*.blk")}
        assert on_disk == {d.path_of(x).name for x in held}
        assert not list(tmp_path.rglob("*.tmp"))


# ---- tiered store --------------------------------------------------------------------------------


def _two_tier(tmp_path: Path, mem: int, disk: int, **kw: object) -> tuple[TieredStore, list]:
    dropped: list[tuple[BlockKey, int]] = []
    store = TieredStore(
        [MemoryTier(mem), DiskTier(tmp_path, disk, fsync=False)],
        on_drop=lambda key, n: dropped.append((key, n)),
        **kw,  # type: ignore[arg-type]
    )
    return store, dropped


def test_tiered_spills_promotes_and_drops(tmp_path: Path) -> None:
    store, dropped = _two_tier(tmp_path, 300, 500, promote="move")
    mem, disk = store.tiers
    for i in range(8):
        store.put(k(i), blob(k(i)))
    assert keys_of(mem) == [5, 6, 7]
    assert keys_of(disk) == [0, 1, 2, 3, 4]
    assert dropped == []
    store.put(k(8), blob(k(8)))  # 5 spills to disk, 0 falls out of the end
    assert dropped == [(k(0), 100)]
    assert store.get(k(0)) is None
    assert store.get(k(1)) == blob(k(1))  # promoted: now in memory, not on disk
    assert mem.contains(k(1)) and not disk.contains(k(1)) and not disk.path_of(k(1)).exists()
    assert keys_of(mem) == [7, 8, 1]  # 6 spilled to make room
    assert store.contains(k(6)) and disk.contains(k(6))
    c = store.counters()
    assert (c.spills, c.promotions, c.dropped, c.refused) == (7, 1, 1, 0)
    s = store.stats()
    assert [x.evictions for x in s] == [7, 1] and [x.blocks for x in s] == [3, 5]
    assert sum(x.used_bytes for x in s) == 800
    assert store.delete(k(6)) and not store.contains(k(6)) and not store.delete(k(6))
    store.close()
    with pytest.raises(StoreClosedError):
        store.put(k(1), b"x")


def test_tiered_put_supersedes_lower_copy(tmp_path: Path) -> None:
    store, _ = _two_tier(tmp_path, 200, 1000)
    for i in range(3):
        store.put(k(i), blob(k(i)))
    assert store.tiers[1].contains(k(0))
    store.put(k(0), b"new")
    assert not store.tiers[1].contains(k(0))
    assert store.get(k(0)) == b"new"
    store.close()


def test_tiered_refuse_policy_never_drops(tmp_path: Path) -> None:
    store, dropped = _two_tier(tmp_path, 300, 500, when_full="refuse")
    accepted = []
    with pytest.raises(StoreFullError, match="refuse"):
        for i in range(100):
            store.put(k(i), blob(k(i)))
            accepted.append(i)
    assert 5 <= len(accepted) <= 8  # 800 B of room, at most one 100 B block lost per spill step
    assert dropped == [] and store.counters().refused == 1
    for i in accepted:  # promotions shuffle blocks around but lose none
        assert store.get(k(i)) == blob(k(i))
    assert dropped == []
    assert store.delete(k(accepted[0]))
    store.put(k(1000), blob(k(1000)))  # room again
    assert dropped == []
    store.close()


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 120), min_size=1, max_size=60),
    reads=st.lists(st.integers(0, 59), max_size=30),
    mem_policy=st.sampled_from(["lru", "lfu"]),
)
def test_tiered_refuse_property(sizes: list[int], reads: list[int], mem_policy: str) -> None:
    """Whatever the block sizes and reads, refuse mode loses nothing and serves only right bytes."""
    dropped: list[BlockKey] = []
    store = TieredStore(
        [MemoryTier(250, policy=mem_policy), MemoryTier(300, name="m2"), MemoryTier(400, name="m3")],  # type: ignore[arg-type]
        when_full="refuse",
        promote="move",  # the one-copy accounting below is the move policy's
        on_drop=lambda key, n: dropped.append(key),
    )
    held = {}
    for i, n in enumerate(sizes):
        try:
            store.put(k(i), blob(k(i), n))
            held[i] = n
        except StoreFullError:
            pass
        if reads:
            j = reads[i % len(reads)]
            if j in held:
                assert store.get(k(j)) == blob(k(j), held[j])
    assert dropped == []
    for i, n in held.items():
        assert store.get(k(i)) == blob(k(i), n)
    assert sum(s.used_bytes for s in store.stats()) == sum(held.values())


def test_tiered_block_larger_than_a_tier_is_refused(tmp_path: Path) -> None:
    store, _ = _two_tier(tmp_path, 300, 1000)
    with pytest.raises(BlockTooLargeError):
        store.put(k(1), b"x" * 301)
    assert not store.contains(k(1)) and sum(s.blocks for s in store.stats()) == 0
    store.close()


def test_tiered_corrupt_disk_block_is_a_miss_and_reported(tmp_path: Path) -> None:
    corrupt: list[tuple[BlockKey, str]] = []
    store = TieredStore(
        [MemoryTier(100), DiskTier(tmp_path, 1000)], on_corrupt=lambda key, tier: corrupt.append((key, tier))
    )
    store.put(k(1), blob(k(1)))
    store.put(k(2), blob(k(2)))  # 1 spills to disk
    p = store.tiers[1].path_of(k(1))  # type: ignore[attr-defined]
    _flip(p, len(p.read_bytes()) - 1)
    assert store.get(k(1)) is None
    assert corrupt == [(k(1), "disk")]
    assert store.counters().corrupt == 1 and store.stats()[1].corrupt == 1
    assert not store.contains(k(1)) and not p.exists()
    assert store.get(k(2)) == blob(k(2))
    store.close()


def test_tiered_failing_callback_does_not_break_the_cascade(tmp_path: Path) -> None:
    def boom(key: BlockKey, n: int) -> None:
        raise RuntimeError("metrics hook broke")

    store = TieredStore([MemoryTier(100), MemoryTier(100, name="m2")], on_drop=boom)
    for i in range(5):
        store.put(k(i), blob(k(i)))
    assert store.counters().dropped == 3
    assert store.get(k(4)) == blob(k(4)) and store.get(k(3)) == blob(k(3))


def test_tiered_threads_serve_only_right_bytes(tmp_path: Path) -> None:
    store, dropped = _two_tier(tmp_path, 20 * 1000, 50 * 1000, promote="move")
    errors: list[str] = []
    size = {i: 500 + 13 * i for i in range(120)}

    def work(seed: int) -> None:
        rnd = random.Random(seed)
        for _ in range(400):
            i = rnd.randrange(120)
            try:
                if rnd.random() < 0.4:
                    store.put(k(i), blob(k(i), size[i]))
                else:
                    v = store.get(k(i))
                    if v is not None and v != blob(k(i), size[i]):
                        errors.append(f"wrong bytes for {i}")
            except Exception as e:
                errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    mem, disk = (set(t.keys()) for t in store.tiers)
    assert not mem & disk  # a block lives in exactly one tier
    s = store.stats()
    assert s[0].used_bytes == sum(size[x.sequence_hash] for x in mem)
    assert s[1].used_bytes == sum(size[x.sequence_hash] for x in disk)
    assert all(x.used_bytes <= x.capacity_bytes for x in s)
    assert len(dropped) == store.counters().dropped > 0
    store.close()
