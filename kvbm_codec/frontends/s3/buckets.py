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
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvbm_codec.api.blocks import BlockSpec
from kvbm_codec.api.vllm_layout import VllmCpuLayout
from kvbm_codec.codec.layout_check import LayoutChecker, sample_tokens
from kvbm_codec.codec.positions import Placement, PositionEstimator, PositionSearch
from kvbm_codec.core.service import BlockService, ServedModel
from kvbm_codec.frontends.s3.config import BucketBinding
from kvbm_codec.frontends.s3.errors import S3Error, no_such_bucket

MAX_KEY_BYTES = 1024
# vLLM's OBJ tier HEADs this key once at start to check the endpoint and bucket; a 404 is the
# expected answer ("reachable, object absent"), served without touching the store.
PROBE_KEY = "__nixl_probe__/connectivity_test"
# Candidates per block re-scored for the readings a bucket is *not* bound to: they only need to be
# good enough to show that another reading explains the bytes far better (the right reading's best
# coarse candidate is its position, docs/benchmarks.md), so two keep the check cheap.
ALT_REFINE_TOP = 2
# Blocks scored per pass: the search's temporaries grow with the batch (candidates x sampled tokens
# x layers x heads x head_dim per block), and past a few blocks they leave the CPU's caches, so a
# large batch is placed (checked) a few blocks at a time: measured fastest per block on the build
# machine at 4-8 blocks (docs/benchmarks.md, "S3 batching"). A layout check scores every reading.
PLACE_CHUNK = 8
CHECK_CHUNK = 4


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
                est = self._estimators[cal.calibration_id] = PositionEstimator(cal, self.estimator_search())
            return est

    def estimator_search(self) -> PositionSearch:
        return PositionSearch(max_position=self.binding.max_position, alignment=self.spec.page_size)

    def checker(self) -> LayoutChecker:
        cal = self.model.calibration
        with self._lock:
            chk = self._checkers.get(cal.calibration_id)
            if chk is None:
                chk = self._checkers[cal.calibration_id] = LayoutChecker(
                    cal, tokens=self.estimator_search().refine_tokens
                )
            return chk

    def _part(
        self,
        blocks: Sequence[torch.Tensor],
        part: int,
        dtype: torch.dtype = torch.float32,
        tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Keys (``part`` 0) or values (1) of blocks [L, 2, P, H*D] as one [N, L, P, H, D] tensor
        (float32, or ``dtype``), the blocks' own token-major order, copied once; with ``tokens``,
        only those token offsets of each block ([N, L, T, H, D])."""
        s = self.spec
        n_tokens = s.page_size if tokens is None else len(tokens)
        out = torch.empty(len(blocks), s.n_layers, n_tokens, s.n_kv_heads, s.head_dim, dtype=dtype)
        for i, b in enumerate(blocks):
            v = b.reshape(s.n_layers, 2, s.page_size, s.n_kv_heads, s.head_dim)[:, part]
            out[i].copy_(v if tokens is None else torch.index_select(v, 1, tokens))
        return out

    def place(self, blocks: Sequence[torch.Tensor], given: Sequence[int | None]) -> list[Placement]:
        """Each block's first position (searched where ``given`` is None) and its key residual there,
        ``PLACE_CHUNK`` blocks per pass."""
        c = PLACE_CHUNK
        return [p for i in range(0, len(blocks), c) for p in self._place(blocks[i : i + c], given[i : i + c])]

    def _place(self, blocks: Sequence[torch.Tensor], given: Sequence[int | None]) -> list[Placement]:
        out: list[Placement | None] = [None] * len(blocks)
        if not blocks:
            return []
        # the blocks' own dtype: the search widens what it reads (a block at a time, a few tokens)
        keys = self._part(blocks, 0, blocks[0].dtype)
        est = self.estimator()
        search = [i for i, g in enumerate(given) if g is None]
        known = [i for i, g in enumerate(given) if g is not None]
        # the key residual serves only the relative layout test: without it the refine may stop early
        found = est.place_many(
            keys if len(search) == len(blocks) else keys[search],  # no copy when all
            residual=self.binding.layout_margin is not None,
        )
        for i, p in zip(search, found, strict=True):
            out[i] = p
        at = [int(g) for g in given if g is not None]
        if not self.checks_layout:  # the residual and energy would go unused
            placed = [Placement(p, float("nan")) for p in at]
        else:
            placed = est.at(keys[known], at, residual=self.binding.layout_margin is not None)
        for i, p in zip(known, placed, strict=True):
            out[i] = p
        return [p for p in out if p is not None]

    @property
    def checks_layout(self) -> bool:
        return self.binding.layout_energy_limit is not None or self.binding.layout_margin is not None

    def _readings(self, data: bytes) -> dict[str, torch.Tensor]:
        """The same bytes read in every other layout this endpoint knows (K and V swapped aside:
        that reading is the bound one's halves exchanged, see ``misfit_many``)."""
        s = self.spec
        alternatives: dict[str, torch.Tensor] = {}
        if self.vllm is not None:
            alternatives["FullyContiguous"] = s.from_bytes(data[: s.nbytes])
            alternatives["vllm-cpu with keys [page_size, head_dim]"] = VllmCpuLayout(s, "td").chunk_to_block(
                data
            )
        elif len(data) in (s.nbytes, VllmCpuLayout(s).chunk_bytes):
            alternatives["vllm-cpu"] = VllmCpuLayout(s).chunk_to_block(data)
        return alternatives

    def misfit_many(
        self, data: Sequence[bytes], blocks: Sequence[torch.Tensor], placed: Sequence[Placement]
    ) -> list[str | None]:
        """Why each object (``data``, read as ``blocks``, placed at ``placed``) does not fit this
        bucket's layout, or None; the whole batch scored at once.

        Absolute test (``layout_energy_limit``): the bound reading's keys (at the recovered position;
        the search's own figure, ``placed``) and values must carry about the normalised energy per
        token of the calibration's own KV; any other layout's bytes, or K and V swapped, carry 5x or
        more (docs/vllm.md). Relative test (``layout_margin``, off by default): the bound reading
        is compared with the same bytes read in every other layout this endpoint knows (KVBM
        FullyContiguous, vLLM CPU with keys either way round, K and V swapped), each at its own
        recovered position, and a block that some other reading explains ``layout_margin`` times
        better is refused; it runs only on blocks the absolute test let through."""
        if not self.checks_layout:
            return [None] * len(blocks)
        c = CHECK_CHUNK
        return [
            why
            for i in range(0, len(blocks), c)
            for why in self._misfit(data[i : i + c], blocks[i : i + c], placed[i : i + c])
        ]

    def _misfit(
        self, data: Sequence[bytes], blocks: Sequence[torch.Tensor], placed: Sequence[Placement]
    ) -> list[str | None]:
        chk = self.checker()
        if self.binding.layout_margin is None:  # the absolute test alone: the values' energy, sampled tokens
            value_energy = chk.value_energy(
                self._part(blocks, 1, tokens=sample_tokens(self.spec.page_size, chk.tokens))
            )
        else:
            values = self._part(blocks, 1)
            value_frac, value_energy = chk.value_stats(values)
        out: list[str | None] = [None] * len(blocks)
        limit = self.binding.layout_energy_limit
        if limit is not None:
            for i, p in enumerate(placed):
                k, v = p.key_energy, float(value_energy[i])
                if not (k <= limit and v <= limit):  # a NaN (no figure) refuses too
                    part, x = ("keys", k) if not k <= limit else ("values", v)
                    out[i] = (
                        f"the block does not fit bucket {self.name}'s {self.binding.layout} layout: read "
                        f"so, its {part} carry {x:.1f}x the calibration's normalised energy per token "
                        f"(limit {limit}x)"
                    )
        rest = [i for i, w in enumerate(out) if w is None]
        if self.binding.layout_margin is not None and rest:
            why = self._relative(
                [data[i] for i in rest],
                [blocks[i] for i in rest],
                [placed[i] for i in rest],
                values[rest],
                value_frac[rest],
            )
            for i, w in zip(rest, why, strict=True):
                out[i] = w
        return out

    def _relative(
        self,
        data: Sequence[bytes],
        blocks: Sequence[torch.Tensor],
        placed: Sequence[Placement],
        values: torch.Tensor,
        value_frac: torch.Tensor,
    ) -> list[str | None]:
        margin = self.binding.layout_margin
        assert margin is not None
        chk = self.checker()
        n = len(blocks)
        keys = self._part(blocks, 0)
        key_frac = torch.tensor([p.key_residual for p in placed], dtype=torch.float64)
        bound = chk.score(key_frac, value_frac)
        readings = [self._readings(d) for d in data]
        names = ["K and V swapped", *readings[0]]
        other = [r[name] for name in names[1:] for r in readings]  # reading-major: [A-1 readings x N]
        alt_keys = torch.cat([values, self._part(other, 0)]) if other else values
        alt_values = torch.cat([keys, self._part(other, 1)]) if other else keys
        found = self.estimator().place_many(alt_keys, ALT_REFINE_TOP)
        alt_key = torch.tensor([p.key_residual for p in found], dtype=torch.float64)
        alt_score = chk.score(alt_key, chk.value_fractions(alt_values)).reshape(len(names), n).T  # [N, A]
        best, which = alt_score.min(1)
        out: list[str | None] = []
        for i in range(n):
            b, a = float(bound[i]), float(best[i])
            if b <= margin * a:
                out.append(None)
                continue
            out.append(
                f"the block does not fit bucket {self.name}'s {self.binding.layout} layout: read as "
                f"{names[int(which[i])]} it fits the calibration {b / a:.1f}x better (PCA residual {a:.1f} "
                f"vs {b:.1f}; limit {margin}x)"
            )
        return out


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
