"""KVBM's block layouts and sequence hashes, and a narrow offload/onboard client for the codec tier.

Layouts are those of Dynamo's KV Block Manager (kvbm / ai-dynamo 1.6.1, ``block_manager::layout::
LayoutType``); every page is ``[page_size, inner]`` with ``inner = n_kv_heads * head_dim`` (heads outer):

- ``FULLY_CONTIGUOUS``: one tensor ``[n_blocks, n_layers, 2, page_size, inner]`` (outer dim 2 = K, V).
  This is KVBM's host (G2) and disk (G3) layout, and one block of it is ``kvbm_codec.api.blocks``' block.
- ``LAYER_SEPARATE_OUTER``: one tensor per layer, ``[2, n_blocks, page_size, inner]``
  (``LayerSeparate { outer_contiguous: true }``): vLLM's FlashAttention cache
  ``[2, num_blocks, block_size, n_kv_heads, head_dim]`` as the kvbm vLLM connector registers it.
- ``LAYER_SEPARATE_BLOCK``: one tensor per layer, ``[n_blocks, 2, page_size, inner]``
  (``outer_contiguous: false``): FlashInfer-style caches. kvbm's connector hands vLLM's per-layer
  tensors to Rust unchanged and lets it infer which of the two from the strides, so both occur.

Sequence hashes: KVBM identifies a full block by a chained hash, ``block_hash = xxh3_64(token ids as
little-endian u32, seed)``, ``seq_hash[0] = block_hash[0]``, ``seq_hash[i] = xxh3_64(le_u64(seq_hash[i-1])
|| le_u64(block_hash[i]), 1337)`` (dynamo ``tokens::compute_next_sequence_hash``). :func:`sequence_hashes`
reproduces that for tests and the demo; a real KVBM computes its own (salted with the model/LoRA) and this
client takes whatever hashes it is given as opaque keys.

Only full blocks are offloaded (KVBM registers and moves full pages only); a conversation's partial last
block stays with the engine ("on the GPU"): :func:`kv_to_kvbm` returns it separately. The last ``window``
tokens of a conversation are sent with ``compress=False``, so the recent window the model attends to most
stays exact, as in the KVTC paper.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np
import torch
import xxhash

from kvbm_codec.api.blocks import BlockSpec, InvalidBlockError, block_positions, blocks_to_kv, kv_to_blocks
from kvbm_codec.api.types import BlockTransport, GetResult, PutItem, PutResult
from kvbm_codec.kv import KVCache

XXH3_SEED = 1337  # Dynamo's default seed for block and sequence hashes (kv router, mocker, tokens crate)
DEFAULT_WINDOW_TOKENS = 128
_U64 = 2**64


class KvbmLayout(StrEnum):
    FULLY_CONTIGUOUS = "fully_contiguous"
    LAYER_SEPARATE_OUTER = "layer_separate_outer_contiguous"
    LAYER_SEPARATE_BLOCK = "layer_separate_block_contiguous"


# ---- sequence hashes ----------------------------------------------------------------------------


def block_hash(tokens: Sequence[int], seed: int = XXH3_SEED) -> int:
    arr = np.asarray(tokens, dtype=np.int64)
    if arr.ndim != 1 or (arr.size and (arr.min() < 0 or arr.max() >= 2**32)):
        raise ValueError("token ids must be a 1-D sequence of unsigned 32-bit integers")
    return xxhash.xxh3_64_intdigest(arr.astype("<u4").tobytes(), seed=seed)


def next_sequence_hash(parent: int, child_block_hash: int) -> int:
    return xxhash.xxh3_64_intdigest(struct.pack("<QQ", parent, child_block_hash), seed=XXH3_SEED)


def sequence_hashes(
    token_ids: Sequence[int] | torch.Tensor, page_size: int, seed: int = XXH3_SEED
) -> list[int]:
    """Chained hashes of every *full* page of ``token_ids`` (a trailing partial page has none)."""
    ids = token_ids.reshape(-1).tolist() if isinstance(token_ids, torch.Tensor) else list(token_ids)
    out: list[int] = []
    for start in range(0, len(ids) - page_size + 1, page_size):
        h = block_hash(ids[start : start + page_size], seed)
        out.append(h if not out else next_sequence_hash(out[-1], h))
    return out


# ---- layouts ------------------------------------------------------------------------------------


@dataclass
class KvbmBlocks:
    """Full KVBM blocks in one of KVBM's layouts, with each block's sequence hash and first position.

    Block ``i`` holds positions ``first_positions[i] .. first_positions[i] + page_size - 1``.
    """

    spec: BlockSpec
    layout: KvbmLayout
    tensors: list[torch.Tensor]
    sequence_hashes: list[int]
    first_positions: list[int]

    def __post_init__(self) -> None:
        n = len(self.sequence_hashes)
        if len(self.first_positions) != n:
            raise InvalidBlockError(f"{n} sequence hashes but {len(self.first_positions)} first positions")
        for h in self.sequence_hashes:
            if not 0 <= h < _U64:
                raise InvalidBlockError(f"sequence hash {h} is not an unsigned 64-bit integer")
        for p in self.first_positions:
            if p < 0:
                raise InvalidBlockError(f"first position {p} is negative")
        expected = self.expected_shapes(self.spec, self.layout, n)
        got = [tuple(t.shape) for t in self.tensors]
        if got != expected or any(t.dtype != self.spec.torch_dtype for t in self.tensors):
            raise InvalidBlockError(
                f"{self.layout.value} tensors for {n} blocks of {self.spec} must be {len(expected)} x "
                f"{expected[0] if expected else '()'} {self.spec.dtype}, got "
                f"{got[:2]}{'...' if len(got) > 2 else ''} {[str(t.dtype) for t in self.tensors[:1]]}"
            )

    @staticmethod
    def expected_shapes(spec: BlockSpec, layout: KvbmLayout, n_blocks: int) -> list[tuple[int, ...]]:
        L, P, inner = spec.n_layers, spec.page_size, spec.inner
        if layout is KvbmLayout.FULLY_CONTIGUOUS:
            return [(n_blocks, L, 2, P, inner)]
        if layout is KvbmLayout.LAYER_SEPARATE_OUTER:
            return [(2, n_blocks, P, inner)] * L
        return [(n_blocks, 2, P, inner)] * L

    @property
    def n_blocks(self) -> int:
        return len(self.sequence_hashes)

    def canonical(self) -> torch.Tensor:
        """All blocks as ``[n_blocks, n_layers, 2, page_size, inner]`` (FullyContiguous order)."""
        if self.layout is KvbmLayout.FULLY_CONTIGUOUS:
            return self.tensors[0]
        if self.layout is KvbmLayout.LAYER_SEPARATE_OUTER:
            return torch.stack(self.tensors).permute(2, 0, 1, 3, 4)  # [L, 2, n, P, I] -> [n, L, 2, P, I]
        return torch.stack(self.tensors, dim=1)  # [n, L, 2, P, I]

    def block(self, i: int) -> torch.Tensor:
        """Block ``i`` in the service's shape ``[n_layers, 2, page_size, inner]``, contiguous."""
        if self.layout is KvbmLayout.FULLY_CONTIGUOUS:
            return self.tensors[0][i].contiguous()
        if self.layout is KvbmLayout.LAYER_SEPARATE_OUTER:
            return torch.stack([t[:, i] for t in self.tensors])
        return torch.stack([t[i] for t in self.tensors])

    def positions(self, i: int) -> torch.Tensor:
        return block_positions(self.first_positions[i], self.spec.page_size)

    @classmethod
    def from_canonical(
        cls,
        stacked: torch.Tensor,
        spec: BlockSpec,
        layout: KvbmLayout,
        sequence_hashes: Sequence[int],
        first_positions: Sequence[int],
    ) -> KvbmBlocks:
        """``[n_blocks, n_layers, 2, page_size, inner]`` -> the given layout (copies into fresh tensors)."""
        n = int(stacked.shape[0]) if stacked.dim() == 5 else -1
        if tuple(stacked.shape) != (n, spec.n_layers, 2, spec.page_size, spec.inner):
            raise InvalidBlockError(f"expected [n_blocks, {spec.shape}], got {tuple(stacked.shape)}")
        stacked = stacked.to(spec.torch_dtype)
        if layout is KvbmLayout.FULLY_CONTIGUOUS:
            tensors = [stacked.contiguous()]
        elif layout is KvbmLayout.LAYER_SEPARATE_OUTER:
            tensors = [stacked[:, layer].transpose(0, 1).contiguous() for layer in range(spec.n_layers)]
        else:
            tensors = [stacked[:, layer].contiguous() for layer in range(spec.n_layers)]
        return cls(spec, layout, tensors, list(sequence_hashes), list(first_positions))


