"""Does a block fit the layout its bucket is bound to? Judged by the calibration, before storing.

An object's bytes have only the meaning its bucket binding gives them: a PUT of the right length but
another engine's layout (vLLM's CPU pages sent to a KVBM bucket, or the reverse, or K and V
swapped) would otherwise be compressed and stored as if it fit, and every GET would return garbage
KV. Two tests, both on a few evenly spaced tokens of each block (``sample_tokens``; a wrong reading
is wrong on every token):

* Absolute (``energy``): the calibration normalises every feature (per-head scale) so that its own
  KV carries a known energy per token, the sum of the PCA's eigenvalues and residual variance. Real
  KV of the model read in the bound layout (keys de-rotated at their position) carries about that
  (0.65-1.2x on held-out text with the default calibration); bytes read in any other layout or with
  K and V swapped do not: the keys' energy is 13.6-15.6x (values read as keys, scrambled head dims,
  another engine's order; 4.9x or more with a tiny test calibration), the values' 7-73x where they
  are not values (docs/vllm.md has the table). A block whose keys or values exceed a configured
  multiple (``layout_energy_limit``) is refused. The median over the sampled tokens
  is used, so one outlier token (an attention sink at position 0) does not move it.
* Relative (``score``, optional): the bound reading's PCA residual compared with every other reading
  the bucket knows (``buckets.Bucket.misfit_many``). It misses a K/V swap often (values read as keys
  still lie mostly in the key subspace: the residual *fraction* is as small as real keys'), so it is
  off by default; it names the reading that fits better when enabled.

The key figures at the recovered position are the ones the position search
(``positions.PositionEstimator``) already computed. Of the values, the absolute test needs only the
energy (``value_energy``: the sampled tokens' normalised energy, no projection); the relative test
also projects them (``value_stats``).
"""

from __future__ import annotations

import functools

import torch

from kvbm_codec.codec.params import Calibration
from kvbm_codec.codec.pca import to_features


@functools.cache
def _sample_tokens(page_size: int, n: int) -> torch.Tensor:
    if n >= page_size:
        return torch.arange(page_size, dtype=torch.int64)
    return torch.linspace(0, page_size - 1, n).round().to(torch.int64).unique()


def sample_tokens(page_size: int, n: int) -> torch.Tensor:
    """``n`` evenly spaced token indices of a block (all of them when ``n >= page_size``); a fresh
    copy of a cached table (its ``unique`` was a few percent of a batch's search)."""
    return _sample_tokens(page_size, n).clone()


def energy(token_energy: torch.Tensor, expected: float) -> torch.Tensor:
    """[..., T] normalised energy of each sampled token -> [...] the median token's, relative to the
    calibration's ``expected`` (about 1 for real KV read in the right layout)."""
    return token_energy.median(-1).values / expected


