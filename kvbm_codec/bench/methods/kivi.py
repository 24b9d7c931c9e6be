"""KIVI (Liu et al. 2024): asymmetric int4/int2, keys per-channel, values per-token, fp16 residual.

Keys are grouped along tokens (per channel) because their outliers live in fixed channels; values
per token because their error matters per attended token. The most recent tokens stay fp16 as KIVI's
residual (128 here, as in the paper), and only whole groups of 32 tokens are quantized.
"""

from __future__ import annotations

import math

import torch

from kvbm_codec.bench.base import NOMINAL_HEADER_BYTES, BenchContext, Compressed, KVMethod
from kvbm_codec.kv import KVCache


def _asym_quant(x: torch.Tensor, dim: int, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest with fp16 scale/zero (rounded before use, so decode sees exactly what is stored)."""
    lo = x.amin(dim=dim, keepdim=True).half().float()
    hi = x.amax(dim=dim, keepdim=True)
    qmax = 2**bits - 1
    scale = ((hi - lo) / qmax).clamp_min(1e-8).half().float()
    codes = ((x - lo) / scale).round().clamp(0, qmax).to(torch.uint8)
    return codes, scale, lo


class KIVI(KVMethod):
    family = "quantization"

    def __init__(self, bits: int, group: int = 32, residual: int = 128) -> None:
        self.bits, self.group, self.residual = bits, group, residual
        self.name = f"kivi{bits}"

    def params(self) -> dict[str, object]:
        return {"bits": self.bits, "group": self.group, "residual": self.residual}

    def compress(self, kv: KVCache, ctx: BenchContext) -> Compressed:
        g = self.group
        n_q = max(0, kv.n_tokens - self.residual) // g * g
        k, v = kv.keys.float(), kv.values.float()
        L, H, _, dk = k.shape
        dv = v.shape[3]
        if dv % g:
            raise ValueError(f"value head dim {dv} is not a multiple of the group size {g}")
        kq = k[:, :, :n_q].reshape(L, H, n_q // g, g, dk)
        vq = v[:, :, :n_q].reshape(L, H, n_q, dv // g, g)
        k_parts = _asym_quant(kq, 3, self.bits)  # per channel, over 32 tokens
        v_parts = _asym_quant(vq, 4, self.bits)  # per token, over 32 channels
        residual = (k[:, :, n_q:].half(), v[:, :, n_q:].half())
        n_codes = kq.numel() + vq.numel()
        n_groups = k_parts[1].numel() + v_parts[1].numel()
        stored = (
            math.ceil(n_codes * self.bits / 8)
            + n_groups * 4  # fp16 scale + fp16 zero
            + (residual[0].numel() + residual[1].numel()) * 2
            + NOMINAL_HEADER_BYTES
        )
        payload = (k_parts, v_parts, residual, kv.positions, (L, H, n_q, dk, dv))
        return Compressed(stored, payload, kv.n_tokens, {"quantized_tokens": n_q})

    def restore(self, c: Compressed) -> KVCache:
        (kc, ks, kz), (vc, vs, vz), (rk, rv), pos, (L, H, n_q, dk, dv) = c.payload
        k = (kc.float() * ks + kz).reshape(L, H, n_q, dk)
        v = (vc.float() * vs + vz).reshape(L, H, n_q, dv)
        return KVCache(torch.cat([k, rk.float()], 2), torch.cat([v, rv.float()], 2), pos)
