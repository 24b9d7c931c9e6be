"""The RoPE position search (codec/positions.py) and the layout check's figures on real model KV at
real positions: blocks of the demo text prefilled from position 0 and of a calibration-domain text
prefilled at positions from 5120 (a context whose first token sits there), with the small test
calibration (6-layer bases: 5 layer groups)."""

from __future__ import annotations

import pytest
import torch
from _smollm2 import block_of
from transformers import DynamicCache

from kvbm_codec.codec.layout_check import LayoutChecker, sample_tokens
from kvbm_codec.codec.positions import PositionEstimator, PositionSearch
from kvbm_codec.codec.rope import undo_rope
from kvbm_codec.models.hf import DEFAULT_CHUNK, kv_from_dynamic_cache

FAR = 5120  # first position of the second context


def _keys(smollm, text: str, first: int, n_blocks: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(keys, values) [N, L, P, H, D] float32 of the blocks of ``text`` prefilled at positions from
    ``first`` (fp16 first, as the engine holds them), and the blocks' true first positions."""
    ids = smollm.encode(text)[:, : n_blocks * 32]
    cache = DynamicCache()
    with torch.inference_mode():
        smollm._run(ids, cache, first, DEFAULT_CHUNK, False)  # the prefill, RoPE positions from `first`
    kv = kv_from_dynamic_cache(cache, torch.arange(first, first + ids.shape[1])).to(torch.float16)
    blocks = torch.stack([block_of(kv, b) for b in range(n_blocks)])
    parts = blocks.reshape(n_blocks, 30, 2, 32, 3, 64).float()
    return parts[:, :, 0].contiguous(), parts[:, :, 1].contiguous(), [first + 32 * b for b in range(n_blocks)]


@pytest.fixture(scope="module")
def real(smollm) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    from kvbm_codec.texts import calibration_texts, demo_document

    near = _keys(smollm, demo_document(), 0, 8)
    far = _keys(smollm, "\n".join(calibration_texts()[40:44]), FAR, 8)
    return torch.cat([near[0], far[0]]), torch.cat([near[1], far[1]]), near[2] + far[2]


@pytest.fixture(scope="module")
def est(small_calibration) -> PositionEstimator:
    return PositionEstimator(small_calibration, PositionSearch(max_position=8192, alignment=32))


def test_the_search_finds_the_true_first_position_of_real_keys(est, real) -> None:
    keys, _, first = real
    one_pass = [p.position for p in est.place_many(keys)]
    two_pass = [p.position for p in est.place_many(keys, residual=False)]
    assert one_pass == first
    assert two_pass == first
    # the first pass alone (every winner accepted) is right on real keys too: the test sees it decide
    eager = PositionEstimator(est.cal, PositionSearch(max_position=8192, alignment=32, quick_margin=1.0))
    assert [p.position for p in eager.place_many(keys, residual=False)] == first


def test_two_pass_refine_gives_the_one_pass_figures(est, real) -> None:
    keys, values, _ = real
    g = torch.Generator().manual_seed(3)
    for what in (keys, values, torch.randn(keys[:4].shape, generator=g)):  # real, K/V swapped, noise
        a, b = est.place_many(what), est.place_many(what, residual=False)
        for x, y in zip(a, b, strict=True):
            if what is keys:
                assert x.position == y.position
            if x.position == y.position:
                assert y.key_energy == pytest.approx(x.key_energy, rel=1e-4)
            assert y.key_residual != y.key_residual  # NaN: not computed, never a stale figure
    # at given positions (a client sent them): the same energies without the residual
    given = [p.position for p in est.place_many(keys)]
    for x, y in zip(est.at(keys, given), est.at(keys, given, residual=False), strict=True):
        assert (y.position, y.key_energy) == (x.position, pytest.approx(x.key_energy, rel=1e-4))


def test_frequency_split_equals_derotating_every_candidate(est, real) -> None:
    """The split's residual and energy tables against the plain computation: de-rotate the sampled
    tokens at each candidate start, normalise and project on every layer group's basis."""
    keys, _, first = real
    keys = keys[[0, 3, 9, 14]]
    starts = torch.tensor([[first[i], first[i] + 32, 64, 4096] for i in (0, 3, 9, 14)])
    res, tot = est.residual_table(keys, starts)  # [N, K, T, G]
    tok = sample_tokens(32, est.search.refine_tokens)
    for n in range(keys.shape[0]):
        for k in range(starts.shape[1]):
            x = keys[n][:, tok].permute(0, 2, 1, 3)  # [L, H, T, D]
            y = undo_rope(x, starts[n, k] + tok, est.cal.rope).permute(2, 0, 1, 3)  # [T, L, H, D]
            r, t = est.bases.residual(y.contiguous())
            assert torch.allclose(res[n, k].sum(-1).double(), r, rtol=2e-4, atol=1e-3)
            assert torch.allclose(tot[n, k].sum(-1).double(), t, rtol=2e-5)


def test_value_energy_is_value_stats_energy(small_calibration, real) -> None:
    _, values, _ = real
    chk = LayoutChecker(small_calibration, tokens=8)
    tok = sample_tokens(32, 8)
    assert torch.allclose(chk.value_energy(values[:, :, tok]), chk.value_stats(values)[1], rtol=1e-5)
    # and on bytes that are not values (the figure a refusal reads): keys, noise
    for other in (real[0], torch.randn(values[:3].shape, generator=torch.Generator().manual_seed(5))):
        assert torch.allclose(chk.value_energy(other[:, :, tok]), chk.value_stats(other)[1], rtol=1e-5)
