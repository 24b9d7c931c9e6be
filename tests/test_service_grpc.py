"""The gRPC front end over real sockets on 127.0.0.1, with real SmolLM2 KV and a real (small) calibration."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import _smollm2
import grpc
import pytest
import torch
from _smollm2 import MODEL, SPEC, assert_same_restore
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from kvbm_codec.adapters.kv_blocks import KVBlock, kv_blocks, sequence_hashes
from kvbm_codec.api.errors import (
    InvalidBlockRequestError,
    OverloadedError,
    UnknownModelError,
)
from kvbm_codec.api.types import PutItem
from kvbm_codec.cluster.sharding import ShardedClient, StaticMembership
from kvbm_codec.core.service import ServedModel
from kvbm_codec.frontends.grpc.client import CodecClient, RpcFailedError
from kvbm_codec.frontends.grpc.server import CodecServer
from kvbm_codec.frontends.grpc.wire import SERVICE_NAME
from kvbm_codec.server.app import build_service
from kvbm_codec.service.config import ModelConfig, NixlConfig, ServiceConfig
from kvbm_codec.texts import demo_document

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(small_calibration) -> ServedModel:
    return _smollm2.served(small_calibration)


@pytest.fixture(scope="module")
def blocks(smollm) -> list[KVBlock]:
    return kv_blocks(smollm, demo_document(), SPEC, max_tokens=8 * SPEC.page_size)


def _cfg(**kw) -> ServiceConfig:
    base = dict(grpc_port=0, metrics_port=0, workers=4, nixl=NixlConfig(enabled=False))
    base.update(kw)
    return ServiceConfig.load(**base)


class Running:
    def __init__(self, served: ServedModel, **cfg) -> None:
        self.cfg = _cfg(**cfg)
        self.svc = build_service(self.cfg, models=[served])
        self.server = CodecServer(self.svc, self.cfg).start()
        self.target = f"127.0.0.1:{self.server.port}"

    def client(self, **kw) -> CodecClient:
        return CodecClient(self.target, model=MODEL, timeout_s=60, **kw)

    def inflight(self) -> float:
        return self.svc.metrics.registry.get_sample_value("kvbm_codec_inflight_requests") or 0.0


@pytest.fixture
def running(served) -> Iterator[Running]:
    r = Running(served)
    yield r
    r.server.stop(1.0)


def _items(blocks: list[KVBlock]) -> list[PutItem]:
    return [PutItem(b.sequence_hash, b.data, first_position=b.first_position) for b in blocks]


def _expected(served: ServedModel, b: KVBlock) -> bytes:
    """What the codec itself restores for this block: the service must return this (assert_same_restore)."""
    block = SPEC.from_bytes(b.data)
    frame, _ = served.encoder.encode(block, torch.arange(b.first_position, b.first_position + SPEC.page_size))
    restored, _ = served.encoder.decode(frame)
    return SPEC.to_bytes(restored)


def test_sequence_hashes_chain_over_tokens():
    ids = list(range(100))
    hs = sequence_hashes(ids, 32)
    assert len(hs) == 3 and len(set(hs)) == 3
    # a change in block 0 changes every later hash (the hash names the whole prefix)
    hs2 = sequence_hashes([1_000, *ids[1:]], 32)
    assert all(a != b for a, b in zip(hs, hs2, strict=True))
    assert sequence_hashes(ids[:64], 32) == hs[:2]


def test_put_get_round_trip_restores_what_the_codec_restores(running, served, blocks):
    with running.client() as c:
        put = c.put_blocks(_items(blocks))
        assert [r.sequence_hash for r in put] == [b.sequence_hash for b in blocks]
        assert all(r.raw_bytes == SPEC.nbytes and 0 < r.stored_bytes < SPEC.nbytes / 4 for r in put)
        got = c.get_blocks([b.sequence_hash for b in blocks] + [12345], batch_size=3)
    assert [g.status for g in got] == ["hit"] * len(blocks) + ["miss"]
    assert got[-1].data is None
    for b, g in zip(blocks, got, strict=False):
        assert g.positions == tuple(range(b.first_position, b.first_position + SPEC.page_size))
        assert_same_restore(g.data, _expected(served, b), b.data)
        orig, back = SPEC.from_bytes(b.data).float(), SPEC.from_bytes(g.data).float()
        rel = ((back - orig).norm() / orig.norm()).item()
        assert 0 < rel < 0.5, rel  # lossy, but KV, not noise
    reg = running.svc.metrics.registry
    sent = sum(len(b.data) for b in blocks)
    assert (
        reg.get_sample_value("kvbm_codec_transfer_bytes_total", {"path": "grpc", "direction": "in"}) == sent
    )
    assert (
        reg.get_sample_value("kvbm_codec_transfer_bytes_total", {"path": "grpc", "direction": "out"}) == sent
    )
    body = urllib.request.urlopen(
        f"http://127.0.0.1:{running.server.metrics_port}/metrics", timeout=10
    ).read()
    assert b'kvbm_codec_transfer_bytes_total{direction="in",path="grpc"}' in body


def test_frames_pass_through_and_back(running, served, blocks):
    b0, b1 = blocks[0], blocks[1]
    with running.client() as c:
        c.put_blocks(_items([b0, b1]))
        frames = c.get_blocks([b0.sequence_hash, b1.sequence_hash], as_frames=True)
        assert all(f.status == "hit" and f.data[:4] != b0.data[:4] for f in frames)
        assert len(frames[0].data) < SPEC.nbytes / 4
        # a client-held frame stored under another hash restores to the same block
        c.put_blocks(
            [PutItem(777, frames[0].data, is_frame=True), PutItem(778, frames[1].data, is_frame=True)]
        )
        raw = c.get_blocks([777, 778, b0.sequence_hash])
    assert raw[0].data == raw[2].data == _expected(served, b0)
    assert raw[1].data == _expected(served, b1)
    assert raw[0].positions == tuple(range(0, SPEC.page_size))


def test_contains_lookup_delete_stats(running, served, blocks):
    hs = [b.sequence_hash for b in blocks[:3]]
    with running.client() as c:
        c.put_blocks(_items(blocks[:2]))
        assert c.contains(hs) == [True, True, False]
        look = c.lookup(hs)
        assert [e.stored for e in look] == [True, True, False]
        assert look[0].calibration_id == served.calibration.calibration_id
        assert look[1].positions == tuple(range(32, 64))
        assert 0 < look[0].stored_bytes < SPEC.nbytes and look[0].raw_bytes == SPEC.nbytes
        assert look[2].stored_bytes == 0 and look[2].positions == ()
        st = c.stats()
        assert [m.name for m in st.models] == [MODEL]
        assert st.models[0].block_bytes == SPEC.nbytes and st.models[0].fingerprint == served.fingerprint
        assert st.tiers[0].blocks == 2 and st.tiers[0].used_bytes == sum(e.stored_bytes for e in look)
        assert c.delete(hs) == 2
        assert c.contains(hs) == [False, False, False]
        assert c.get_blocks(hs[:1])[0].status == "miss"


def test_tenants_are_isolated_by_the_auth_hook(served, blocks):
    cfg = _cfg()
    svc = build_service(cfg, models=[served])
    server = CodecServer(
        svc, cfg, authenticate=lambda ctx: dict(ctx.invocation_metadata()).get("x-kvbm-tenant", "anon")
    ).start()
    try:
        t = f"127.0.0.1:{server.port}"
        with CodecClient(t, model=MODEL, tenant="a") as a, CodecClient(t, model=MODEL, tenant="b") as b:
            a.put_blocks(_items(blocks[:1]))
            assert a.contains([blocks[0].sequence_hash]) == [True]
            assert b.contains([blocks[0].sequence_hash]) == [False]
            assert b.get_blocks([blocks[0].sequence_hash])[0].status == "miss"
    finally:
        server.stop(1.0)


def test_unknown_model_is_not_found(running):
    with CodecClient(running.target, model="no-such-model") as c:
        with pytest.raises(UnknownModelError) as ei:
            c.contains([1])
        assert ei.value.status == grpc.StatusCode.NOT_FOUND
        with pytest.raises(UnknownModelError):
            c.get_blocks([1])


def test_invalid_block_is_refused_and_nothing_stored(running, blocks):
    good = _items(blocks[:1])[0]
    short = PutItem(99, blocks[1].data[:-2], first_position=32)
    nan = bytearray(blocks[2].data)
    nan[0:2] = b"\x00\x7e"  # float16 NaN in the first element
    with running.client(batch_blocks=8) as c:
        for bad in (short, PutItem(98, bytes(nan), first_position=64)):
            with pytest.raises(InvalidBlockRequestError) as ei:
                c.put_blocks([good, bad])
            assert ei.value.status == grpc.StatusCode.INVALID_ARGUMENT
            assert ei.value.code == "invalid_block"
        assert c.contains([good.sequence_hash, 99, 98]) == [False, False, False]
        assert c.stats().tiers[0].blocks == 0


def test_overload_is_refused_with_retry_hint(served, blocks):
    r = Running(served, max_inflight_requests=1, retry_after_s=0.25)
    try:
        slow_done: list[object] = []
        slow = threading.Thread(
            target=lambda: slow_done.append(r.client().put_blocks(_items(blocks) * 2)), daemon=True
        )
        slow.start()
        deadline = time.monotonic() + 30
        while r.inflight() < 1 and time.monotonic() < deadline:
            time.sleep(0.002)
        assert r.inflight() == 1, "the slow put never became in flight"
        with r.client(max_attempts=1) as c, pytest.raises(OverloadedError) as ei:
            c.contains([1])
        assert ei.value.status == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert ei.value.retry_after_s == pytest.approx(0.25)
        slow.join(60)
        assert slow_done, "the admitted request must still succeed"
        # With retries on, gRPC's retry policy waits the server's hint and replays: hold the only
        # slot until the first refusal is counted, then free it; the call must succeed.
        refused = lambda: r.svc.metrics.registry.get_sample_value(  # noqa: E731
            "kvbm_codec_requests_refused_total", {"reason": "overloaded", "tenant_class": "default"}
        )
        before = refused()
        hold = r.svc.request("hold")
        hold.__enter__()
        answer: list[object] = []
        with r.client(max_attempts=4) as c:
            t = threading.Thread(target=lambda: answer.append(c.contains([1])), daemon=True)
            t.start()
            while refused() == before and time.monotonic() < deadline + 30:
                time.sleep(0.002)
            hold.__exit__(None, None, None)
            t.join(30)
        assert refused() > before and answer == [[False]]
        assert (
            r.svc.metrics.registry.get_sample_value(
                "kvbm_codec_requests_refused_total", {"reason": "overloaded", "tenant_class": "default"}
            )
            >= 1
        )
    finally:
        r.server.stop(1.0)


def test_oversized_message_is_refused(served, blocks):
    r = Running(served, max_message_bytes=1 << 20)  # a raw block is 720 KiB: two do not fit
    try:
        with r.client(batch_blocks=2, max_attempts=1) as c:
            with pytest.raises(RpcFailedError) as ei:
                c.put_blocks(_items(blocks[:2]))
            assert ei.value.status == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert c.contains([blocks[0].sequence_hash]) == [False]
            c.put_blocks(_items(blocks[:1]))  # one block fits
            assert c.contains([blocks[0].sequence_hash]) == [True]
    finally:
        r.server.stop(1.0)


def test_reflection_lists_the_service(running):
    with grpc.insecure_channel(running.target) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        reqs = iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        resp = next(stub.ServerReflectionInfo(reqs, timeout=10))
    names = {s.name for s in resp.list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names


def test_health_serving_then_not_serving_while_draining(served, blocks):
    r = Running(served, drain_timeout_s=60)
    c = r.client()
    assert c.health() == "SERVING" and c.health(SERVICE_NAME) == "SERVING"
    slow = threading.Thread(target=lambda: c.put_blocks(_items(blocks) * 2), daemon=True)
    slow.start()
    deadline = time.monotonic() + 30
    while r.inflight() < 1 and time.monotonic() < deadline:
        time.sleep(0.002)
    stopper = threading.Thread(target=r.server.stop, daemon=True)
    stopper.start()
    seen = "SERVING"
    while seen == "SERVING" and time.monotonic() < deadline:
        seen = c.health()
    assert seen == "NOT_SERVING"
    slow.join(60)
    stopper.join(60)
    assert r.server.drained is True
    c.close()


def test_nixl_round_trip_matches_bytes_path(served, blocks):
    pytest.importorskip("nixl")
    r = Running(
        served, nixl=NixlConfig(enabled=True, staging_bytes=4 * SPEC.nbytes, slot_bytes=2 * SPEC.nbytes)
    )
    try:
        assert r.server.staging is not None, "the server's NIXL agent did not start"
        with r.client() as c:
            src = torch.zeros(len(blocks) * SPEC.nbytes, dtype=torch.uint8)
            for i, b in enumerate(blocks):
                src[i * SPEC.nbytes : (i + 1) * SPEC.nbytes] = torch.frombuffer(
                    bytearray(b.data), dtype=torch.uint8
                )
            dst = torch.zeros_like(src)
            agent = c.nixl_agent()
            with agent.register(src) as rs, agent.register(dst) as rd:
                offs = [i * SPEC.nbytes for i in range(len(blocks))]
                put = c.put_blocks_nixl(
                    rs, [(b.sequence_hash, b.first_position, o) for b, o in zip(blocks, offs, strict=True)]
                )
                assert len(put) == len(blocks)
                rev = list(reversed(offs))  # restore in another order than stored: offsets are honoured
                got = c.get_blocks_nixl(rd, [b.sequence_hash for b in blocks], rev)
            assert [g.status for g in got] == ["hit"] * len(blocks)
            via_grpc = c.get_blocks([b.sequence_hash for b in blocks])
        for i, g in enumerate(via_grpc):
            assert_same_restore(bytes(dst[rev[i] : rev[i] + SPEC.nbytes].numpy()), g.data, blocks[i].data)
            assert_same_restore(g.data, _expected(served, blocks[i]), blocks[i].data)
        reg = r.svc.metrics.registry
        total = len(blocks) * SPEC.nbytes
        assert (
            reg.get_sample_value("kvbm_codec_transfer_bytes_total", {"path": "nixl", "direction": "in"})
            == total
        )
        assert (
            reg.get_sample_value("kvbm_codec_transfer_bytes_total", {"path": "nixl", "direction": "out"})
            == total
        )
    finally:
        r.server.stop(1.0)


def _nixl_bytes(r: Running, direction: str) -> float:
    labels = {"path": "nixl", "direction": direction}
    return r.svc.metrics.registry.get_sample_value("kvbm_codec_transfer_bytes_total", labels) or 0.0


def test_sharded_nixl_moves_each_block_to_and_from_its_owner(served, blocks):
    """One client buffer, two NIXL replicas behind a ShardedClient (the vLLM tier's layout with a list
    of targets): each block goes over NIXL to its ring owner and comes back from it, the buffer
    registered with each replica client's own agent, decoded exactly as the codec does; once a replica
    stops, its blocks are misses, the survivor's still hit, and new blocks go to the survivor."""
    pytest.importorskip("nixl")
    nixl = NixlConfig(enabled=True, staging_bytes=4 * SPEC.nbytes, slot_bytes=2 * SPEC.nbytes)
    reps = {"r1": Running(served, nixl=nixl), "r2": Running(served, nixl=nixl)}
    client = ShardedClient(
        StaticMembership({k: r.target for k, r in reps.items()}),  # fixed keys: a fixed ring
        lambda _key, target: CodecClient(target, model=MODEL, timeout_s=60),
        refresh_interval_s=3600,
    )
    n = len(blocks)
    src = torch.zeros(n * SPEC.nbytes, dtype=torch.uint8)
    for i, b in enumerate(blocks):
        src[i * SPEC.nbytes : (i + 1) * SPEC.nbytes] = torch.frombuffer(bytearray(b.data), dtype=torch.uint8)
    dst = torch.zeros_like(src)
    regs: dict[tuple[int, int], object] = {}

    def registration(buf: torch.Tensor):
        def reg(t: CodecClient):
            key = (id(buf), id(t))
            if key not in regs:
                regs[key] = t.nixl_agent().register(buf)
            return regs[key]

        return reg

    try:
        hashes = [b.sequence_hash for b in blocks]
        owners = [client.owner(h) for h in hashes]
        assert set(owners) == {"r1", "r2"}, "the fixed ring puts these blocks on both replicas"
        offs = [i * SPEC.nbytes for i in range(n)]
        put = client.put_blocks_staged(
            registration(src),
            [(b.sequence_hash, b.first_position, o) for b, o in zip(blocks, offs, strict=True)],
        )
        assert [p.sequence_hash for p in put] == hashes
        for key, r in reps.items():  # each replica READ exactly its own blocks
            assert _nixl_bytes(r, "in") == owners.count(key) * SPEC.nbytes
        rev = list(reversed(offs))
        got = client.get_blocks_staged(registration(dst), hashes, rev)
        assert [g.status for g in got] == ["hit"] * n
        for key, r in reps.items():
            assert _nixl_bytes(r, "out") == owners.count(key) * SPEC.nbytes
        for i, b in enumerate(blocks):
            assert_same_restore(
                bytes(dst[rev[i] : rev[i] + SPEC.nbytes].numpy()), _expected(served, b), b.data
            )

        reps["r2"].server.stop(1.0)
        got = client.get_blocks_staged(registration(dst), hashes, offs)
        assert [g.status for g in got] == ["hit" if o == "r1" else "miss" for o in owners]
        assert client.replicas == {"r1"} and client.failovers == 1
        fresh = [(h ^ 1, b.first_position, o) for h, b, o in zip(hashes, blocks, offs, strict=True)]
        client.put_blocks_staged(registration(src), fresh)
        assert _nixl_bytes(reps["r1"], "in") == (owners.count("r1") + n) * SPEC.nbytes
    finally:
        for reg in regs.values():
            if not reg.closed:  # type: ignore[attr-defined]
                reg.close()  # type: ignore[attr-defined]
        client.close()
        for r in reps.values():
            r.server.stop(1.0)


