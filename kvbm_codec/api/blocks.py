"""A KVBM block as every layer sees it: its spec, its bytes, and the one conversion to and from KVCache.

KVBM moves KV in fixed pages ("blocks") of ``page_size`` tokens. On the wire and in the S3 endpoint a
block is one FullyContiguous block: ``[n_layers, 2, page_size, inner]`` with ``inner = n_kv_heads *
head_dim`` (heads outer, head_dim inner, as vLLM/KVBM lay out a page). Every path into the service
(gRPC bytes, NIXL, S3, the KVBM adapter) converts to this one shape, and :func:`blocks_to_kv` /
:func:`kv_to_blocks` are the only place the layout is permuted, so the codec call is written once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kvbm_codec.kv import KVCache

DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}


_EXPONENT = {
    torch.float16: (torch.int16, 0x7FFF, 0x7C00),
    torch.bfloat16: (torch.int16, 0x7FFF, 0x7F80),
    torch.float32: (torch.int32, 0x7FFFFFFF, 0x7F800000),
}
"""Per dtype: the integer view, the mask clearing the sign, and the all-ones exponent (Inf/NaN)."""


def all_finite(block: torch.Tensor) -> bool:
    """No NaN or Inf in ``block``, read from the bit patterns: a value is Inf or NaN exactly when its
    exponent bits are all ones, so the largest pattern without its sign bit decides. ``isfinite``
    on fp16 converts every element and took ~1 ms per 737 KB block, a tenth of its encode."""
    view = _EXPONENT.get(block.dtype)
    if view is None or block.numel() == 0:
        return bool(torch.isfinite(block).all())
    as_int, magnitude, exponent = view
    bits = block.contiguous().view(as_int)
    return int(torch.bitwise_and(bits, magnitude).max()) < exponent


class InvalidBlockError(ValueError):
    """The bytes or tensor handed in are not a block of the declared spec."""

    code = "invalid_block"


@dataclass(frozen=True)
class BlockSpec:
    n_layers: int
    page_size: int
    n_kv_heads: int
    head_dim: int
    dtype: str = "float16"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"block dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        for name in ("n_layers", "page_size", "n_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")

    @property
    def inner(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.n_layers, 2, self.page_size, self.inner)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def nbytes(self) -> int:
        return self.n_layers * 2 * self.page_size * self.inner * self.torch_dtype.itemsize

    def from_bytes(self, data: bytes | bytearray | memoryview) -> torch.Tensor:
        """Bytes (little-endian, C order) -> block tensor; refuses a wrong length instead of guessing."""
        self._check_nbytes(data)
        flat = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return flat.view(self.torch_dtype).reshape(self.shape)

    def stack_bytes(
        self, blocks: Sequence[bytes | bytearray | memoryview], *, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Many blocks' bytes -> ``[n, *shape]``, each copied once into the stack: a restore of
        hundreds of 737 KB blocks pays for neither a writable copy per block nor a second stack copy.
        ``out`` (``[n or more, *shape]``, this dtype, contiguous) is filled instead of fresh memory,
        whose first touch costs as much as the copy itself; the result is its first ``n`` blocks."""
        n = len(blocks)
        if out is None:
            out = torch.empty((n, *self.shape), dtype=self.torch_dtype)
        elif out.dtype != self.torch_dtype or tuple(out.shape[1:]) != self.shape or out.shape[0] < n:
            raise InvalidBlockError(
                f"out must be [>= {n}, {self.shape}] {self.dtype}, got {tuple(out.shape)} {out.dtype}"
            )
        elif not out.is_contiguous() or out.device.type != "cpu":
            raise InvalidBlockError("out must be a contiguous CPU tensor")
        rows = out[:n].view(n, -1).view(torch.uint8).numpy()
        for i, data in enumerate(blocks):
            self._check_nbytes(data)
            rows[i] = np.frombuffer(data, dtype=np.uint8)
        return out[:n]

    def _check_nbytes(self, data: bytes | bytearray | memoryview) -> None:
        if len(data) != self.nbytes:
            raise InvalidBlockError(
                f"block must be {self.nbytes} bytes ({self.shape} {self.dtype}), got {len(data)}"
            )

    def to_bytes(self, block: torch.Tensor) -> bytes:
        self.check(block)
        t = block.detach().to("cpu").contiguous()
        return t.view(torch.uint8).numpy().tobytes()

    def check(self, block: torch.Tensor) -> None:
        if tuple(block.shape) != self.shape or block.dtype != self.torch_dtype:
            raise InvalidBlockError(
                f"block must be {self.shape} {self.dtype}, got {tuple(block.shape)} {block.dtype}"
            )


