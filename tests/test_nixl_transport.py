"""The NIXL bulk transport over real UCX loopback: two agents in this process, and a peer in a child
process that holds its registered buffer while this process READs and WRITEs it."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any

import pytest
import torch

from kvbm_codec.transport import (
    NixlAgent,
    NixlClosedError,
    NixlTimeoutError,
    NixlTransferError,
    Registration,
    RemoteRegion,
)

BLOCK = 7 * 1024 + 3  # odd on purpose: spans need no alignment
CHILD_BYTES = 4 << 20
# UCX over TCP on 127.0.0.1 only: a READ then needs the peer's own progress, so a stopped peer stalls it.
TCP_LOOPBACK = {"UCX_TLS": "tcp,self", "UCX_NET_DEVICES": "lo"}


def _pattern(seed: int, nbytes: int) -> torch.Tensor:
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def server() -> Iterator[NixlAgent]:
    with NixlAgent("kvbm-codec-test-server") as agent:
        yield agent


@pytest.fixture(scope="module")
def client() -> Iterator[NixlAgent]:
    with NixlAgent("kvbm-codec-test-client") as agent:
        yield agent


def test_read_and_write_are_bit_identical(server: NixlAgent, client: NixlAgent) -> None:
    src = torch.randn(30, 2, 32, 192, generator=torch.Generator().manual_seed(1)).to(torch.float16)
    with client.register(src.clone()) as creg, server.register(torch.zeros_like(src)) as sreg:
        server.read(creg.remote(), 0, sreg, 0, creg.nbytes)
        assert torch.equal(sreg.tensor.view(torch.int16), src.view(torch.int16))

        new = _pattern(2, creg.nbytes)
        sreg.tensor.view(torch.uint8).view(-1).copy_(new)
        server.write(creg.remote(), 0, sreg, 0, creg.nbytes)
        assert torch.equal(creg.tensor.view(torch.uint8).view(-1), new)


def test_many_spans_in_one_transfer(
    server: NixlAgent, client: NixlAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    n_blocks = 64
    perm = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(3)).tolist()
    spans = [(perm[i] * BLOCK, i * BLOCK, BLOCK) for i in range(n_blocks)]
    remote_pool = _pattern(4, n_blocks * BLOCK)
    requests: list[tuple[str, int]] = []
    initialize_xfer = server._nixl.initialize_xfer

    def counting(op: str, local_descs: Any, remote_descs: Any, *args: Any, **kwargs: Any) -> Any:
        requests.append((op, local_descs.descCount()))
        return initialize_xfer(op, local_descs, remote_descs, *args, **kwargs)

    monkeypatch.setattr(server._nixl, "initialize_xfer", counting)
    with client.register(remote_pool.clone()) as creg, server.register(torch.zeros_like(remote_pool)) as sreg:
        remote = creg.remote()
        server.read_many(remote, spans, sreg)
        for r, loc, n in spans:
            assert torch.equal(sreg.tensor[loc : loc + n], remote_pool[r : r + n])

        outgoing = _pattern(5, n_blocks * BLOCK)
        sreg.tensor.copy_(outgoing)
        server.write_many(remote, spans, sreg)
        for r, loc, n in spans:
            assert torch.equal(creg.tensor[r : r + n], outgoing[loc : loc + n])
    assert requests == [("READ", n_blocks), ("WRITE", n_blocks)]


@pytest.mark.parametrize(
    ("spans", "match"),
    [
        ([(4096 - 100, 0, 101)], "remote region"),  # one byte past the remote end
        ([(0, 8192 - 10, 11)], "local region"),  # one byte past the local end
        ([(1 << 62, 0, 16)], "remote region"),
        ([(-1, 0, 16)], ">= 0"),
        ([(0, -16, 16)], ">= 0"),
        ([(0, 0, 0)], "> 0"),
        ([(0, 0, 64), (64, 32, 64)], "overlap"),  # two READs into the same local bytes
        ([], "no spans"),
        ([(0, 0)], "3 ints"),
        ([(0, 0, True)], "3 ints"),
        ([(0, 0, 1 << 70)], "out of range"),
    ],
)
def test_out_of_bounds_is_refused_before_any_transfer(
    server: NixlAgent, client: NixlAgent, spans: list[tuple[int, int, int]], match: str
) -> None:
    with (
        client.register(_pattern(6, 4096)) as creg,
        server.register(torch.zeros(8192, dtype=torch.uint8)) as sreg,
    ):
        with pytest.raises(ValueError, match=match):
            server.read_many(creg.remote(), spans, sreg)
        assert not sreg.tensor.any(), "a refused READ wrote into local memory"


def test_region_larger_than_registered_is_refused_by_nixl(server: NixlAgent, client: NixlAgent) -> None:
    """A client that lies about its region size passes the bounds check; nixl then finds no such region
    and the error names the peer."""
    with (
        client.register(_pattern(7, 4096)) as creg,
        server.register(torch.zeros(8192, dtype=torch.uint8)) as sreg,
    ):
        lying = RemoteRegion.from_dict({**creg.remote().to_dict(), "nbytes": 8192})
        with pytest.raises(NixlTransferError, match=client.name) as info:
            server.read(lying, 0, sreg, 0, 8192)
        assert info.value.peer == client.name
        assert not sreg.tensor.any()
        server.read(creg.remote(), 0, sreg, 0, 4096)  # the agent is still usable
        assert torch.equal(sreg.tensor[:4096], creg.tensor)


def test_remote_region_validates_and_round_trips(client: NixlAgent) -> None:
    with client.register(torch.zeros(64, dtype=torch.uint8)) as creg:
        region = creg.remote()
        assert RemoteRegion.from_dict(region.to_dict()) == region
        assert region.agent_metadata == client.metadata()
        good = region.to_dict()
    for bad in (
        {"agent_name": ""},
        {"agent_metadata": b""},
        {"addr": 0},
        {"nbytes": 0},
        {"nbytes": -1},
        {"dev_id": -1},
        {"mem_type": "FILE"},
        {"addr": (1 << 64) - 8},
    ):
        with pytest.raises(ValueError):
            RemoteRegion.from_dict({**good, **bad})
    with pytest.raises(ValueError, match="unknown"):
        RemoteRegion.from_dict({**good, "extra": 1})
    with pytest.raises(ValueError):
        RemoteRegion.from_dict({k: v for k, v in good.items() if k != "addr"})


def test_changed_metadata_reloads_the_peer(server: NixlAgent, client: NixlAgent) -> None:
    """A region registered after the server loaded the peer is reachable once its newer metadata is sent;
    with the stale metadata nixl does not know it."""
    with (
        client.register(_pattern(8, 1024)) as first,
        server.register(torch.zeros(1024, dtype=torch.uint8)) as sreg,
    ):
        old_view = first.remote()
        server.read(old_view, 0, sreg, 0, 1024)
        with client.register(_pattern(9, 1024)) as second:
            new_view = second.remote()
            assert new_view.agent_metadata != old_view.agent_metadata
            stale = RemoteRegion.from_dict({**new_view.to_dict(), "agent_metadata": old_view.agent_metadata})
            server.read(old_view, 0, sreg, 0, 1024)  # loads the old metadata again
            with pytest.raises(NixlTransferError):
                server.read(stale, 0, sreg, 0, 1024)
            server.read(new_view, 0, sreg, 0, 1024)
            assert torch.equal(sreg.tensor, second.tensor)


def test_metadata_of_another_agent_is_refused(server: NixlAgent, client: NixlAgent) -> None:
    with (
        client.register(_pattern(10, 256)) as creg,
        server.register(torch.zeros(256, dtype=torch.uint8)) as sreg,
    ):
        impostor = RemoteRegion.from_dict({**creg.remote().to_dict(), "agent_name": "someone-else"})
        with pytest.raises(NixlTransferError, match="belongs to agent"):
            server.read(impostor, 0, sreg, 0, 256)
        assert not sreg.tensor.any()
        server.read(creg.remote(), 0, sreg, 0, 256)
        assert torch.equal(sreg.tensor, creg.tensor)


def test_peer_cache_is_bounded_lru() -> None:
    with NixlAgent("kvbm-codec-test-lru", max_peers=2) as srv:
        peers = [NixlAgent(f"kvbm-codec-test-peer{i}") for i in range(3)]
        try:
            regs = [p.register(_pattern(20 + i, 128)) for i, p in enumerate(peers)]
            views = [r.remote() for r in regs]
            with srv.register(torch.zeros(128, dtype=torch.uint8)) as sreg:
                for view in (views[0], views[1], views[0], views[2]):
                    srv.read(view, 0, sreg, 0, 128)
                assert list(srv._peers) == [peers[0].name, peers[2].name]  # peer1 was least recent
                srv.read(views[1], 0, sreg, 0, 128)  # evicted peers load again on demand
                assert torch.equal(sreg.tensor, regs[1].tensor)
                assert list(srv._peers) == [peers[2].name, peers[1].name]
        finally:
            for p in peers:
                p.close()


def test_concurrent_transfers_from_a_thread_pool(server: NixlAgent, client: NixlAgent) -> None:
    n_jobs, size = 48, 64 * 1024
    src = _pattern(11, n_jobs * size)
    with client.register(src.clone()) as creg, server.register(torch.zeros_like(src)) as sreg:
        remote = creg.remote()

        def job(i: int) -> None:
            if i % 2:
                server.read(remote, i * size, sreg, i * size, size)
            else:
                half = size // 2
                server.read_many(
                    remote, [(i * size + half, i * size, half), (i * size, i * size + half, half)], sreg
                )
                sreg.tensor[i * size : (i + 1) * size] = sreg.tensor[i * size : (i + 1) * size].roll(half)

        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(job, range(n_jobs)))
        assert torch.equal(sreg.tensor, src)
        assert all(p.inflight == 0 for p in server._peers.values())


def test_metadata_changes_while_transfers_are_in_flight(server: NixlAgent, client: NixlAgent) -> None:
    """Threads alternate between two metadata versions of one peer: each switch must wait for the other
    version's transfers to finish before the peer is reloaded, and every READ still lands exactly."""
    n_jobs, size = 32, 32 * 1024
    src1, src2 = _pattern(13, n_jobs * size), _pattern(14, n_jobs * size)
    with client.register(src1.clone()) as reg1:
        view1 = reg1.remote()
        with client.register(src2.clone()) as reg2, server.register(torch.zeros_like(src1)) as sreg:
            view2 = reg2.remote()
            assert view1.agent_metadata != view2.agent_metadata

            def job(i: int) -> None:
                server.read(view2 if i % 2 else view1, i * size, sreg, i * size, size)

            with ThreadPoolExecutor(max_workers=6) as pool:
                list(pool.map(job, range(n_jobs)))
            for i in range(n_jobs):
                want = (src2 if i % 2 else src1)[i * size : (i + 1) * size]
                assert torch.equal(sreg.tensor[i * size : (i + 1) * size], want)
            peer = server._peers[client.name]
            assert (peer.inflight, peer.pending) == (0, 0)


