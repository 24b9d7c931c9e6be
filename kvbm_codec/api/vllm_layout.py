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

    def chunk_to_block(self, chunk: torch.Tensor | bytes | bytearray | memoryview) -> torch.Tensor:
        """Chunk bytes (uint8 tensor or buffer, padded or not) -> block [L, 2, P, H*D] in the spec's dtype."""
        s = self.spec
        raw = (
            chunk.reshape(-1)
            if isinstance(chunk, torch.Tensor)
            else torch.frombuffer(bytearray(chunk), dtype=torch.uint8)
        )
        self._check_len(raw.numel())
        x = raw[: self.payload_bytes].view(s.torch_dtype).reshape(s.n_layers, s.n_kv_heads, 2, -1)
        if self.key_order == "dt":
            k = x[:, :, 0].reshape(s.n_layers, s.n_kv_heads, s.head_dim, s.page_size).transpose(2, 3)
        else:
            k = x[:, :, 0].reshape(s.n_layers, s.n_kv_heads, s.page_size, s.head_dim)
        v = x[:, :, 1].reshape(s.n_layers, s.n_kv_heads, s.page_size, s.head_dim)
        kv = torch.stack([k, v], dim=1)  # [L, 2, H, P, D]
        return kv.permute(0, 1, 3, 2, 4).reshape(s.shape).contiguous()

    def block_to_chunk(self, block: torch.Tensor, *, padded: bool = True) -> torch.Tensor:
        """Block [L, 2, P, H*D] -> chunk bytes as a uint8 tensor (zero-padded to ``chunk_bytes``)."""
        s = self.spec
        s.check(block)
        kv = block.reshape(s.n_layers, 2, s.page_size, s.n_kv_heads, s.head_dim).permute(0, 1, 3, 2, 4)
        k, v = kv[:, 0], kv[:, 1]  # [L, H, P, D]
        if self.key_order == "dt":
            k = k.transpose(2, 3)
        x = torch.stack([k.reshape(s.n_layers, s.n_kv_heads, -1), v.reshape(s.n_layers, s.n_kv_heads, -1)], 2)
        payload = x.contiguous().view(torch.uint8).reshape(-1)
        if not padded or self.chunk_bytes == self.payload_bytes:
            return payload
        out = torch.zeros(self.chunk_bytes, dtype=torch.uint8)
        out[: self.payload_bytes] = payload
        return out