def _check_kv_fits(kv: KVCache, spec: BlockSpec) -> None:
    got = (kv.layer_start, kv.n_layers, kv.n_heads, kv.key_head_dim, kv.value_head_dim)
    want = (0, spec.n_layers, spec.n_kv_heads, spec.head_dim, spec.head_dim)
    if got != want:
        raise InvalidBlockError(
            f"KV (layer_start, layers, kv heads, key dim, value dim) = {got} does not fit {spec} ({want})"
        )


def kv_to_kvbm(
    kv: KVCache,
    token_ids: Sequence[int] | torch.Tensor,
    spec: BlockSpec,
    layout: KvbmLayout = KvbmLayout.FULLY_CONTIGUOUS,
    *,
    hashes: Sequence[int] | None = None,
    seed: int = XXH3_SEED,
) -> tuple[KvbmBlocks, KVCache | None]:
    """A conversation's KV (positions 0..T-1) -> its full KVBM blocks, and the partial tail (or None).

    ``hashes`` are KVBM's own sequence hashes when the caller has them; otherwise they are computed
    from ``token_ids`` the way Dynamo does (:func:`sequence_hashes`).
    """
    _check_kv_fits(kv, spec)
    ids = token_ids.reshape(-1).tolist() if isinstance(token_ids, torch.Tensor) else list(token_ids)
    T, P = kv.n_tokens, spec.page_size
    if len(ids) != T:
        raise InvalidBlockError(f"{len(ids)} token ids for a KV cache of {T} tokens")
    if not torch.equal(kv.positions, torch.arange(T, dtype=torch.int64)):
        raise InvalidBlockError(
            "KVBM pages hold consecutive positions from 0; this cache's positions are not 0..T-1 "
            "(an evicted cache cannot be paged)"
        )
    n = T // P
    hs = list(hashes) if hashes is not None else sequence_hashes(ids, P, seed)
    if len(hs) != n:
        raise InvalidBlockError(f"{len(hs)} sequence hashes for {n} full blocks")
    full = n * P
    stacked = kv_to_blocks(kv.select_tokens(torch.arange(full)), spec) if n else _no_blocks(spec)
    blocks = KvbmBlocks.from_canonical(stacked, spec, layout, hs, [i * P for i in range(n)])
    tail = kv.select_tokens(torch.arange(full, T)) if full < T else None
    return blocks, tail


