"""KVBM adapter: KVBM's layouts round-trip real model KV exactly, and a conversation offloaded through the
service, dropped, and onboarded again continues as well as the codec allows: the codec run directly on
the same blocks, bit for bit or but for a coefficient at a rounding boundary (_smollm2.SAME_RESTORE)."""

from __future__ import annotations

import os
from dataclasses import replace

import _smollm2
import pytest
import torch
import xxhash
from _smollm2 import MODEL, SPEC

from kvbm_codec.adapters.kvbm import (
    XXH3_SEED,
    KvbmBlocks,
    KvbmLayout,
    KvbmTierClient,
    concat_tokens,
    kv_to_kvbm,
    kvbm_to_kv,
    sequence_hashes,
)
from kvbm_codec.api.blocks import BlockSpec, InvalidBlockError, kv_to_block
from kvbm_codec.api.types import BlockTransport
from kvbm_codec.codec.block import KVTCBlockCodec
from kvbm_codec.core.service import BlockService, ServiceTransport
from kvbm_codec.eval.metrics import perplexity, top1_agreement
from kvbm_codec.kv import KVCache
from kvbm_codec.store.memory import MemoryTier
from kvbm_codec.store.tiered import TieredStore
from kvbm_codec.texts import demo_conversation

TARGET_CR = 20.0
CONTINUATION = 64


def _spec(page_size: int = 32) -> BlockSpec:
    return replace(SPEC, page_size=page_size)


@pytest.fixture(scope="module")
def conversation_ids(smollm) -> torch.Tensor:
    text = demo_conversation(smollm.tokenizer)
    return smollm.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]


@pytest.fixture(scope="module")
def kv_1k(smollm, conversation_ids) -> KVCache:
    """1000 tokens: 31 full 32-token pages (62 of 16) and a partial tail of 8 tokens."""
    kv, _ = smollm.prefill(conversation_ids[:, :1000], return_logits=False)
    return kv


def _service(cal) -> BlockService:
    return BlockService([_smollm2.served(cal, target_cr=TARGET_CR)], TieredStore([MemoryTier(1 << 30)]))


# ---- hashes -------------------------------------------------------------------------------------


def test_sequence_hashes_are_dynamos_chain():
    tokens = list(range(100, 100 + 70))
    hs = sequence_hashes(tokens, 32)
    assert len(hs) == 2  # the 6-token tail has no hash
    b0 = xxhash.xxh3_64_intdigest(torch.tensor(tokens[:32], dtype=torch.int32).numpy().tobytes(), seed=1337)
    b1 = xxhash.xxh3_64_intdigest(torch.tensor(tokens[32:64], dtype=torch.int32).numpy().tobytes(), seed=1337)
    assert hs[0] == b0
    assert hs[1] == xxhash.xxh3_64_intdigest(
        b0.to_bytes(8, "little") + b1.to_bytes(8, "little"), seed=XXH3_SEED
    )
    # A shared prefix shares hashes; a changed token changes its block's hash and every later one.
    other = [*tokens[:40], 7, *tokens[41:]]
    ho = sequence_hashes(other, 32)
    assert ho[0] == hs[0] and ho[1] != hs[1]
    # Same block content after a different prefix is a different sequence hash.
    swapped = tokens[32:64] + tokens[:32]
    assert sequence_hashes(swapped, 32)[1] != hs[0]
    with pytest.raises(ValueError):
        sequence_hashes([-1] * 32, 32)


# ---- layouts ------------------------------------------------------------------------------------


def _region_offset(layout: KvbmLayout, spec: BlockSpec, n_blocks: int, b: int, layer: int, outer: int):
    """(tensor index, element offset) of page (block, layer, outer) as kvbm's Rust layouts compute it
    (layout.rs: FullyContiguous strides outer -> layer -> block; layer_separate.rs per layer)."""
    page = spec.page_size * spec.inner
    if layout is KvbmLayout.FULLY_CONTIGUOUS:
        return 0, ((b * spec.n_layers + layer) * 2 + outer) * page
    if layout is KvbmLayout.LAYER_SEPARATE_OUTER:
        return layer, (outer * n_blocks + b) * page
    return layer, (b * 2 + outer) * page


