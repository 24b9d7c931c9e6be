"""vLLM CPU chunk <-> service block conversion writing into a given buffer (the native tier writes
chunks straight into NIXL staging and restored blocks straight into vLLM's primary-tier slots):
the same bytes as the allocating conversion, every byte of the destination written, bad buffers
refused. Random blocks: the conversion is a permutation, real KV is checked in test_vllm_engine."""

from __future__ import annotations

import pytest
import torch

from kvbm_codec.api.blocks import BlockSpec, InvalidBlockError
from kvbm_codec.api.vllm_layout import VllmCpuLayout


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("key_order", ["dt", "td"])
def test_conversion_into_a_buffer_matches_and_fills_it(dtype, key_order):
    spec = BlockSpec(4, 32, 3, 64, dtype)  # 49152 B fp32 (4096-aligned), 24576 B fp16
    lay = VllmCpuLayout(spec, key_order)
    block = torch.randn(spec.shape, generator=torch.Generator().manual_seed(0)).to(spec.torch_dtype)
    chunk = lay.block_to_chunk(block)
    slot = torch.full((lay.chunk_bytes,), 0xA5, dtype=torch.uint8)  # stale bytes of a reused slot
    assert lay.block_to_chunk(block, out=slot).data_ptr() == slot.data_ptr()
    assert torch.equal(slot, chunk)
    staging = torch.full(spec.shape, float("nan"), dtype=spec.torch_dtype)
    lay.chunk_to_block(slot, out=staging)
    assert torch.equal(staging, block)
    assert torch.equal(lay.chunk_to_block(chunk.numpy().tobytes()), block)


def test_padding_is_zeroed_in_a_reused_slot():
    spec = BlockSpec(3, 32, 3, 60, "float16")  # 69120 B payload -> 69632 B chunk
    lay = VllmCpuLayout(spec)
    assert lay.chunk_bytes > lay.payload_bytes
    slot = torch.full((lay.chunk_bytes,), 0xFF, dtype=torch.uint8)
    lay.block_to_chunk(torch.zeros(spec.shape, dtype=torch.float16), out=slot)
    assert int(slot.count_nonzero()) == 0


def test_bad_destination_buffers_are_refused():
    spec = BlockSpec(4, 32, 3, 64, "float32")
    lay = VllmCpuLayout(spec)
    block = torch.zeros(spec.shape)
    with pytest.raises(InvalidBlockError):
        lay.block_to_chunk(block, out=torch.empty(lay.chunk_bytes - 4096, dtype=torch.uint8))
    with pytest.raises(ValueError, match="contiguous uint8"):
        lay.block_to_chunk(block, out=torch.empty(lay.chunk_bytes // 4, dtype=torch.float32))
    strided = torch.empty((spec.shape[0], spec.shape[1], spec.shape[2], 2 * spec.shape[3]))[..., ::2]
    with pytest.raises(ValueError, match="contiguous block"):
        lay.chunk_to_block(lay.block_to_chunk(block), out=strided)
    with pytest.raises(InvalidBlockError):
        lay.chunk_to_block(lay.block_to_chunk(block), out=torch.empty(spec.shape, dtype=torch.float16))