def kvbm_to_kv(blocks: KvbmBlocks) -> KVCache:
    """Blocks (in order) -> one KVCache in the blocks' dtype; positions from each block's first position."""
    n = blocks.n_blocks
    if n == 0:
        raise InvalidBlockError("no blocks to turn into a KV cache")
    positions = torch.cat([blocks.positions(i) for i in range(n)])
    kv = blocks_to_kv(blocks.canonical(), positions, blocks.spec)
    return KVCache(kv.keys.contiguous(), kv.values.contiguous(), kv.positions, layer_start=0)


def _no_blocks(spec: BlockSpec) -> torch.Tensor:
    return torch.empty((0, *spec.shape), dtype=spec.torch_dtype)


def concat_tokens(a: KVCache, b: KVCache) -> KVCache:
    """Tokens of ``a`` then ``b`` (e.g. onboarded blocks + the partial tail the engine kept)."""
    if (a.layer_start, a.n_layers, a.n_heads) != (b.layer_start, b.n_layers, b.n_heads):
        raise ValueError("caches disagree on layers/heads")
    dtype = a.keys.dtype
    return KVCache(
        torch.cat([a.keys, b.keys.to(dtype)], dim=2),
        torch.cat([a.values, b.values.to(dtype)], dim=2),
        torch.cat([a.positions, b.positions]),
        layer_start=a.layer_start,
    )


# ---- transport ----------------------------------------------------------------------------------


def grpc_transport(target: str, model: str, tenant: str | None = None, **options: Any) -> BlockTransport:
    """One replica over gRPC. ``CodecClient`` already has the transport's four methods with tenant and
    model bound at construction, so it is the transport itself (``options`` go to its constructor)."""
    from kvbm_codec.frontends.grpc.client import CodecClient

    return CodecClient(target, model=model, tenant=tenant, **options)


# ---- the tier client ----------------------------------------------------------------------------


@dataclass(frozen=True)
class OffloadReport:
    sequence_hashes: list[int]
    compressed: int  # blocks stored through the codec
    exact: int  # blocks in the recent window, stored uncompressed
    raw_bytes: int
    stored_bytes: int

    @property
    def ratio(self) -> float:
        return self.raw_bytes / max(1, self.stored_bytes)


