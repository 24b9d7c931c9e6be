"""The S3 endpoint over 127.0.0.1 with real clients (boto3, botocore-signed raw requests) and real
model KV: signed PUT/GET/Range/HEAD/DELETE, multipart, ListObjectsV2, aws-chunked bodies with
trailers, and every refusal with its S3 error code and nothing stored."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib

import _smollm2
import pytest
import torch
import urllib3
from _s3_client import path_style_client
from _smollm2 import SPEC
from awscrt import checksums as crt
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

from kvbm_codec.core.service import BlockService
from kvbm_codec.frontends.s3 import BucketBinding, CredentialConfig, S3Config, sigv4, start_s3_server
from kvbm_codec.frontends.s3 import chunked as aws_chunked
from kvbm_codec.frontends.s3.buckets import sequence_hash
from kvbm_codec.frontends.s3.server import parse_range
from kvbm_codec.store.memory import MemoryTier
from kvbm_codec.store.tiered import TieredStore

BUCKET = "kvbm-smollm2-135m"
AK, SK = "AKKVBMTEST", "s3cr3t/KEY+with=chars"
AK2, SK2 = "AKOTHERTENANT", "another-secret"
REGION = "us-east-1"
N_BLOCKS = 6


@pytest.fixture(scope="module")
def blocks(smollm) -> list[bytes]:
    return _smollm2.block_bytes(smollm, N_BLOCKS)


@pytest.fixture(scope="module")
def server(small_calibration):
    svc = BlockService([_smollm2.served(small_calibration)], TieredStore([MemoryTier(1 << 28)]))
    cfg = S3Config(
        credentials=[
            CredentialConfig(access_key=AK, secret_key=SK, tenant="tenant-a"),
            CredentialConfig(access_key=AK2, secret_key=SK2, tenant="tenant-b"),
        ],
        buckets=[BucketBinding(max_position=4096)],
        max_object_bytes=4 << 20,
        workers=2,
    )
    handle = start_s3_server(svc, cfg)
    yield handle
    handle.stop()


def _client(server, ak: str = AK, sk: str = SK):
    return path_style_client(server.url, ak, sk, REGION)


@pytest.fixture(scope="module")
def s3(server):
    return _client(server)


def _stored(server) -> int:
    """Blocks the store holds, whoever put them: the 'nothing stored' check of every refusal."""
    return sum(t.blocks for t in server.endpoint.svc.store.stats())


def _code(exc: pytest.ExceptionInfo) -> str:
    return exc.value.response["Error"]["Code"]


def _rel(a: bytes, b: bytes) -> float:
    x, y = SPEC.from_bytes(a).float(), SPEC.from_bytes(b).float()
    return float((x - y).norm() / y.norm())


class _Auth(S3SigV4Auth):
    """botocore's signer with the payload hash we choose (streaming modes it would not pick)."""

    def __init__(self, creds: Credentials, payload_hash: str | None) -> None:
        super().__init__(creds, "s3", REGION)
        self._payload_hash = payload_hash

    def payload(self, request):  # type: ignore[no-untyped-def]
        return self._payload_hash or super().payload(request)


def _raw(
    server,
    method: str,
    path: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    *,
    payload_hash: str | None = None,
    secret: str = SK,
    absolute_form: bool = False,
):
    req = AWSRequest(method=method, url=server.url + path, data=body, headers=headers or {})
    _Auth(Credentials(AK, secret), payload_hash).add_auth(req)
    prepared = req.prepare()
    pool = urllib3.HTTPConnectionPool("127.0.0.1", server.port, retries=False)
    target = server.url + path if absolute_form else path
    return pool.urlopen(
        method, target, body=body or None, headers=dict(prepared.headers), assert_same_host=False
    )


def _aws_chunked(data: bytes, trailers: dict[str, str], chunk: int = 65536) -> bytes:
    out = b"".join(
        f"{len(data[i : i + chunk]):x}\r\n".encode() + data[i : i + chunk] + b"\r\n"
        for i in range(0, len(data), chunk)
    )
    return out + b"0\r\n" + "".join(f"{k}:{v}\r\n" for k, v in trailers.items()).encode() + b"\r\n"


def _b64(v: int, width: int) -> str:
    return base64.b64encode(v.to_bytes(width, "big")).decode()


def _s3_bytes(server, direction: str) -> float:
    reg = server.endpoint.svc.metrics.registry
    labels = {"path": "s3", "direction": direction}
    return reg.get_sample_value("kvbm_codec_transfer_bytes_total", labels) or 0.0


