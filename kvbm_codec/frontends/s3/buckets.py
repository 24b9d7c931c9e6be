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

import torch

from kvbm_codec.api.blocks import BlockSpec
from kvbm_codec.api.vllm_layout import VllmCpuLayout
from kvbm_codec.codec.layout_check import LayoutChecker, LayoutFit
from kvbm_codec.codec.positions import PositionEstimator, PositionSearch
from kvbm_codec.core.service import BlockService, ServedModel
from kvbm_codec.frontends.s3.config import BucketBinding
from kvbm_codec.frontends.s3.errors import S3Error, no_such_bucket

MAX_KEY_BYTES = 1024
# vLLM's OBJ tier HEADs this key once at start to check the endpoint and bucket; a 404 is the
# expected answer ("reachable, object absent"), served without touching the store.
PROBE_KEY = "__nixl_probe__/connectivity_test"


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
        self.vllm = VllmCpuLayout(spec) if binding.layout == "vllm-cpu" else None
        self._estimators: dict[str, PositionEstimator] = {}
        self._checkers: dict[str, LayoutChecker] = {}
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.binding.name

    @property
    def spec(self) -> BlockSpec:
        return self.model.spec

    @property
    def object_bytes(self) -> int:
        """A FullyContiguous block [1, L, 2, P, H*D] has the bytes of BlockSpec's [L, 2, P, H*D]; a vLLM
        CPU chunk is as long, padded to 4096 bytes."""
        return self.vllm.chunk_bytes if self.vllm is not None else self.spec.nbytes

    def to_block(self, data: bytes) -> torch.Tensor:
        """An object's bytes (exactly ``object_bytes``) -> the service's block tensor [L, 2, P, H*D]."""
        if self.vllm is not None:
            return self.vllm.chunk_to_block(data)
        return self.spec.from_bytes(data)

    def from_block(self, block: torch.Tensor) -> bytes:
        if self.vllm is not None:
            return self.vllm.block_to_chunk(block).numpy().tobytes()
        return self.spec.to_bytes(block)

    def estimator(self) -> PositionEstimator:
        cal = self.model.calibration
        with self._lock:
            est = self._estimators.get(cal.calibration_id)
            if est is None:
                search = PositionSearch(max_position=self.binding.max_position, alignment=self.spec.page_size)
                est = self._estimators[cal.calibration_id] = PositionEstimator(cal, search)
            return est

    def checker(self) -> LayoutChecker:
        cal = self.model.calibration
        with self._lock:
            chk = self._checkers.get(cal.calibration_id)
            if chk is None:
                chk = self._checkers[cal.calibration_id] = LayoutChecker(cal)
            return chk

    def _score(self, block: torch.Tensor, first_position: int | None) -> float:
        """Key plus value PCA residual, each relative to the calibration's own (lower: fits better)."""
        s = self.spec
        kv = block.reshape(s.n_layers, 2, s.page_size, s.n_kv_heads, s.head_dim).permute(1, 0, 3, 2, 4)
        keys, values = kv[0].to(torch.float32), kv[1].to(torch.float32)
        if first_position is None:
            first_position = self.estimator().estimate(keys)
        chk = self.checker()
        fit: LayoutFit = chk.fit(keys, values, first_position)
        return fit.key_residual / chk.expected[0] + fit.value_residual / chk.expected[1]

    def misfit(self, data: bytes, block: torch.Tensor, first_position: int) -> str | None:
        """Why the object ``data`` (read as ``block``) does not fit this bucket's layout, or None.

        The bound reading is compared with the same bytes read in every other layout this endpoint
        knows (KVBM FullyContiguous, vLLM CPU with keys either way round, K and V swapped), each at its
        own recovered position: real KV fits exactly one reading well, so a block that some other
        reading explains ``layout_margin`` times better than the bound one is refused."""
        margin = self.binding.layout_margin
        if margin is None:
            return None
        s = self.spec
        alternatives: dict[str, torch.Tensor] = {"K and V swapped": block.flip(1)}
        if self.vllm is not None:
            alternatives["FullyContiguous"] = s.from_bytes(data[: s.nbytes])
            alternatives["vllm-cpu with keys [page_size, head_dim]"] = VllmCpuLayout(s, "td").chunk_to_block(
                data
            )
        elif len(data) in (s.nbytes, VllmCpuLayout(s).chunk_bytes):
            alternatives["vllm-cpu"] = VllmCpuLayout(s).chunk_to_block(data)
        bound = self._score(block, first_position)
        name, best = min(((n, self._score(b, None)) for n, b in alternatives.items()), key=lambda t: t[1])
        if bound <= margin * best:
            return None
        return (
            f"the block does not fit bucket {self.name}'s {self.binding.layout} layout: read as {name} it "
            f"fits the calibration {bound / best:.1f}x better (PCA residual {best:.1f} vs {bound:.1f}; "
            f"limit {margin}x)"
        )


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

    def __init__(self, max_keys_per_tenant: int = 1_000_000) -> None:
        self._data: dict[tuple[str, str], dict[str, Entry]] = {}
        self._per_tenant: dict[str, int] = {}
        self.max_keys_per_tenant = max_keys_per_tenant
        self._lock = threading.Lock()

    def put(self, tenant: str, bucket: str, key: str, h: int, etag: str, size: int) -> None:
        """Bounded per tenant: past the bound the tenant's oldest entry (insertion order) is dropped,
        so one tenant's distinct keys cannot grow the process; the store still serves that block."""
        with self._lock:
            d = self._data.setdefault((tenant, bucket), {})
            if key not in d:
                if self._per_tenant.get(tenant, 0) >= self.max_keys_per_tenant:
                    victim = next((dd for (t, _), dd in self._data.items() if t == tenant and dd), None)
                    if victim is not None:
                        victim.pop(next(iter(victim)))
                        self._per_tenant[tenant] -= 1
                self._per_tenant[tenant] = self._per_tenant.get(tenant, 0) + 1
            d[key] = Entry(key, h, etag, size, time.time())

    def get(self, tenant: str, bucket: str, key: str) -> Entry | None:
        with self._lock:
            return self._data.get((tenant, bucket), {}).get(key)

    def remove(self, tenant: str, bucket: str, keys: list[str]) -> None:
        with self._lock:
            d = self._data.get((tenant, bucket), {})
            for k in keys:
                if d.pop(k, None) is not None:
                    self._per_tenant[tenant] -= 1

    def page(self, tenant: str, bucket: str, prefix: str, after: str, limit: int) -> tuple[list[Entry], bool]:
        with self._lock:
            keys = sorted(
                k for k in self._data.get((tenant, bucket), {}) if k.startswith(prefix) and k > after
            )
            d = self._data.get((tenant, bucket), {})
            entries = [d[k] for k in keys[: limit + 1]]
        return entries[:limit], len(entries) > limit
