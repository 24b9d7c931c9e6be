"""The S3-compatible HTTP endpoint that KVBM's object tier (NIXL's OBJ backend) reads and writes.

A PUT of a raw KVBM block is compressed with KVTC and stored through ``BlockService``; a GET decodes
it back to a raw block of the same layout and length (lossy by design, within the codec's error
bound) and serves ranges of it. Requests are path-style (``/<bucket>/<key>``), SigV4-signed, and may
use the absolute request-target form (``GET http://host:port/bucket/key``) the AWS CRT client sends.

ETag semantics: an object's ETag is the MD5 of the *stored frame*, quoted. The same ETag is returned
by PUT, CompleteMultipartUpload, HEAD, GET and ListObjectsV2, and the frame fixes the bytes every GET
returns (decoding is deterministic), so ``If-Match`` on the parallel ranged GETs of one object holds
for as long as the object is not replaced. It is not the MD5 of the uploaded body (the body is not
what is kept), as S3's own ETags are not for multipart or KMS-encrypted objects.

aiohttp runs in its own thread and event loop; encode, decode and the position search run on a
small thread pool so one slow block never stalls the loop. Concurrent GETs, HEADs and PUTs of one
tenant's bucket are served in batches (``coalesce.Coalescer``): one core call, one batched decode
or encode, for the requests that arrive while a batch of that bucket runs or within
``coalesce_window_s``; each request is still answered with its own bytes, ETag and errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any
from urllib.parse import unquote
from xml.sax.saxutils import escape

import torch
from aiohttp import web

from kvbm_codec.api.blocks import all_finite
from kvbm_codec.api.errors import InvalidBlockRequestError, RequestTooLargeError, ServiceError
from kvbm_codec.api.types import PutItem
from kvbm_codec.core.fairness import UNKNOWN_CLASS
from kvbm_codec.core.service import BlockService
from kvbm_codec.frontends.s3 import checksums, chunked, sigv4
from kvbm_codec.frontends.s3.buckets import PROBE_KEY, Bucket, KeyIndex, lookup, resolve, sequence_hash
from kvbm_codec.frontends.s3.coalesce import Coalescer
from kvbm_codec.frontends.s3.config import BucketBinding, S3Config
from kvbm_codec.frontends.s3.errors import (
    S3Error,
    entity_too_large,
    from_service,
    invalid_argument,
    no_such_key,
)
from kvbm_codec.frontends.s3.multipart import Uploads

log = logging.getLogger(__name__)

XMLNS = "http://s3.amazonaws.com/doc/2006-03-01/"
POSITION_HEADER = "x-amz-meta-kvbm-first-position"  # optional: a client that knows the position
CHUNK_OVERHEAD = 1 << 16  # aws-chunked framing allowed on top of the decoded body
# bodies this large are hashed and checksummed on the pool, off the event loop; smaller ones (a
# DELETE, a CompleteMultipartUpload) are not worth the hop
OFF_LOOP_BODY_BYTES = 1 << 16
MAX_POSITION = 1 << 62  # the gRPC front end's bound: a first position must leave room for a page
_MAX_INT_DIGITS = 19  # every numeric header / query value fits an int64; longer is refused unparsed


def bounded_int(value: str, what: str, *, lo: int = 0, hi: int = (1 << 63) - 1) -> int:
    """Parse a client-supplied integer with explicit bounds: a bad one is a 400, never a 500."""
    v = value.strip()
    if not v or len(v) > _MAX_INT_DIGITS or not v.isdigit() or not v.isascii():
        raise invalid_argument(f"{what} must be an integer between {lo} and {hi}")
    n = int(v)
    if not lo <= n <= hi:
        raise invalid_argument(f"{what} must be an integer between {lo} and {hi}")
    return n


def split_path(raw_path: str) -> tuple[str, str]:
    """Bucket and key from the request-target's path exactly as sent (percent-decoded, dot segments
    kept): the same string SigV4 signs, so what is verified is what is routed."""
    bucket, _, key = raw_path.lstrip("/").partition("/")
    return unquote(bucket), unquote(key)


@dataclass(frozen=True)
class StoredObject:
    etag: str
    frame: bytes
    sequence_hash: int
    data: bytes | None = None  # the object's bytes, decoded from this frame (None for a HEAD)


@dataclass(frozen=True)
class _PutJob:
    key: str
    sequence_hash: int
    data: bytes
    first_position: int | None  # sent by the client (POSITION_HEADER), else recovered from the keys


@dataclass(frozen=True)
class _Stored:
    etag: str
    stored: int  # frame bytes
    first: int  # first position the block was encoded at


def _xml(body: str, status: int = 200) -> web.Response:
    return web.Response(
        status=status,
        body=('<?xml version="1.0" encoding="UTF-8"?>\n' + body).encode(),
        content_type="application/xml",
    )


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(ts))


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """'bytes=a-b' | 'bytes=a-' | 'bytes=-n' -> inclusive (start, end); None for a multi-range
    (S3 serves the whole object then). Unsatisfiable -> 416 InvalidRange."""
    unit, _, spec = header.partition("=")
    if unit.strip() != "bytes" or "," in spec:
        return None
    first, sep, last = spec.strip().partition("-")
    try:
        if not sep:
            raise ValueError
        if first == "":
            n = int(last)
            if n <= 0:
                raise ValueError
            start, end = max(0, size - n), size - 1
        else:
            start = int(first)
            end = int(last) if last else size - 1
            end = min(end, size - 1)
            if start > end and last:
                raise ValueError
    except ValueError:
        return None
    if start >= size or start < 0:
        raise S3Error(
            416,
            "InvalidRange",
            "The requested range is not satisfiable",
            headers={"Content-Range": f"bytes */{size}"},
        )
    return start, end


class S3Endpoint:
    def __init__(self, service: BlockService, config: S3Config) -> None:
        if not config.credentials:
            raise ValueError(
                "the S3 endpoint needs credentials: set KVBM_CODEC_S3_ACCESS_KEY and KVBM_CODEC_S3_SECRET_KEY"
            )
        self.svc = service
        self.cfg = config
        creds = [
            sigv4.Credential(c.access_key, c.secret_key.get_secret_value(), c.tenant or c.access_key)
            for c in config.credentials or []
        ]
        self.verifier = sigv4.Verifier(creds, config.region, config.max_skew_s)
        bindings = config.buckets if config.buckets is not None else default_buckets(service)
        self.buckets = resolve(service, bindings)
        for b in self.buckets.values():
            if b.object_bytes > config.max_object_bytes:
                raise ValueError(f"bucket {b.name}: a block ({b.object_bytes} B) exceeds max_object_bytes")
        self.index = KeyIndex(config.max_index_keys_per_tenant)
        self.uploads = Uploads(
            config.max_uploads,
            config.max_object_bytes,
            config.upload_ttl_s,
            max_per_tenant=config.max_uploads_per_tenant,
        )
        self.pool = ThreadPoolExecutor(config.workers, thread_name_prefix="kvbm-s3")
        # its own threads: a body check queued behind running encodes would hold back the next batch
        self.body_pool = ThreadPoolExecutor(min(2, config.workers), thread_name_prefix="kvbm-s3-body")
        batching = {
            "window_s": config.coalesce_window_s,
            "max_batch": config.max_batch_blocks,
            "max_running": min(config.batches_in_flight, config.workers),
            "max_pending": config.max_queued_per_bucket,
        }
        self.reads: Coalescer[str, StoredObject] = Coalescer(self._fetch_batch, self.pool, **batching)
        self.writes: Coalescer[_PutJob, _Stored] = Coalescer(
            self._store_batch, self.pool, separate=lambda a, b: a.sequence_hash == b.sequence_hash, **batching
        )

    # ---- plumbing -------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.cfg.max_object_bytes + CHUNK_OVERHEAD)
        app.router.add_route("*", "/{tail:.*}", self.handle, expect_handler=self._expect)
        return app

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def _declared_size(self, req: web.BaseRequest) -> int | None:
        for h in ("x-amz-decoded-content-length", "content-length"):
            v = req.headers.get(h)
            if v is not None:
                return bounded_int(v, h)
        return None

    async def _expect(self, req: web.Request) -> web.StreamResponse | None:
        """Refuse an oversized upload before the client sends it; otherwise 100 Continue."""
        if req.headers.get("Expect", "").lower() != "100-continue":
            return web.Response(status=417, text="only 100-continue is supported")
        try:
            n = self._declared_size(req)
            if n is not None and n > self.cfg.max_object_bytes:
                raise entity_too_large(f"{n} bytes exceeds the {self.cfg.max_object_bytes}-byte limit")
        except S3Error as e:
            resp = self._error(e, req.path, uuid.uuid4().hex)
            resp.force_close()
            return resp
        assert req.transport is not None
        req.transport.write(b"HTTP/%d.%d 100 Continue\r\n\r\n" % (req.version.major, req.version.minor))
        return None

    def _error(self, e: S3Error, resource: str, rid: str) -> web.Response:
        return web.Response(
            status=e.status,
            body=b"" if e.status == 304 else e.xml(resource, rid),
            content_type="application/xml",
            headers={"x-amz-request-id": rid, **e.headers},
        )

    async def handle(self, req: web.Request) -> web.StreamResponse:
        rid = uuid.uuid4().hex[:16].upper()
        try:
            resp = await self._dispatch(req)
        except S3Error as e:
            resp = self._error(e, req.path, rid)
        except ServiceError as e:
            resp = self._error(from_service(e), req.path, rid)
        except TimeoutError:
            resp = self._error(
                S3Error(400, "RequestTimeout", "the request body did not arrive within the body timeout"),
                req.path,
                rid,
            )
            resp.force_close()
        except Exception:  # a bug: logged here, never described to the client
            log.exception("S3 %s %s failed (request id %s)", req.method, req.path, rid)
            resp = self._error(
                S3Error(500, "InternalError", "We encountered an internal error."), req.path, rid
            )
        if req.method == "HEAD" and resp.status >= 300:  # HEAD errors carry no body
            resp = web.Response(status=resp.status, headers={"x-amz-request-id": rid})
        resp.headers.setdefault("x-amz-request-id", rid)
        return resp

    async def _dispatch(self, req: web.Request) -> web.StreamResponse:
        raw_path = req.rel_url.raw_path  # as sent: yarl's req.url resolves dot segments, routing must not
        query = {k: v for k, v in req.query.items()}
        try:
            verified = self.verifier.verify(
                req.method, raw_path, req.rel_url.raw_query_string, lambda n: req.headers.getall(n, []), query
            )
        except S3Error as e:
            self.svc.metrics.auth_failures.labels(
                frontend="s3", reason=e.code, tenant_class=UNKNOWN_CLASS
            ).inc()
            raise
        tenant = verified.credential.tenant
        bucket_name, key = split_path(raw_path)
        m = req.method
        if not bucket_name:
            if m == "GET":
                return self._list_buckets()
            raise S3Error(405, "MethodNotAllowed", f"{m} / is not supported")
        bucket = lookup(self.buckets, bucket_name)
        if not key:
            return await self._bucket_op(req, verified, bucket, query)
        if m == "PUT" and "uploadId" in query:
            return await self._upload_part(req, verified, bucket, key, query)
        if m == "PUT":
            if "x-amz-copy-source" in req.headers:
                raise S3Error(501, "NotImplemented", "CopyObject is not supported")
            return await self._put_object(req, verified, bucket, key)
        if m in ("GET", "HEAD"):
            if "uploadId" in query:
                raise S3Error(501, "NotImplemented", "ListParts is not supported")
            return await self._get_object(req, verified, bucket, key)
        if m == "DELETE" and "uploadId" in query:
            self.uploads.abort(query["uploadId"], tenant, bucket.name, key)
            return web.Response(status=204)
        if m == "DELETE":
            await self._body(req, verified)
            return await self._delete_object(tenant, bucket, key)
        if m == "POST" and "uploads" in query:
            await self._body(req, verified)
            uid = self.uploads.create(tenant, bucket.name, key)
            return _xml(
                f'<InitiateMultipartUploadResult xmlns="{XMLNS}"><Bucket>{escape(bucket.name)}</Bucket>'
                f"<Key>{escape(key)}</Key><UploadId>{uid}</UploadId></InitiateMultipartUploadResult>"
            )
        if m == "POST" and "uploadId" in query:
            return await self._complete(req, verified, bucket, key, query["uploadId"])
        raise S3Error(501, "NotImplemented", f"{m} on an object with {sorted(query)} is not supported")

    async def _body(self, req: web.Request, verified: sigv4.Verified) -> bytes:
        """Read (bounded), un-chunk and verify the body: payload hash, chunk signatures, checksums."""
        limit = self.cfg.max_object_bytes
        if self.cfg.require_signed_payload and verified.payload_hash in (
            sigv4.UNSIGNED,
            sigv4.STREAMING_UNSIGNED_TRAILER,
        ):
            raise S3Error(
                403, "AccessDenied", "this endpoint requires signed payloads (x-amz-content-sha256)"
            )
        declared = self._declared_size(req)
        if declared is not None and declared > limit:
            raise entity_too_large(f"{declared} bytes exceeds the {limit}-byte limit")
        buf = bytearray()
        deadline = asyncio.get_running_loop().time() + self.cfg.body_timeout_s
        while True:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise TimeoutError
            piece = await asyncio.wait_for(req.content.read(1 << 20), left)
            if not piece:
                break
            buf += piece
            if len(buf) > limit + CHUNK_OVERHEAD:
                raise entity_too_large(f"body exceeds the {limit}-byte limit")
        body = bytes(buf)
        headers = {k.lower(): v for k, v in req.headers.items()}
        if len(body) < OFF_LOOP_BODY_BYTES:
            return self._verified_body(body, headers, verified)
        # hashlib and awscrt release the GIL: on the pool, a block's SHA-256 and CRC run beside the
        # loop's parsing of the next request and the other workers' encodes.
        loop = asyncio.get_running_loop()
        data: bytes = await loop.run_in_executor(self.body_pool, self._verified_body, body, headers, verified)
        return data

    def _verified_body(self, body: bytes, headers: dict[str, str], verified: sigv4.Verified) -> bytes:
        limit = self.cfg.max_object_bytes
        encoding = [e.strip() for e in headers.get("content-encoding", "").split(",") if e.strip()]
        if "aws-chunked" in encoding or verified.payload_hash.startswith("STREAMING-"):
            declared_trailers = [
                t.strip().lower() for t in headers.get("x-amz-trailer", "").split(",") if t.strip()
            ]
            dl = headers.get("x-amz-decoded-content-length")
            out = chunked.decode(
                body,
                verified=verified,
                declared_trailers=declared_trailers,
                decoded_length=bounded_int(dl, "x-amz-decoded-content-length") if dl is not None else None,
                max_bytes=limit,
            )
            data = out.data
        else:
            if len(body) > limit:
                raise entity_too_large(f"body exceeds the {limit}-byte limit")
            sigv4.check_payload_hash(verified.payload_hash, body)
            data = body
        checksums.verify_headers(headers, data)
        return data

    # ---- buckets --------------------------------------------------------------------------------

    def _list_buckets(self) -> web.Response:
        items = "".join(
            f"<Bucket><Name>{escape(b)}</Name><CreationDate>{_iso(0)}</CreationDate></Bucket>"
            for b in self.buckets
        )
        return _xml(
            f'<ListAllMyBucketsResult xmlns="{XMLNS}"><Owner><ID>kvbm-codec</ID></Owner>'
            f"<Buckets>{items}</Buckets></ListAllMyBucketsResult>"
        )

    async def _bucket_op(
        self, req: web.Request, verified: sigv4.Verified, bucket: Bucket, query: dict[str, str]
    ) -> web.StreamResponse:
        if req.method == "HEAD":
            return web.Response(status=200, headers={"x-amz-bucket-region": self.cfg.region})
        if req.method == "GET" and "location" in query:
            return _xml(f'<LocationConstraint xmlns="{XMLNS}">{escape(self.cfg.region)}</LocationConstraint>')
        if req.method == "GET" and query.get("list-type") == "2":
            return await self._list_objects(verified.credential.tenant, bucket, query)
        if req.method == "PUT":
            raise S3Error(409, "BucketAlreadyOwnedByYou", "buckets are bound in the service configuration")
        raise S3Error(
            501, "NotImplemented", f"{req.method} on a bucket with {sorted(query)} is not supported"
        )

    async def _list_objects(self, tenant: str, bucket: Bucket, q: dict[str, str]) -> web.Response:
        max_keys = min(1000, bounded_int(q.get("max-keys", "1000"), "max-keys"))
        if q.get("delimiter"):
            raise S3Error(501, "NotImplemented", "delimiter is not supported (block keys are flat)")
        prefix = q.get("prefix", "")
        token = q.get("continuation-token")
        try:
            after = bytes.fromhex(token).decode() if token else q.get("start-after", "")
        except ValueError:  # not hex, or not UTF-8 once decoded
            raise invalid_argument("continuation-token is not one this endpoint issued") from None
        entries: list = []
        truncated = False
        while len(entries) < max_keys:
            page, more = self.index.page(tenant, bucket.name, prefix, after, max_keys - len(entries))
            if not page:
                break
            live = await self._run(self._live, tenant, bucket, [e.sequence_hash for e in page])
            self.index.remove(
                tenant, bucket.name, [e.key for e, ok in zip(page, live, strict=True) if not ok]
            )
            entries += [e for e, ok in zip(page, live, strict=True) if ok]
            after = page[-1].key
            if not more:
                break
            truncated = True
        truncated = truncated and len(entries) >= max_keys
        contents = "".join(
            f"<Contents><Key>{escape(e.key)}</Key><LastModified>{_iso(e.last_modified)}</LastModified>"
            f"<ETag>{escape(e.etag)}</ETag><Size>{e.size}</Size><StorageClass>STANDARD</StorageClass></Contents>"
            for e in entries
        )
        nxt = (
            f"<NextContinuationToken>{entries[-1].key.encode().hex()}</NextContinuationToken>"
            if truncated
            else ""
        )
        tok = f"<ContinuationToken>{escape(token)}</ContinuationToken>" if token else ""
        return _xml(
            f'<ListBucketResult xmlns="{XMLNS}"><Name>{escape(bucket.name)}</Name>'
            f"<Prefix>{escape(prefix)}</Prefix><KeyCount>{len(entries)}</KeyCount><MaxKeys>{max_keys}</MaxKeys>"
            f"<IsTruncated>{'true' if truncated else 'false'}</IsTruncated>{tok}{nxt}{contents}"
            "</ListBucketResult>"
        )

    def _live(self, tenant: str, bucket: Bucket, hashes: list[int]) -> list[bool]:
        out: list[bool] = []
        step = self.svc.limits.max_blocks_per_request
        for i in range(0, len(hashes), step):
            out += self.svc.contains(tenant, bucket.model.name, hashes[i : i + step], method="s3_list")
        return out

    # ---- objects --------------------------------------------------------------------------------

    def _fetch_batch(self, lane: tuple[str, str, str], keys: list[str]) -> list[StoredObject | BaseException]:
        """One core get for a batch of one tenant's objects of one bucket (one batched decode for a
        GET): each object's stored frame (its MD5 is the ETag) and, for a GET, the block the core
        decoded from that same frame in the same call, so the bytes served always match the ETag.
        A key named twice is fetched once; a missing or damaged frame fails only its own requests."""
        op, tenant, bucket_name = lane
        bucket = self.buckets[bucket_name]
        decode = op == "get"
        hashes = list(dict.fromkeys(sequence_hash(k) for k in keys))
        name = bucket.model.name
        if decode:
            got = self.svc.get_blocks(tenant, name, hashes, with_frames=True, method="s3_get")
        else:
            got = self.svc.get_blocks(tenant, name, hashes, as_frames=True, method="s3_head")
        by_hash: dict[int, StoredObject | str] = {}  # the object, or why there is none
        for h, res in zip(hashes, got, strict=True):
            frame = res.frame if decode else res.data
            if res.status != "hit" or res.data is None or frame is None:
                corrupt = res.status == "corrupt"
                by_hash[h] = "its stored frame failed verification and was dropped" if corrupt else ""
                continue
            data = bucket.from_block(bucket.spec.from_bytes(res.data)) if decode else None
            by_hash[h] = StoredObject(f'"{hashlib.md5(frame).hexdigest()}"', bytes(frame), h, data)
        found = [by_hash[sequence_hash(k)] for k in keys]
        return [no_such_key(k, r) if isinstance(r, str) else r for k, r in zip(keys, found, strict=True)]

    async def _fetch(self, tenant: str, bucket: Bucket, key: str, decode: bool = False) -> StoredObject:
        """The object under ``key``, fetched in a batch with the other requests of this tenant's
        bucket that arrive meanwhile (``coalesce_window_s``)."""
        if key == PROBE_KEY:
            raise no_such_key(key, "connectivity probe")
        sequence_hash(key)  # a bad key is refused here, alone, not inside a batch
        limit = min(self.cfg.max_batch_blocks, self.svc.limits.max_blocks_per_request)
        lane = ("get" if decode else "head", tenant, bucket.name)
        obj: StoredObject = await self.reads.submit(lane, key, max_batch=limit)
        return obj

    def _conditions(self, req: web.Request, etag: str) -> None:
        im = req.headers.get("If-Match")
        if (
            im is not None
            and im.strip() != "*"
            and etag.strip('"') not in [t.strip().strip('"') for t in im.split(",")]
        ):
            raise S3Error(
                412, "PreconditionFailed", "At least one of the pre-conditions you specified did not hold"
            )
        inm = req.headers.get("If-None-Match")
        if inm is not None and (
            inm.strip() == "*" or etag.strip('"') in [t.strip().strip('"') for t in inm.split(",")]
        ):
            raise S3Error(304, "NotModified", "Not Modified")

    async def _get_object(
        self, req: web.Request, verified: sigv4.Verified, bucket: Bucket, key: str
    ) -> web.StreamResponse:
        tenant = verified.credential.tenant
        obj = await self._fetch(tenant, bucket, key, req.method != "HEAD")
        self._conditions(req, obj.etag)
        size = bucket.object_bytes
        entry = self.index.get(tenant, bucket.name, key)
        headers = {
            "ETag": obj.etag,
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
            "Last-Modified": formatdate(entry.last_modified if entry else time.time(), usegmt=True),
            "x-kvbm-codec-stored-bytes": str(len(obj.frame)),
        }
        rng = parse_range(req.headers["Range"], size) if "Range" in req.headers else None
        if req.method == "HEAD":
            return web.Response(status=200, headers={**headers, "Content-Length": str(size)})
        data = obj.data
        assert data is not None  # decoded by _fetch for every GET
        sent = self.svc.metrics.transfer_bytes.labels(path="s3", direction="out")  # the dashboard's s3 series
        if rng is None:
            if req.headers.get("x-amz-checksum-mode", "").lower() == "enabled":
                headers["x-amz-checksum-crc64nvme"] = checksums.digest_b64("crc64nvme", data)
                headers["x-amz-checksum-type"] = "FULL_OBJECT"
            sent.inc(len(data))
            return web.Response(status=200, body=data, headers=headers)
        start, end = rng
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        sent.inc(end + 1 - start)
        return web.Response(status=206, body=data[start : end + 1], headers=headers)

    def _put_job(self, bucket: Bucket, key: str, data: bytes, position: str | None) -> _PutJob:
        """The checks that need no decoding of the block: its length, its key, a sent position."""
        spec = bucket.spec
        if len(data) > bucket.object_bytes:
            raise entity_too_large(
                f"object is {len(data)} bytes; bucket {bucket.name} holds blocks of exactly "
                f"{bucket.object_bytes}"
            )
        if len(data) != bucket.object_bytes:
            raise invalid_argument(
                f"object is {len(data)} bytes, not a {bucket.binding.layout} block "
                f"[1, {spec.n_layers}, 2, {spec.page_size}, {spec.inner}] {spec.dtype} "
                f"({bucket.object_bytes} bytes)"
            )
        hi = MAX_POSITION - spec.page_size
        first = None if position is None else bounded_int(position, POSITION_HEADER, hi=hi)
        return _PutJob(key, sequence_hash(key), data, first)

    async def _store(self, tenant: str, bucket: Bucket, job: _PutJob) -> _Stored:
        """Store one block, in a batch with this tenant's other PUTs to the bucket that arrive meanwhile."""
        limit = min(self.cfg.max_batch_blocks, self.svc.limits.max_blocks_per_request)
        per_tenant = self.svc.limits.max_inflight_bytes_per_tenant
        if per_tenant:  # one batch is one request of the tenant: its bytes must fit the tenant's bound
            limit = max(1, min(limit, per_tenant // bucket.object_bytes))
        stored: _Stored = await self.writes.submit(("put", tenant, bucket.name), job, max_batch=limit)
        return stored

    def _store_batch(self, lane: tuple[str, str, str], jobs: list[_PutJob]) -> list[_Stored | BaseException]:
        """Read, place (positions), check the layout of, encode and store a batch of blocks: one
        position search, one layout check and one core put (one batched encode) for all of them.
        Each job is answered on its own: a block refused (wrong length, NaN, wrong layout) fails
        only its own request."""
        _, tenant, bucket_name = lane
        bucket = self.buckets[bucket_name]
        answers: list[_Stored | BaseException | None] = [None] * len(jobs)
        blocks: dict[int, torch.Tensor] = {}
        for i, job in enumerate(jobs):
            block = bucket.to_block(job.data)
            if not all_finite(block):
                answers[i] = invalid_argument("block holds NaN or Inf values")
            else:
                blocks[i] = block
        ok = list(blocks)
        placed = bucket.place([blocks[i] for i in ok], [jobs[i].first_position for i in ok])
        misfit = bucket.misfit_many([jobs[i].data for i in ok], [blocks[i] for i in ok], placed)
        good: list[tuple[int, int]] = []
        for i, p, why in zip(ok, placed, misfit, strict=True):
            if why is None:
                good.append((i, p.position))
                continue
            self.svc.metrics.refused.labels(
                reason="layout_mismatch", tenant_class=self.svc.tenant_class(tenant)
            ).inc()
            log.warning("S3 PUT %s/%s refused: %s", bucket.name, jobs[i].key, why)
            answers[i] = invalid_argument(why)
        self._put_placed(tenant, bucket, jobs, blocks, good, answers)
        return [a if a is not None else RuntimeError("unanswered") for a in answers]

    def _put_placed(
        self,
        tenant: str,
        bucket: Bucket,
        jobs: list[_PutJob],
        blocks: dict[int, torch.Tensor],
        good: list[tuple[int, int]],
        answers: list[_Stored | BaseException | None],
    ) -> None:
        if not good:
            return
        spec = bucket.spec
        items = [PutItem(jobs[i].sequence_hash, spec.to_bytes(blocks[i]), first_position=p) for i, p in good]
        nbytes = sum(len(jobs[i].data) for i, _ in good)
        try:
            self.svc.put_blocks(tenant, bucket.model.name, items, method="s3_put", nbytes=nbytes)
        except ServiceError as e:
            if len(good) > 1 and isinstance(e, InvalidBlockRequestError | RequestTooLargeError):
                for one in good:  # one block's own fault: find it, store the others
                    self._put_placed(tenant, bucket, jobs, blocks, [one], answers)
                return
            for i, _ in good:
                answers[i] = e
            return
        self.svc.metrics.transfer_bytes.labels(path="s3", direction="in").inc(nbytes)
        objs = self._fetch_batch(("head", tenant, bucket.name), [jobs[i].key for i, _ in good])
        for (i, first), obj in zip(good, objs, strict=True):
            if isinstance(obj, BaseException):  # stored, then gone (evicted by a concurrent put)
                answers[i] = obj
                continue
            self.index.put(tenant, bucket.name, jobs[i].key, obj.sequence_hash, obj.etag, bucket.object_bytes)
            answers[i] = _Stored(obj.etag, len(obj.frame), first)

    def _put_response(self, etag: str, stored: int, first: int) -> dict[str, str]:
        return {
            "ETag": etag,
            "x-kvbm-codec-stored-bytes": str(stored),
            "x-kvbm-codec-first-position": str(first),
        }

    async def _put_object(
        self, req: web.Request, verified: sigv4.Verified, bucket: Bucket, key: str
    ) -> web.StreamResponse:
        tenant = verified.credential.tenant
        if req.headers.get("If-None-Match", "").strip() == "*":
            exists = await self._run(self._live, tenant, bucket, [sequence_hash(key)])
            if exists[0]:
                raise S3Error(412, "PreconditionFailed", "an object with this key already exists")
        data = await self._body(req, verified)
        job = self._put_job(bucket, key, data, req.headers.get(POSITION_HEADER))
        done = await self._store(tenant, bucket, job)
        return web.Response(status=200, headers=self._put_response(done.etag, done.stored, done.first))

    async def _delete_object(self, tenant: str, bucket: Bucket, key: str) -> web.StreamResponse:
        h = sequence_hash(key)

        def delete() -> None:
            self.svc.delete(tenant, bucket.model.name, [h], method="s3_delete")

        await self._run(delete)
        self.index.remove(tenant, bucket.name, [key])
        return web.Response(status=204)

    async def _upload_part(
        self, req: web.Request, verified: sigv4.Verified, bucket: Bucket, key: str, q: dict[str, str]
    ) -> web.StreamResponse:
        number = bounded_int(q.get("partNumber", ""), "partNumber", lo=1, hi=10000)
        data = await self._body(req, verified)
        etag = self.uploads.put_part(
            q["uploadId"], verified.credential.tenant, bucket.name, key, number, data
        )
        return web.Response(status=200, headers={"ETag": etag})

    async def _complete(
        self, req: web.Request, verified: sigv4.Verified, bucket: Bucket, key: str, upload_id: str
    ) -> web.StreamResponse:
        tenant = verified.credential.tenant
        xml = await self._body(req, verified)
        headers = self.uploads.completed(upload_id, tenant, bucket.name, key)
        if headers is None:
            data = self.uploads.complete(upload_id, tenant, bucket.name, key, xml)
            job = self._put_job(bucket, key, data, req.headers.get(POSITION_HEADER))
            done = await self._store(tenant, bucket, job)
            headers = self._put_response(done.etag, done.stored, done.first)
            self.uploads.finish(upload_id, headers)
        etag = headers["ETag"]
        return web.Response(
            status=200,
            body=(
                f'<?xml version="1.0" encoding="UTF-8"?>\n<CompleteMultipartUploadResult xmlns="{XMLNS}">'
                f"<Location>/{escape(bucket.name)}/{escape(key)}</Location><Bucket>{escape(bucket.name)}</Bucket>"
                f"<Key>{escape(key)}</Key><ETag>{escape(etag)}</ETag></CompleteMultipartUploadResult>"
            ).encode(),
            content_type="application/xml",
            headers=headers,
        )


class S3ServerHandle:
    """A running endpoint: ``.url``, ``.port``, ``.endpoint``; ``.stop()`` closes it."""

    def __init__(self, endpoint: S3Endpoint, host: str) -> None:
        self.endpoint = endpoint
        self.host = host
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, name="kvbm-s3", daemon=True)

    @property
    def url(self) -> str:
        scheme = "https" if self.endpoint.cfg.tls_cert else "http"
        return f"{scheme}://{self.host}:{self.port}"

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._start())
        except BaseException as e:  # reported to start() by the waiting caller
            self._error = e
            self._started.set()
            return
        self._started.set()
        self._loop.run_forever()
        # Stopped by stop(): its handlers were cancelled there; close the loop here, in its own thread.
        self._loop.run_until_complete(self._loop.shutdown_asyncgens())
        self._loop.close()

    async def _start(self) -> None:
        cfg = self.endpoint.cfg
        self._runner = web.AppRunner(
            self.endpoint.app(), access_log=None, keepalive_timeout=cfg.idle_timeout_s
        )
        await self._runner.setup()
        tls = None
        if cfg.tls_cert:
            tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls.minimum_version = ssl.TLSVersion.TLSv1_2
            tls.load_cert_chain(cfg.tls_cert, cfg.tls_key)
        site = web.TCPSite(self._runner, self.host, cfg.port or 0, ssl_context=tls)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def start(self, timeout_s: float = 30.0) -> S3ServerHandle:
        self._thread.start()
        if not self._started.wait(timeout_s):
            raise TimeoutError("S3 endpoint did not start")
        if self._error is not None:
            raise RuntimeError(f"S3 endpoint failed to start: {self._error}") from self._error
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        if not self._thread.is_alive():
            return

        async def _close() -> None:
            if self._runner is not None:
                await self._runner.cleanup()
            # Handlers still waiting on a slow client (keep-alive readers, aborted uploads) would be
            # destroyed pending when the loop closes: cancel them and let them unwind first.
            rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in rest:
                t.cancel()
            await asyncio.gather(*rest, return_exceptions=True)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(_close(), self._loop).result(timeout_s)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout_s)
        self.endpoint.pool.shutdown(wait=False, cancel_futures=True)
        self.endpoint.body_pool.shutdown(wait=False, cancel_futures=True)


def start_s3_server(service: BlockService, config: S3Config | dict[str, Any] | None = None) -> S3ServerHandle:
    """Serve the S3 endpoint for ``service`` in its own thread and event loop; returns once listening.

    ``config`` is the service config's ``s3`` section (or a dict of it). Without bucket bindings,
    one bucket per served model, "kvbm-<model name>", in that model's block layout."""
    cfg = config if isinstance(config, S3Config) else S3Config(**(config or {}))
    if cfg.buckets is None:
        cfg = cfg.model_copy(update={"buckets": default_buckets(service)})
    return S3ServerHandle(S3Endpoint(service, cfg), cfg.host).start()


def default_bucket_name(model: str) -> str:
    """The bucket a served model gets when the config binds none: what a client of a default `serve`
    addresses, so one function names it for the endpoint and for whoever drives it."""
    return ("kvbm-" + re.sub(r"[^a-z0-9-]+", "-", model.lower()).strip("-"))[:63]


def default_buckets(service: BlockService) -> list[BucketBinding]:
    return [
        BucketBinding(
            name=default_bucket_name(m.name), model=m.name, page_size=m.spec.page_size, dtype=m.spec.dtype
        )
        for m in service.models()
    ]