def test_config_file_env_and_overrides(tmp_path, monkeypatch):
    f = tmp_path / "svc.toml"
    f.write_text('grpc_port = 7000\nworkers = 3\n[nixl]\nstaging_bytes = 1048576\n[[models]]\nname = "m1"\n')
    monkeypatch.setenv("DYN_KVBM_CODEC_GRPC_PORT", "7001")
    monkeypatch.setenv("DYN_KVBM_CODEC_MEMORY_CAPACITY_BYTES", "12345")
    monkeypatch.setenv("DYN_KVBM_CODEC_NIXL__SLOT_BYTES", "4096")
    cfg = ServiceConfig.load(f, workers=5)
    assert (cfg.grpc_port, cfg.workers, cfg.memory_capacity_bytes) == (7001, 5, 12345)
    assert (cfg.nixl.staging_bytes, cfg.nixl.slot_bytes) == (1 << 20, 4096)
    assert [m.name for m in cfg.models] == ["m1"] and cfg.models[0].page_size == 32
    with pytest.raises(ValueError):
        ServiceConfig.load(f, max_inflight_requests=0)
    for name, field in ServiceConfig.model_fields.items():
        assert field.description, f"{name} has no description (Helm values are generated from them)"


def test_serve_subprocess_stops_cleanly_on_sigterm(tmp_path, small_calibration, blocks):
    from kvbm_codec.calibration.registry import Registry

    reg_dir = tmp_path / "registry"
    Registry.from_url(reg_dir).publish(small_calibration)
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(
        json.dumps(  # JSON is YAML
            {
                "metrics_port": 0,
                "models": [
                    ModelConfig(
                        registry=str(reg_dir),
                        fingerprint=small_calibration.model_fingerprint,
                        calibration=small_calibration.calibration_id,
                    ).model_dump(mode="json")
                ],
                "nixl": {"enabled": False},
            }
        )
    )
    exe = Path(sys.executable).with_name("kvbm-codec")
    proc = subprocess.Popen(
        [str(exe), "serve", "--config", str(cfg), "--port", "0"],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "DYN_KVBM_CODEC_DRAIN_TIMEOUT_S": "30"},
    )
    try:
        port = None
        lines = []
        deadline = time.monotonic() + 120
        while port is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("{") and json.loads(line).get("msg") == "serving":
                port = json.loads(line)["grpc_port"]
        assert port, "".join(lines)
        with CodecClient(f"127.0.0.1:{port}", model=MODEL) as c:
            assert c.health() == "SERVING"
            c.put_blocks(_items(blocks[:2]))
            assert c.contains([blocks[0].sequence_hash]) == [True]
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, rest
    stopped = [json.loads(x) for x in rest.splitlines() if x.startswith("{") and '"stopped"' in x]
    assert stopped and stopped[0]["drained"] is True