def test_put_get_head_range_delete_roundtrip(s3, server, blocks):
    moved_in, moved_out = _s3_bytes(server, "in"), _s3_bytes(server, "out")
    put = s3.put_object(Bucket=BUCKET, Key="4242", Body=blocks[2])
    assert _s3_bytes(server, "in") - moved_in == len(blocks[2])  # the dashboard's s3 series is counted
    etag = put["ETag"]
    hdr = put["ResponseMetadata"]["HTTPHeaders"]
    assert int(hdr["x-kvbm-codec-first-position"]) == 64  # recovered from the keys alone
    assert len(blocks[2]) / int(hdr["x-kvbm-codec-stored-bytes"]) > 8
    head = s3.head_object(Bucket=BUCKET, Key="4242")
    assert head["ETag"] == etag and head["ContentLength"] == SPEC.nbytes
    got = s3.get_object(Bucket=BUCKET, Key="4242")
    data = got["Body"].read()
    assert got["ETag"] == etag and len(data) == SPEC.nbytes
    assert _rel(data, blocks[2]) < 0.5  # lossy by design; the accuracy bound is measured in test_s3_nixl_obj
    assert data == s3.get_object(Bucket=BUCKET, Key="4242")["Body"].read()  # deterministic bytes
    part = s3.get_object(Bucket=BUCKET, Key="4242", Range="bytes=1000-1999", IfMatch=etag)
    assert part["ContentRange"] == f"bytes 1000-1999/{SPEC.nbytes}"
    assert part["Body"].read() == data[1000:2000]
    assert _s3_bytes(server, "out") - moved_out == 2 * SPEC.nbytes + 1000
    assert s3.get_object(Bucket=BUCKET, Key="4242", Range="bytes=-10")["Body"].read() == data[-10:]
    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket=BUCKET, Key="4242", Range="bytes=0-9", IfMatch='"0123"')
    assert _code(e) == "PreconditionFailed"
    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket=BUCKET, Key="4242", Range=f"bytes={SPEC.nbytes}-")
    assert _code(e) == "InvalidRange"
    s3.delete_object(Bucket=BUCKET, Key="4242")
    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket=BUCKET, Key="4242")
    assert _code(e) == "NoSuchKey"
    with pytest.raises(ClientError) as e:
        s3.head_object(Bucket=BUCKET, Key="4242")
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404


def test_explicit_position_and_conditional_put(s3, blocks):
    r = s3.put_object(Bucket=BUCKET, Key="pos-key", Body=blocks[1], Metadata={"kvbm-first-position": "32"})
    assert r["ResponseMetadata"]["HTTPHeaders"]["x-kvbm-codec-first-position"] == "32"
    with pytest.raises(ClientError) as e:
        s3.put_object(Bucket=BUCKET, Key="pos-key", Body=blocks[1], IfNoneMatch="*")
    assert _code(e) == "PreconditionFailed"
    s3.delete_object(Bucket=BUCKET, Key="pos-key")


def test_tenants_are_isolated(server, s3, blocks):
    s3.put_object(Bucket=BUCKET, Key="777", Body=blocks[0])
    other = _client(server, AK2, SK2)
    with pytest.raises(ClientError) as e:
        other.get_object(Bucket=BUCKET, Key="777")
    assert _code(e) == "NoSuchKey"
    assert other.list_objects_v2(Bucket=BUCKET)["KeyCount"] == 0
    s3.delete_object(Bucket=BUCKET, Key="777")


def test_list_objects_v2_pages(s3, blocks):
    keys = ["100", "101", "102", "zz-other"]
    for k, b in zip(keys, blocks, strict=False):
        s3.put_object(Bucket=BUCKET, Key=k, Body=b)
    first = s3.list_objects_v2(Bucket=BUCKET, Prefix="10", MaxKeys=2)
    assert [o["Key"] for o in first["Contents"]] == ["100", "101"] and first["IsTruncated"]
    rest = s3.list_objects_v2(Bucket=BUCKET, Prefix="10", ContinuationToken=first["NextContinuationToken"])
    assert [o["Key"] for o in rest["Contents"]] == ["102"] and not rest["IsTruncated"]
    assert all(o["Size"] == SPEC.nbytes for o in first["Contents"])
    head = s3.head_object(Bucket=BUCKET, Key="100")
    assert first["Contents"][0]["ETag"] == head["ETag"]
    s3.delete_object(Bucket=BUCKET, Key="101")
    assert [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="10")["Contents"]] == ["100", "102"]
    for k in keys:
        s3.delete_object(Bucket=BUCKET, Key=k)


