"""DP bit allocation: the fast hierarchical DP must equal a brute-force DP over all aligned tilings."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kvbm_codec.codec.allocation import Allocation, ErrorTable, allocate, allocate_for_ratio, predicted_error
from kvbm_codec.codec.config import CodecConfig
from kvbm_codec.codec.quantize import (
    Block,
    active_components,
    block_error_table,
    decode_coefficients,
    encode_coefficients,
)

SIZES = (1, 4, 16)


def _reference_dp(table: ErrorTable, lam: float, scale_bits: int) -> float:
    """Plain O(r * |sizes| * bits) DP over positions, no hierarchy assumed."""
    r = table.rank
    value = [math.inf] * (r + 1)
    value[r] = 0.0
    for i in range(r - 1, -1, -1):
        for g, t in table.tables.items():
            if i % g or i + g > r:
                continue
            for bits in range(t.shape[0]):
                rate = g * bits + scale_bits if bits else 0
                value[i] = min(value[i], table.weight * t[bits, i // g] + lam * rate + value[i + g])
    return value[0]


def _cost(table: ErrorTable, blocks: list[Block], lam: float, scale_bits: int) -> float:
    return sum(
        table.weight * table.tables[b.size][b.bits, b.start // b.size]
        + lam * (b.size * b.bits + scale_bits if b.bits else 0)
        for b in blocks
    )


@pytest.fixture(scope="module")
def coeffs() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    rank = 37  # deliberately not a multiple of the largest group size
    return torch.randn(400, rank, generator=g) * torch.logspace(1.5, -2, rank)


@pytest.mark.parametrize("lam", [1e-5, 1e-3, 1e-2, 0.1, 1.0, 10.0])
def test_hierarchical_dp_is_optimal(coeffs: torch.Tensor, lam: float) -> None:
    table = ErrorTable(coeffs.shape[1], block_error_table(coeffs, SIZES, 8))
    blocks = allocate({"x": table}, lam, 32).blocks["x"]
    assert [b.start for b in blocks] == sorted(b.start for b in blocks)
    assert sum(b.size for b in blocks) == coeffs.shape[1]
    assert all(b.start % b.size == 0 for b in blocks)
    assert _cost(table, blocks, lam, 32) == pytest.approx(_reference_dp(table, lam, 32), rel=1e-12)


def test_allocation_is_not_uniform_and_favours_leading_components(coeffs: torch.Tensor) -> None:
    table = ErrorTable(coeffs.shape[1], block_error_table(coeffs, SIZES, 8))
    blocks = allocate({"x": table}, 1e-2, 32).blocks["x"]
    bits_per_comp = np.concatenate([[b.bits] * b.size for b in blocks])
    assert len(set(bits_per_comp.tolist())) >= 3, "a DP allocation should use several widths"
    assert bits_per_comp[0] > bits_per_comp[-1]
    assert bits_per_comp[-1] == 0, "trailing low-variance components should be dropped"


def test_bits_fall_and_error_grows_with_lambda(coeffs: torch.Tensor) -> None:
    tables = {"x": ErrorTable(coeffs.shape[1], block_error_table(coeffs, SIZES, 8))}
    prev_bits, prev_err = math.inf, -1.0
    for lam in [1e-5, 1e-3, 1e-2, 1e-1, 1.0]:
        a = allocate(tables, lam, 32)
        bits, err = a.bits_per_token(32), predicted_error(tables, a)["x"]
        assert bits <= prev_bits and err >= prev_err
        prev_bits, prev_err = bits, err


def test_predicted_error_equals_real_quantization_error(coeffs: torch.Tensor) -> None:
    """On the data the table was measured on, the DP's prediction is the actual round-trip MSE."""
    tables = {"x": ErrorTable(coeffs.shape[1], block_error_table(coeffs, SIZES, 8))}
    a = allocate(tables, 1e-3, 32)
    blocks = a.blocks["x"]
    active = active_components(blocks)
    codes, scales = encode_coefficients(coeffs[:, active], blocks)
    rec = torch.zeros_like(coeffs)
    rec[:, active] = decode_coefficients(codes, scales, blocks, coeffs.shape[0])
    real = float(((rec - coeffs).double() ** 2).sum(1).mean())
    assert real == pytest.approx(predicted_error(tables, a)["x"], rel=1e-6)