def test_close_is_idempotent_and_refuses_later_use() -> None:
    a, b = NixlAgent("kvbm-codec-test-close-a"), NixlAgent("kvbm-codec-test-close-b")
    areg, breg = a.register(_pattern(12, 512)), b.register(torch.zeros(512, dtype=torch.uint8))
    view = areg.remote()
    b.read(view, 0, breg, 0, 512)
    a.close()
    a.close()
    assert areg.closed and a.closed
    areg.close()  # after its agent: a no-op
    with pytest.raises(NixlClosedError):
        a.metadata()
    with pytest.raises(NixlClosedError):
        a.register(torch.zeros(8, dtype=torch.uint8))
    breg.close()
    breg.close()
    with pytest.raises(NixlClosedError):
        b.read(view, 0, breg, 0, 512)
    with b:
        pass
    with pytest.raises(NixlClosedError):
        b.read(view, 0, breg, 0, 512)
    b.close()


# -- a peer in another process ------------------------------------------------------------------------


def _child_peer(conn: Connection, name: str, nbytes: int, env: dict[str, str]) -> None:
    """Holds one registered buffer and answers commands over the pipe until told to exit."""
    os.environ.update(env)
    with NixlAgent(name) as agent, agent.register(torch.zeros(nbytes, dtype=torch.uint8)) as reg:
        conn.send(reg.remote().to_dict())
        while True:
            cmd, arg = conn.recv()
            if cmd == "fill":
                reg.tensor.copy_(_pattern(arg, nbytes))
                conn.send("ok")
            elif cmd == "bytes":
                conn.send(reg.tensor.numpy().tobytes())
            else:
                break
    conn.send("closed")


