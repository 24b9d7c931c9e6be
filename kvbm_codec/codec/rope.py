"""Rotary position embedding, undone on keys before PCA and re-applied after decoding.

RoPE rotates each key by a position-dependent angle, which smears the low-rank structure PCA relies
on; undoing it (an exact, orthonormal operation) is what lets one basis serve every position.
The parameters are stored in the calibration artifact so decoding needs no model code.
Convention: HF "rotate_half" (pairs (i, i + d/2)), as Llama, Mistral, Qwen use. With partial rotary
(Phi, StableLM) only the first `head_dim` = 2 * len(inv_freq) dims of a key rotate; the rest pass through.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RotaryParams:
    inv_freq: torch.Tensor  # [head_dim // 2] float32 (after any rope scaling the model applies)
    attention_scaling: float = 1.0

    @property
    def head_dim(self) -> int:
        return int(self.inv_freq.shape[0]) * 2

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin tables [n_tokens, head_dim]. Angles are computed in float64 (position * frequency
        loses digits in float32 at long positions); the rotation itself is applied in float32."""
        inv = self.inv_freq.to(device=positions.device, dtype=torch.float64)
        freqs = positions.to(torch.float64)[:, None] * inv[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def _split(keys: torch.Tensor, rope: RotaryParams) -> tuple[torch.Tensor, torch.Tensor | None]:
    rot = rope.head_dim
    if keys.shape[-1] < rot:
        raise ValueError(f"keys have {keys.shape[-1]} dims, RoPE rotates {rot}")
    if keys.shape[-1] == rot:
        return keys.to(torch.float32), None
    return keys[..., :rot].to(torch.float32), keys[..., rot:]


def _join(rotated: torch.Tensor, rest: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    out = rotated if rest is None else torch.cat([rotated, rest.to(torch.float32)], dim=-1)
    return out.to(dtype)


def apply_rope(keys: torch.Tensor, positions: torch.Tensor, rope: RotaryParams) -> torch.Tensor:
    """keys [..., n_tokens, head_dim] without RoPE -> with RoPE."""
    cos, sin = (t.to(torch.float32) for t in rope.cos_sin(positions))
    k, rest = _split(keys, rope)
    return _join(k * cos + _rotate_half(k) * sin, rest, keys.dtype)


def undo_rope(keys: torch.Tensor, positions: torch.Tensor, rope: RotaryParams) -> torch.Tensor:
    """keys [..., n_tokens, head_dim] with RoPE -> without (rotation by the negative angle)."""
    cos, sin = (t.to(torch.float32) for t in rope.cos_sin(positions))
    scale2 = rope.attention_scaling**2
    k, rest = _split(keys, rope)
    return _join((k * cos - _rotate_half(k) * sin) / scale2, rest, keys.dtype)
