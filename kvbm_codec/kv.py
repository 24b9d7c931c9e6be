"""The one in-memory shape of a KV cache that every module of kvbm-codec speaks.

Engines and layouts differ (HF DynamicCache, KVBM FullyContiguous, ...); adapters convert to this
and back, so the codec math only ever sees one layout.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch


@dataclass
class KVCache:
    """Keys and values of a token set for a contiguous range of layers.

    keys:   [n_layers, n_kv_heads, n_tokens, key_head_dim], keys *with* RoPE applied (as engines store them)
    values: [n_layers, n_kv_heads, n_tokens, value_head_dim]
    positions: [n_tokens] int64 absolute token positions (not necessarily contiguous: eviction may
        have removed tokens; RoPE needs the true positions).
    layer_start: index of the first layer held, so a partial (layer-group) cache knows where it sits.
    """

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    layer_start: int = 0

    def __post_init__(self) -> None:
        if self.keys.dim() != 4 or self.values.dim() != 4:
            raise ValueError(
                f"keys/values must be 4-D [layers, heads, tokens, dim], got {tuple(self.keys.shape)} "
                f"and {tuple(self.values.shape)}"
            )
        if self.keys.shape[:3] != self.values.shape[:3]:
            raise ValueError(
                f"keys {tuple(self.keys.shape)} and values {tuple(self.values.shape)} disagree on "
                "layers/heads/tokens"
            )
        if self.positions.dim() != 1 or self.positions.shape[0] != self.keys.shape[2]:
            raise ValueError(
                f"positions must be 1-D with one entry per token ({self.keys.shape[2]}), "
                f"got {tuple(self.positions.shape)}"
            )

    @property
    def n_layers(self) -> int:
        return int(self.keys.shape[0])

    @property
    def n_heads(self) -> int:
        return int(self.keys.shape[1])

    @property
    def n_tokens(self) -> int:
        return int(self.keys.shape[2])

    @property
    def key_head_dim(self) -> int:
        return int(self.keys.shape[3])

    @property
    def value_head_dim(self) -> int:
        return int(self.values.shape[3])

    @property
    def layer_end(self) -> int:
        return self.layer_start + self.n_layers

    def nbytes(self, bytes_per_element: int = 2) -> int:
        """Size at a given element width (fp16 by default: the reference for compression ratios)."""
        return (self.keys.numel() + self.values.numel()) * bytes_per_element

    def to(self, dtype: torch.dtype) -> KVCache:
        """Same cache at another element type (decoded frames are fp16; the reference model runs fp32)."""
        return KVCache(
            self.keys.to(dtype), self.values.to(dtype), self.positions, layer_start=self.layer_start
        )

    def select_tokens(self, index: torch.Tensor) -> KVCache:
        return KVCache(
            keys=self.keys[:, :, index],
            values=self.values[:, :, index],
            positions=self.positions[index],
            layer_start=self.layer_start,
        )

    def select_layers(self, start: int, end: int) -> KVCache:
        """Layers [start, end) in absolute layer numbers."""
        lo, hi = start - self.layer_start, end - self.layer_start
        if lo < 0 or hi > self.n_layers or lo >= hi:
            raise ValueError(f"layers [{start}, {end}) not inside [{self.layer_start}, {self.layer_end})")
        return KVCache(self.keys[lo:hi], self.values[lo:hi], self.positions, layer_start=start)

    @staticmethod
    def concat_layers(parts: list[KVCache]) -> KVCache:
        parts = sorted(parts, key=lambda p: p.layer_start)
        for a, b in itertools.pairwise(parts):
            if a.layer_end != b.layer_start:
                raise ValueError(f"layer ranges are not contiguous: {a.layer_end} then {b.layer_start}")
        return KVCache(
            keys=torch.cat([p.keys for p in parts], dim=0),
            values=torch.cat([p.values for p in parts], dim=0),
            positions=parts[0].positions,
            layer_start=parts[0].layer_start,
        )
