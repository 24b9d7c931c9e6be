"""PCA basis for one feature space (the keys or the values of one layer group).

The covariance is accumulated in float64 over many calibration batches, so calibration can stream
arbitrarily many tokens through a fixed amount of memory (p x p), then one eigendecomposition.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class CovarianceAccumulator:
    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.count = 0
        self._sum = torch.zeros(dim, dtype=torch.float64)
        self._outer = torch.zeros(dim, dim, dtype=torch.float64)

    def add(self, x: torch.Tensor) -> None:
        """x: [n, dim] samples."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"expected {self.dim} features, got {x.shape[-1]}")
        x64 = x.reshape(-1, self.dim).to(torch.float64)
        self.count += x64.shape[0]
        self._sum += x64.sum(0)
        self._outer += x64.T @ x64

    def finalize(self, rank: int, norm_block: int = 0) -> PCABasis:
        """norm_block > 0 scales each run of norm_block features (one head of one layer) to unit
        variance first, so PCA and the bit allocation weigh every head's *relative* error alike;
        otherwise a low-variance layer can lose all its bits while still mattering to the model."""
        if self.count < 2:
            raise ValueError("PCA needs at least 2 calibration samples")
        mean = self._sum / self.count
        cov = self._outer / self.count - torch.outer(mean, mean)
        scale = torch.ones(self.dim, dtype=torch.float64)
        if norm_block > 0:
            var = cov.diagonal().reshape(-1, norm_block).mean(1).clamp_min(1e-12)
            scale = var.sqrt().repeat_interleave(norm_block)
            cov = cov / torch.outer(scale, scale)
        evals, evecs = torch.linalg.eigh(cov)
        order = torch.argsort(evals, descending=True)
        evals, evecs = evals[order].clamp_min(0), evecs[:, order]
        rank = min(rank, self.dim)
        # Sign convention (largest |entry| of each vector positive) makes bases reproducible.
        signs = torch.sign(evecs.gather(0, evecs.abs().argmax(0, keepdim=True)))
        evecs = evecs * signs
        return PCABasis(
            mean=mean.to(torch.float32),
            scale=scale.to(torch.float32),
            basis=evecs[:, :rank].contiguous().to(torch.float32),
            eigenvalues=evals[:rank].to(torch.float32),
            residual_variance=float(evals[rank:].sum()),
        )


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