def test_a_get_parses_each_frame_once(running, blocks, monkeypatch):
    """Parse and verify once: the core reads each stored frame's header and digest and hands the
    parsed frame to the codec, through the core's verb and through a streamed gRPC get alike."""
    from kvbm_codec.codec import frame as fr

    n = 5
    with running.client() as c:
        c.put_blocks(_items(blocks[:n]))
    hashes = [b.sequence_hash for b in blocks[:n]]
    real = fr.read_frame
    calls = [0]

    def counting(*a, **kw):  # type: ignore[no-untyped-def]
        calls[0] += 1
        return real(*a, **kw)

    monkeypatch.setattr(fr, "read_frame", counting)
    got = running.svc.get_blocks("default", MODEL, hashes)
    assert [g.status for g in got] == ["hit"] * n and calls[0] == n
    calls[0] = 0
    with running.client() as c:
        got = c.get_blocks(hashes, batch_size=2)  # three streamed batches
    assert [g.status for g in got] == ["hit"] * n and calls[0] == n


def test_an_entropy_coded_calibration_serves_blocks_over_grpc_and_nixl(small_ecsq_calibration, blocks):
    """A service whose calibration is entropy-coded (quantizer="ecsq") stores compact v2 frames and
    returns exactly what its codec restores, over gRPC bytes and over NIXL alike."""
    from kvbm_codec.codec import frame as fr

    ecsq = _smollm2.served(small_ecsq_calibration)
    nixl = importlib.util.find_spec("nixl") is not None
    r = Running(
        ecsq, nixl=NixlConfig(enabled=nixl, staging_bytes=4 * SPEC.nbytes, slot_bytes=2 * SPEC.nbytes)
    )
    try:
        with r.client() as c:
            put = c.put_blocks(_items(blocks))
            assert all(0 < p.stored_bytes < SPEC.nbytes / 4 for p in put)
            frames = c.get_blocks([b.sequence_hash for b in blocks[1:3]], as_frames=True)
            assert all(fr.read_frame(f.data).version == fr.FORMAT_VERSION_BLOCK for f in frames)
            got = c.get_blocks([b.sequence_hash for b in blocks])
            for b, g in zip(blocks, got, strict=True):
                assert g.status == "hit"
                assert_same_restore(g.data, _expected(ecsq, b), b.data)
            if nixl:
                dst = torch.zeros(len(blocks) * SPEC.nbytes, dtype=torch.uint8)
                with c.nixl_agent().register(dst) as rd:
                    offs = [i * SPEC.nbytes for i in range(len(blocks))]
                    via = c.get_blocks_nixl(rd, [b.sequence_hash for b in blocks], offs)
                assert [g.status for g in via] == ["hit"] * len(blocks)
                for i, g in enumerate(got):
                    assert_same_restore(
                        bytes(dst[offs[i] : offs[i] + SPEC.nbytes].numpy()), g.data, blocks[i].data
                    )
    finally:
        r.server.stop(1.0)
