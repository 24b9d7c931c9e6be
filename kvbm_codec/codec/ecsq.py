"""Entropy-coded uniform quantization of one basis' coefficients (``CodecConfig.quantizer="ecsq"``).

Instead of a bit width per group of components with each token's min/max, every kept component is
rounded to one uniform step per basis, scaled per token by a gain (the RMS of that token's
coefficients in units of their calibrated standard deviations, one fp16 per token and basis), and
the integer codes are ANS-coded with the calibration's static tables (codec/entropy.py). Why each
part (docs/benchmarks.md, "Session 25"):

- the step: step_b = step / sqrt(weight_b), equal slope across bases in the allocator's metric;
  one global step per target ratio replaces the DP's bit widths;
- no dead zone, reconstruction at the code: a dead zone saves bits but shrinks every coefficient
  toward zero, a bias the model feels far more than its squared error says (KL 2-3x on validation);
- the per-token gain: without it a uniform step gives small tokens the error of large ones, and the
  ratio swings with the text (16-19x at a 20x target on validation); with it, 20-21x;
- classes from ``sigma / (step_b * gain_t)``: what the decoder can compute from the artifact and
  the gains alone, with no transcendental function (codec/entropy.class_of), so it agrees exactly
  on every machine.

Kept components are a prefix of the basis (eigenvalues descend); the rest decode as zero. How many
is the allocation's to say (its one block per basis, hashed into its id): calibration chooses it by
a floor on ``sigma / step`` (calibration/entropy_fit.MIN_SCALE), and a codec never re-derives it, so
a later floor cannot make old frames decode with other components.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kvbm_codec.codec.entropy import ClassRuns, CodeTables

GAIN_RANGE = (1e-3, 1e3)  # a token's gain is clamped to this (fp16-representable, never zero)


@dataclass(frozen=True)
class EcsqBasis:
    """What encode and decode of one basis need at one allocation: its step and kept components'
    standard deviations (float64, from the artifact's eigenvalues)."""

    step: float
    sigma: np.ndarray  # [kept]

    @classmethod
    def of(cls, eigenvalues: torch.Tensor, weight: float, global_step: float, n_kept: int) -> EcsqBasis:
        if not 0 <= n_kept <= eigenvalues.numel():
            raise ValueError(f"{n_kept} kept components of a {eigenvalues.numel()}-component basis")
        return cls(basis_step(global_step, weight), sigmas(eigenvalues)[:n_kept])

    @property
    def n_kept(self) -> int:
        return int(self.sigma.size)

    def classes(self, gains: np.ndarray) -> ClassRuns:
        """The table class of every code [T, kept], ``class_of(sigma / (step * gain_t))``, from the
        frame's fp16 gains [T], as runs (the sigmas descend)."""
        return ClassRuns.of(self.sigma, self.step * gains.astype(np.float64))


def basis_step(global_step: float, weight: float) -> float:
    return global_step / math.sqrt(weight)


def sigmas(eigenvalues: torch.Tensor) -> np.ndarray:
    """Each component's calibrated standard deviation (float64, as classes are computed from)."""
    return eigenvalues.to(torch.float64).clamp_min(0).sqrt().numpy()


def gains(coeffs: torch.Tensor, sigma: np.ndarray) -> torch.Tensor:
    """[T, kept] coefficients -> [T] fp16 gains (RMS in units of sigma), as the frame stores them."""
    if coeffs.shape[1] == 0:
        return torch.ones(coeffs.shape[0], dtype=torch.float16)
    sig = torch.from_numpy(sigma).to(coeffs.device, torch.float32).clamp_min(1e-12)
    g = (coeffs / sig).square().mean(1).sqrt()
    return torch.nan_to_num(g, nan=1.0).clamp(*GAIN_RANGE).to(torch.float16)


def quantize_basis(coeffs: torch.Tensor, eb: EcsqBasis) -> tuple[np.ndarray, np.ndarray, ClassRuns]:
    """coeffs [T, kept] -> (int32 codes, fp16 gains [T], their classes): what a frame codes, and
    what calibration's step bisection prices, by one formula."""
    g = gains(coeffs, eb.sigma)
    codes = torch.round(coeffs / (g.to(torch.float32)[:, None] * eb.step)).to(torch.int32).cpu().numpy()
    g_np = g.cpu().numpy()
    return codes, g_np, eb.classes(g_np)


def encode_basis(coeffs: torch.Tensor, eb: EcsqBasis, tables: CodeTables) -> tuple[bytes, bytes]:
    """coeffs [T, kept] -> (entropy-coded codes, fp16 gains): the basis' codes and scales streams."""
    codes, g, classes = quantize_checked(coeffs, eb)
    return tables.encode([(codes, classes)]), g.astype("<f2").tobytes()


def quantize_checked(coeffs: torch.Tensor, eb: EcsqBasis) -> tuple[np.ndarray, np.ndarray, ClassRuns]:
    """:func:`quantize_basis` of coefficients an encoder was handed: the right width, all finite."""
    if coeffs.shape[1] != eb.n_kept:
        raise ValueError(f"expected {eb.n_kept} kept components, got {coeffs.shape[1]}")
    if not math.isfinite(float(coeffs.sum())):  # one pass; inf or NaN anywhere makes the sum so
        raise ValueError("coefficients are not finite: the KV holds inf or NaN")
    return quantize_basis(coeffs, eb)


def decode_basis(
    codes: bytes | memoryview, scales: bytes | memoryview, n_tokens: int, eb: EcsqBasis, tables: CodeTables
) -> torch.Tensor:
    """Inverse of :func:`encode_basis`: [n_tokens, kept] float32 coefficients."""
    return decode_bases(codes, [scales], n_tokens, [eb], tables, by_class=False)[0]


def decode_bases(
    codes: bytes | memoryview,
    scales: Sequence[bytes | memoryview],
    n_tokens: int,
    bases: Sequence[EcsqBasis],
    tables: CodeTables,
    *,
    by_class: bool = True,
) -> list[torch.Tensor]:
    """One code stream of several bases (a block frame's, written ``by_class``: one coder call per
    class for all of them) and each basis' gains -> each basis' [n_tokens, kept] float32
    coefficients."""
    gs = [_gains_of(s, n_tokens) for s in scales]
    shapes = [((n_tokens, eb.n_kept), eb.classes(g)) for eb, g in zip(bases, gs, strict=True)]
    out = []
    for q, g, eb in zip(tables.decode(codes, shapes, by_class=by_class), gs, bases, strict=True):
        scale = torch.from_numpy(g.astype(np.float32)) * np.float32(eb.step)
        out.append(torch.from_numpy(q).to(torch.float32) * scale[:, None])
    return out


def _gains_of(scales: bytes | memoryview, n_tokens: int) -> np.ndarray:
    g = np.frombuffer(scales, dtype="<f2")
    if g.size != n_tokens:
        raise ValueError(f"gains stream holds {g.size} values, {n_tokens} tokens need {n_tokens}")
    if not np.isfinite(g).all() or (g.size and float(g.min()) < np.float16(GAIN_RANGE[0])):
        raise ValueError("gains stream holds a gain no encoder writes")
    return g


def max_codes_bytes(n_tokens: int, n_kept: int) -> int:
    """The largest codes stream an encoder can write for this shape (2^-16 per symbol: 16 bits, an
    escape 16 more): what a reader checks a header's size against before allocating anything."""
    return 16 + 4 * n_tokens * n_kept + 4
