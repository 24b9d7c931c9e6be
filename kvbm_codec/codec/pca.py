"""PCA basis for one feature space (the keys or the values of one layer group).

The covariance is accumulated in float64 over many calibration batches, so calibration can stream
arbitrarily many tokens through a fixed amount of memory (p x p), then one eigendecomposition.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def to_features(x: torch.Tensor) -> torch.Tensor:
    """``[layers, heads, tokens, dim]`` -> ``[tokens, layers*heads*dim]``: one PCA sample per token.

    The one definition of the feature layout that calibration fits and the codec projects; the width is
    explicit so a group with no compressed tokens still has the basis' width."""
    return x.permute(2, 0, 1, 3).reshape(x.shape[2], x.shape[0] * x.shape[1] * x.shape[3])


def from_features(feats: torch.Tensor, n_layers: int, n_heads: int, dim: int) -> torch.Tensor:
    """Inverse of :func:`to_features`: ``[tokens, layers*heads*dim]`` -> ``[layers, heads, tokens, dim]``."""
    return feats.reshape(-1, n_layers, n_heads, dim).permute(1, 2, 0, 3)


class CovarianceAccumulator:
    """Products are taken in float32 (twice the BLAS speed) on data centred on the first batch's
    mean, which removes the large-mean cancellation that would otherwise cost float32 precision;
    the running sums are float64. The product goes through numpy: its ``a.T @ a`` is a symmetric
    rank-k update (BLAS ``syrk``, half the multiplications of torch's general ``x.T @ x``; 1.8x
    faster on one calibration sequence's features, docs/benchmarks.md "Calibration speed")."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.count = 0
        self._ref: torch.Tensor | None = None
        self._sum = torch.zeros(dim, dtype=torch.float64)
        self._outer = torch.zeros(dim, dim, dtype=torch.float64)

    def add(self, x: torch.Tensor) -> None:
        """x: [n, dim] samples."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"expected {self.dim} features, got {x.shape[-1]}")
        x32 = x.reshape(-1, self.dim).to(torch.float32)
        if self._ref is None:
            self._ref = x32.mean(0)
        xc = x32 - self._ref
        self.count += xc.shape[0]
        self._sum += xc.sum(0, dtype=torch.float64)
        # numpy widens the float32 product and adds in place at ~5x torch's mixed-dtype add_ (the
        # same float64 values: the widening is exact)
        outer = self._outer.numpy()
        np.add(outer, self._gram(xc), out=outer)

    @staticmethod
    def _gram(xc: torch.Tensor) -> np.ndarray:
        a = xc.detach().cpu().numpy()
        return a.T @ a

    def merged(self, *others: CovarianceAccumulator) -> CovarianceAccumulator:
        """One accumulator over the samples of all: lets calibration keep one per corpus domain and
        fit any mix of domains (e.g. leave one out) without another prefill. Each accumulator is
        re-centred on this one's reference mean before the sums add."""
        out = CovarianceAccumulator(self.dim)
        for acc in (self, *others):
            if acc.dim != self.dim:
                raise ValueError(f"cannot merge {acc.dim}-d statistics into {self.dim}-d ones")
            if acc._ref is None:
                continue
            if out._ref is None:
                out._ref = acc._ref.clone()
            d = (acc._ref - out._ref).to(torch.float64)
            s = acc._sum
            out._outer += acc._outer + torch.outer(s, d) + torch.outer(d, s) + acc.count * torch.outer(d, d)
            out._sum += s + acc.count * d
            out.count += acc.count
        return out

    def covariance(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean [p], covariance [p, p]) in float64."""
        if self.count < 2:
            raise ValueError("PCA needs at least 2 calibration samples")
        assert self._ref is not None
        centred_mean = self._sum / self.count
        cov = self._outer / self.count - torch.outer(centred_mean, centred_mean)
        return centred_mean + self._ref.to(torch.float64), cov

    def finalize(self, rank: int, norm_block: int = 0, weight: torch.Tensor | None = None) -> PCABasis:
        """norm_block > 0 scales each run of norm_block features (one head of one layer) to unit
        variance first, so PCA and the bit allocation weigh every head's *relative* error alike;
        otherwise a low-variance layer can lose all its bits while still mattering to the model.

        weight [p] is a diagonal distortion metric (what an error in each feature costs the model,
        calibration/statistics.py): features are whitened by sqrt(weight) so the PCA and the
        allocator's error tables work in the space where squared error is the model's distortion.
        With norm_block > 0 as well, each head's weighted variance is normalised to norm_block
        (the metric then only redistributes error within a head)."""
        mean, cov = self.covariance()
        scale = torch.ones(self.dim, dtype=torch.float64)
        var_f = cov.diagonal().clamp_min(1e-12)
        if weight is not None:
            w = weight.to(torch.float64).clamp_min(1e-30)
            if w.shape != (self.dim,):
                raise ValueError(f"metric weight must have {self.dim} entries, got {tuple(w.shape)}")
            if norm_block > 0:
                per_head = (w * var_f).reshape(-1, norm_block).mean(1).clamp_min(1e-30)
                scale = (per_head.repeat_interleave(norm_block) / w).sqrt()
            else:
                scale = w.rsqrt()
        elif norm_block > 0:
            var = var_f.reshape(-1, norm_block).mean(1)
            scale = var.sqrt().repeat_interleave(norm_block)
        if weight is not None or norm_block > 0:
            cov = cov / torch.outer(scale, scale)
        rank = min(rank, self.dim)
        total_var = float(cov.diagonal().sum())
        evals, evecs = top_eigenpairs(cov, rank)
        order = torch.argsort(evals, descending=True)
        evals, evecs = evals[order].clamp_min(0), evecs[:, order]
        # Sign convention (largest |entry| of each vector positive) makes bases reproducible.
        signs = torch.sign(evecs.gather(0, evecs.abs().argmax(0, keepdim=True)))
        evecs = evecs * signs
        return PCABasis(
            mean=mean.to(torch.float32),
            scale=scale.to(torch.float32),
            basis=evecs[:, :rank].contiguous().to(torch.float32),
            eigenvalues=evals[:rank].to(torch.float32),
            residual_variance=max(0.0, total_var - float(evals[:rank].sum())),
        )


def top_eigenpairs(cov: torch.Tensor, k: int, oversample: int = 128, iterations: int = 4) -> tuple:
    """Leading k eigenpairs of a symmetric PSD matrix.

    Full eigh is O(p^3) and takes minutes at p = layers*heads*dim (5760 for SmolLM2) on a CPU; when
    k is well below p, randomized subspace iteration (Halko et al., as the KVTC paper's randomized
    SVD) with a final Rayleigh-Ritz step in float64 gives the same leading subspace for a fraction.
    The full decomposition goes through numpy's LAPACK (OpenBLAS): torch's MKL build took 3-4x as
    long on the same covariances on the AMD build machines (docs/benchmarks.md, calibration speed).
    """
    p = cov.shape[0]
    if k + oversample >= 0.75 * p:
        evals, evecs = np.linalg.eigh(cov.to(torch.float64).numpy())
        return torch.from_numpy(evals), torch.from_numpy(evecs)
    g = torch.Generator().manual_seed(0)
    c32 = cov.to(torch.float32)
    q, _ = torch.linalg.qr(c32 @ torch.randn(p, k + oversample, generator=g))
    for _ in range(iterations):
        q, _ = torch.linalg.qr(c32 @ q)
    q64 = q.to(torch.float64)
    q64, _ = torch.linalg.qr(q64)
    small = q64.T @ cov @ q64
    evals, w = torch.linalg.eigh((small + small.T) / 2)
    return evals[-k:], (q64 @ w)[:, -k:]


@dataclass
class PCABasis:
    mean: torch.Tensor  # [p]
    scale: torch.Tensor  # [p] per-feature normalisation applied before projection
    basis: torch.Tensor  # [p, r] orthonormal columns, descending variance
    eigenvalues: torch.Tensor  # [r]
    residual_variance: float  # variance in the discarded components (r..p), per sample

    @property
    def dim(self) -> int:
        return int(self.basis.shape[0])

    @property
    def rank(self) -> int:
        return int(self.basis.shape[1])

    def project(self, x: torch.Tensor, components: torch.Tensor | None = None) -> torch.Tensor:
        """[n, p] features -> [n, r] coefficients (or only the selected component indices)."""
        b = self.basis if components is None else self.basis[:, components]
        return ((x.to(torch.float32) - self.mean) / self.scale) @ b

    def reconstruct(self, coeffs: torch.Tensor, components: torch.Tensor | None = None) -> torch.Tensor:
        b = self.basis if components is None else self.basis[:, components]
        return (coeffs @ b.T) * self.scale + self.mean

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """Features in the space the PCA (and the DP's error tables) live in."""
        return (x.to(torch.float32) - self.mean) / self.scale
