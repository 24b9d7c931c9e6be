"""Recover KVBM blocks' first token positions from their keys, because an S3 object key carries none.

KVTC undoes RoPE on keys before PCA, which needs each token's absolute position; KVBM names an object
by its sequence hash only. Encoding with a wrong position does not misplace anything (the frame
stores the position used and decoding re-applies exactly that rotation), it only costs accuracy: the
de-rotated keys no longer look like the calibration's. So the position is estimated as the one whose
inverse rotation makes the block look most like the calibrated pre-RoPE statistics, for a whole
batch of blocks at once (the S3 endpoint places a batch of concurrent PUTs together):

1. Coarse, over every candidate (multiples of the page size: KVBM blocks start at page boundaries):
   pre-RoPE keys have a strongly non-zero mean. A block's keys, de-rotated by their offset within
   the block, are the pre-RoPE keys rotated by the unknown start p, so their mean is the calibrated
   mean rotated by p. The fit of every p reduces to ``sum_j C_j cos(p w_j) + S_j sin(p w_j)`` over
   the head_dim/2 RoPE frequencies: one [N, D/2] x [D/2, candidates] matmul per table (cos, sin,
   precomputed) scores every candidate of every block of the batch.
2. Fine, over each block's best few: the PCA residual (energy outside the leading components of
   the calibrated key bases) of the block de-rotated at each candidate, on a few evenly spaced
   tokens of the block (the residual is a per-token average; the right position's is several times
   smaller than its neighbours', docs/benchmarks.md); the smallest wins. The residual and the keys'
   normalised energy at the winner are returned with it: the layout check (``layout_check``) needs
   exactly those figures, so they are not computed twice.

   A candidate start p only adds the rotation R(-p) to the keys de-rotated by their offset in the
   block, and R(-p) scales the features of each RoPE frequency j by cos(p w_j) and sin(p w_j) (of
   the feature and its rotate-half partner). So the projection onto the leading components is
   split by frequency once per token (``_FrequencySplit``: one batched matmul per layer group, twice
   the work of projecting one reading) and every candidate's projection and energy are sums of those
   parts weighted by its cos/sin: the work no longer grows with the candidates per block (it grew
   4x, and the de-rotated copies of every candidate were a third of the search).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvbm_codec.codec.layout_check import ResidualBases, energy, sample_tokens
from kvbm_codec.codec.params import Calibration
from kvbm_codec.codec.rope import RotaryParams


@dataclass(frozen=True)
class PositionSearch:
    max_position: int = 32768  # candidates are [0, max_position), aligned to `alignment`
    alignment: int = 32  # KVBM blocks start at multiples of the page size
    refine_top: int = 4  # candidates re-scored with the PCA residual
    residual_rank: int = 128  # leading components that count as "explained"
    refine_tokens: int = 8  # tokens of a block (evenly spaced) the residual is measured on


@dataclass(frozen=True)
class Placement:
    position: int
    key_residual: float  # fraction of normalised key energy outside the leading components, there
    # median sampled token's normalised key energy there, relative to the calibration's (layout_check)
    key_energy: float = float("nan")


class PositionEstimator:
    """Thread-safe (no per-call state on self); holds the calibration's key statistics only."""

    def __init__(self, cal: Calibration, search: PositionSearch | None = None) -> None:
        self.cal = cal
        self.search = search or PositionSearch()
        s = cal.shape
        groups = cal.config.layer_groups(s.n_layers)
        means, scales = [], []
        for gi, (a, b) in enumerate(groups):
            basis = cal.bases[cal.basis_name(gi, "k")]
            means.append(basis.mean.reshape(b - a, s.n_kv_heads, s.key_head_dim))
            scales.append(basis.scale.reshape(b - a, s.n_kv_heads, s.key_head_dim))
        self.bases = ResidualBases(cal, "k", self.search.residual_rank)
        mean = torch.cat(means).to(torch.float64)  # [L, H, D] pre-RoPE key mean
        self._w = mean / torch.cat(scales).to(torch.float64) ** 2  # inverse-variance weights
        inv = cal.rope.inv_freq.to(torch.float64)  # [D/2]
        ang = self.candidates().to(torch.float64)[:, None] * inv[None, :]  # [C, D/2]
        self._cos_t, self._sin_t = ang.cos().T.contiguous(), ang.sin().T.contiguous()  # [D/2, C]
        self._weights: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        # a partial rotary (dims past the rotary ones) keeps the direct refine
        self._split = _FrequencySplit(self.bases, cal.rope) if cal.rope.head_dim == s.key_head_dim else None

    def candidates(self) -> torch.Tensor:
        return torch.arange(0, self.search.max_position, self.search.alignment, dtype=torch.int64)

    def _coarse_weights(self, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Wc, Ws [L*P*H, D] such that for a block's keys k (rotate-half halves ka, kb) the sums of
        k Wc and k Ws over layers, tokens and heads, each half added to the other, are c and s below.

        They fold three linear steps into one product: undoing each key's rotation by its offset in
        the block (undo_rope's (k cos - rotate_half(k) sin) / scale^2), the mean over the block's
        tokens, and the inverse-variance weights of the fit below."""
        w = self._weights.get(n_tokens)
        if w is None:
            cos, sin = (t.to(torch.float64) for t in self.cal.rope.cos_sin(torch.arange(n_tokens)))
            half = self._cos_t.shape[0]
            scale2 = self.cal.rope.attention_scaling**2
            ct = (cos[:, :half] / (n_tokens * scale2))[None, :, None, :]  # [1, P, 1, D/2]
            st = (sin[:, :half] / (n_tokens * scale2))[None, :, None, :]
            wa, wb = self._w[:, None, :, :half], self._w[:, None, :, half : 2 * half]  # [L, 1, H, D/2]
            w1, w2 = ct * wa - st * wb, st * wa + ct * wb  # [L, P, H, D/2]
            rest = torch.zeros(*w1.shape[:-1], self._w.shape[-1] - 2 * half, dtype=torch.float64)
            wc = torch.cat([w1, w2, rest], -1).reshape(-1, self._w.shape[-1])  # [L*P*H, D]: c = sum(k wc)
            ws = torch.cat([-w2, w1, rest], -1).reshape(-1, self._w.shape[-1])  # s = sum(k ws)
            w = (wc.to(torch.float32), ws.to(torch.float32))
            self._weights[n_tokens] = w  # one entry per page size: benign if two threads race here
        return w

    def coarse_scores(self, keys: torch.Tensor) -> torch.Tensor:
        """keys [N, L, P, H, D] with RoPE (the block's own order) -> [N, candidates] fit of every
        start (higher is better).

        The de-rotated block mean z rotated back by p fits the calibrated mean best where
        <R(-p) z, w> peaks; per frequency j that is cos(p w_j) c_j + sin(p w_j) s_j with
        c = a wa + b wb and s = b wa - a wb (a, b: z's rotate-half halves), summed over layers and heads.
        """
        wc, ws = self._coarse_weights(keys.shape[2])
        n, dim = keys.shape[0], keys.shape[-1]
        half = self._cos_t.shape[0]
        k = keys.to(torch.float32).reshape(n, -1, dim)  # [N, L*P*H, D]
        rc, rs = (k * wc).sum(1), (k * ws).sum(1)  # [N, D]; a partial rotary's other dims weigh 0
        c = (rc[:, :half] + rc[:, half : 2 * half]).to(torch.float64)  # [N, D/2]
        s = (rs[:, :half] + rs[:, half : 2 * half]).to(torch.float64)
        return c @ self._cos_t + s @ self._sin_t

    def key_residuals(
        self, keys: torch.Tensor, starts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """keys [N, L, P, H, D] with RoPE, candidate first positions [N, K] -> (residual energy,
        total energy, the median token's energy relative to the calibration's) [N, K] of the
        normalised keys de-rotated at each, on the sampled tokens."""
        n, layers, page, heads, dim = keys.shape
        k_cands = starts.shape[1]
        tok = sample_tokens(page, self.search.refine_tokens)
        x = keys[:, :, tok].to(torch.float32).transpose(1, 2)  # [N, T, L, H, D]
        if self.cal.config.undo_rope and self._split is not None and k_cands > 1:
            # de-rotated by the in-block offsets only; each candidate's start is applied per frequency
            y = _derotate(x, tok[None, :].expand(n, -1), self.cal.rope)
            res, tot = self._split.residual(y, starts)  # [N, K, T]
        else:
            x = x[:, None]  # [N, 1, T, L, H, D]
            if self.cal.config.undo_rope:
                pos = starts[:, :, None] + tok[None, None, :]  # [N, K, T]: every candidate of every token
                x = _derotate(x, pos, self.cal.rope)  # [N, K, T, L, H, D], the candidates broadcast
            else:
                x = x.expand(n, k_cands, tok.numel(), layers, heads, dim)
            res, tot = self.bases.residual(x.reshape(-1, layers, heads, dim))
            res, tot = res.reshape(n, k_cands, -1), tot.reshape(n, k_cands, -1)
        return res.sum(2), tot.sum(2), energy(tot, self.bases.energy)

    def place_many(self, keys: torch.Tensor, refine_top: int | None = None) -> list[Placement]:
        """Most likely first positions of N blocks whose keys [N, L, P, H, D] carry RoPE, with the key
        residual fraction at each (``refine_top`` overrides the search's candidates per block)."""
        n = keys.shape[0]
        if n == 0:
            return []
        if not self.cal.config.undo_rope:
            return self.at(keys, [0] * n)
        scores = self.coarse_scores(keys)
        k = min(refine_top or self.search.refine_top, scores.shape[1])
        starts = self.candidates()[torch.topk(scores, k, dim=1).indices]  # [N, K]
        res, tot, en = self.key_residuals(keys, starts)
        best = res.argmin(1)
        rows = torch.arange(n)
        frac = res[rows, best] / tot[rows, best].clamp_min(1e-30)
        return [
            Placement(int(p), float(f), float(e))
            for p, f, e in zip(starts[rows, best], frac, en[rows, best], strict=True)
        ]

    def at(self, keys: torch.Tensor, positions: Sequence[int]) -> list[Placement]:
        """The key residual fractions of N blocks at given first positions (a client sent them)."""
        if keys.shape[0] == 0:
            return []
        starts = torch.tensor(list(positions), dtype=torch.int64)[:, None]
        res, tot, en = self.key_residuals(keys, starts)
        frac = res[:, 0] / tot[:, 0].clamp_min(1e-30)
        return [
            Placement(int(p), float(f), float(e)) for p, f, e in zip(positions, frac, en[:, 0], strict=True)
        ]

    def estimate(self, keys: torch.Tensor) -> int:
        """Most likely first position of one block whose keys [L, P, H, D] carry RoPE."""
        return self.place_many(keys[None])[0].position


def _derotate(x: torch.Tensor, positions: torch.Tensor, rope: RotaryParams) -> torch.Tensor:
    """rope.undo_rope for token-major keys x [..., L, H, D] at positions broadcast against x's
    leading dims (so every candidate start of a block is de-rotated without copying the keys
    first): the same rotation (rotate-half pairs (i, i + rot/2), only the rotary dims, divided by
    attention_scaling^2), written out per half so no rotate_half copy is made."""
    cos, sin = rope.cos_sin(positions.reshape(-1))  # float64 [M, rot], both halves equal
    rot = rope.head_dim
    half = rot // 2
    shape = (*positions.shape, 1, 1, half)
    scale2 = rope.attention_scaling**2
    c = (cos[:, :half] / scale2).to(torch.float32).reshape(shape)
    s = (sin[:, :half] / scale2).to(torch.float32).reshape(shape)
    k1, k2 = x[..., :half], x[..., half:rot]
    parts = [k1 * c + k2 * s, k2 * c - k1 * s]
    if rot < x.shape[-1]:
        parts.append(x[..., rot:].expand(*torch.broadcast_shapes(x.shape[:-1], shape[:-1]), -1))
    return torch.cat(parts, dim=-1)


class _FrequencySplit:
    """The leading-component projections and energies of keys at many candidate starts, from one
    projection per token split by RoPE frequency (module docstring, step 2).

    For a feature f of frequency j and its rotate-half partner f' (f in the first half of a head),
    the key de-rotated by a further p is z_f = c y_f + s y_f', z_f' = c y_f' - s y_f (c, s = cos,
    sin of p w_j), normalised by the calibration's scale: z / scale = c u + s v with u = y / scale
    and v the partner's value over the feature's own scale (v_f = y_f' / scale_f, v_f' = -y_f /
    scale_f'). Then the projection (z - mean) / scale @ B = sum_j c_j U_j + s_j V_j - (mean / scale)
    @ B, with U_j, V_j the projections of u and v restricted to frequency j's features, and the
    energy |(z - mean) / scale|^2 a quadratic form in (c_j, s_j) with five sums per token and
    frequency. Exact up to float rounding: the same figures as de-rotating every candidate."""

    def __init__(self, bases: ResidualBases, rope: RotaryParams) -> None:
        j = self.half = rope.head_dim // 2
        self.inv_freq = rope.inv_freq.to(torch.float64)
        inv, mus = [], []
        self.groups: list[tuple[int, int, torch.Tensor, torch.Tensor]] = []
        for a, b, mean, scale, basis in bases.groups:
            lg, r = b - a, basis.shape[1]
            sc = scale.to(torch.float32)
            inv.append((1 / sc).reshape(lg, -1, 2, j))
            mus.append((mean.to(torch.float32) / sc).reshape(lg, -1, 2, j))
            wu = (basis.to(torch.float32) / sc[:, None]).reshape(lg, -1, 2, j, r)
            wv = torch.stack([-wu[:, :, 1], wu[:, :, 0]], 2)  # weights of y for v's projection
            # [J, Lg*H*2, 2r]: frequency-major, u's then v's components side by side
            w = torch.cat([wu, wv], -1).permute(3, 0, 1, 2, 4).reshape(j, -1, 2 * r).contiguous()
            mu_b = (mus[-1].reshape(-1) @ basis.to(torch.float32)).contiguous()  # [r]
            self.groups.append((a, b, w, mu_b))
        self.inv = torch.cat(inv)  # [L, H, 2, J]: 1 / scale
        self.mu = torch.cat(mus)  # mean / scale
        self.mu2 = float((self.mu * self.mu).sum())

    def residual(self, y: torch.Tensor, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """y [N, T, L, H, D] keys de-rotated by their offset in the block, starts [N, K] -> (energy
        outside the leading components, total energy) of the normalised keys at each candidate,
        float64 [N, K, T]."""
        n, t, layers = y.shape[:3]
        k, j, m = starts.shape[1], self.half, y.shape[0] * y.shape[1]
        ang = starts.to(torch.float64)[:, :, None] * self.inv_freq  # [N, K, J]
        c, s = ang.cos().to(torch.float32), ang.sin().to(torch.float32)
        g = y.reshape(m, layers, -1, 2, j)  # [M, L, H, 2, J]
        # energy: a quadratic form in each frequency's (c, s), the same for every layer group
        u = g * self.inv
        v = torch.stack([g[:, :, :, 1], -g[:, :, :, 0]], 3) * self.inv  # the partner's value, own scale
        sums = torch.stack(
            [(u * u).sum((1, 2, 3)), (v * v).sum((1, 2, 3)), (u * v).sum((1, 2, 3)),
             (u * self.mu).sum((1, 2, 3)), (v * self.mu).sum((1, 2, 3))], -1,
        ).reshape(n, t, j * 5)  # fmt: skip
        quad = torch.stack([c * c, s * s, 2 * c * s, -2 * c, -2 * s], -1).reshape(n, k, j * 5)
        tot = (torch.bmm(quad, sums.transpose(1, 2)) + self.mu2).to(torch.float64)  # [N, K, T]
        cs = torch.stack([c, s], -1).reshape(n, k, j * 2)
        res = tot.clone()
        for a, b, w, mu_b in self.groups:
            r = w.shape[-1] // 2
            # contiguous: a strided batch makes bmm copy every matrix of it on its own
            q = torch.bmm(g[:, a:b].permute(4, 0, 1, 2, 3).reshape(j, m, -1).contiguous(), w)  # [J, M, 2r]
            q = q.reshape(j, n, t, 2, r).permute(1, 0, 3, 2, 4).reshape(n, j * 2, t * r)  # [N, (J, u|v), T*r]
            proj = torch.bmm(cs, q).reshape(n, k, t, r) - mu_b  # [N, K, T, r]
            res -= proj.square().sum(-1).to(torch.float64)
        return res, tot