def test_allocate_for_ratio_meets_target_with_a_real_measure(coeffs: torch.Tensor) -> None:
    tables = {"x": ErrorTable(coeffs.shape[1], block_error_table(coeffs, SIZES, 8))}
    reference_bits = 16 * coeffs.shape[1]

    def nominal_ratio(a: Allocation) -> float:
        return reference_bits / max(1, a.bits_per_token(32))

    for target in (2.0, 4.0, 8.0):
        a = allocate_for_ratio(tables, target, 32, nominal_ratio)
        assert nominal_ratio(a) >= target
        assert a.meta["target_cr"] == target
    with pytest.raises(ValueError, match="no allocation reaches"):
        allocate_for_ratio(tables, 1e9, 32, lambda a: 1.0)


def test_a_warm_started_bisection_finds_as_good_an_allocation_in_fewer_encodes(coeffs: torch.Tensor) -> None:
    """Block allocations start from their context allocation's lambda: the bracket around it must
    still hold the answer when the guess is off (far above, far below), and meet the target."""
    tables = {"x": ErrorTable(coeffs.shape[1], block_error_table(coeffs, SIZES, 8))}
    reference_bits = 16 * coeffs.shape[1]
    calls = [0]

    def nominal_ratio(a: Allocation) -> float:
        calls[0] += 1
        return reference_bits / max(1, a.bits_per_token(32))

    for target in (2.0, 4.0, 8.0):
        calls[0] = 0
        cold = allocate_for_ratio(tables, target, 32, nominal_ratio)
        cold_calls = calls[0]
        for guess in (cold.meta["lambda"] * 1.1, cold.meta["lambda"] * 1e4, cold.meta["lambda"] * 1e-4):
            calls[0] = 0
            warm = allocate_for_ratio(tables, target, 32, nominal_ratio, near=guess)
            assert nominal_ratio(warm) >= target
            # the same rate to the bisection's precision (lambda within 0.01 decades -> bits within a few)
            assert abs(warm.bits_per_token(32) - cold.bits_per_token(32)) <= 0.02 * cold.bits_per_token(32)
            if guess == cold.meta["lambda"] * 1.1:
                assert calls[0] < cold_calls
    with pytest.raises(ValueError, match="no allocation reaches"):
        allocate_for_ratio(tables, 1e9, 32, lambda a: 1.0, near=1e-3)


def test_the_bisection_measures_each_tiling_once(
    coeffs: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lambdas that give a tiling already measured reuse its ratio: fewer real encodes, and the search
    still sees one ratio per tiling, so it takes the same steps."""
    from kvbm_codec.codec import allocation as allocation_module

    tables = {"x": ErrorTable(coeffs.shape[1], block_error_table(coeffs, SIZES, 8))}
    reference_bits = 16 * coeffs.shape[1]
    measured: list[str] = []
    dp_calls = [0]
    dp = allocation_module.allocate

    def counted_dp(*args, **kwargs):  # type: ignore[no-untyped-def]
        dp_calls[0] += 1
        return dp(*args, **kwargs)

    def ratio(a: Allocation) -> float:
        measured.append(a.allocation_id)
        return reference_bits / max(1, a.bits_per_token(32))

    monkeypatch.setattr(allocation_module, "allocate", counted_dp)
    for near in (None, 1e-3):
        measured.clear()
        dp_calls[0] = 0
        a = allocate_for_ratio(tables, 4.0, 32, ratio, near=near)
        assert len(measured) == len(set(measured))
        assert dp_calls[0] > len(measured)  # some steps met a tiling already measured
        assert a.meta["calibration_cr"] == ratio(a) >= 4.0


def test_allocation_json_round_trip_and_id(coeffs: torch.Tensor) -> None:
    tables = {"x": ErrorTable(coeffs.shape[1], block_error_table(coeffs, SIZES, 8))}
    a = allocate(tables, 1e-2, 32)
    b = Allocation.from_json(a.to_json())
    assert b.blocks == a.blocks and b.allocation_id == a.allocation_id
    c = allocate(tables, 1e-1, 32)
    assert c.allocation_id != a.allocation_id


def test_group_sizes_must_be_a_divisibility_chain() -> None:
    with pytest.raises(ValueError, match="divisibility chain"):
        CodecConfig(group_sizes=(1, 16, 24))
    with pytest.raises(ValueError, match="include 1"):
        CodecConfig(group_sizes=(16, 64))
