"""Does a block fit the layout its bucket is bound to? Judged by the calibration, before storing.

An object's bytes have only the meaning its bucket binding gives them: a PUT of the right length but
another engine's layout (vLLM's CPU pages sent to a KVBM bucket, or the reverse, or K and V
swapped) would otherwise be compressed and stored as if it fit, and every GET would return garbage
KV. Real KV of the calibrated model, read in the bound layout and de-rotated at its position, is
explained by the calibrated PCA bases: little of its (normalised) energy falls outside the leading
components. Bytes read in the wrong layout are not: their residual is about twice as large or more
(docs/vllm.md has the measurements). The bucket compares the bound reading of a block with every
other reading it knows (``buckets.Bucket.misfit``); a relative test holds for a small calibration
(whose own data already leaves more residual) as well as for a large one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbm_codec.codec.params import Calibration
from kvbm_codec.codec.rope import undo_rope


@dataclass(frozen=True)
class LayoutFit:
    key_residual: float  # fraction of normalised key energy outside the leading components
    value_residual: float

    @property
    def worst(self) -> float:
        return max(self.key_residual, self.value_residual)


class LayoutChecker:
    """Thread-safe (read-only after construction)."""

    def __init__(self, cal: Calibration, rank: int = 128) -> None:
        self.cal = cal
        s = cal.shape
        self._groups: list[tuple[int, int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]] = []
        expected: dict[str, list[tuple[float, float]]] = {"k": [], "v": []}
        for gi, (a, b) in enumerate(cal.config.layer_groups(s.n_layers)):
            per_kind = []
            for kind in ("k", "v"):
                basis = cal.bases[cal.basis_name(gi, kind)]
                r = min(rank, basis.rank)
                per_kind.append((basis.mean, basis.scale, basis.basis[:, :r].contiguous()))
                eig = basis.eigenvalues.to(torch.float64)
                tail = float(eig[r:].sum()) + basis.residual_variance
                expected[kind].append((tail, float(eig.sum()) + basis.residual_variance))
            self._groups.append((a, b, per_kind))
        # The fraction calibration KV itself leaves outside the leading components (from the PCA's own
        # eigenvalues): a block is judged relative to it, so the bound holds for any calibration size.
        self.expected = tuple(
            sum(t for t, _ in expected[kind]) / max(sum(a for _, a in expected[kind]), 1e-30)
            for kind in ("k", "v")
        )

    def fit(self, keys: torch.Tensor, values: torch.Tensor, first_position: int) -> LayoutFit:
        """keys/values [L, H, P, D] as the engine stores them (keys with RoPE)."""
        k = keys.to(torch.float32)
        if self.cal.config.undo_rope:
            pos = torch.arange(first_position, first_position + k.shape[2], dtype=torch.int64)
            k = undo_rope(k, pos, self.cal.rope)
        v = values.to(torch.float32)
        out = []
        for idx, x_all in enumerate((k, v)):
            res = tot = 0.0
            for a, b, kinds in self._groups:
                mean, scale, basis = kinds[idx]
                x = x_all[a:b].permute(2, 0, 1, 3).reshape(x_all.shape[2], -1)
                xn = (x - mean) / scale
                e = float((xn * xn).sum())
                res += e - float(((xn @ basis) ** 2).sum())
                tot += e
            out.append(res / max(tot, 1e-30))
        return LayoutFit(out[0], out[1])