@pytest.mark.parametrize("page_size", [16, 32])
@pytest.mark.parametrize("layout", list(KvbmLayout))
def test_layout_round_trip_is_exact(kv_1k, conversation_ids, layout, page_size):
    spec = _spec(page_size)
    ids = conversation_ids[0, :1000]
    blocks, tail = kv_to_kvbm(kv_1k, ids, spec, layout)
    n = 1000 // page_size
    assert blocks.n_blocks == n and blocks.first_positions == [i * page_size for i in range(n)]
    assert blocks.sequence_hashes == sequence_hashes(ids, page_size)
    assert tail is not None and tail.positions.tolist() == list(range(n * page_size, 1000))
    assert all(t.is_contiguous() for t in blocks.tensors)

    # Every page sits where kvbm's own offset arithmetic puts it, and holds the right tokens.
    kv16 = kv_1k.to(torch.float16)
    for b in (0, 1, n - 1):
        for layer in (0, 7, 29):
            for outer, src in enumerate((kv16.keys, kv16.values)):
                ti, off = _region_offset(layout, spec, n, b, layer, outer)
                flat = blocks.tensors[ti].reshape(-1)
                page = flat[off : off + page_size * spec.inner].reshape(page_size, spec.n_kv_heads, -1)
                want = src[layer, :, b * page_size : (b + 1) * page_size].transpose(0, 1)
                assert torch.equal(page, want)

    # Each block equals the service's block shape, and the whole cache comes back bit for bit.
    sub = kv_1k.select_tokens(torch.arange(page_size, 2 * page_size))
    assert torch.equal(blocks.block(1), kv_to_block(sub, spec))
    back = kvbm_to_kv(blocks)
    full = kv16.select_tokens(torch.arange(n * page_size))
    assert torch.equal(back.keys, full.keys) and torch.equal(back.values, full.values)
    assert torch.equal(back.positions, full.positions)
    # Layout conversions agree with each other.
    again = KvbmBlocks.from_canonical(
        blocks.canonical(), spec, KvbmLayout.FULLY_CONTIGUOUS, blocks.sequence_hashes, blocks.first_positions
    )
    assert torch.equal(again.tensors[0], kv_to_kvbm(kv_1k, ids, spec)[0].tensors[0])


def test_layout_refuses_what_is_not_a_conversation(kv_1k, conversation_ids):
    spec = _spec()
    ids = conversation_ids[0, :1000]
    with pytest.raises(InvalidBlockError, match="token ids"):
        kv_to_kvbm(kv_1k, ids[:999], spec)
    evicted = kv_1k.select_tokens(torch.cat([torch.arange(10), torch.arange(20, 1000)]))
    with pytest.raises(InvalidBlockError, match="consecutive"):
        kv_to_kvbm(evicted, ids[:990], spec)
    with pytest.raises(InvalidBlockError, match="does not fit"):
        kv_to_kvbm(kv_1k.select_layers(0, 29), ids, spec)
    with pytest.raises(InvalidBlockError, match="sequence hashes"):
        kv_to_kvbm(kv_1k, ids, spec, hashes=[1, 2, 3])
    blocks, _ = kv_to_kvbm(kv_1k, ids, spec, KvbmLayout.LAYER_SEPARATE_OUTER)
    with pytest.raises(InvalidBlockError, match="must be"):
        KvbmBlocks(
            spec,
            KvbmLayout.LAYER_SEPARATE_BLOCK,
            blocks.tensors,
            blocks.sequence_hashes,
            blocks.first_positions,
        )
    with pytest.raises(InvalidBlockError, match="first positions"):
        KvbmBlocks(spec, blocks.layout, blocks.tensors, blocks.sequence_hashes, blocks.first_positions[:-1])


# ---- offload / onboard through the service --------------------------------------------------------


