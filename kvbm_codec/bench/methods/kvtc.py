"""KVTC at a target ratio, alone or on top of an eviction method's surviving tokens, measured through
the block codec the service serves (``api.codecs.get_codec("kvtc")``), so a row of the benchmark is
what a tier replica would store.

The context is cut into pages of the served page size, each page a block with its true positions,
and the blocks are encoded in one ``encode_many`` call, exactly as ``BlockService.put_blocks`` does.
What the whole-context codec kept exact stays exact: attention sinks (the block codec keeps
positions < ``sink_tokens``), and the recent window: every block holding one of the last
``window_tokens`` tokens is sent ``compress=False`` (the service's keep-exact flag), and the tail
that does not fill a page is kept as fp16 tokens. All of it is counted in the stored bytes.

On top of eviction the blocks hold only the kept tokens (their true positions travel in each frame),
so the combined ratio is fp16 bytes of the ORIGINAL context / stored bytes.
"""

from __future__ import annotations

import torch

from kvbm_codec.api.blocks import BlockSpec, blocks_to_kv, kv_to_blocks
from kvbm_codec.api.codecs import BlockCodec, get_codec
from kvbm_codec.bench.base import BenchContext, Compressed, KVMethod
from kvbm_codec.bench.methods._eviction import EvictionMethod
from kvbm_codec.codec import block as _builtin_codecs  # noqa: F401  (registers "kvtc")
from kvbm_codec.codec.params import Calibration
from kvbm_codec.kv import KVCache
from kvbm_codec.service.config import ModelConfig

CODEC = "kvtc"
PAGE_SIZE: int = ModelConfig.model_fields["page_size"].default  # the served default: one source


def block_spec(cal: Calibration, page_size: int = PAGE_SIZE) -> BlockSpec:
    """The service's block spec for a calibration's model (as ``server.app`` builds it)."""
    s = cal.shape
    return BlockSpec(s.n_layers, page_size, s.n_kv_heads, s.key_head_dim, "float16")


def _concat_tokens(parts: list[KVCache]) -> KVCache:
    return KVCache(
        keys=torch.cat([p.keys for p in parts], dim=2),
        values=torch.cat([p.values for p in parts], dim=2),
        positions=torch.cat([p.positions for p in parts]),
        layer_start=parts[0].layer_start,
    )


class KVTC(KVMethod):
    needs_calibration = True

    def __init__(self, target_cr: float, evict: EvictionMethod | None = None) -> None:
        self.target_cr, self.evict = target_cr, evict
        self.name = f"kvtc@{target_cr:g}" + (f"+{evict.name}" if evict else "")
        self.family = "kvtc+eviction" if evict else "kvtc"
        self.needs_attention = bool(evict and evict.needs_attention)
        self._codecs: dict[str, BlockCodec] = {}

    def params(self) -> dict[str, object]:
        return {
            "target_cr": self.target_cr,
            "evict": self.evict.params() if self.evict else None,
            "path": f"block:{CODEC}:{PAGE_SIZE}",  # results of the whole-context path are not these
        }

    def _codec(self, ctx: BenchContext) -> BlockCodec:
        cal = ctx.resources.calibration()
        if cal.calibration_id not in self._codecs:
            self._codecs[cal.calibration_id] = get_codec(CODEC)(cal, block_spec(cal), self.target_cr)
        return self._codecs[cal.calibration_id]

    def prepare(self, ctx: BenchContext) -> None:
        self._codec(ctx)
        if self.evict is not None:
            self.evict.prepare(ctx)

    def compress(self, kv: KVCache, ctx: BenchContext) -> Compressed:
        codec = self._codec(ctx)
        window = ctx.resources.calibration().config.window_tokens
        if self.evict is not None:
            kv = self.evict.restore(self.evict.compress(kv, ctx))
        frames, tail, stats = encode_blocks(codec, kv, window)
        stored = sum(len(f) for f in frames) + tail.nbytes()
        info = {
            "kept_tokens": kv.n_tokens,
            "blocks": len(frames),
            "raw_tokens": sum(s.raw_tokens for s in stats) + tail.n_tokens,
            "raw_section_bytes": sum(s.raw_section_bytes for s in stats) + tail.nbytes(),
            "allocation_id": codec.describe()["allocation_id"],
        }
        return Compressed(stored, (frames, tail, codec), kv.n_tokens, info)

    def restore(self, c: Compressed) -> KVCache:
        frames, tail, codec = c.payload
        return decode_blocks(codec, frames, tail).to(torch.float32)


def encode_blocks(codec: BlockCodec, kv: KVCache, window_tokens: int) -> tuple[list[bytes], KVCache, list]:
    """(one frame per whole page, the fp16 tail that fills no page, per-frame stats)."""
    spec = codec.spec
    P = spec.page_size
    n_blocks = kv.n_tokens // P
    whole = kv.select_tokens(torch.arange(n_blocks * P))
    tail = kv.select_tokens(torch.arange(n_blocks * P, kv.n_tokens)).to(torch.float16)
    if n_blocks == 0:
        return [], tail, []
    exact_from = kv.n_tokens - window_tokens  # tokens from here on are the recent window
    blocks = kv_to_blocks(whole, spec)
    positions = [whole.positions[b * P : (b + 1) * P] for b in range(n_blocks)]
    compress = [(b + 1) * P <= exact_from for b in range(n_blocks)]
    encoded = codec.encode_many(list(blocks), positions, compress)
    return [f for f, _ in encoded], tail, [s for _, s in encoded]


def decode_blocks(codec: BlockCodec, frames: list[bytes], tail: KVCache) -> KVCache:
    if not frames:
        return tail
    decoded = codec.decode_many(frames)
    for d in decoded:
        if isinstance(d, Exception):
            raise d
    blocks = torch.stack([d[0] for d in decoded])  # type: ignore[index]
    kv = blocks_to_kv(blocks, torch.cat([d[1] for d in decoded]), codec.spec)  # type: ignore[index]
    return _concat_tokens([kv, tail.to(kv.keys.dtype)]) if tail.n_tokens else kv
