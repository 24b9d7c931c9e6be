"""fp16 as engines store it: the reference every ratio and every accuracy number is measured against."""

from __future__ import annotations

from kvbm_codec.bench.base import BenchContext, Compressed, KVMethod
from kvbm_codec.kv import KVCache


class RawFP16(KVMethod):
    name = "fp16"
    family = "reference"

    def compress(self, kv: KVCache, ctx: BenchContext) -> Compressed:
        # No header charged: fp16 as the engine holds it is the definition of ratio 1.0.
        return Compressed(kv.nbytes(2), (kv.keys.half(), kv.values.half(), kv.positions), kv.n_tokens)

    def restore(self, c: Compressed) -> KVCache:
        k, v, pos = c.payload
        return KVCache(k.float(), v.float(), pos)