def test_multipart_upload_complete_and_abort(s3, server, blocks):
    up = s3.create_multipart_upload(Bucket=BUCKET, Key="555")
    uid = up["UploadId"]
    p1 = s3.upload_part(Bucket=BUCKET, Key="555", UploadId=uid, PartNumber=1, Body=blocks[3])
    with pytest.raises(ClientError) as e:  # a wrong ETag for a listed part
        s3.complete_multipart_upload(
            Bucket=BUCKET,
            Key="555",
            UploadId=uid,
            MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": '"00"'}]},
        )
    assert _code(e) == "InvalidPart"
    done = s3.complete_multipart_upload(
        Bucket=BUCKET,
        Key="555",
        UploadId=uid,
        MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": p1["ETag"]}]},
    )
    again = s3.complete_multipart_upload(  # a retried Complete (the CRT client retries) gets the same answer
        Bucket=BUCKET,
        Key="555",
        UploadId=uid,
        MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": p1["ETag"]}]},
    )
    assert again["ETag"] == done["ETag"]
    got = s3.get_object(Bucket=BUCKET, Key="555")
    assert got["ETag"] == done["ETag"] and _rel(got["Body"].read(), blocks[3]) < 0.5
    with pytest.raises(ClientError) as e:  # consumed
        s3.upload_part(Bucket=BUCKET, Key="555", UploadId=uid, PartNumber=2, Body=b"x")
    assert _code(e) == "NoSuchUpload"
    # two parts: the first below 5 MiB is refused, and nothing is stored
    up2 = s3.create_multipart_upload(Bucket=BUCKET, Key="556")["UploadId"]
    half = len(blocks[0]) // 2
    e1 = s3.upload_part(Bucket=BUCKET, Key="556", UploadId=up2, PartNumber=1, Body=blocks[0][:half])["ETag"]
    e2 = s3.upload_part(Bucket=BUCKET, Key="556", UploadId=up2, PartNumber=2, Body=blocks[0][half:])["ETag"]
    parts = [{"PartNumber": 1, "ETag": e1}, {"PartNumber": 2, "ETag": e2}]
    with pytest.raises(ClientError) as e:
        s3.complete_multipart_upload(Bucket=BUCKET, Key="556", UploadId=up2, MultipartUpload={"Parts": parts})
    assert _code(e) == "EntityTooSmall"
    s3.abort_multipart_upload(Bucket=BUCKET, Key="556", UploadId=up2)
    with pytest.raises(ClientError) as e:
        s3.complete_multipart_upload(Bucket=BUCKET, Key="556", UploadId=up2, MultipartUpload={"Parts": parts})
    assert _code(e) == "NoSuchUpload"
    with pytest.raises(ClientError):
        s3.head_object(Bucket=BUCKET, Key="556")
    s3.delete_object(Bucket=BUCKET, Key="555")


@pytest.mark.parametrize(
    ("name", "fn", "width"),
    [("crc64nvme", crt.crc64nvme, 8), ("crc32", crt.crc32, 4), ("crc32c", crt.crc32c, 4)],
)
def test_aws_chunked_with_checksum_trailer(server, blocks, name, fn, width):
    """What NIXL's OBJ backend sends by default: unsigned aws-chunked body, checksum trailer."""
    data = blocks[4]
    trailer = f"x-amz-checksum-{name}"
    headers = {
        "Content-Encoding": "aws-chunked",
        "x-amz-decoded-content-length": str(len(data)),
        "x-amz-trailer": trailer,
    }
    before = _stored(server)
    bad = _aws_chunked(data, {trailer: _b64(fn(data) ^ 1, width)})
    r = _raw(server, "PUT", f"/{BUCKET}/9001", bad, headers, payload_hash=sigv4.STREAMING_UNSIGNED_TRAILER)
    assert r.status == 400 and b"<Code>BadDigest</Code>" in r.data and _stored(server) == before
    missing = _aws_chunked(data, {})
    r = _raw(
        server, "PUT", f"/{BUCKET}/9001", missing, headers, payload_hash=sigv4.STREAMING_UNSIGNED_TRAILER
    )
    assert r.status == 400 and b"<Code>IncompleteBody</Code>" in r.data and _stored(server) == before
    good = _aws_chunked(data, {trailer: _b64(fn(data), width)})
    r = _raw(server, "PUT", f"/{BUCKET}/9001", good, headers, payload_hash=sigv4.STREAMING_UNSIGNED_TRAILER)
    assert r.status == 200, r.data
    r = _raw(server, "GET", f"/{BUCKET}/9001", headers={"x-amz-checksum-mode": "enabled"})
    assert r.status == 200 and r.headers["x-amz-checksum-crc64nvme"] == _b64(crt.crc64nvme(r.data), 8)
    _raw(server, "DELETE", f"/{BUCKET}/9001")


