"""Consistent-hash sharding: balance and minimal movement of the ring, and a ShardedClient spreading real
blocks over in-process services, failing over when a replica goes away (misses, never wrong data)."""

from __future__ import annotations

import random
import threading

import _smollm2
import pytest
import torch
from _smollm2 import MODEL, SPEC

from kvbm_codec.api.blocks import BlockSpec
from kvbm_codec.api.errors import OverloadedError
from kvbm_codec.api.types import BlockTransport, PutItem
from kvbm_codec.cluster.sharding import (
    HashRing,
    NoReplicaError,
    ShardedClient,
    StaticMembership,
    is_replica_failure,
)
from kvbm_codec.core.service import BlockService, ServiceTransport
from kvbm_codec.store.memory import MemoryTier
from kvbm_codec.store.tiered import TieredStore


def _keys(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.getrandbits(64) for _ in range(n)]


def test_ring_balance():
    nodes = [f"replica-{i}" for i in range(4)]
    ring = HashRing(nodes)
    keys = _keys(40_000)
    counts = {n: 0 for n in nodes}
    for k in keys:
        counts[ring.owner(k)] += 1
    share = [c / len(keys) for c in counts.values()]
    assert max(share) < 0.25 * 1.2 and min(share) > 0.25 * 0.8, counts
    # Sequential keys (not already uniform) balance too: the ring re-hashes them.
    seq = [sum(ring.owner(k) == n for k in range(20_000)) / 20_000 for n in nodes]
    assert max(seq) < 0.3 and min(seq) > 0.2, seq


