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


def rope_tables(
    positions: torch.Tensor, rope: RotaryParams, *, inverse: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 cos/sin of one half of the rotary dims, [n_tokens, head_dim // 2]: the halves of
    ``cos_sin`` are equal, so half the table does. ``inverse`` folds undo's 1 / scaling^2 in."""
    inv = rope.inv_freq.to(device=positions.device, dtype=torch.float64)
    freqs = positions.to(torch.float64)[:, None] * inv[None, :]
    a = rope.attention_scaling / rope.attention_scaling**2 if inverse else rope.attention_scaling
    return (freqs.cos() * a).to(torch.float32), (freqs.sin() * a).to(torch.float32)


def rotate(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    rot: int,
    *,
    inverse: bool,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """RoPE (or its inverse) of float32 ``x [..., dim]`` whose first ``rot`` dims rotate, with tables
    already shaped to broadcast against ``x[..., :rot // 2]``: works on any layout (the codec's
    feature rows as well as [layers, heads, tokens, dim]) with the same per-element arithmetic, so
    every path that rotates gets bit-identical values. Half-width products, no rotate_half copy.
    ``out`` (x's shape, float32, not overlapping x): where the result goes, e.g. a buffer the caller
    reuses; default a new tensor."""
    h = rot // 2
    x1, x2 = x[..., :h], x[..., h:rot]
    out = torch.empty_like(x) if out is None else out
    o1, o2 = out[..., :h], out[..., h:rot]
    torch.mul(x1, cos, out=o1)
    torch.mul(x2, cos, out=o2)
    if inverse:  # rotation by the negative angle
        o1.addcmul_(x2, sin)
        o2.addcmul_(x1, sin, value=-1.0)
    else:
        o1.addcmul_(x2, sin, value=-1.0)
        o2.addcmul_(x1, sin)
    if rot < x.shape[-1]:
        out[..., rot:] = x[..., rot:]
    return out


def rotate_(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rot: int, *, inverse: bool
) -> torch.Tensor:
    """``rotate`` in place on ``x`` (which it returns), bit for bit the same values: the same kernels
    on the same operands in the same order, only with a half-width temporary instead of a second
    full-size tensor. The codec's feature rows are its own buffers; a fresh full-size output cost
    the decoder more in first-touch page faults than the rotation's arithmetic."""
    h = rot // 2
    x1, x2 = x[..., :h], x[..., h:rot]
    o1 = torch.mul(x1, cos)
    if inverse:  # rotation by the negative angle
        o1.addcmul_(x2, sin)
        x2.mul_(cos).addcmul_(x1, sin, value=-1.0)
    else:
        o1.addcmul_(x2, sin, value=-1.0)
        x2.mul_(cos).addcmul_(x1, sin)
    x1.copy_(o1)
    return x


def _check(keys: torch.Tensor, rope: RotaryParams) -> None:
    if keys.shape[-1] < rope.head_dim:
        raise ValueError(f"keys have {keys.shape[-1]} dims, RoPE rotates {rope.head_dim}")


def apply_rope(keys: torch.Tensor, positions: torch.Tensor, rope: RotaryParams) -> torch.Tensor:
    """keys [..., n_tokens, head_dim] without RoPE -> with RoPE."""
    _check(keys, rope)
    cos, sin = rope_tables(positions, rope, inverse=False)
    return rotate(keys.to(torch.float32), cos, sin, rope.head_dim, inverse=False).to(keys.dtype)


def undo_rope(keys: torch.Tensor, positions: torch.Tensor, rope: RotaryParams) -> torch.Tensor:
    """keys [..., n_tokens, head_dim] with RoPE -> without (rotation by the negative angle)."""
    _check(keys, rope)
    cos, sin = rope_tables(positions, rope, inverse=True)
    return rotate(keys.to(torch.float32), cos, sin, rope.head_dim, inverse=True).to(keys.dtype)
