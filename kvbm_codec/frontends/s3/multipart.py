"""Multipart uploads (create, upload part, complete, abort), held in memory until completed.

The AWS CRT client (NIXL OBJ with ``crtMinLimit``) uploads through these. Parts are kept only until
Complete assembles them into one object body, which then goes through the same validation as a PUT;
uploads are bounded in number, in bytes, and in age, and belong to the tenant that created them.
"""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

from defusedxml import ElementTree
from defusedxml.common import DefusedXmlException

from kvbm_codec.frontends.s3.errors import S3Error, entity_too_large, invalid_argument

MAX_PARTS = 10000
MIN_PART_BYTES = 5 << 20  # every part but the last, as S3 requires
MAX_COMPLETE_XML = 1 << 20


def no_such_upload(upload_id: str) -> S3Error:
    return S3Error(
        404,
        "NoSuchUpload",
        f"upload {upload_id!r} does not exist: it was completed, aborted, expired or never created",
    )


@dataclass
class Upload:
    upload_id: str
    tenant: str
    bucket: str
    key: str
    created: float
    parts: dict[int, tuple[str, bytes]] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(len(b) for _, b in self.parts.values())


class Uploads:
    def __init__(self, max_uploads: int, max_bytes: int, ttl_s: float) -> None:
        self.max_uploads = max_uploads
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._uploads: dict[str, Upload] = {}
        # Completed uploads' results, so a client that retries a Complete (the CRT client does when a
        # slow encode outlasts its timeout) gets the same answer instead of NoSuchUpload.
        self._completed: OrderedDict[str, tuple[tuple[str, str, str], dict[str, str]]] = OrderedDict()
        self._lock = threading.Lock()

    def _expire(self) -> None:
        cutoff = time.monotonic() - self.ttl_s
        for uid in [u for u, up in self._uploads.items() if up.created < cutoff]:
            del self._uploads[uid]

    def create(self, tenant: str, bucket: str, key: str) -> str:
        with self._lock:
            self._expire()
            if len(self._uploads) >= self.max_uploads:
                raise S3Error(503, "SlowDown", f"{len(self._uploads)} multipart uploads open; retry later")
            uid = uuid.uuid4().hex
            self._uploads[uid] = Upload(uid, tenant, bucket, key, time.monotonic())
            return uid

    def _get(self, upload_id: str, tenant: str, bucket: str, key: str) -> Upload:
        up = self._uploads.get(upload_id)
        if up is None or (up.tenant, up.bucket, up.key) != (tenant, bucket, key):
            raise no_such_upload(upload_id)
        return up

    def put_part(self, upload_id: str, tenant: str, bucket: str, key: str, number: int, data: bytes) -> str:
        if not 1 <= number <= MAX_PARTS:
            raise invalid_argument(f"part number must be an integer between 1 and {MAX_PARTS}")
        etag = f'"{hashlib.md5(data).hexdigest()}"'
        with self._lock:
            up = self._get(upload_id, tenant, bucket, key)
            old = len(up.parts[number][1]) if number in up.parts else 0
            if up.nbytes - old + len(data) > self.max_bytes:
                raise entity_too_large(f"upload would exceed {self.max_bytes} bytes")
            up.parts[number] = (etag, data)
        return etag

    def abort(self, upload_id: str, tenant: str, bucket: str, key: str) -> None:
        with self._lock:
            self._get(upload_id, tenant, bucket, key)
            del self._uploads[upload_id]

    def complete(self, upload_id: str, tenant: str, bucket: str, key: str, xml: bytes) -> bytes:
        """Assemble the listed parts (which must exist, ascend and carry their ETags); the upload is
        consumed only if the object it forms is then stored (``finish`` after success)."""
        listed = parse_complete(xml)
        with self._lock:
            up = self._get(upload_id, tenant, bucket, key)
            chunks = []
            for i, (number, etag) in enumerate(listed):
                part = up.parts.get(number)
                if part is None or part[0].strip('"') != etag.strip('"'):
                    raise S3Error(400, "InvalidPart", f"part {number} was not uploaded or its ETag differs")
                if i < len(listed) - 1 and len(part[1]) < MIN_PART_BYTES:
                    raise S3Error(400, "EntityTooSmall", f"part {number} is below the 5 MiB minimum")
                chunks.append(part[1])
        return b"".join(chunks)

    def completed(self, upload_id: str, tenant: str, bucket: str, key: str) -> dict[str, str] | None:
        with self._lock:
            done = self._completed.get(upload_id)
        return done[1] if done is not None and done[0] == (tenant, bucket, key) else None

    def finish(self, upload_id: str, result: dict[str, str]) -> None:
        """The object is stored: drop the parts, remember the result for retried Completes."""
        with self._lock:
            up = self._uploads.pop(upload_id, None)
            if up is not None:
                self._completed[upload_id] = ((up.tenant, up.bucket, up.key), result)
                while len(self._completed) > self.max_uploads:
                    self._completed.popitem(last=False)

    def count(self) -> int:
        with self._lock:
            return len(self._uploads)


def parse_complete(xml: bytes) -> list[tuple[int, str]]:
    if len(xml) > MAX_COMPLETE_XML:
        raise S3Error(400, "MalformedXML", "CompleteMultipartUpload body is too large")
    try:
        root = ElementTree.fromstring(xml, forbid_dtd=True)
    except (ElementTree.ParseError, DefusedXmlException, ValueError) as e:
        raise S3Error(400, "MalformedXML", f"CompleteMultipartUpload body is not valid XML: {e}") from None
    parts = []
    for el in root:
        if _local(el.tag) != "Part":
            continue
        fields = {_local(c.tag): (c.text or "").strip() for c in el}
        try:
            number = int(fields["PartNumber"])
            etag = fields["ETag"]
        except (KeyError, ValueError):
            raise S3Error(400, "MalformedXML", "each Part needs a PartNumber and an ETag") from None
        parts.append((number, etag))
    if not parts:
        raise S3Error(400, "MalformedXML", "CompleteMultipartUpload lists no parts")
    numbers = [n for n, _ in parts]
    if numbers != sorted(set(numbers)):
        raise S3Error(400, "InvalidPartOrder", "parts must be listed in ascending order, each once")
    return parts


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]
