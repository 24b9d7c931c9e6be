"""FP8 e4m3 with one fp32 scale per (layer, head) for keys and for values: what vLLM/TRT-LLM ship.

Per-head rather than per-tensor because key outlier channels differ wildly between heads; a single
tensor scale would crush the quiet heads into e4m3's subnormals.
"""

from __future__ import annotations

import torch

from kvbm_codec.bench.base import NOMINAL_HEADER_BYTES, BenchContext, Compressed, KVMethod
from kvbm_codec.kv import KVCache

E4M3_MAX = 448.0


def _quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = (x.abs().amax(dim=(2, 3), keepdim=True) / E4M3_MAX).clamp_min(1e-12)
    return (x / scale).to(torch.float8_e4m3fn), scale


class FP8(KVMethod):
    name = "fp8"
    family = "quantization"

    def params(self) -> dict[str, object]:
        return {"format": "e4m3fn", "scale": "per-layer-head fp32"}

    def compress(self, kv: KVCache, ctx: BenchContext) -> Compressed:
        qk, sk = _quant(kv.keys.float())
        qv, sv = _quant(kv.values.float())
        stored = qk.numel() + qv.numel() + 4 * (sk.numel() + sv.numel()) + NOMINAL_HEADER_BYTES
        return Compressed(stored, (qk, sk, qv, sv, kv.positions), kv.n_tokens)

    def restore(self, c: Compressed) -> KVCache:
        qk, sk, qv, sv, pos = c.payload
        return KVCache(qk.float() * sk, qv.float() * sv, pos)
