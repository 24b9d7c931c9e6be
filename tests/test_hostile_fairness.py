"""Fairness under a hostile tenant, over real gRPC and S3 on 127.0.0.1 with real SmolLM2 KV (issue 18):
a bounded flood from one tenant (unread GetBlocks streams with hour-long deadlines, stalled S3 uploads,
multipart spam) leaves a second tenant served and lands every refusal on the flooder's tenant class;
per-tenant byte admission; dtype on the wire; /metrics behind a bearer token on its own address.

No timing thresholds here: the p99 comparison under flood lives in bench/hostile_flood.py and
docs/benchmarks.md."""

from __future__ import annotations

import contextlib
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from _s3_client import path_style_client
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from test_service_grpc import MODEL, SPEC, _cfg, _items, blocks, served  # noqa: F401

from kvbm_codec._proto import kvbm_codec_pb2 as pb
from kvbm_codec._proto import kvbm_codec_pb2_grpc as pb_grpc
from kvbm_codec.adapters.kvbm import KvbmTierClient
from kvbm_codec.api.errors import InvalidRequestError, OverloadedError
from kvbm_codec.core.service import ServedModel
from kvbm_codec.frontends.grpc.auth import Authenticator, AuthPolicy, TokenTable
from kvbm_codec.frontends.grpc.client import CodecClient
from kvbm_codec.frontends.grpc.server import CodecServer
from kvbm_codec.frontends.s3 import BucketBinding, CredentialConfig, S3Config, start_s3_server
from kvbm_codec.server.app import build_service

pytestmark = pytest.mark.slow

TOK_A, TOK_B = "a" * 32, "b" * 32
AK, SK = "AKFLOODA", "flood-secret-a"
BUCKET = f"kvbm-{MODEL}"
CLASSES = {"tenant-a": "flood"}  # tenant-b is class default


