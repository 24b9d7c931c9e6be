"""Quantizer, byte packing and the rotation: exact inverse streams, explicit refusals, and the batched
decoder's buffer-reusing paths bit-identical to the plain ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvbm_codec.codec.quantize import (
    Block,
    Tiling,
    decode_coefficients,
    decode_coefficients_batch,
    dequantize_batch_into,
    encode_coefficients,
    encode_coefficients_batch,
    pack_codes,
    quantize_groups,
    unpack_codes,
)
from kvbm_codec.codec.rope import rotate, rotate_


@settings(max_examples=200, deadline=None)
@given(bits=st.integers(1, 8), n=st.integers(0, 300), seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_inverse(bits: int, n: int, seed: int) -> None:
    codes = np.random.default_rng(seed).integers(0, 1 << bits, size=n, dtype=np.uint8)
    assert np.array_equal(unpack_codes(pack_codes(codes, bits), n, bits), codes)


@pytest.mark.parametrize("symmetric", [False, True])
def test_quantization_error_bounded_by_half_step(symmetric: bool) -> None:
    x = torch.randn(64, 10, 16)
    for bits in (1, 3, 8):
        codes, shift, scale = quantize_groups(x, bits, symmetric)
        rec = shift.float()[..., None] + codes.float() * scale.float()[..., None]
        step = scale.float()[..., None]
        # fp16 rounding of shift/scale may move the grid slightly: allow a small margin
        assert bool(((rec - x).abs() <= step * 0.5 + step * 0.01 * (1 << bits) + 1e-3).all())


def test_constant_group_decodes_exactly_to_fp16_value() -> None:
    x = torch.full((5, 1, 4), 0.25)
    codes, shift, scale = quantize_groups(x, 4)
    assert bool((scale == 0).all()) and bool((codes == 0).all()) and bool((shift == 0.25).all())


@pytest.mark.parametrize("symmetric", [False, True])
def test_stream_round_trip_and_size_check(symmetric: bool) -> None:
    blocks = [Block(0, 4, 8), Block(4, 4, 3), Block(8, 8, 0), Block(16, 16, 2)]
    active = [0, 1, 2, 3, 4, 5, 6, 7, *range(16, 32)]
    x = torch.randn(33, 32)[:, active]
    codes, scales = encode_coefficients(x, blocks, symmetric)
    rec = decode_coefficients(codes, scales, blocks, 33, symmetric)
    assert rec.shape == x.shape
    assert float((rec[:, :4] - x[:, :4]).abs().max()) < 0.05
    # a symmetric group stores its scale only: half the side information
    assert len(scales) == 33 * 3 * 2 * (1 if symmetric else 2)
    with pytest.raises(ValueError, match="allocation needs"):
        decode_coefficients(codes[:-1], scales, blocks, 33, symmetric)
    with pytest.raises(ValueError, match="allocation needs"):  # the other kind's streams never fit
        decode_coefficients(codes, scales, blocks, 33, not symmetric)
    with pytest.raises(ValueError, match="allocation needs"):
        decode_coefficients(codes, scales, blocks, 34, symmetric)


def test_symmetric_groups_are_symmetric_around_zero() -> None:
    """+-max|x| is the range: -x quantizes to the mirrored code, and 0 to the middle of the grid."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(16, 4, 64, generator=g)
    for bits in (1, 2, 5):
        levels = (1 << bits) - 1
        codes, shift, scale = quantize_groups(x, bits, symmetric=True)
        mirrored, _, scale_m = quantize_groups(-x, bits, symmetric=True)
        assert torch.equal(scale, scale_m) and torch.equal(shift, -scale.float() * levels / 2)
        # rounding ties aside, -x's code mirrors x's
        assert float((codes.int() + mirrored.int() == levels).float().mean()) > 0.99


def test_values_beyond_fp16_range_are_refused() -> None:
    with pytest.raises(ValueError, match="fp16 range"):
        encode_coefficients(torch.tensor([[1e6, 0.0]]), [Block(0, 2, 4)])
    with pytest.raises(ValueError, match="fp16 range"):  # a symmetric 1-bit scale would be 2 x 40000
        encode_coefficients(torch.tensor([[4e4, 0.0]]), [Block(0, 2, 1)], symmetric=True)


@pytest.mark.parametrize("symmetric", [False, True])
def test_batched_dequantization_is_the_per_frame_one_bit_for_bit(symmetric: bool) -> None:
    """The batched decoder writes each run straight into its columns; the values must be exactly
    those of ``decode_coefficients`` (one product and one sum per code, in the same order)."""
    blocks = [Block(0, 4, 8), Block(4, 4, 3), Block(8, 8, 0), Block(16, 16, 2), Block(32, 8, 1)]
    active = [*range(8), *range(16, 40)]
    g = torch.Generator().manual_seed(3)
    frames = [torch.randn(29, 40, generator=g)[:, active] * (i + 1) for i in range(5)]
    streams = [encode_coefficients(x, blocks, symmetric) for x in frames]
    codes = np.stack([np.frombuffer(c, dtype=np.uint8) for c, _ in streams])
    scales = np.stack([np.frombuffer(s, dtype=np.uint8) for _, s in streams])
    batch = encode_coefficients_batch(torch.cat(frames), blocks, 5, symmetric)
    assert np.array_equal(batch[0], codes) and np.array_equal(batch[1], scales)
    tiling = Tiling.of(blocks, symmetric)
    out = torch.full((5 * 29, tiling.n_active), float("nan"))
    dequantize_batch_into(codes, scales, tiling, 29, out)
    ref = torch.cat([decode_coefficients(c, s, blocks, 29, symmetric) for c, s in streams])
    got = decode_coefficients_batch(codes, scales, blocks, 29, symmetric)
    assert torch.equal(out, ref) and torch.equal(got, ref)
    assert tiling.stream_sizes(29) == (codes.shape[1], scales.shape[1])
    with pytest.raises(ValueError, match="allocation needs"):
        dequantize_batch_into(codes[:, :-1], scales, tiling, 29, out)
    with pytest.raises(ValueError, match="output must be"):
        dequantize_batch_into(codes, scales, tiling, 29, out[:-1])


@pytest.mark.parametrize("inverse", [False, True])
def test_rotation_in_place_or_into_a_buffer_is_the_same_rotation(inverse: bool) -> None:
    """``rotate_`` and ``rotate(out=...)`` (the codec's reused buffers) give ``rotate``'s values
    bit for bit, partial rotary dims (passed through) included."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(37, 6, 24, generator=g) * 50
    cos, sin = torch.randn(37, 1, 8, generator=g), torch.randn(37, 1, 8, generator=g)
    ref = rotate(x, cos, sin, 16, inverse=inverse)
    buf = torch.full_like(x, float("nan"))
    assert rotate(x, cos, sin, 16, inverse=inverse, out=buf) is buf and torch.equal(buf, ref)
    same = x.clone()
    assert rotate_(same, cos, sin, 16, inverse=inverse) is same and torch.equal(same, ref)
    assert torch.equal(ref[..., 16:], x[..., 16:])
