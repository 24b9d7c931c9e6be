"""Recover a KVBM block's first token position from its keys, because an S3 object key carries none.

KVTC undoes RoPE on keys before PCA, which needs each token's absolute position; KVBM names an object
by its sequence hash only. Encoding with a wrong position does not misplace anything (the frame
stores the position used and decoding re-applies exactly that rotation), it only costs accuracy: the
de-rotated keys no longer look like the calibration's. So the position is estimated as the one whose
inverse rotation makes the block look most like the calibrated pre-RoPE statistics:

1. Coarse, over every candidate (multiples of the page size: KVBM blocks start at page boundaries):
   pre-RoPE keys have a strongly non-zero mean. The block's keys, de-rotated by their offset within
   the block, are the pre-RoPE keys rotated by the unknown start p, so their mean is the calibrated
   mean rotated by p. The fit of every p reduces to ``sum_j C_j cos(p w_j) + S_j sin(p w_j)`` over the
   head_dim/2 RoPE frequencies: a few thousand candidates cost microseconds.
2. Fine, over the best few: the PCA residual (energy outside the leading components of the
   calibrated key bases) of the block de-rotated at each candidate; the smallest wins.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbm_codec.codec.params import Calibration
from kvbm_codec.codec.pca import to_features
from kvbm_codec.codec.rope import undo_rope


@dataclass(frozen=True)
class PositionSearch:
    max_position: int = 32768  # candidates are [0, max_position), aligned to `alignment`
    alignment: int = 32  # KVBM blocks start at multiples of the page size
    refine_top: int = 4  # candidates re-scored with the PCA residual
    residual_rank: int = 128  # leading components that count as "explained"


class PositionEstimator:
    """Thread-safe (no per-call state on self); holds the calibration's key statistics only."""

    def __init__(self, cal: Calibration, search: PositionSearch | None = None) -> None:
        self.cal = cal
        self.search = search or PositionSearch()
        s = cal.shape
        self._inv = cal.rope.inv_freq.to(torch.float64)  # [D/2]
        groups = cal.config.layer_groups(s.n_layers)
        means, scales = [], []
        self._groups: list[tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for gi, (a, b) in enumerate(groups):
            basis = cal.bases[cal.basis_name(gi, "k")]
            means.append(basis.mean.reshape(b - a, s.n_kv_heads, s.key_head_dim))
            scales.append(basis.scale.reshape(b - a, s.n_kv_heads, s.key_head_dim))
            r = min(self.search.residual_rank, basis.rank)
            self._groups.append((a, b, basis.mean, basis.scale, basis.basis[:, :r].contiguous()))
        self._mean = torch.cat(means).to(torch.float64)  # [L, H, D] pre-RoPE key mean
        self._w = self._mean / torch.cat(scales).to(torch.float64) ** 2  # inverse-variance weights

    def candidates(self) -> torch.Tensor:
        return torch.arange(0, self.search.max_position, self.search.alignment, dtype=torch.int64)

    def coarse_scores(self, keys: torch.Tensor) -> torch.Tensor:
        """keys [L, H, P, D] with RoPE -> fit of every candidate start (higher is better)."""
        n_tokens = keys.shape[2]
        offsets = torch.arange(n_tokens, dtype=torch.int64)
        z = undo_rope(keys.to(torch.float32), offsets, self.cal.rope).to(torch.float64).mean(2)
        half = z.shape[-1] // 2
        a, b = z[..., :half], z[..., half:]
        wa, wb = self._w[..., :half], self._w[..., half:]
        # <R(-p) z, w> per frequency j: cos(p w_j) (a wa + b wb) + sin(p w_j) (b wa - a wb)
        c = (a * wa + b * wb).sum((0, 1))
        s = (b * wa - a * wb).sum((0, 1))
        ang = self.candidates().to(torch.float64)[:, None] * self._inv[None, :]
        return ang.cos() @ c + ang.sin() @ s

    def residual(self, keys: torch.Tensor, first_position: int) -> float:
        """Energy of the de-rotated, normalised keys outside the leading PCA components."""
        pos = torch.arange(first_position, first_position + keys.shape[2], dtype=torch.int64)
        k = undo_rope(keys.to(torch.float32), pos, self.cal.rope)
        total = 0.0
        for a, b, mean, scale, basis in self._groups:
            x = to_features(k[a:b])
            xn = (x - mean) / scale
            total += float((xn * xn).sum() - ((xn @ basis) ** 2).sum())
        return total

    def estimate(self, keys: torch.Tensor) -> int:
        """Most likely first position of a block whose keys [L, H, P, D] carry RoPE."""
        if not self.cal.config.undo_rope:
            return 0
        scores = self.coarse_scores(keys)
        top = torch.topk(scores, min(self.search.refine_top, scores.numel())).indices
        cands = self.candidates()[top].tolist()
        return min(cands, key=lambda p: self.residual(keys, int(p)))
