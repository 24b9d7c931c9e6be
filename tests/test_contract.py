"""The block contract (kvbm_codec.api): the one layout conversion and the codec registry, on real KV."""

from __future__ import annotations

import pytest
import torch

from kvbm_codec.api import (
    BlockSpec,
    InvalidBlockError,
    UnknownCodecError,
    block_to_kv,
    blocks_to_kv,
    codec_names,
    get_codec,
    kv_to_block,
    kv_to_blocks,
    register_codec,
)
from kvbm_codec.api.errors import IncompatibleFrameError
from kvbm_codec.api.types import PutItem
from kvbm_codec.codec import frame as fr
from kvbm_codec.codec.block import KVTCBlockCodec
from kvbm_codec.core.service import BlockService, ServedModel
from kvbm_codec.kv import KVCache
from kvbm_codec.store.memory import MemoryTier
from kvbm_codec.store.tiered import TieredStore
from kvbm_codec.texts import demo_document

SPEC = BlockSpec(n_layers=3, page_size=4, n_kv_heads=2, head_dim=5, dtype="float32")


def _kv(n_blocks: int) -> KVCache:
    g = torch.Generator().manual_seed(n_blocks)
    L, H, T, D = SPEC.n_layers, SPEC.n_kv_heads, n_blocks * SPEC.page_size, SPEC.head_dim
    return KVCache(
        torch.randn(L, H, T, D, generator=g), torch.randn(L, H, T, D, generator=g), torch.arange(T), 0
    )


def test_blocks_hold_each_token_where_kvbm_puts_it() -> None:
    """[n, L, 2, P, H*D] with heads outer, head_dim inner: checked element by element, not by inverse."""
    kv = _kv(3)
    stacked = kv_to_blocks(kv, SPEC)
    assert stacked.shape == (3, *SPEC.shape)
    P, D = SPEC.page_size, SPEC.head_dim
    for b, layer, h, p, d in [(0, 0, 0, 0, 0), (2, 1, 1, 3, 4), (1, 2, 0, 2, 3)]:
        t = b * P + p
        assert stacked[b, layer, 0, p, h * D + d] == kv.keys[layer, h, t, d]
        assert stacked[b, layer, 1, p, h * D + d] == kv.values[layer, h, t, d]


def test_conversion_round_trips_and_single_blocks_agree() -> None:
    kv = _kv(2)
    back = blocks_to_kv(kv_to_blocks(kv, SPEC), kv.positions, SPEC)
    assert torch.equal(back.keys, kv.keys) and torch.equal(back.values, kv.values)
    one = kv.select_tokens(torch.arange(SPEC.page_size, 2 * SPEC.page_size))
    block = kv_to_block(one, SPEC)
    assert torch.equal(block, kv_to_blocks(kv, SPEC)[1])
    again = block_to_kv(block, one.positions, SPEC)
    assert torch.equal(again.keys, one.keys) and torch.equal(again.positions, one.positions)


def test_conversion_refuses_what_is_not_whole_blocks() -> None:
    with pytest.raises(InvalidBlockError, match="whole blocks"):
        kv_to_blocks(_kv(2).select_tokens(torch.arange(5)), SPEC)
    with pytest.raises(InvalidBlockError, match="positions"):
        blocks_to_kv(kv_to_blocks(_kv(2), SPEC), torch.arange(3), SPEC)
    with pytest.raises(InvalidBlockError, match="block of"):
        kv_to_block(_kv(2), SPEC)


def test_registry_by_name() -> None:
    assert "kvtc" in codec_names()
    assert get_codec("kvtc") == KVTCBlockCodec.create
    with pytest.raises(UnknownCodecError, match="no block codec named 'nope'"):
        get_codec("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_codec("kvtc", lambda *a: None)  # type: ignore[arg-type,return-value]
    with pytest.raises(ValueError, match="ASCII"):
        register_codec("", KVTCBlockCodec.create)


def _served(cal, spec: BlockSpec) -> tuple[BlockService, ServedModel]:  # type: ignore[no-untyped-def]
    m = ServedModel("m", cal, spec, 8.0)
    return BlockService([m], TieredStore([MemoryTier(1 << 24)])), m


def test_the_frame_codec_field_selects_the_decoder(small_calibration, smollm) -> None:  # type: ignore[no-untyped-def]
    """A registered codec's frames go to that codec; a frame naming an unregistered codec is refused."""
    s = small_calibration.shape
    spec = BlockSpec(s.n_layers, 16, s.n_kv_heads, s.key_head_dim)
    kv, _ = smollm.prefill(smollm.encode(demo_document()[:400])[:, :16], return_logits=False)
    svc, m = _served(small_calibration, spec)
    raw = spec.to_bytes(kv_to_block(kv, spec))
    (put,) = svc.put_blocks("t", "m", [PutItem(1, raw)])
    (got,) = svc.get_blocks("t", "m", [1], as_frames=True)
    assert got.status == "hit" and fr.read_frame(got.data).header.codec == "kvtc"  # type: ignore[arg-type]

    class Tagged(KVTCBlockCodec):
        name = "kvtc-tagged"

    f = fr.read_frame(got.data)  # type: ignore[arg-type]
    sections = [(sec.name, f.section(sec.name)) for sec in f.header.sections]
    retagged = fr.write_frame(f.header.model_copy(update={"codec": "kvtc-tagged", "sections": []}), sections)
    with pytest.raises(IncompatibleFrameError, match="kvtc-tagged"):
        svc.put_blocks("t", "m", [PutItem(2, retagged, is_frame=True)])
    assert svc.get_blocks("t", "m", [2])[0].status == "miss"  # refused whole: nothing stored

    register_codec("kvtc-tagged", lambda cal, sp, cr: Tagged(KVTCBlockCodec.create(cal, sp, cr).codec, sp))
    assert isinstance(m.decoder_for(small_calibration.calibration_id, "kvtc-tagged"), Tagged)
    assert type(m.decoder_for(small_calibration.calibration_id)) is KVTCBlockCodec
    svc.put_blocks("t", "m", [PutItem(2, retagged, is_frame=True)])  # its codec is served now
    assert put.stored_bytes == len(got.data)  # type: ignore[arg-type]