def block_positions(first_position: int, page_size: int) -> torch.Tensor:
    return torch.arange(first_position, first_position + page_size, dtype=torch.int64)


def blocks_to_kv(stacked: torch.Tensor, positions: torch.Tensor, spec: BlockSpec) -> KVCache:
    """``[n_blocks, L, 2, P, H*D]`` (blocks in token order) -> one KVCache ``[L, H, n*P, D]``."""
    n = int(stacked.shape[0]) if stacked.dim() == 5 else -1
    if tuple(stacked.shape) != (n, *spec.shape):
        raise InvalidBlockError(f"expected [n_blocks, {spec.shape}], got {tuple(stacked.shape)}")
    if positions.dim() != 1 or positions.shape[0] != n * spec.page_size:
        raise InvalidBlockError(
            f"{n} blocks need {n * spec.page_size} positions, got {tuple(positions.shape)}"
        )
    L, P, H, D = spec.n_layers, spec.page_size, spec.n_kv_heads, spec.head_dim
    kv = stacked.reshape(n, L, 2, P, H, D).permute(2, 1, 4, 0, 3, 5).reshape(2, L, H, n * P, D)
    return KVCache(kv[0], kv[1], positions.to(torch.int64), layer_start=0)


def kv_to_blocks(kv: KVCache, spec: BlockSpec) -> torch.Tensor:
    """A KVCache of whole blocks (``n * page_size`` tokens, every layer) -> ``[n, L, 2, P, H*D]``."""
    P = spec.page_size
    n = kv.n_tokens // P if kv.n_tokens % P == 0 else -1
    if (kv.layer_start, kv.n_layers, kv.n_heads, kv.key_head_dim, kv.value_head_dim) != (
        0,
        spec.n_layers,
        spec.n_kv_heads,
        spec.head_dim,
        spec.head_dim,
    ) or n <= 0:
        raise InvalidBlockError(
            f"KV [layers {kv.layer_start}+{kv.n_layers}, {kv.n_heads} heads, {kv.n_tokens} tokens, "
            f"{kv.key_head_dim}/{kv.value_head_dim}] is not whole blocks of {spec}"
        )
    L, H, D = spec.n_layers, spec.n_kv_heads, spec.head_dim
    stacked = torch.stack([kv.keys, kv.values]).reshape(2, L, H, n, P, D)
    out = stacked.permute(3, 1, 0, 4, 2, 5).reshape(n, *spec.shape)
    return out.to(spec.torch_dtype).contiguous()


def block_to_kv(block: torch.Tensor, positions: torch.Tensor, spec: BlockSpec) -> KVCache:
    """[L, 2, P, H*D] -> KVCache keys/values [L, H, P, D]."""
    spec.check(block)
    if positions.dim() != 1 or positions.shape[0] != spec.page_size:
        raise InvalidBlockError(f"a block needs {spec.page_size} positions, got {tuple(positions.shape)}")
    return blocks_to_kv(block.unsqueeze(0), positions, spec)


def kv_to_block(kv: KVCache, spec: BlockSpec) -> torch.Tensor:
    if kv.n_tokens != spec.page_size:
        raise InvalidBlockError(
            f"KV [{kv.n_layers} layers, {kv.n_heads} heads, {kv.n_tokens} tokens, {kv.key_head_dim}] "
            f"is not a block of {spec}"
        )
    return kv_to_blocks(kv, spec)[0]