class _Child:
    def __init__(self, name: str, env: dict[str, str]) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child_conn = ctx.Pipe()
        self.proc = ctx.Process(target=_child_peer, args=(child_conn, name, CHILD_BYTES, env), daemon=True)
        self.proc.start()
        if not self.conn.poll(60):
            raise RuntimeError("child NIXL peer did not start")
        self.region = RemoteRegion.from_dict(self.conn.recv())

    def call(self, cmd: str, arg: object = None) -> object:
        self.conn.send((cmd, arg))
        if not self.conn.poll(30):
            raise RuntimeError(f"child did not answer {cmd}")
        return self.conn.recv()

    def close(self) -> None:
        try:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.conn.send(("exit", None))
            assert self.conn.poll(30) and self.conn.recv() == "closed"
            self.proc.join(30)
        finally:
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join()


@pytest.fixture(scope="module")
def child() -> Iterator[_Child]:
    peer = _Child("kvbm-codec-test-child", {})
    yield peer
    peer.close()


@pytest.fixture(scope="module")
def tcp_server() -> Iterator[NixlAgent]:
    """A server agent limited to UCX tcp on 127.0.0.1 (UCX reads the variables at agent creation)."""
    with pytest.MonkeyPatch.context() as mp_env:
        for key, value in TCP_LOOPBACK.items():
            mp_env.setenv(key, value)
        agent = NixlAgent("kvbm-codec-test-tcp-server")
    with agent:
        yield agent


