"""Buckets bound to served models, object keys mapped to KVBM sequence hashes, and the key index
that ListObjectsV2 reads.

Object keys: KVBM's object tier names a block by its u64 sequence hash, and NIXL's OBJ backend turns
the descriptor's device id into the key with ``std::to_string`` (canonical decimal). Such a key *is*
the sequence hash. Any other key (a tool's own naming) is mapped to a stable 64-bit BLAKE2b hash of
the key, so it is stored just as well (a hash collision with another key, 2^-64, would alias them).
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass

from kvbm_codec.api.blocks import BlockSpec
from kvbm_codec.codec.positions import PositionEstimator, PositionSearch
from kvbm_codec.core.service import BlockService, ServedModel
from kvbm_codec.frontends.s3.config import BucketBinding
from kvbm_codec.frontends.s3.errors import S3Error, no_such_bucket

MAX_KEY_BYTES = 1024


def sequence_hash(key: str) -> int:
    raw = key.encode()
    if len(raw) > MAX_KEY_BYTES:
        raise S3Error(400, "KeyTooLongError", f"object key is {len(raw)} bytes; limit is {MAX_KEY_BYTES}")
    if key.isdigit() and key.isascii() and (key == "0" or key[0] != "0") and int(key) < 2**64:
        return int(key)
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "big")


class Bucket:
    """A bucket resolved against the running service: its model, block spec and position search."""

    def __init__(self, binding: BucketBinding, model: ServedModel) -> None:
        spec = model.spec
        if (binding.page_size, binding.dtype) != (spec.page_size, spec.dtype):
            raise ValueError(
                f"bucket {binding.name}: page_size/dtype {binding.page_size}/{binding.dtype} do not match "
                f"model {model.name}'s blocks {spec.page_size}/{spec.dtype}"
            )
        self.binding = binding
        self.model = model
        self._estimators: dict[str, PositionEstimator] = {}
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.binding.name

    @property
    def spec(self) -> BlockSpec:
        return self.model.spec

    @property
    def object_bytes(self) -> int:
        """A FullyContiguous block [1, L, 2, P, H*D] has the bytes of BlockSpec's [L, 2, P, H*D]."""
        return self.spec.nbytes

    def estimator(self) -> PositionEstimator:
        cal = self.model.calibration
        with self._lock:
            est = self._estimators.get(cal.calibration_id)
            if est is None:
                search = PositionSearch(max_position=self.binding.max_position, alignment=self.spec.page_size)
                est = self._estimators[cal.calibration_id] = PositionEstimator(cal, search)
            return est


def resolve(service: BlockService, bindings: list[BucketBinding]) -> dict[str, Bucket]:
    return {b.name: Bucket(b, service.model(b.model)) for b in bindings}


def lookup(buckets: dict[str, Bucket], name: str) -> Bucket:
    b = buckets.get(name)
    if b is None:
        raise no_such_bucket(name)
    return b


@dataclass(frozen=True)
class Entry:
    key: str
    sequence_hash: int
    etag: str
    size: int
    last_modified: float


class KeyIndex:
    """(tenant, bucket) -> key -> Entry, for listing; the store stays the truth for GET/HEAD (a listed
    key whose block the store evicted is filtered out when listed). Per process, not shared between
    replicas, and empty after a restart."""

    def __init__(self) -> None:
        self._data: dict[tuple[str, str], dict[str, Entry]] = {}
        self._lock = threading.Lock()

    def put(self, tenant: str, bucket: str, key: str, h: int, etag: str, size: int) -> None:
        with self._lock:
            self._data.setdefault((tenant, bucket), {})[key] = Entry(key, h, etag, size, time.time())

    def get(self, tenant: str, bucket: str, key: str) -> Entry | None:
        with self._lock:
            return self._data.get((tenant, bucket), {}).get(key)

    def remove(self, tenant: str, bucket: str, keys: list[str]) -> None:
        with self._lock:
            d = self._data.get((tenant, bucket), {})
            for k in keys:
                d.pop(k, None)

    def page(self, tenant: str, bucket: str, prefix: str, after: str, limit: int) -> tuple[list[Entry], bool]:
        with self._lock:
            keys = sorted(
                k for k in self._data.get((tenant, bucket), {}) if k.startswith(prefix) and k > after
            )
            d = self._data.get((tenant, bucket), {})
            entries = [d[k] for k in keys[: limit + 1]]
        return entries[:limit], len(entries) > limit
