"""DEFLATE (ISA-L, raw RFC 1951, level 1) on fp16 bytes: what a generic storage tier would do for free.

Level 1 because that is the only ISA-L level fast enough for a KV tier; fp16 mantissas are close to
random, so the expected gain is small (~1.1-1.3x) and this row mainly bounds "lossless" from above.
"""

from __future__ import annotations

from isal import isal_zlib

from kvbm_codec.bench.base import NOMINAL_HEADER_BYTES, BenchContext, Compressed, KVMethod
from kvbm_codec.bench.methods._bytes import fp16_bytes_to_kv, kv_to_fp16_bytes
from kvbm_codec.kv import KVCache


class Deflate(KVMethod):
    name = "deflate"
    family = "lossless"

    def params(self) -> dict[str, object]:
        return {"level": 1, "wbits": -15}

    def compress(self, kv: KVCache, ctx: BenchContext) -> Compressed:
        data = isal_zlib.compress(kv_to_fp16_bytes(kv), level=1, wbits=-15)
        shapes = (tuple(kv.keys.shape), tuple(kv.values.shape))
        return Compressed(len(data) + NOMINAL_HEADER_BYTES, (data, shapes, kv.positions), kv.n_tokens)

    def restore(self, c: Compressed) -> KVCache:
        data, shapes, pos = c.payload
        return fp16_bytes_to_kv(isal_zlib.decompress(data, wbits=-15), shapes, pos)
