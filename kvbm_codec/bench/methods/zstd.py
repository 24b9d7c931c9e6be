"""zstd level 3 on fp16 bytes: the other generic lossless choice (better ratio than DEFLATE-1, slower)."""

from __future__ import annotations

import zstandard

from kvbm_codec.bench.base import NOMINAL_HEADER_BYTES, BenchContext, Compressed, KVMethod
from kvbm_codec.bench.methods._bytes import fp16_bytes_to_kv, kv_to_fp16_bytes
from kvbm_codec.kv import KVCache


class Zstd(KVMethod):
    name = "zstd"
    family = "lossless"

    def params(self) -> dict[str, object]:
        return {"level": 3, "zstandard": zstandard.__version__}

    def compress(self, kv: KVCache, ctx: BenchContext) -> Compressed:
        # threads=0: single-threaded, so MB/s per core means the same thing as for every other method.
        data = zstandard.ZstdCompressor(level=3, threads=0).compress(kv_to_fp16_bytes(kv))
        shapes = (tuple(kv.keys.shape), tuple(kv.values.shape))
        return Compressed(len(data) + NOMINAL_HEADER_BYTES, (data, shapes, kv.positions), kv.n_tokens)

    def restore(self, c: Compressed) -> KVCache:
        data, shapes, pos = c.payload
        return fp16_bytes_to_kv(zstandard.ZstdDecompressor().decompress(data), shapes, pos)