def test_ring_moves_only_what_it_must():
    keys = _keys(20_000, seed=1)
    ring = HashRing(["a", "b", "c"])
    before = {k: ring.owner(k) for k in keys}

    ring.remove("b")
    after = {k: ring.owner(k) for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert all(before[k] == "b" for k in moved)  # only b's keys move
    assert len(moved) == sum(o == "b" for o in before.values())

    ring.add("b")
    assert {k: ring.owner(k) for k in keys} == before  # deterministic: same membership, same owners

    ring.add("d")
    joined = {k: ring.owner(k) for k in keys}
    moved = [k for k in keys if before[k] != joined[k]]
    assert all(joined[k] == "d" for k in moved)  # keys only move to the newcomer
    assert 0.15 < len(moved) / len(keys) < 0.35  # about 1/4

    assert not ring.set_nodes(["a", "b", "c", "d"]) and ring.set_nodes(["a"])
    assert {ring.owner(k) for k in keys[:100]} == {"a"}
    with pytest.raises(NoReplicaError):
        HashRing().owner(1)
    with pytest.raises(ValueError):
        HashRing(vnodes=0)


def test_replica_failure_classification():
    import grpc

    from kvbm_codec.api.errors import ShuttingDownError

    class Rpc(grpc.RpcError):
        def __init__(self, code):
            self._code = code

        def code(self):
            return self._code

    assert is_replica_failure(Rpc(grpc.StatusCode.UNAVAILABLE))
    assert is_replica_failure(ConnectionRefusedError())
    assert is_replica_failure(ShuttingDownError("draining"))
    assert not is_replica_failure(Rpc(grpc.StatusCode.INVALID_ARGUMENT))
    assert not is_replica_failure(OverloadedError("busy"))
    assert not is_replica_failure(ValueError("bad"))


# ---- ShardedClient over real in-process services ---------------------------------------------------


@pytest.fixture
def replicas(small_calibration):
    services = {
        name: BlockService([_smollm2.served(small_calibration)], TieredStore([MemoryTier(1 << 30)]))
        for name in ("r1", "r2", "r3")
    }
    return SPEC, services


def _blocks(spec: BlockSpec, n: int, seed: int) -> list[PutItem]:
    g = torch.Generator().manual_seed(seed)
    items = []
    for i, h in enumerate(_keys(n, seed)):
        block = torch.randn(spec.shape, generator=g).to(torch.float16)
        items.append(PutItem(h, spec.to_bytes(block), first_position=4096 + 32 * i, compress=False))
    return items


def test_sharded_client_spreads_and_fails_over(replicas):
    spec, services = replicas
    membership = StaticMembership({k: k for k in services})

    def connect(key: str, _member: object) -> BlockTransport:
        return ServiceTransport(services[key], "tenant-a", MODEL)

    client = ShardedClient(membership, connect, refresh_interval_s=3600)
    assert isinstance(client, BlockTransport)
    items = _blocks(spec, 24, seed=3)
    hashes = [it.sequence_hash for it in items]
    results = client.put_blocks(items)
    assert [r.sequence_hash for r in results] == hashes

    # Each block lives on its owner and nowhere else.
    owners = {h: client.owner(h) for h in hashes}
    assert set(owners.values()) == set(services)
    for h, o in owners.items():
        for name, svc in services.items():
            assert svc.contains("tenant-a", MODEL, [h]) == [name == o]
    got = client.get_blocks(hashes)
    assert [g.status for g in got] == ["hit"] * 24
    assert all(g.data == it.data for g, it in zip(got, items, strict=True))  # exact blocks round-trip exactly

    # r2 starts draining (refuses with shutting_down): its blocks become misses, the rest still hit.
    services["r2"].drain(0.0)
    got = client.get_blocks(hashes)
    for g in got:
        assert g.status == ("miss" if owners[g.sequence_hash] == "r2" else "hit")
    assert client.replicas == {"r1", "r3"} and client.failovers == 1
    assert client.contains(hashes) == [owners[h] != "r2" for h in hashes]

    # New puts go to the survivors only; a put routed to a replica that just died is re-routed.
    services["r3"].drain(0.0)  # the client has not noticed yet
    fresh = _blocks(spec, 8, seed=4)
    client.put_blocks(fresh)
    assert client.replicas == {"r1"}
    assert services["r1"].contains("tenant-a", MODEL, [it.sequence_hash for it in fresh]) == [True] * 8
    assert client.delete([it.sequence_hash for it in fresh]) == 8

    # With every replica gone, reads are misses (no raise) and writes say why they failed.
    services["r1"].drain(0.0)
    assert all(g.status == "miss" for g in client.get_blocks(hashes[:3]))
    with pytest.raises(NoReplicaError):
        client.put_blocks(fresh[:1])


def test_sharded_client_passes_refusals_through(replicas):
    spec, services = replicas
    svc = services["r1"]

    class Busy(ServiceTransport):
        def put_blocks(self, items):
            raise OverloadedError("busy", retry_after_s=0.1)

    client = ShardedClient(StaticMembership({"r1": "r1"}), lambda k, m: Busy(svc, "t", MODEL))
    with pytest.raises(OverloadedError):
        client.put_blocks(_blocks(spec, 1, seed=5))
    assert client.replicas == {"r1"} and client.failovers == 0


def test_a_request_spread_over_replicas_calls_them_at_once(replicas):
    """The shares of one request are in flight together (each waits at a barrier only both can pass),
    so a request over N replicas costs its slowest share, not their sum; fanout=1 calls them in turn."""
    spec, services = replicas
    two = {k: services[k] for k in ("r1", "r2")}

    def meeting(barrier: threading.Barrier) -> type[ServiceTransport]:
        class Meeting(ServiceTransport):
            def put_blocks(self, items):  # type: ignore[no-untyped-def]
                barrier.wait()
                return super().put_blocks(items)

            def get_blocks(self, hashes, *, views=False):  # type: ignore[no-untyped-def]
                barrier.wait()
                return super().get_blocks(hashes, views=views)

        return Meeting

    together = meeting(threading.Barrier(2, timeout=30))
    client = ShardedClient(
        StaticMembership({k: k for k in two}),
        lambda k, m: together(two[k], "t", MODEL),
        refresh_interval_s=3600,
    )
    items = _blocks(spec, 16, seed=6)
    assert {client.owner(it.sequence_hash) for it in items} == set(two)  # the request spans both
    assert len(client.put_blocks(items)) == 16  # in turn, the first share would break the barrier
    got = client.get_blocks([it.sequence_hash for it in items])
    assert [g.data for g in got] == [it.data for it in items]
    client.close()

    in_turn = meeting(threading.Barrier(2, timeout=0.5))
    serial = ShardedClient(
        StaticMembership({k: k for k in two}),
        lambda k, m: in_turn(two[k], "t", MODEL),
        refresh_interval_s=3600,
        fanout=1,
    )
    with pytest.raises(threading.BrokenBarrierError):  # not a replica failure: raised, nothing marked dead
        serial.put_blocks(_blocks(spec, 16, seed=7))
    assert serial.replicas == set(two) and serial.failovers == 0
    with pytest.raises(ValueError, match="fanout"):
        ShardedClient(StaticMembership({}), lambda k, m: together(two[k], "t", MODEL), fanout=0)


def test_an_error_on_one_share_is_raised_after_every_share_finished(replicas):
    spec, services = replicas
    two = {k: services[k] for k in ("r1", "r2")}
    finished: list[str] = []

    class Recording(ServiceTransport):
        def __init__(self, key: str) -> None:
            super().__init__(two[key], "t", MODEL)
            self.key = key

        def put_blocks(self, items):  # type: ignore[no-untyped-def]
            if self.key == "r1":
                raise OverloadedError("busy", retry_after_s=0.1)
            out = super().put_blocks(items)
            finished.append(self.key)
            return out

    client = ShardedClient(StaticMembership({k: k for k in two}), lambda k, m: Recording(k))
    items = _blocks(spec, 16, seed=8)
    with pytest.raises(OverloadedError):
        client.put_blocks(items)
    assert finished == ["r2"] and client.failovers == 0  # the other share ran to its end first
    client.close()


def test_each_replica_answers_once_and_disagreement_is_refused(replicas):
    """What the vLLM tier checks at start: every live replica asked once (a draining one left out and
    marked dead), the value they all give, and a refusal naming the two that disagree."""
    _, services = replicas
    models = {"r1": MODEL, "r2": MODEL, "r3": "other-model"}
    client = ShardedClient(
        StaticMembership({k: k for k in services}),
        lambda key, _m: ServiceTransport(services[key], "tenant-a", models[key]),
        refresh_interval_s=3600,
    )
    assert client.on_each_replica(lambda t: t.model) == models
    with pytest.raises(ValueError, match="r1 has smollm2-135m, r3 has other-model"):
        client.agreed(lambda t: t.model, "the model")

    def model(t: ServiceTransport) -> str:
        t.contains([1])  # a draining replica refuses this with shutting_down: a replica failure
        return t.model

    services["r3"].drain(0.0)
    assert client.agreed(model, "the model") == MODEL
    assert client.replicas == {"r1", "r2"} and client.failovers == 1
