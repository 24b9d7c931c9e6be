"""vLLM's CPU offload chunk layout, converted exactly to and from the service's KVBM block.

A chunk of vLLM's CPU primary tier (and so one object of its OBJ tier) holds one offload chunk of
``page_size`` tokens for every attention layer, one layer after the other, each layer's page being
what the CPU attention backend writes: ``[n_kv_heads, 2 * page_size, head_dim]`` with the keys of a
head in the first ``page_size`` rows and its values in the next. The CPU cache writer of the "vec"
ISA (x86 float32/float16 without AMX) stores a head's keys transposed, ``[head_dim, page_size]``, so
its attention kernel can read them column-wise; values stay ``[page_size, head_dim]``. The chunk is
padded with zeros up to a multiple of 4096 bytes (vLLM's offload region alignment).

The service stores KVBM blocks ``[n_layers, 2, page_size, n_kv_heads * head_dim]``. Both conversions
are pure permutations, so chunk -> block -> chunk is bit-exact; nothing here imports vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from kvbm_codec.api.blocks import BlockSpec, InvalidBlockError

ALIGNMENT = 4096  # vLLM SharedOffloadRegion.BLOCK_SIZE_ALIGNMENT

KeyOrder = Literal["dt", "td"]  # head keys stored [head_dim, tokens] ("dt") or [tokens, head_dim]


def round_up(n: int, multiple: int = ALIGNMENT) -> int:
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class VllmCpuLayout:
    """One vLLM CPU offload chunk of a model whose KVBM block is ``spec``."""

    spec: BlockSpec
    key_order: KeyOrder = "dt"

    @property
    def payload_bytes(self) -> int:
        return self.spec.nbytes

    @property
    def chunk_bytes(self) -> int:
        """Bytes of one chunk as vLLM sizes it (padded to the region alignment)."""
        return round_up(self.spec.nbytes)

    def _check_len(self, n: int) -> None:
        if n not in (self.payload_bytes, self.chunk_bytes):
            raise InvalidBlockError(
                f"a vLLM CPU chunk of {self.spec} is {self.payload_bytes} bytes "
                f"({self.chunk_bytes} padded), got {n}"
            )

    def _chunk_parts(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of a chunk's payload: keys and values as [L, H, P, D] (keys strided when "dt")."""
        s = self.spec
        x = flat[: self.payload_bytes].view(s.torch_dtype).view(s.n_layers, s.n_kv_heads, 2, -1)
        if self.key_order == "dt":
            k = x[:, :, 0].view(s.n_layers, s.n_kv_heads, s.head_dim, s.page_size).transpose(2, 3)
        else:
            k = x[:, :, 0].view(s.n_layers, s.n_kv_heads, s.page_size, s.head_dim)
        return k, x[:, :, 1].view(s.n_layers, s.n_kv_heads, s.page_size, s.head_dim)

    def _block_parts(self, block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of a block [L, 2, P, H*D]: keys and values as [L, H, P, D]."""
        s = self.spec
        kv = block.reshape(s.n_layers, 2, s.page_size, s.n_kv_heads, s.head_dim).permute(0, 1, 3, 2, 4)
        return kv[:, 0], kv[:, 1]

    def chunk_to_block(
        self, chunk: torch.Tensor | bytes | bytearray | memoryview, *, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Chunk bytes (uint8 tensor or buffer, padded or not) -> block [L, 2, P, H*D] in the spec's dtype.

        ``out``: a contiguous block tensor to write into (e.g. a registered NIXL staging slot), so
        the conversion is the only copy.
        """
        s = self.spec
        raw = (
            chunk.reshape(-1)
            if isinstance(chunk, torch.Tensor)
            else torch.frombuffer(bytearray(chunk), dtype=torch.uint8)
        )
        self._check_len(raw.numel())
        if out is None:
            out = torch.empty(s.shape, dtype=s.torch_dtype)
        s.check(out)
        if not out.is_contiguous():
            raise ValueError("out must be a contiguous block tensor")
        k, v = self._chunk_parts(raw)
        ok, ov = self._block_parts(out)
        ok.copy_(k)
        ov.copy_(v)
        return out

    def block_to_chunk(
        self, block: torch.Tensor, *, padded: bool = True, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Block [L, 2, P, H*D] -> chunk bytes as a uint8 tensor (zero-padded to ``chunk_bytes``).

        ``out``: a uint8 tensor of ``chunk_bytes`` (or the payload's bytes without padding) to write
        into, e.g. the engine's own primary-tier slot: the conversion is then the only copy.
        """
        s = self.spec
        s.check(block)
        if out is None:
            out = torch.empty(self.chunk_bytes if padded else self.payload_bytes, dtype=torch.uint8)
        if out.dtype != torch.uint8 or not out.is_contiguous():
            raise ValueError("out must be a contiguous uint8 tensor")
        flat = out.view(-1)
        self._check_len(flat.numel())
        k, v = self._chunk_parts(flat)
        bk, bv = self._block_parts(block)
        k.copy_(bk)
        v.copy_(bv)
        if flat.numel() > self.payload_bytes:
            flat[self.payload_bytes :].zero_()
        return flat