def _direct_codec_blocks(cal, blocks: KvbmBlocks, exact_from: int) -> torch.Tensor:
    """What the codec alone makes of the same blocks, window blocks stored exactly: the bound. Built as
    the service builds its block codec (the allocation sized on block frames when there is one)."""
    codec = KVTCBlockCodec.create(cal, blocks.spec, TARGET_CR)
    out = []
    for i in range(blocks.n_blocks):
        frame, _ = codec.encode(blocks.block(i), blocks.positions(i), compress=i < exact_from)
        out.append(codec.decode(frame)[0])
    return torch.stack(out)


def _same_decode(a: torch.Tensor, b: torch.Tensor, original: torch.Tensor) -> bool:
    """Two onboards of the same frames: the same blocks, or nearly (another batch split may round a
    matmul differently on some CPUs, _smollm2.SAME_RESTORE)."""
    return a.shape == b.shape and _smollm2.same_restore(a, b, original)


def _offload_drop_onboard_continue(
    smollm, cal, ids: torch.Tensor, n_ctx: int, layout: KvbmLayout, kv: KVCache | None = None
):
    spec = _spec()
    ctx, cont = ids[:, :n_ctx], ids[:, n_ctx : n_ctx + CONTINUATION]
    if kv is None:
        kv, _ = smollm.prefill(ctx, return_logits=False)
    blocks, tail = kv_to_kvbm(kv, ctx[0], spec, layout)
    assert tail is not None  # n_ctx is chosen with a partial last page: it stays with the engine

    service = _service(cal)
    transport = ServiceTransport(service, "tenant-a", MODEL)
    assert isinstance(transport, BlockTransport)
    client = KvbmTierClient(transport, spec, layout=layout, window_tokens=128)
    report = client.offload(blocks, context_tokens=n_ctx)
    # The window is the last 128 tokens of the conversation, tail included: 8 tail tokens + 4 pages.
    exact_from = blocks.n_blocks - 4
    assert (report.compressed, report.exact) == (exact_from, 4)
    assert report.ratio > 4  # a codec that stored raw blocks would be ~1x

    # The engine drops its copy: only the hashes, positions and the partial tail remain.
    hashes, firsts = list(blocks.sequence_hashes), list(blocks.first_positions)
    del blocks
    got = client.onboard(hashes, firsts)
    assert got.complete and got.blocks.n_blocks == len(hashes) and got.blocks.layout is layout

    # The codec run directly on the same KV, bit for bit or but for a few coefficients at a rounding
    # boundary (_smollm2.SAME_RESTORE): the service path adds no error.
    original, _ = kv_to_kvbm(kv, ctx[0], spec)
    direct = _direct_codec_blocks(cal, original, exact_from)
    onboarded = got.blocks.canonical()
    head = slice(0, exact_from)
    assert _smollm2.same_restore(onboarded[head], direct[head], original.canonical()[head]), (
        _smollm2.restore_offset(onboarded[head], direct[head], original.canonical()[head])
    )
    # Window blocks are exact, compressed ones are not.
    assert torch.equal(onboarded[exact_from:], original.canonical()[exact_from:])
    assert not torch.equal(onboarded[:exact_from], original.canonical()[:exact_from])

    restored = concat_tokens(kvbm_to_kv(got.blocks).to(torch.float32), tail)
    assert torch.equal(restored.positions, kv.positions)
    ref = smollm.logits_with_cache(kv, cont)
    test = smollm.logits_with_cache(restored, cont)
    direct_blocks = KvbmBlocks.from_canonical(direct, spec, layout, hashes, firsts)
    bound = smollm.logits_with_cache(concat_tokens(kvbm_to_kv(direct_blocks).to(torch.float32), tail), cont)
    targets = cont[0, 1:]
    agree, agree_bound = top1_agreement(ref[:-1], test[:-1]), top1_agreement(ref[:-1], bound[:-1])
    ppl_ref, ppl, ppl_bound = (perplexity(x[:-1], targets) for x in (ref, test, bound))
    print(
        f"\n{n_ctx} tokens {layout.value}: {report.ratio:.1f}x over {len(hashes)} blocks; top-1 {agree:.3f} "
        f"(codec direct {agree_bound:.3f}), ppl {ppl_ref:.3f} -> {ppl:.3f} (codec direct {ppl_bound:.3f})"
    )
    # as well as the codec allows: a few coefficients at a rounding boundary move perplexity ~1e-5
    assert abs(agree - agree_bound) <= 1 / len(targets) and ppl == pytest.approx(ppl_bound, rel=1e-3)
    # Loose sanity floors that only a broken restore (wrong layout, positions, dtype) would cross.
    assert agree >= 0.6 and ppl < 2.0 * ppl_ref

    # Generation continues from the restored cache.
    generated = smollm.generate(restored, cont[:, :1], 8, stop_at_eos=False)
    assert len(generated) == 8

    # Into memory the caller already holds (an engine's pages): the same KV, there, and only there.
    pages = torch.full((len(hashes) + 1, *spec.shape), 7.0, dtype=spec.torch_dtype)
    into = client.onboard(hashes, firsts, out=pages)
    assert torch.equal(pages[:-1], into.blocks.canonical()) and bool((pages[-1] == 7.0).all())
    assert _same_decode(into.blocks.canonical(), onboarded, original.canonical())
    with pytest.raises(InvalidBlockError, match="out must be"):
        client.onboard(hashes, firsts, out=pages[:2])

    # Blocks dropped from the tier become misses; onboarding stops at the first one.
    assert client.drop(hashes[5:6]) == 1
    partial = client.onboard(hashes, firsts)
    assert partial.misses == [hashes[5]] and partial.blocks.n_blocks == 5
    assert _same_decode(partial.blocks.canonical(), onboarded[:5], original.canonical()[:5])
    # A hash asked for at other positions than it was stored with is a miss, not wrong KV.
    shifted = client.onboard(hashes[:2], [firsts[0] + 32, firsts[1]])
    assert shifted.misses == [hashes[0]] and shifted.blocks.n_blocks == 0


