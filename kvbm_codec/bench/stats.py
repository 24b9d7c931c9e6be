"""Paired comparisons: is a baseline's accuracy really different from KVTC's, on the same prompts/tokens?

Every method is scored on the same contexts, so differences are paired: per prompt for the retrieval
tasks, per continuation position for top-1 and NLL. Positions of one continuation are correlated (one
context, one text), so their confidence intervals come from a block bootstrap (blocks of BLOCK
consecutive positions, resampled with replacement), not from treating tokens as independent. Task
accuracy also gets an exact McNemar test (two-sided binomial on the discordant prompts), which is what
"enough trials to separate methods" has to pass.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

BLOCK = 32  # positions per bootstrap block (~ the span over which one continuation's errors correlate)
MIN_BLOCKS = 8  # below this a block bootstrap says nothing: no interval is reported (NaN), never "separated"
N_BOOT = 2000
SEED = 0


@dataclass(frozen=True)
class PairedDiff:
    """mean(a - b) with a 95 % bootstrap interval; n = pairs (prompts, or positions)."""

    mean: float
    lo: float
    hi: float
    n: int
    p_value: float | None = None  # exact McNemar, only for paired binary outcomes per prompt

    @property
    def separated(self) -> bool:
        return not math.isnan(self.lo) and (self.lo > 0 or self.hi < 0)

    def as_dict(self) -> dict[str, float | int | bool | None]:
        return {**asdict(self), "separated": self.separated}


def _bootstrap(diff_blocks: list[np.ndarray]) -> tuple[float, float]:
    """95 % percentile interval of the pooled mean, resampling whole blocks."""
    rng = np.random.default_rng(SEED)
    k = len(diff_blocks)
    sums = np.array([b.sum() for b in diff_blocks])
    counts = np.array([len(b) for b in diff_blocks], dtype=np.float64)
    idx = rng.integers(0, k, size=(N_BOOT, k))
    means = sums[idx].sum(1) / counts[idx].sum(1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def paired_positions(a: list[list[float]], b: list[list[float]]) -> PairedDiff:
    """a, b: per-window per-position values (e.g. top-1 hit, NLL) of two methods on the same windows."""
    if len(a) != len(b) or any(len(x) != len(y) for x, y in zip(a, b, strict=True)):
        raise ValueError("paired_positions needs the same windows and positions for both methods")
    blocks = []
    for x, y in zip(a, b, strict=True):
        d = np.asarray(x, dtype=np.float64) - np.asarray(y, dtype=np.float64)
        blocks += [d[i : i + BLOCK] for i in range(0, len(d), BLOCK)]
    if not blocks:
        raise ValueError("no positions to compare")
    pooled = np.concatenate(blocks)
    lo, hi = _bootstrap(blocks) if len(blocks) >= MIN_BLOCKS else (math.nan, math.nan)
    return PairedDiff(float(pooled.mean()), lo, hi, int(pooled.size))


def mcnemar_exact(a: list[bool], b: list[bool]) -> float:
    """Two-sided exact McNemar p-value: under H0 each discordant prompt favours a or b with p = 1/2."""
    n01 = sum(1 for x, y in zip(a, b, strict=True) if x and not y)
    n10 = sum(1 for x, y in zip(a, b, strict=True) if y and not x)
    n = n01 + n10
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(n01, n10) + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_prompts(a: list[float], b: list[float], binary: bool) -> PairedDiff:
    """Per-prompt paired difference; binary outcomes also get the exact McNemar p-value."""
    if len(a) != len(b) or not a:
        raise ValueError("paired_prompts needs the same, non-empty prompt list for both methods")
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    lo, hi = _bootstrap([np.array([x]) for x in d]) if d.size >= MIN_BLOCKS else (math.nan, math.nan)
    p = mcnemar_exact([bool(x) for x in a], [bool(y) for y in b]) if binary else None
    return PairedDiff(float(d.mean()), lo, hi, int(d.size), p)


def min_detectable_binary(n: int, discordant_rate: float) -> float:
    """Smallest accuracy difference a paired test on n prompts separates (alpha 0.05, power 0.8),
    given the fraction of prompts on which the two methods disagree (normal approximation)."""
    if n <= 0:
        return math.inf
    return (1.96 + 0.84) * math.sqrt(max(discordant_rate, 1.0 / n) / n)
