"""A KVBM block as the service stores it, and its codec.

KVBM moves KV in fixed pages ("blocks") of ``page_size`` tokens. On the wire and in the S3 endpoint a
block is one FullyContiguous block: ``[n_layers, 2, page_size, inner]`` with ``inner = n_kv_heads *
head_dim`` (heads outer, head_dim inner, as vLLM/KVBM lay out a page). Every path into the service
(gRPC bytes, NIXL, S3, the KVBM adapter) converts to this one shape, so the codec call is written once.

Blocks are compressed whole: the engine's recent window lives on the GPU, not in this tier, so the
codec's recent-window exemption does not apply per block (``window_tokens=0``). Attention sinks
(absolute positions < ``sink_tokens``) are kept fp16 as in the paper. A caller that wants a block kept
exact (e.g. the adapter for the last pages of a conversation) sends ``compress=False``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbm_codec.codec.kvtc import EncodeStats, KVTCCodec
from kvbm_codec.kv import KVCache

DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}


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
        if len(data) != self.nbytes:
            raise InvalidBlockError(
                f"block must be {self.nbytes} bytes ({self.shape} {self.dtype}), got {len(data)}"
            )
        flat = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return flat.view(self.torch_dtype).reshape(self.shape)

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


def block_to_kv(block: torch.Tensor, positions: torch.Tensor, spec: BlockSpec) -> KVCache:
    """[L, 2, P, H*D] -> KVCache keys/values [L, H, P, D] (views where possible)."""
    spec.check(block)
    if positions.dim() != 1 or positions.shape[0] != spec.page_size:
        raise InvalidBlockError(f"a block needs {spec.page_size} positions, got {tuple(positions.shape)}")
    L, _, P, _ = block.shape
    kv = block.reshape(L, 2, P, spec.n_kv_heads, spec.head_dim).permute(1, 0, 3, 2, 4)
    return KVCache(kv[0], kv[1], positions.to(torch.int64), layer_start=0)


def kv_to_block(kv: KVCache, spec: BlockSpec) -> torch.Tensor:
    if (kv.n_layers, kv.n_tokens, kv.n_heads, kv.key_head_dim) != (
        spec.n_layers,
        spec.page_size,
        spec.n_kv_heads,
        spec.head_dim,
    ):
        raise InvalidBlockError(
            f"KV [{kv.n_layers} layers, {kv.n_heads} heads, {kv.n_tokens} tokens, {kv.key_head_dim}] "
            f"is not a block of {spec}"
        )
    stacked = torch.stack([kv.keys, kv.values])  # [2, L, H, P, D]
    out = stacked.permute(1, 0, 3, 2, 4).reshape(spec.shape)
    return out.to(spec.torch_dtype).contiguous()


class BlockCodec:
    """KVTC for one block spec. Thread-safe: encode/decode keep no per-call state on self."""

    def __init__(self, codec: KVTCCodec, spec: BlockSpec) -> None:
        s = codec.cal.shape
        if (s.n_layers, s.n_kv_heads, s.key_head_dim) != (spec.n_layers, spec.n_kv_heads, spec.head_dim):
            raise ValueError(f"block spec {spec} does not match calibration shape {s}")
        self.codec = codec
        self.spec = spec

    def encode(
        self, block: torch.Tensor, positions: torch.Tensor, *, compress: bool = True
    ) -> tuple[bytes, EncodeStats]:
        kv = block_to_kv(block, positions, self.spec)
        if compress:
            raw_mask = kv.positions < self.codec.cal.config.sink_tokens
        else:
            raw_mask = torch.ones(kv.n_tokens, dtype=torch.bool)
        return self.codec.encode_with_stats(kv, raw_mask, window_tokens=0, dtype=self.spec.dtype)

    def decode(
        self, frame: bytes | memoryview, device: str | torch.device = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(block tensor in the spec's layout and dtype, positions). Raises FrameError on damage."""
        kv = self.codec.decode(frame, device=device)
        if kv.n_tokens != self.spec.page_size or kv.layer_start != 0 or kv.n_layers != self.spec.n_layers:
            raise InvalidBlockError(
                f"frame holds {kv.n_tokens} tokens of layers [{kv.layer_start}, {kv.layer_end}), "
                f"not a whole block of {self.spec}"
            )
        return kv_to_block(kv, self.spec), kv.positions