@dataclass
class OnboardResult:
    """``blocks``: the longest run of hits from the first requested hash (KV must be contiguous to be
    usable); ``misses``: every requested hash that was absent, damaged, or came back for other positions."""

    blocks: KvbmBlocks
    misses: list[int] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.misses


class KvbmTierClient:
    """The KVBM-connector-shaped face of the codec tier: offload full blocks, onboard them by hash."""

    def __init__(
        self,
        transport: BlockTransport,
        spec: BlockSpec,
        *,
        layout: KvbmLayout = KvbmLayout.FULLY_CONTIGUOUS,
        window_tokens: int = DEFAULT_WINDOW_TOKENS,
        max_blocks_per_call: int = 64,
    ) -> None:
        if window_tokens < 0 or max_blocks_per_call <= 0:
            raise ValueError("window_tokens must be >= 0 and max_blocks_per_call > 0")
        self.transport = transport
        self.spec = spec
        bind = getattr(transport, "bind_dtype", None)
        if bind is not None:  # a wire transport carries the dtype so the server can refuse a mismatch
            bind(spec.dtype)
        self.layout = layout
        self.window_tokens = window_tokens
        self.max_blocks_per_call = max_blocks_per_call

    def offload(self, blocks: KvbmBlocks, *, context_tokens: int | None = None) -> OffloadReport:
        """Store every block; those overlapping the last ``window_tokens`` of the conversation exactly.

        ``context_tokens`` is the conversation's length including a partial tail the engine keeps
        (default: the end of the last block), so the window is measured from the true end.
        """
        if blocks.spec != self.spec:
            raise InvalidBlockError(f"blocks are {blocks.spec}, this client serves {self.spec}")
        P = self.spec.page_size
        end = context_tokens if context_tokens is not None else max(blocks.first_positions, default=-P) + P
        window_start = end - self.window_tokens
        items = []
        for i in range(blocks.n_blocks):
            exact = self.window_tokens > 0 and blocks.first_positions[i] + P > window_start
            items.append(
                PutItem(
                    blocks.sequence_hashes[i],
                    self.spec.to_bytes(blocks.block(i)),
                    first_position=blocks.first_positions[i],
                    compress=not exact,
                )
            )
        results: list[PutResult] = []
        for start in range(0, len(items), self.max_blocks_per_call):
            results += self.transport.put_blocks(items[start : start + self.max_blocks_per_call])
        n_exact = sum(not it.compress for it in items)
        return OffloadReport(
            sequence_hashes=list(blocks.sequence_hashes),
            compressed=len(items) - n_exact,
            exact=n_exact,
            raw_bytes=sum(r.raw_bytes for r in results),
            stored_bytes=sum(r.stored_bytes for r in results),
        )

    def onboard(
        self, hashes: Sequence[int], first_positions: Sequence[int], *, out: torch.Tensor | None = None
    ) -> OnboardResult:
        """``out``: memory the blocks land in, ``[len(hashes), *spec.shape]`` of the spec's dtype (an
        engine's own KV pages, reused between onboards), so each block is copied once, into it; a
        FullyContiguous result then views ``out``. Without it a fresh stack is allocated."""
        if len(hashes) != len(first_positions):
            raise ValueError(f"{len(hashes)} hashes but {len(first_positions)} first positions")
        got: list[GetResult] = []
        for start in range(0, len(hashes), self.max_blocks_per_call):
            got += self.transport.get_blocks(
                list(hashes[start : start + self.max_blocks_per_call]), views=True
            )
        P = self.spec.page_size
        datas: list[bytes | memoryview] = []
        misses: list[int] = []
        for h, p, r in zip(hashes, first_positions, got, strict=True):
            expected = tuple(range(p, p + P))
            if r.sequence_hash != h or r.status != "hit" or r.data is None or tuple(r.positions) != expected:
                misses.append(h)
                continue
            if not misses:  # still inside the leading run of hits
                datas.append(r.data)
        n = len(datas)
        stacked = self.spec.stack_bytes(datas, out=out) if datas else _no_blocks(self.spec)
        blocks = KvbmBlocks.from_canonical(stacked, self.spec, self.layout, hashes[:n], first_positions[:n])
        return OnboardResult(blocks, misses)

    def drop(self, hashes: Sequence[int]) -> int:
        return self.transport.delete(list(hashes))
