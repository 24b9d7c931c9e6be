"""Hostile inputs against the S3 endpoint over 127.0.0.1 (issue 18): each test is one observed
problem, reproduced with a real botocore-signed request, and the refusal (or the right answer) it
must now get. Nothing here may produce a 500 or echo internal text."""

from __future__ import annotations

import datetime as dt
import socket
import time

import _smollm2
import pytest
import urllib3
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from test_s3_endpoint import AK, AK2, BUCKET, REGION, SK, SK2, _client, _stored, blocks  # noqa: F401

from kvbm_codec.core.service import BlockService
from kvbm_codec.frontends.s3 import BucketBinding, CredentialConfig, S3Config, start_s3_server
from kvbm_codec.store.memory import MemoryTier
from kvbm_codec.store.tiered import TieredStore


def _config(**kw) -> S3Config:
    return S3Config(
        credentials=[
            CredentialConfig(access_key=AK, secret_key=SK, tenant="tenant-a"),
            CredentialConfig(access_key=AK2, secret_key=SK2, tenant="tenant-b"),
        ],
        buckets=[BucketBinding(max_position=4096)],
        max_object_bytes=4 << 20,
        workers=2,
        **kw,
    )


@pytest.fixture(scope="module")
def server(small_calibration):
    svc = BlockService([_smollm2.served(small_calibration)], TieredStore([MemoryTier(1 << 28)]))
    handle = start_s3_server(svc, _config(body_timeout_s=2.0, max_uploads_per_tenant=4))
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def s3(server):
    return _client(server)


def _signed(server, method: str, signed_path: str, body: bytes = b"", headers=None) -> dict[str, str]:
    req = AWSRequest(method=method, url=server.url + signed_path, data=body, headers=headers or {})
    S3SigV4Auth(Credentials(AK, SK), "s3", REGION).add_auth(req)
    return dict(req.prepare().headers)


def _send(server, method: str, path: str, body: bytes = b"", headers=None):
    pool = urllib3.HTTPConnectionPool("127.0.0.1", server.port, retries=False)
    return pool.urlopen(method, path, body=body or None, headers=headers or {}, assert_same_host=False)


def _no_internal(r) -> None:
    assert 400 <= r.status < 500, (r.status, r.data[:300])
    for leak in (b"Traceback", b"Error:", b"OverflowError", b"ValueError", b"TypeError", b"UnicodeDecode"):
        assert leak not in r.data, r.data[:300]


def test_item02_s3_dot_segment_path_signed_and_routed_identically(server, s3, blocks):  # noqa: F811
    before = _stored(server)
    # signed for one path, sent as another that resolves to it: must not be accepted under either name
    hdrs = _signed(server, "PUT", "/etc/passwd", blocks[0])
    r = _send(server, "PUT", f"/{BUCKET}/../../etc/passwd", blocks[0], hdrs)
    assert r.status == 403 and b"SignatureDoesNotMatch" in r.data, (r.status, r.data[:200])
    assert _stored(server) == before
    # a key that really contains dot segments, signed by botocore as sent, is one ordinary object
    key = "a/../../b"
    s3.put_object(Bucket=BUCKET, Key=key, Body=blocks[1])
    assert len(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()) == len(blocks[1])
    assert key in [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="a/")["Contents"]]
    s3.delete_object(Bucket=BUCKET, Key=key)


def test_item03_s3_non_ascii_signatures_are_403_not_500(server, s3, blocks):  # noqa: F811
    s3.put_object(Bucket=BUCKET, Key="sig3", Body=blocks[0])
    url = s3.generate_presigned_url("get_object", Params={"Bucket": BUCKET, "Key": "sig3"}, ExpiresIn=60)
    base, _, _ = url.partition("X-Amz-Signature=")
    r = urllib3.PoolManager(retries=False).request("GET", base + "X-Amz-Signature=" + "%C3%A9" * 32)
    _no_internal(r)
    assert r.status == 403
    # a streaming upload whose chunk-signature is not ASCII
    body = (
        b"5;chunk-signature="
        + "é".encode() * 32
        + b"\r\nhello\r\n0;chunk-signature="
        + b"0" * 64
        + b"\r\n\r\n"
    )
    req = AWSRequest(
        method="PUT",
        url=server.url + f"/{BUCKET}/sig3b",
        data=body,
        headers={
            "x-amz-content-sha256": "STREAMING-AWS4-HMAC-SHA256-PAYLOAD",
            "content-encoding": "aws-chunked",
            "x-amz-decoded-content-length": "5",
        },
    )

    class _A(S3SigV4Auth):
        def payload(self, request):  # type: ignore[no-untyped-def]
            return "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"

    _A(Credentials(AK, SK), "s3", REGION).add_auth(req)
    r = _send(server, "PUT", f"/{BUCKET}/sig3b", body, dict(req.prepare().headers))
    _no_internal(r)
    s3.delete_object(Bucket=BUCKET, Key="sig3")


