"""Quantizer and byte packing: exact inverse streams, explicit refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvbm_codec.codec.quantize import (
    Block,
    decode_coefficients,
    encode_coefficients,
    pack_codes,
    quantize_groups,
    unpack_codes,
)


@settings(max_examples=200, deadline=None)
@given(bits=st.integers(1, 8), n=st.integers(0, 300), seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_inverse(bits: int, n: int, seed: int) -> None:
    codes = np.random.default_rng(seed).integers(0, 1 << bits, size=n, dtype=np.uint8)
    assert np.array_equal(unpack_codes(pack_codes(codes, bits), n, bits), codes)


def test_quantization_error_bounded_by_half_step() -> None:
    x = torch.randn(64, 10, 16)
    for bits in (1, 3, 8):
        codes, shift, scale = quantize_groups(x, bits)
        rec = shift.float()[..., None] + codes.float() * scale.float()[..., None]
        step = scale.float()[..., None]
        # fp16 rounding of shift/scale may move the grid slightly: allow a small margin
        assert bool(((rec - x).abs() <= step * 0.5 + step * 0.01 * (1 << bits) + 1e-3).all())


def test_constant_group_decodes_exactly_to_fp16_value() -> None:
    x = torch.full((5, 1, 4), 0.25)
    codes, shift, scale = quantize_groups(x, 4)
    assert bool((scale == 0).all()) and bool((codes == 0).all()) and bool((shift == 0.25).all())


def test_stream_round_trip_and_size_check() -> None:
    blocks = [Block(0, 4, 8), Block(4, 4, 3), Block(8, 8, 0), Block(16, 16, 2)]
    active = [0, 1, 2, 3, 4, 5, 6, 7, *range(16, 32)]
    x = torch.randn(33, 32)[:, active]
    codes, scales = encode_coefficients(x, blocks)
    rec = decode_coefficients(codes, scales, blocks, 33)
    assert rec.shape == x.shape
    assert float((rec[:, :4] - x[:, :4]).abs().max()) < 0.05
    with pytest.raises(ValueError, match="allocation needs"):
        decode_coefficients(codes[:-1], scales, blocks, 33)
    with pytest.raises(ValueError, match="allocation needs"):
        decode_coefficients(codes, scales, blocks, 34)


def test_values_beyond_fp16_range_are_refused() -> None:
    with pytest.raises(ValueError, match="fp16 range"):
        encode_coefficients(torch.tensor([[1e6, 0.0]]), [Block(0, 2, 4)])
