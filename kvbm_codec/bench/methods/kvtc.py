"""KVTC (this package) at a target ratio, alone or on top of an eviction method's surviving tokens.

On top of eviction the frame holds only the kept tokens (their true positions travel in the frame), so
the combined ratio is fp16 bytes of the ORIGINAL context / frame bytes: the two savings multiply, minus
what the raw sinks + recent window cost inside the frame.
"""

from __future__ import annotations

import torch

from kvbm_codec.bench.base import BenchContext, Compressed, KVMethod
from kvbm_codec.bench.methods._eviction import EvictionMethod
from kvbm_codec.codec.kvtc import KVTCCodec
from kvbm_codec.kv import KVCache


class KVTC(KVMethod):
    needs_calibration = True

    def __init__(self, target_cr: float, evict: EvictionMethod | None = None) -> None:
        self.target_cr, self.evict = target_cr, evict
        self.name = f"kvtc@{target_cr:g}" + (f"+{evict.name}" if evict else "")
        self.family = "kvtc+eviction" if evict else "kvtc"
        self.needs_attention = bool(evict and evict.needs_attention)
        self._codecs: dict[str, KVTCCodec] = {}

    def params(self) -> dict[str, object]:
        return {"target_cr": self.target_cr, "evict": self.evict.params() if self.evict else None}

    def _codec(self, ctx: BenchContext) -> KVTCCodec:
        cal = ctx.resources.calibration()
        if cal.calibration_id not in self._codecs:
            self._codecs[cal.calibration_id] = KVTCCodec(cal, self.target_cr)
        return self._codecs[cal.calibration_id]

    def prepare(self, ctx: BenchContext) -> None:
        self._codec(ctx)
        if self.evict is not None:
            self.evict.prepare(ctx)

    def compress(self, kv: KVCache, ctx: BenchContext) -> Compressed:
        codec = self._codec(ctx)
        if self.evict is not None:
            kv = self.evict.restore(self.evict.compress(kv, ctx))
        frame, stats = codec.encode_with_stats(kv)
        info = {
            "kept_tokens": kv.n_tokens,
            "raw_tokens": stats.raw_tokens,
            "raw_section_bytes": stats.raw_section_bytes,
            "allocation_id": codec.alloc.allocation_id,
        }
        return Compressed(len(frame), (frame, codec), kv.n_tokens, info)

    def restore(self, c: Compressed) -> KVCache:
        frame, codec = c.payload
        kv = codec.decode(frame)
        return kv.to(torch.float32)
