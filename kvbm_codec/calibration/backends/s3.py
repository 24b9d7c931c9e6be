"""S3 backend: one bucket/prefix shared by every replica of the codec tier.

S3 has no rename, so an entry is committed by uploading its data files first and its manifest last
with ``If-None-Match: *``; readers treat an entry without a manifest as nonexistent, which gives the
same all-or-nothing visibility as the local backend's directory rename. Pointers (``latest``) move
with ``If-Match: <etag>`` (S3 conditional writes, GA since 2024; also supported by moto and MinIO).
A store that ignores these headers would silently lose the race guarantees, so ``check_conditional``
lets an operator prove it once per bucket (``registry verify`` does).

Credentials and endpoint come from the usual boto3 chain (``AWS_ENDPOINT_URL`` for S3-compatible
stores), so nothing secret is ever part of a registry URL.
"""

from __future__ import annotations

import uuid
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from kvbm_codec.calibration.backends import ProgressFn, StoredObject

_PRECONDITION_CODES = {"PreconditionFailed", "412"}
_CONFLICT_CODES = {"ConditionalRequestConflict", "409"}
_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}


def _code(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


class S3Backend:
    def __init__(
        self, bucket: str, prefix: str = "", *, client: Any | None = None, **client_kwargs: Any
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.client = client or boto3.client(
            "s3", config=Config(retries={"max_attempts": 5, "mode": "standard"}), **client_kwargs
        )

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def _k(self, key: str) -> str:
        if not key or key.startswith("/") or any(p in ("", ".", "..") for p in key.split("/")):
            raise ValueError(f"invalid registry key {key!r}")
        return f"{self.prefix}/{key}" if self.prefix else key

    def _unk(self, full: str) -> str:
        return full[len(self.prefix) + 1 :] if self.prefix else full

    def get(self, key: str) -> bytes | None:
        got = self.get_versioned(key)
        return None if got is None else got[0]

    def get_versioned(self, key: str) -> tuple[bytes, str] | None:
        try:
            r = self.client.get_object(Bucket=self.bucket, Key=self._k(key))
        except ClientError as e:
            if _code(e) in _MISSING_CODES:
                return None
            raise
        return r["Body"].read(), r["ETag"]

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._k(key), Body=data)

    def _conditional_put(self, key: str, data: bytes, **cond: str) -> bool:
        # A 409 means a concurrent conditional write to the same key is in flight; the caller's retry
        # loop re-reads and tries again, exactly as for a lost race.
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._k(key), Body=data, **cond)
        except ClientError as e:
            if _code(e) in _PRECONDITION_CODES | _CONFLICT_CODES:
                return False
            raise
        return True

    def put_if_absent(self, key: str, data: bytes) -> bool:
        return self._conditional_put(key, data, IfNoneMatch="*")

    def compare_and_swap(self, key: str, data: bytes, etag: str | None) -> bool:
        if etag is None:
            return self._conditional_put(key, data, IfNoneMatch="*")
        return self._conditional_put(key, data, IfMatch=etag)

    def commit_files(
        self, prefix: str, files: dict[str, bytes], marker: str, progress: ProgressFn | None
    ) -> bool:
        marker_key = f"{prefix}/{marker}"
        if self.get(marker_key) is not None:
            return False
        names = [n for n in files if n != marker]
        total = len(names) + 1
        for i, name in enumerate(names):
            # Content files are deterministic for a given calibration id, so a concurrent publisher
            # of the same entry overwriting them writes identical bytes; the manifest decides.
            self.put(f"{prefix}/{name}", files[name])
            if progress:
                progress(name, i + 1, total)
        created = self.put_if_absent(marker_key, files[marker])
        if progress:
            progress(marker, total, total)
        return created

    def list(self, prefix: str) -> list[StoredObject]:
        out: list[StoredObject] = []
        full = (
            self._k(prefix.rstrip("/")) + ("/" if prefix.endswith("/") else "")
            if prefix
            else (f"{self.prefix}/" if self.prefix else "")
        )
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
            for o in page.get("Contents", []):
                out.append(StoredObject(self._unk(o["Key"]), int(o["Size"]), o["LastModified"].timestamp()))
        return sorted(out, key=lambda o: o.key)

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._k(key))

    def check_conditional(self) -> bool:
        """True if the store enforces If-None-Match (a probe object is created and removed)."""
        key = f".probe/{uuid.uuid4().hex}"
        try:
            first = self.put_if_absent(key, b"1")
            second = self.put_if_absent(key, b"2")
            return first and not second
        finally:
            self.delete(key)