@pytest.mark.parametrize("server_fixture", ["server", "tcp_server"])
def test_read_and_write_across_processes(
    request: pytest.FixtureRequest, server_fixture: str, child: _Child
) -> None:
    server: NixlAgent = request.getfixturevalue(server_fixture)
    child.call("fill", 30)
    expected = _pattern(30, CHILD_BYTES)
    n_blocks = CHILD_BYTES // BLOCK
    perm = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(31)).tolist()
    spans = [(perm[i] * BLOCK, i * BLOCK, BLOCK) for i in range(n_blocks)]
    with server.register(torch.zeros(CHILD_BYTES, dtype=torch.uint8)) as sreg:
        server.read(child.region, 0, sreg, 0, CHILD_BYTES)
        assert torch.equal(sreg.tensor, expected)

        sreg.tensor.zero_()
        server.read_many(child.region, spans, sreg)
        for r, loc, n in spans:
            assert torch.equal(sreg.tensor[loc : loc + n], expected[r : r + n])

        outgoing = _pattern(32, CHILD_BYTES)
        sreg.tensor.copy_(outgoing)
        server.write(child.region, 0, sreg, 0, CHILD_BYTES)
        assert child.call("bytes") == outgoing.numpy().tobytes()

        child.call("fill", 33)
        server.write_many(child.region, spans[::2], sreg)
        landed = torch.frombuffer(bytearray(child.call("bytes")), dtype=torch.uint8)
        untouched = _pattern(33, CHILD_BYTES)
        for r, loc, n in spans[::2]:
            assert torch.equal(landed[r : r + n], outgoing[loc : loc + n])
        for r, _, n in spans[1::2]:
            assert torch.equal(landed[r : r + n], untouched[r : r + n])


def _wait_stopped(pid: int) -> None:
    """kill() returns before the target stops; wait until every thread of it is in state T."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        states = set()
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                states.add(f.read().rsplit(")", 1)[1].split()[0])
        if states == {"T"}:
            return
        time.sleep(0.01)
    raise RuntimeError(f"process {pid} did not stop")


def test_stalled_peer_times_out_and_the_transfer_is_released(tcp_server: NixlAgent, child: _Child) -> None:
    """Over TCP a READ needs the peer's progress; a SIGSTOPped peer stalls it for real until the deadline.
    (Over shared memory the reader copies by itself, so a stopped peer cannot stall it.)"""
    child.call("fill", 40)
    peer = child.region.agent_name
    with tcp_server.register(torch.zeros(CHILD_BYTES, dtype=torch.uint8)) as sreg:
        tcp_server.read(child.region, 0, sreg, 0, 1024)  # connected before the peer stops
        os.kill(child.proc.pid, signal.SIGSTOP)
        try:
            _wait_stopped(child.proc.pid)
            start = time.monotonic()
            with pytest.raises(NixlTimeoutError, match="cancelled") as info:
                tcp_server.read(child.region, 0, sreg, 0, CHILD_BYTES, timeout_s=0.5)
            assert 0.5 <= time.monotonic() - start < 10
            assert info.value.peer == peer
            assert tcp_server._peers[peer].inflight == 0
        finally:
            os.kill(child.proc.pid, signal.SIGCONT)
        sreg.tensor.zero_()
        tcp_server.read(child.region, 0, sreg, 0, CHILD_BYTES, timeout_s=30)
        assert torch.equal(sreg.tensor, _pattern(40, CHILD_BYTES))


def test_registration_is_a_context_manager(server: NixlAgent) -> None:
    reg = server.register(torch.zeros(16, dtype=torch.uint8))
    assert isinstance(reg, Registration)
    with reg:
        assert not reg.closed
    assert reg.closed
    with pytest.raises(NixlClosedError):
        reg.remote()