def test_signed_chunks_aws_documentation_vectors():
    """The worked example of S3's streaming SigV4 documentation (seed, then three chunk signatures)."""
    cred = sigv4.Credential("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "t")
    headers = {
        "host": ["s3.amazonaws.com"],
        "x-amz-date": ["20130524T000000Z"],
        "x-amz-storage-class": ["REDUCED_REDUNDANCY"],
        "content-encoding": ["aws-chunked"],
        "content-length": ["66824"],
        "x-amz-decoded-content-length": ["66560"],
        "x-amz-content-sha256": ["STREAMING-AWS4-HMAC-SHA256-PAYLOAD"],
        "authorization": [
            "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request,"
            "SignedHeaders=content-encoding;content-length;host;x-amz-content-sha256;x-amz-date;"
            "x-amz-decoded-content-length;x-amz-storage-class,"
            "Signature=4f232c4386841ef735655705268965c44a0e4690baa4adea153f7db9fa80a0a9"
        ],
    }
    now = dt.datetime(2013, 5, 24, 0, 1, tzinfo=dt.UTC)
    v = sigv4.Verifier([cred], "us-east-1").verify(
        "PUT", "/examplebucket/chunkObject.txt", "", lambda n: headers.get(n, []), {}, now=now
    )
    sigs = [
        "ad80c730a21e5b8d04586a2213dd63b9a0e99e0e2307b0ade35a65485a288648",
        "0055627c9e194cb4542bae2aa5492e3c1575bbb81b612b7d234b86a503ef5497",
        "b6c6ea8a5354eaf15b3cb7646744f4275b71ea724fed81ceb9323e279d449df9",
    ]
    body = (
        f"10000;chunk-signature={sigs[0]}\r\n".encode()
        + b"a" * 65536
        + f"\r\n400;chunk-signature={sigs[1]}\r\n".encode()
        + b"a" * 1024
        + f"\r\n0;chunk-signature={sigs[2]}\r\n\r\n".encode()
    )
    assert len(body) == 66824
    out = aws_chunked.decode(body, verified=v, declared_trailers=[], decoded_length=66560, max_bytes=1 << 20)
    assert out.data == b"a" * 66560
    tampered = body.replace(b"a" * 1024, b"b" + b"a" * 1023)
    with pytest.raises(sigv4.S3Error) as e:
        aws_chunked.decode(
            tampered, verified=v, declared_trailers=[], decoded_length=66560, max_bytes=1 << 20
        )
    assert e.value.code == "SignatureDoesNotMatch"
    with pytest.raises(sigv4.S3Error) as e:  # the same request an hour later
        sigv4.Verifier([cred], "us-east-1").verify(
            "PUT",
            "/examplebucket/chunkObject.txt",
            "",
            lambda n: headers.get(n, []),
            {},
            now=now + dt.timedelta(hours=1),
        )
    assert e.value.code == "RequestTimeTooSkewed"


def test_absolute_form_target_and_plain_sha256_body(server, blocks):
    """The CRT client's request target (GET http://host:port/bucket/key); req_checksum=required PUT."""
    data = blocks[5]
    sha = hashlib.sha256(data).hexdigest()
    r = _raw(server, "PUT", f"/{BUCKET}/31337", data, payload_hash=sha, absolute_form=True)
    assert r.status == 200, r.data
    r = _raw(server, "GET", f"/{BUCKET}/31337", headers={"Range": "bytes=0-99"}, absolute_form=True)
    assert r.status == 206 and len(r.data) == 100
    before = _stored(server)
    r = _raw(server, "PUT", f"/{BUCKET}/31338", data, payload_hash=hashlib.sha256(b"other").hexdigest())
    assert r.status == 400 and b"XAmzContentSHA256Mismatch" in r.data and _stored(server) == before
    _raw(server, "DELETE", f"/{BUCKET}/31337")


def test_refusals_carry_s3_codes_and_store_nothing(server, s3, blocks):
    before = _stored(server)
    # bad signature (wrong secret)
    r = _raw(
        server,
        "PUT",
        f"/{BUCKET}/1",
        blocks[0],
        payload_hash=hashlib.sha256(blocks[0]).hexdigest(),
        secret="x",
    )
    assert r.status == 403 and b"<Code>SignatureDoesNotMatch</Code>" in r.data
    # unknown access key, unsigned request
    with pytest.raises(ClientError) as e:
        _client(server, "AKNOBODY", "x").put_object(Bucket=BUCKET, Key="1", Body=blocks[0])
    assert _code(e) == "InvalidAccessKeyId"
    anon = urllib3.HTTPConnectionPool("127.0.0.1", server.port, retries=False).request("GET", f"/{BUCKET}/1")
    assert anon.status == 403 and b"AccessDenied" in anon.data
    # unknown bucket
    with pytest.raises(ClientError) as e:
        s3.put_object(Bucket="no-such-bucket", Key="1", Body=blocks[0])
    assert _code(e) == "NoSuchBucket"
    # not a block of the bucket's layout: short, long, over the endpoint limit, NaN
    with pytest.raises(ClientError) as e:
        s3.put_object(Bucket=BUCKET, Key="1", Body=blocks[0][:-2])
    assert _code(e) == "InvalidArgument"
    with pytest.raises(ClientError) as e:
        s3.put_object(Bucket=BUCKET, Key="1", Body=blocks[0] + b"\0\0")
    assert _code(e) == "EntityTooLarge"
    with pytest.raises(ClientError) as e:
        s3.put_object(Bucket=BUCKET, Key="1", Body=b"\0" * (5 << 20))
    assert _code(e) == "EntityTooLarge"
    nan = bytearray(blocks[0])
    nan[0:2] = torch.tensor([float("nan")], dtype=torch.float16).view(torch.uint8).numpy().tobytes()
    with pytest.raises(ClientError) as e:
        s3.put_object(Bucket=BUCKET, Key="1", Body=bytes(nan))
    assert _code(e) == "InvalidArgument"
    # Content-MD5 that does not match
    with pytest.raises(ClientError) as e:
        s3.put_object(Bucket=BUCKET, Key="1", Body=blocks[0], ContentMD5=base64.b64encode(b"0" * 16).decode())
    assert _code(e) in ("BadDigest", "InvalidDigest")
    assert _stored(server) == before
    with pytest.raises(ClientError) as e:
        s3.head_object(Bucket=BUCKET, Key="1")
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404


def test_object_keys_and_ranges():
    assert sequence_hash("12345") == 12345
    assert sequence_hash(str(2**64 - 1)) == 2**64 - 1
    for alias in ("012345", "0x3039", str(2**64), "+1"):  # never read as another key's number
        assert sequence_hash(alias) not in (12345, 1) and sequence_hash(alias) == sequence_hash(alias)
    with pytest.raises(sigv4.S3Error):
        sequence_hash("k" * 1025)
    assert parse_range("bytes=0-9", 100) == (0, 9)
    assert parse_range("bytes=90-", 100) == (90, 99)
    assert parse_range("bytes=-5", 100) == (95, 99)
    assert parse_range("bytes=95-200", 100) == (95, 99)
    assert parse_range("bytes=0-1,5-6", 100) is None


def test_botocore_presigned_get(server, s3, blocks):
    s3.put_object(Bucket=BUCKET, Key="presigned", Body=blocks[1])
    v4 = path_style_client(server.url, AK, SK, REGION, signature_version="s3v4")
    url = v4.generate_presigned_url("get_object", Params={"Bucket": BUCKET, "Key": "presigned"}, ExpiresIn=60)
    r = urllib3.PoolManager(retries=False).request("GET", url)
    assert r.status == 200 and len(r.data) == SPEC.nbytes
    r = urllib3.PoolManager(retries=False).request("GET", url.replace("presigned?", "presigne2?"))
    assert r.status == 403 and b"SignatureDoesNotMatch" in r.data
    s3.delete_object(Bucket=BUCKET, Key="presigned")


def test_started_from_the_service_config_section(server, monkeypatch):
    """`kvbm-codec serve` passes its config's s3 section as it is: credentials come from the
    environment (read when the config loads), and each served model gets its bucket; without
    credentials it refuses to start."""
    from kvbm_codec.service.config import ServiceConfig

    svc = server.endpoint.svc
    s3 = {"enabled": True, "host": "127.0.0.1", "port": 0}
    monkeypatch.delenv("KVBM_CODEC_S3_ACCESS_KEY", raising=False)
    with pytest.raises(ValueError, match="KVBM_CODEC_S3_ACCESS_KEY"):
        start_s3_server(svc, ServiceConfig.load(s3=s3).s3)
    monkeypatch.setenv("KVBM_CODEC_S3_ACCESS_KEY", "AKFROMENV")
    monkeypatch.setenv("KVBM_CODEC_S3_SECRET_KEY", "secret-from-env")
    handle = start_s3_server(svc, ServiceConfig.load(s3=s3).s3)
    try:
        names = [b["Name"] for b in _client(handle, "AKFROMENV", "secret-from-env").list_buckets()["Buckets"]]
        assert names == [BUCKET]
    finally:
        handle.stop()