@dataclass
class Served:
    svc: object
    server: CodecServer
    target: str

    def client(self, token: str, **kw: object) -> CodecClient:
        return CodecClient(self.target, model=MODEL, token=token, timeout_s=60, max_attempts=1, **kw)

    def refused(self, tenant_class: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for fam in self.svc.metrics.registry.collect():  # type: ignore[attr-defined]
            if fam.name != "kvbm_codec_requests_refused":
                continue
            for s in fam.samples:
                if s.name.endswith("_total") and s.labels["tenant_class"] == tenant_class:
                    out[s.labels["reason"]] = out.get(s.labels["reason"], 0) + s.value
        return out

    def inflight(self) -> float:
        return self.svc.metrics.registry.get_sample_value("kvbm_codec_inflight_requests") or 0.0  # type: ignore[attr-defined]


@contextlib.contextmanager
def _serve(served: ServedModel, **cfg: object) -> Iterator[Served]:  # noqa: F811
    c = _cfg(tenant_classes=CLASSES, **cfg)
    svc = build_service(c, models=[served])
    auth = Authenticator(AuthPolicy(tokens=TokenTable([("tenant-a", TOK_A), ("tenant-b", TOK_B)])))
    server = CodecServer(svc, c, authenticate=auth).start()
    try:
        yield Served(svc, server, f"127.0.0.1:{server.port}")
    finally:
        server.stop(1.0)


def _unread_streams(target: str, h: int, n: int) -> tuple[grpc.Channel, list]:
    ch = grpc.insecure_channel(target)
    stub = pb_grpc.KvbmCodecStub(ch)
    streams = [
        stub.GetBlocks(
            pb.GetBlocksRequest(model=MODEL, sequence_hashes=[h] * 256, batch_size=1),
            timeout=3600,
            metadata=(("authorization", f"Bearer {TOK_A}"),),
        )
        for _ in range(n)
    ]
    return ch, streams


def _wait(cond, timeout_s: float = 30.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.05)
    return bool(cond())


def _stalled_upload(url_port: int) -> socket.socket:
    """A PUT that declares a raw block and sends 1 KB of it, then nothing."""
    req = AWSRequest(method="PUT", url=f"http://127.0.0.1:{url_port}/{BUCKET}/stall", data=b"")
    S3SigV4Auth(Credentials(AK, SK), "s3", "us-east-1").add_auth(req)
    hdrs = {k: v for k, v in req.prepare().headers.items() if k.lower() not in ("content-length", "host")}
    head = [f"PUT /{BUCKET}/stall HTTP/1.1", f"Host: 127.0.0.1:{url_port}", "Content-Length: 737280"]
    s = socket.create_connection(("127.0.0.1", url_port), timeout=30)
    s.sendall(
        ("\r\n".join(head + [f"{k}: {v}" for k, v in hdrs.items()]) + "\r\n\r\n").encode() + b"x" * 1024
    )
    return s


def test_flood_from_one_tenant_leaves_the_other_served_and_refusals_on_the_flooder(served, blocks):  # noqa: F811
    with _serve(served, max_inflight_requests=16, max_inflight_per_tenant=4, max_deadline_s=6.0) as r:
        s3 = start_s3_server(
            r.svc,  # type: ignore[arg-type]
            S3Config(
                credentials=[CredentialConfig(access_key=AK, secret_key=SK, tenant="tenant-a")],
                buckets=[BucketBinding(max_position=4096)],
                body_timeout_s=2.0,
                max_uploads_per_tenant=4,
                workers=2,
            ),
        )
        a, b = r.client(TOK_A), r.client(TOK_B)
        items = _items(blocks[:4])
        socks: list[socket.socket] = []
        ch = None
        try:
            a.put_blocks(items[:1])
            ch, _streams = _unread_streams(r.target, items[0].sequence_hash, 8)  # held, never read
            assert _wait(lambda: r.refused("flood").get("tenant_overloaded", 0) >= 4)  # 4 in, 4 refused
            socks = [_stalled_upload(s3.port) for _ in range(3)]
            spam = path_style_client(s3.url, AK, SK)
            slowdown = 0
            for i in range(10):
                try:
                    spam.create_multipart_upload(Bucket=BUCKET, Key=f"spam{i}")
                except Exception as e:  # the S3 error the SDK raises
                    assert "SlowDown" in str(e)
                    slowdown += 1
            assert slowdown == 6  # its own table is full; nobody else's
            # tenant A is at its in-flight bound: refused at once, with a retry hint
            with pytest.raises(OverloadedError) as e:
                a.put_blocks(items[1:2])
            assert e.value.retry_after_s is not None
            # tenant B, meanwhile, is served every time
            for it in items:
                b.put_blocks([it])
                (g,) = b.get_blocks([it.sequence_hash])
                assert g.status == "hit"
            # the stalled uploads were cut by the body timeout, not held
            for s in socks:  # an answer (RequestTimeout) or a close, well before our 15 s
                s.settimeout(15)
                with contextlib.suppress(ConnectionResetError):
                    got = s.recv(4096)
                    assert got == b"" or got.startswith(b"HTTP/1.1 4"), got[:100]
            assert r.refused("default") == {}  # no refusal of any reason landed on B's class
            flood = r.refused("flood")
            assert flood.get("tenant_overloaded", 0) >= 5, flood
            page = urllib.request.urlopen(f"http://127.0.0.1:{r.server.metrics_port}/metrics", timeout=10)
            text = page.read().decode()
            assert "tenant-a" not in text and "tenant-b" not in text
            assert 'tenant_class="flood"' in text
        finally:
            for s in socks:
                s.close()
            if ch is not None:
                ch.close()
            a.close()
            b.close()
            s3.stop()
        assert _wait(lambda: r.inflight() == 0)  # cancelled streams gave their slots back


def test_bytes_in_flight_per_tenant_are_bounded(served, blocks):  # noqa: F811
    limit = 2 * SPEC.nbytes  # less than one stream's worth of raw blocks
    with _serve(served, max_inflight_bytes_per_tenant=limit, max_deadline_s=30.0) as r:
        a, b = r.client(TOK_A), r.client(TOK_B)
        items = _items(blocks[:2])
        ch = None
        try:
            a.put_blocks(items[:1])
            ch, streams = _unread_streams(r.target, items[0].sequence_hash, 1)
            assert _wait(lambda: r.inflight() >= 1)  # admitted alone, though over the byte bound
            with pytest.raises(OverloadedError) as e:
                a.put_blocks(items[1:2])
            assert e.value.retry_after_s is not None and "bytes in flight" in str(e.value)
            assert r.refused("flood") == {"tenant_bytes": 1}
            b.put_blocks(items[1:2])  # another tenant's bytes are its own
            assert [g.status for g in b.get_blocks([items[1].sequence_hash])] == ["hit"]
            streams[0].cancel()
            assert _wait(lambda: r.inflight() == 0)
            a.put_blocks(items[1:2])  # its bytes are back
            assert r.refused("default") == {}
        finally:
            if ch is not None:
                ch.close()
            a.close()
            b.close()


def test_dtype_on_the_wire_refuses_other_element_types(served, blocks):  # noqa: F811
    with _serve(served) as r:
        items = _items(blocks[:1])
        h = items[0].sequence_hash
        bf16 = r.client(TOK_A, dtype="bfloat16")
        with pytest.raises(InvalidRequestError, match="bfloat16"):
            bf16.put_blocks(items)  # fp16-sized bytes declared bf16: never stored as fp16
        plain = r.client(TOK_A)
        assert plain.contains([h]) == [False]
        with pytest.raises(InvalidRequestError, match="bfloat16"):
            bf16.get_blocks([h])
        # an old client that sends no dtype gets the served one; the KVBM adapter sends its spec's
        plain.put_blocks(items)
        tier_client = r.client(TOK_B)
        KvbmTierClient(tier_client, SPEC)
        assert tier_client.dtype == SPEC.dtype
        tier_client.put_blocks(items)
        assert [g.status for g in tier_client.get_blocks([h])] == ["hit"]
        with pytest.raises(ValueError):
            KvbmTierClient(bf16, SPEC)  # a client already carrying other blocks is not rebound
        for c in (bf16, plain, tier_client):
            c.close()


def test_metrics_endpoint_requires_its_token_on_its_own_address(served, tmp_path: Path):  # noqa: F811
    token = tmp_path / "metrics-token"
    token.write_text("metrics-token-7c1e\n")
    with _serve(served, metrics_host="127.0.0.2", metrics_token_file=token) as r:
        port = r.server.metrics_port
        with pytest.raises(OSError):  # not on the gRPC host's address
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        url = f"http://127.0.0.2:{port}/metrics"
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url, timeout=5)
        assert e.value.code == 401
        req = urllib.request.Request(url, headers={"Authorization": "Bearer metrics-token-7c1e"})
        with urllib.request.urlopen(req, timeout=5) as resp:
            assert resp.status == 200 and b"kvbm_codec_requests_total" in resp.read()
        n = r.svc.metrics.registry.get_sample_value(  # type: ignore[attr-defined]
            "kvbm_codec_auth_failures_total",
            {"frontend": "metrics", "reason": "unauthenticated", "tenant_class": "unknown"},
        )
        assert n == 1
