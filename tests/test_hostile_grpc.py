"""Hostile clients against the gRPC front end over 127.0.0.1 (issue 18): unread streams with hour-long
deadlines, batches larger than a message, failed authentications, certificates the CA signed but
nobody allowed, and host names that only look like loopback. Each test reproduces one observed
problem and checks the service now holds."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import pytest
from test_auth import Pki, _call, _client, _service_config, pki, whoami_server  # noqa: F401
from test_service_grpc import MODEL, SPEC, Running, _items, blocks, served  # noqa: F401

from kvbm_codec._proto import kvbm_codec_pb2 as pb
from kvbm_codec._proto import kvbm_codec_pb2_grpc as pb_grpc
from kvbm_codec.api.errors import OverloadedError
from kvbm_codec.frontends.grpc import security as grpc_security
from kvbm_codec.frontends.grpc.client import RpcFailedError


def _stub(r: Running) -> tuple[grpc.Channel, pb_grpc.KvbmCodecStub]:
    ch = grpc.insecure_channel(r.target, options=[("grpc.max_receive_message_length", 256 << 20)])
    return ch, pb_grpc.KvbmCodecStub(ch)


@pytest.fixture
def hostile(served) -> Iterator[Running]:  # noqa: F811
    r = Running(served, max_inflight_requests=4, max_deadline_s=2.0, max_message_bytes=4 << 20)
    yield r
    r.server.stop(1.0)


def test_item01_grpc_unread_streams_cannot_hold_slots_past_the_deadline_cap(hostile, blocks):  # noqa: F811
    c = hostile.client()
    c.put_blocks(_items(blocks[:1]))
    h = blocks[0].sequence_hash
    ch, stub = _stub(hostile)
    streams = [
        stub.GetBlocks(
            pb.GetBlocksRequest(model=MODEL, sequence_hashes=[h] * 256, batch_size=1), timeout=3600
        )
        for _ in range(4)
    ]
    try:
        t0 = time.monotonic()
        while hostile.inflight() < 4 and time.monotonic() - t0 < 30:
            time.sleep(0.05)
        assert hostile.inflight() == 4  # every slot held by a stream nobody reads
        with pytest.raises((OverloadedError, RpcFailedError)):
            c.put_blocks(_items(blocks[1:2]))
        time.sleep(hostile.cfg.max_deadline_s + 1.5)  # the server-side cap passes
        assert hostile.inflight() == 0
        c.put_blocks(_items(blocks[1:2]))  # the service is back for everyone
        assert [g.status for g in c.get_blocks([blocks[1].sequence_hash])] == ["hit"]
    finally:
        for s in streams:
            s.cancel()
        ch.close()
        c.close()


def test_item07_grpc_get_batch_is_capped_by_the_message_size(hostile, blocks):  # noqa: F811
    c = hostile.client()
    c.put_blocks(_items(blocks[:4]))
    hashes = [b.sequence_hash for b in blocks[:4]] * 3  # 12 hits, 737 KB each raw: batch 16 > 4 MiB
    ch, stub = _stub(hostile)
    try:
        got = []
        for msg in stub.GetBlocks(
            pb.GetBlocksRequest(model=MODEL, sequence_hashes=hashes, batch_size=16), timeout=60
        ):
            assert msg.ByteSize() <= hostile.cfg.max_message_bytes
            got += [b.status for b in msg.blocks]
        assert got == [pb.BLOCK_STATUS_HIT] * 12
    finally:
        ch.close()
        c.close()


def test_item10_grpc_auth_failures_are_counted(served, blocks, monkeypatch):  # noqa: F811
    from test_service_grpc import _cfg

    from kvbm_codec.frontends.grpc.auth import Authenticator, AuthPolicy, TokenTable
    from kvbm_codec.frontends.grpc.server import CodecServer
    from kvbm_codec.server.app import build_service

    cfg = _cfg()
    svc = build_service(cfg, models=[served])
    auth = Authenticator(AuthPolicy(tokens=TokenTable([("tenant-a", "a" * 32)])))
    server = CodecServer(svc, cfg, authenticate=auth).start()
    try:
        ch = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        stub = pb_grpc.KvbmCodecStub(ch)
        for md in ((), (("authorization", "Bearer wrong-token-wrong-token"),)):
            with pytest.raises(grpc.RpcError) as e:
                stub.Lookup(pb.HashesRequest(model=MODEL, sequence_hashes=[1]), metadata=md, timeout=10)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        ch.close()
        n = svc.metrics.registry.get_sample_value(
            "kvbm_codec_auth_failures_total",
            {"frontend": "grpc", "reason": "unauthenticated", "tenant_class": "unknown"},
        )
        assert n == 2
    finally:
        server.stop(1.0)


def test_item11_mtls_subject_allow_list_and_exact_loopback(pki: Pki, tmp_path) -> None:  # noqa: F811
    cfg = _service_config(pki, tmp_path, mode="mtls", cert_tenants={"tenant-a": "tenant-a"})
    creds, authenticate = grpc_security.from_config(cfg)
    assert authenticate is not None
    with whoami_server(authenticate, creds) as target:
        assert _call(target, _client(pki.tenant_a, trust=pki.server))[0] == "tenant-a"
        # a certificate the CA signed but the allow-list does not name: refused
        assert _call(target, _client(pki.tenant_b, trust=pki.server))[1] == grpc.StatusCode.PERMISSION_DENIED
        # the server's own certificate: refused (its EKU fails the handshake, or the allow-list does)
        assert _call(target, _client(pki.server, trust=pki.server))[1] in (
            grpc.StatusCode.PERMISSION_DENIED,
            grpc.StatusCode.UNAVAILABLE,
        )
    assert grpc_security._is_loopback("127.0.0.1") and grpc_security._is_loopback("::1")
    for host in ("127.example.com", "127.0.0.1.nip.io", "0.0.0.0"):
        assert not grpc_security._is_loopback(host), host


def test_item12_nixl_region_naming_the_servers_own_agent_is_refused(served, blocks):  # noqa: F811
    """Read: ``NixlAgent._acquire_peer`` treats a region naming the server's agent as loopback and
    ``_check_spans`` bounds spans only by the caller's declared ``nbytes``, so a PutBlocks naming the
    server agent at the address of its own staging buffer would READ another request's slot. The
    front end now refuses such a region before any transfer."""
    pytest.importorskip("nixl")
    from kvbm_codec.service.config import NixlConfig

    r = Running(served, nixl=NixlConfig(enabled=True, staging_bytes=4 << 20, slot_bytes=1 << 20))
    try:
        staging = r.server.servicer.staging if hasattr(r.server, "servicer") else r.server.staging
        if staging is None:
            pytest.skip("nixl did not load on this machine")
        reg = staging.registration
        ch, stub = _stub(r)
        region = pb.RemoteRegion(
            agent_name=staging.agent.name,
            agent_metadata=b"x",
            addr=reg.addr,
            nbytes=reg.nbytes,
            mem_type="DRAM",
        )
        block = pb.Block(sequence_hash=1, nixl=pb.NixlSpan(offset=0, nbytes=SPEC.nbytes))
        with pytest.raises(grpc.RpcError) as e:
            stub.PutBlocks(pb.PutBlocksRequest(model=MODEL, blocks=[block], region=region), timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "own agent" in e.value.details()
        ch.close()
    finally:
        r.server.stop(1.0)