class ResidualBases:
    """One kind (keys or values) of the calibration's bases, truncated to their leading ``rank``
    components: the PCA residual of many blocks' tokens in one matmul per layer group."""

    def __init__(self, cal: Calibration, kind: str, rank: int) -> None:
        s = cal.shape
        self.groups: list[tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        tail = total = 0.0
        for gi, (a, b) in enumerate(cal.config.layer_groups(s.n_layers)):
            basis = cal.bases[cal.basis_name(gi, kind)]
            r = min(rank, basis.rank)
            self.groups.append((a, b, basis.mean, basis.scale, basis.basis[:, :r].contiguous()))
            eig = basis.eigenvalues.to(torch.float64)
            tail += float(eig[r:].sum()) + basis.residual_variance
            total += float(eig.sum()) + basis.residual_variance
        # The fraction calibration KV itself leaves outside the leading components (from the PCA's own
        # eigenvalues): a block is judged relative to it, so the bound holds for any calibration size.
        self.expected = tail / max(total, 1e-30)
        # The normalised energy of one token of calibration KV (all its features, every layer group).
        self.energy = max(total, 1e-30)
        self._quad: tuple[torch.Tensor, torch.Tensor, float] | None = None  # ``total``'s weights, built once

    def total(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, L, H, D] -> per token the normalised energy of ``residual``'s second figure, without
        the projection (what the absolute layout test reads): |(x - mean) / scale|^2 expanded as
        x^2 . 1/scale^2 - 2 x . mean/scale^2 + |mean/scale|^2, two matrix-vector products in float64
        over every group's features at once (to_features' order is the row's own (layer, head, dim)
        order); equal to ``residual``'s to float rounding."""
        if self._quad is None:
            inv2, lin, const = [], [], 0.0
            for _, _, mean, scale, _ in self.groups:
                sc2 = scale.to(torch.float64) ** 2
                inv2.append(1 / sc2)
                lin.append(-2 * mean.to(torch.float64) / sc2)
                const += float((mean.to(torch.float64) ** 2 / sc2).sum())
            self._quad = (torch.cat(inv2), torch.cat(lin), const)  # benign if two threads race here
        inv2_all, lin_all, c = self._quad
        xf = x.reshape(x.shape[0], -1).to(torch.float64)
        return (xf * xf) @ inv2_all + xf @ lin_all + c

    def residual(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, L, H, D] (float32; T tokens of any number of blocks, token-major so that a token's
        features are one contiguous row) -> per token (energy outside the leading components, total
        energy), both of the normalised features, float64 [T]."""
        res = torch.zeros(x.shape[0], dtype=torch.float64)
        tot = torch.zeros(x.shape[0], dtype=torch.float64)
        for a, b, mean, scale, basis in self.groups:
            xn = (to_features(x[:, a:b].permute(1, 2, 0, 3)) - mean) / scale
            e = (xn * xn).sum(-1).to(torch.float64)
            p = (xn @ basis).square().sum(-1).to(torch.float64)
            res += e - p
            tot += e
        return res, tot


class LayoutChecker:
    """Thread-safe (read-only after construction)."""

    def __init__(self, cal: Calibration, rank: int = 128, tokens: int = 8) -> None:
        self.cal = cal
        self.tokens = tokens
        self.keys = ResidualBases(cal, "k", rank)
        self.values = ResidualBases(cal, "v", rank)
        self.expected = (self.keys.expected, self.values.expected)

    def value_fractions(self, values: torch.Tensor) -> torch.Tensor:
        """values [N, L, P, H, D] of N blocks (the block's own order) -> [N] residual fractions."""
        return self.value_stats(values)[0]

    def value_stats(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """values [N, L, P, H, D] of N blocks (the block's own order) -> ([N] residual fractions,
        [N] energies: median over the sampled tokens of the normalised energy relative to the
        calibration's, ``energy``)."""
        n, _, page, _, _ = values.shape
        tok = sample_tokens(page, self.tokens)
        x = values[:, :, tok].to(torch.float32).transpose(1, 2).flatten(0, 1)  # [N*T, L, H, D]
        res, tot = self.values.residual(x)
        res, tot = res.reshape(n, -1), tot.reshape(n, -1)
        return res.sum(1) / tot.sum(1).clamp_min(1e-30), energy(tot, self.values.energy)

    def value_energy(self, values: torch.Tensor) -> torch.Tensor:
        """values [N, L, T, H, D] of N blocks, already only their sampled tokens (``sample_tokens``
        with this checker's ``tokens``) -> [N] ``value_stats``' energies, the same figures without
        the projection (the fractions serve only the relative test)."""
        n = values.shape[0]
        tot = self.values.total(values.transpose(1, 2).flatten(0, 1)).reshape(n, -1)
        return energy(tot, self.values.energy)

    def score(self, key_fraction: torch.Tensor, value_fraction: torch.Tensor) -> torch.Tensor:
        """Key plus value residual, each relative to the calibration's own (lower: fits better)."""
        return key_fraction / self.expected[0] + value_fraction / self.expected[1]