def test_offload_drop_onboard_continue_1k(smollm, small_calibration, conversation_ids, kv_1k):
    _offload_drop_onboard_continue(
        smollm, small_calibration, conversation_ids, 1000, KvbmLayout.LAYER_SEPARATE_OUTER, kv_1k
    )


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("KVBM_CODEC_LONG_TESTS") != "1",
    reason="4k-token prefill + 127-block encode: minutes on 2 cores; set KVBM_CODEC_LONG_TESTS=1",
)
def test_offload_drop_onboard_continue_4k(smollm, small_calibration, conversation_ids):
    _offload_drop_onboard_continue(
        smollm, small_calibration, conversation_ids, 4090, KvbmLayout.FULLY_CONTIGUOUS
    )


def test_offload_validates_and_tenants_are_separate(kv_1k, conversation_ids, small_calibration):
    spec = _spec()
    blocks, _ = kv_to_kvbm(kv_1k, conversation_ids[0, :1000], spec)
    service = _service(small_calibration)
    a = KvbmTierClient(ServiceTransport(service, "tenant-a", MODEL), spec, window_tokens=0)
    b = KvbmTierClient(ServiceTransport(service, "tenant-b", MODEL), spec)
    with pytest.raises(InvalidBlockError, match="serves"):
        KvbmTierClient(ServiceTransport(service, "t", MODEL), _spec(16)).offload(blocks)
    head = KvbmBlocks.from_canonical(
        blocks.canonical()[:2], spec, blocks.layout, blocks.sequence_hashes[:2], blocks.first_positions[:2]
    )
    report = a.offload(head)
    assert (report.compressed, report.exact) == (2, 0)
    assert b.onboard(head.sequence_hashes, head.first_positions).misses == head.sequence_hashes
    with pytest.raises(ValueError, match="first positions"):
        a.onboard(head.sequence_hashes, [0])