def test_item03_s3_huge_position_and_bad_token_are_400(server, s3, blocks):  # noqa: F811
    before = _stored(server)
    hdrs = _signed(
        server, "PUT", f"/{BUCKET}/pos63", blocks[0], {"x-amz-meta-kvbm-first-position": str(1 << 63)}
    )
    r = _send(server, "PUT", f"/{BUCKET}/pos63", blocks[0], hdrs)
    _no_internal(r)
    assert r.status == 400 and _stored(server) == before
    for q in (
        "list-type=2&continuation-token=zz",
        "list-type=2&continuation-token=ff",
        "list-type=2&max-keys=1e99",
    ):
        hdrs = _signed(server, "GET", f"/{BUCKET}?{q}")
        r = _send(server, "GET", f"/{BUCKET}?{q}", headers=hdrs)
        _no_internal(r)
    for h in ("content-length", "x-amz-decoded-content-length"):
        hdrs = _signed(server, "PUT", f"/{BUCKET}/big", b"", {h: "9" * 40} if h != "content-length" else {})
        if h == "content-length":
            hdrs["Content-Length"] = "9" * 40
        r = _send(server, "PUT", f"/{BUCKET}/big", b"", hdrs)
        assert r.status < 500, (h, r.status)


def test_item04_s3_stalled_upload_is_cut_by_the_body_timeout(server):
    """A PUT declaring a block's length that sends 1 KB and stops is closed within the body timeout."""
    timeout = server.endpoint.cfg.body_timeout_s
    assert timeout <= 5, "the test server runs with a short body timeout"
    hdrs = _signed(server, "PUT", f"/{BUCKET}/stall", b"")
    lines = [f"PUT /{BUCKET}/stall HTTP/1.1", f"Host: 127.0.0.1:{server.port}", "Content-Length: 737280"]
    lines += [f"{k}: {v}" for k, v in hdrs.items() if k.lower() not in ("content-length", "host")]
    s = socket.create_connection(("127.0.0.1", server.port), timeout=timeout + 10)
    try:
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + b"x" * 1024)
        t0 = time.monotonic()
        got = b""
        while True:
            piece = s.recv(4096)
            if not piece:
                break
            got += piece
            if b"\r\n\r\n" in got:  # the refusal is out; aiohttp may linger before closing
                break
        assert time.monotonic() - t0 < timeout + 5
        assert got == b"" or b" 400 " in got.split(b"\r\n")[0] or b" 408 " in got.split(b"\r\n")[0], got[:200]
    finally:
        s.close()


def test_item05_s3_multipart_table_is_per_tenant(server, blocks):  # noqa: F811
    a = _client(server)
    cap = server.endpoint.cfg.max_uploads_per_tenant
    ids = [a.create_multipart_upload(Bucket=BUCKET, Key=f"mp{i}")["UploadId"] for i in range(cap)]
    with pytest.raises(Exception) as e:
        a.create_multipart_upload(Bucket=BUCKET, Key="mp-over")
    assert "SlowDown" in str(e.value)
    b = _client(server, AK2, SK2)  # another tenant is not refused because tenant A filled its table
    uid = b.create_multipart_upload(Bucket=BUCKET, Key="mp-b")["UploadId"]
    b.abort_multipart_upload(Bucket=BUCKET, Key="mp-b", UploadId=uid)
    for i, u in enumerate(ids):
        a.abort_multipart_upload(Bucket=BUCKET, Key=f"mp{i}", UploadId=u)


def _presign(server, path: str, expires: int, signed_at: dt.datetime, monkeypatch) -> str:
    """botocore's own query signer, at a chosen signing time (boto3 may sign presigned URLs with the
    CRT, whose clock cannot be set)."""
    import botocore.auth

    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: signed_at.replace(tzinfo=None))
    req = AWSRequest(method="GET", url=server.url + path)
    botocore.auth.S3SigV4QueryAuth(Credentials(AK, SK), "s3", REGION, expires=expires).add_auth(req)
    monkeypatch.undo()
    return req.prepare().url


def test_item06_s3_presigned_expiry_is_honoured_past_the_skew(server, s3, blocks, monkeypatch):  # noqa: F811
    s3.put_object(Bucket=BUCKET, Key="pre6", Body=blocks[0])
    signed_at = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1800)  # past the 900 s skew
    live = _presign(server, f"/{BUCKET}/pre6", 3600, signed_at, monkeypatch)
    dead = _presign(server, f"/{BUCKET}/pre6", 600, signed_at, monkeypatch)
    assert "X-Amz-Date=" + signed_at.strftime("%Y%m%dT%H%M") in live
    r = urllib3.PoolManager(retries=False).request("GET", live)
    assert r.status == 200, r.data[:300]
    r = urllib3.PoolManager(retries=False).request("GET", dead)
    assert r.status == 403 and b"expired" in r.data
    s3.delete_object(Bucket=BUCKET, Key="pre6")
