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

   A token at offset t of a block starting at p sits at position p + t, and the rotation R(-(p + t))
   scales the features of each RoPE frequency j by cos((p + t) w_j) and sin((p + t) w_j) (of the
   feature and its rotate-half partner). So the projection onto the leading components is split by
   frequency once per token, on the keys as they arrive (``_FrequencySplit``: one batched matmul per
   layer group, twice the work of projecting one reading; nothing is de-rotated), and every
   candidate's projection and energy are sums of those parts weighted by its cos/sin: the work does
   not grow with the candidates per block. The energies' five sums per frequency and layer group
   come from three batched matmuls over the sampled tokens (all layers: the layout check's figure).
3. The refine in two passes, when the caller needs no residual (the S3 endpoint's default binding:
   only the relative layout test reads it). The first pass measures the residual on one sampled
   token (the middle one: a block's first token can be an attention sink) and one layer group (the
   middle one: the projection's cost there is reading the group's weights, not the token rows);
   its winner stands when the runner-up's residual is at least ``quick_margin`` (2) times larger.
   Every other block is re-scored exactly as the one-pass refine does (all sampled tokens and
   groups), so an unclear case costs what it did. On real keys the right position's residual is
   4x or more below the other candidates' on every validation block, while on values read as keys
   and on noise no candidate stands out (runner-up within 1.25x: they all take the second pass);
   the positions and key energies are the one-pass refine's (bench/position_search_select.py,
   docs/benchmarks.md "S3 position search, pass 3"). Its key residual is then NaN, never a stale
   figure.
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
    quick_tokens: int = 1  # of those, the ones the refine's first pass measures (evenly spaced)
    quick_groups: int = 1  # layer groups it measures (evenly spaced and centred, as the tokens)
    quick_margin: float = 2.0  # its winner stands when the runner-up's residual is this many times larger


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
        """keys [N, L, P, H, D] with RoPE (the block's own order; float16, bfloat16 or float32) ->
        [N, candidates] fit of every start (higher is better).

        The de-rotated block mean z rotated back by p fits the calibrated mean best where
        <R(-p) z, w> peaks; per frequency j that is cos(p w_j) c_j + sin(p w_j) s_j with
        c = a wa + b wb and s = b wa - a wb (a, b: z's rotate-half halves), summed over layers and heads.
        """
        wc, ws = self._coarse_weights(keys.shape[2])
        n, dim = keys.shape[0], keys.shape[-1]
        half = self._cos_t.shape[0]
        k = keys.reshape(n, -1, dim)  # [N, L*P*H, D], any float dtype (fp16 as the engine sends it)
        # one block at a time through one buffer: the batch's [N, L*P*H, D] temporaries left the
        # caches (and were fresh pages every call); the same sums, bit for bit. An fp16 block is
        # widened there too (exactly), so the caller need not copy the whole batch to float32.
        rc, rs, buf = torch.empty(n, dim), torch.empty(n, dim), torch.empty(k.shape[1:])
        wide = None if k.dtype == torch.float32 else torch.empty(k.shape[1:])
        for i in range(n):  # a partial rotary's other dims weigh 0
            ki = k[i] if wide is None else wide.copy_(k[i])
            torch.sum(torch.mul(ki, wc, out=buf), 0, out=rc[i])
            torch.sum(torch.mul(ki, ws, out=buf), 0, out=rs[i])
        c = (rc[:, :half] + rc[:, half : 2 * half]).to(torch.float64)  # [N, D/2]
        s = (rs[:, :half] + rs[:, half : 2 * half]).to(torch.float64)
        return c @ self._cos_t + s @ self._sin_t

    def key_residuals(
        self, keys: torch.Tensor, starts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """keys [N, L, P, H, D] with RoPE, candidate first positions [N, K] -> (residual energy,
        total energy, the median token's energy relative to the calibration's) [N, K] of the
        normalised keys de-rotated at each, on the sampled tokens."""
        if self.cal.config.undo_rope and self._split is not None:
            res, tot = self.residual_table(keys, starts)  # [N, K, T, G]
            res, tot = res.sum(3).to(torch.float64), tot.sum(3).to(torch.float64)
            return res.sum(2), tot.sum(2), energy(tot, self.bases.energy)
        n, layers, page, heads, dim = keys.shape
        k_cands = starts.shape[1]
        tok = sample_tokens(page, self.search.refine_tokens)
        x = keys[:, :, tok].to(torch.float32).transpose(1, 2)[:, None]  # [N, 1, T, L, H, D]
        if self.cal.config.undo_rope:
            pos = starts[:, :, None] + tok[None, None, :]  # [N, K, T]: every candidate of every token
            x = _derotate(x, pos, self.cal.rope)  # [N, K, T, L, H, D], the candidates broadcast
        else:
            x = x.expand(n, k_cands, tok.numel(), layers, heads, dim)
        res, tot = self.bases.residual(x.reshape(-1, layers, heads, dim))
        res, tot = res.reshape(n, k_cands, -1), tot.reshape(n, k_cands, -1)
        return res.sum(2), tot.sum(2), energy(tot, self.bases.energy)

    def residual_table(self, keys: torch.Tensor, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """keys [N, L, P, H, D] with RoPE, candidate starts [N, K] -> (energy outside the leading
        components, total energy) of the normalised keys at each candidate, per sampled token and
        layer group, float32 [N, K, T, G] (the frequency split; full RoPE only)."""
        split = self._split
        assert split is not None
        n, k = starts.shape
        tok = sample_tokens(keys.shape[2], self.search.refine_tokens)
        x, t = split.rows(keys, tok), tok.numel()
        pos = (starts[:, None, :] + tok[None, :, None]).reshape(n * t, k)
        quad, cs = split.weights(pos)
        tot = split.energies(split.energy_sums(x), quad)  # [M, K, G]
        groups = range(len(split.groups))
        qs = split.projections(x, groups)
        res = torch.stack(
            [tot[:, :, g] - split.explained(q, cs, g) for g, q in zip(groups, qs, strict=True)], -1
        )
        return res.reshape(n, t, k, -1).transpose(1, 2), tot.reshape(n, t, k, -1).transpose(1, 2)

    def _quick(self, keys: torch.Tensor, starts: torch.Tensor) -> list[Placement]:
        """The refine in two passes (module docstring, step 3): the residual on the search's quick
        tokens and layer groups picks a block's winner when its runner-up's residual is at least
        ``quick_margin`` times larger; the other blocks are re-scored on every sampled token and
        group exactly as the one-pass refine does. The key energy is every group's, at the winner;
        the residual is not returned (NaN)."""
        split = self._split
        assert split is not None
        srch = self.search
        n, k = starts.shape
        tok = sample_tokens(keys.shape[2], srch.refine_tokens)
        x, t = split.rows(keys, tok), tok.numel()
        pos = (starts[:, None, :] + tok[None, :, None]).reshape(n * t, k)
        quad, cs = split.weights(pos)
        tot = split.energies(split.energy_sums(x), quad).reshape(n, t, k, -1)  # [N, T, K, G]
        # evenly spaced among the sampled tokens and centred: a block's first token can be an
        # attention sink (position 0), whose residual says least about the rotation
        qt = _centred(t, srch.quick_tokens)
        qg = _centred(len(split.groups), srch.quick_groups).tolist()  # one group: a third of the weights read
        rows = (torch.arange(n)[:, None] * t + qt[None, :]).reshape(-1)
        xq, csq = x[:, rows], cs[rows]
        totq = tot[:, qt]
        res = torch.zeros(n, k)
        for g, q in zip(qg, split.projections(xq, qg), strict=True):
            res += (totq[..., g] - split.explained(q, csq, g).reshape(n, -1, k)).sum(1)
        best = res.argmin(1)
        if k > 1:
            two = res.topk(2, dim=1, largest=False).values
            # an unclear winner, or a residual too small to compare (not real KV): the full refine
            unsure = ~(two[:, 1] >= srch.quick_margin * two[:, 0].clamp_min(1e-30))
            if bool(unsure.any()):
                idx = unsure.nonzero().reshape(-1)
                rf, _, _ = self.key_residuals(keys[idx], starts[idx])
                best[idx] = rf.argmin(1)
        rows_n = torch.arange(n)
        en = energy(tot.sum(3).to(torch.float64)[rows_n, :, best], self.bases.energy)
        return [
            Placement(int(p), float("nan"), float(e)) for p, e in zip(starts[rows_n, best], en, strict=True)
        ]

    def place_many(
        self, keys: torch.Tensor, refine_top: int | None = None, residual: bool = True
    ) -> list[Placement]:
        """Most likely first positions of N blocks whose keys [N, L, P, H, D] carry RoPE, with the key
        residual fraction at each (``refine_top`` overrides the search's candidates per block).
        ``residual=False``: the caller needs no residual (NaN in its place), so the refine may run
        in two passes (``_quick``); the positions and key energies are the same."""
        n = keys.shape[0]
        if n == 0:
            return []
        if not self.cal.config.undo_rope:
            return self.at(keys, [0] * n)
        scores = self.coarse_scores(keys)
        k = min(refine_top or self.search.refine_top, scores.shape[1])
        starts = self.candidates()[torch.topk(scores, k, dim=1).indices]  # [N, K]
        if not residual and self._split is not None:  # (undo_rope: returned above otherwise)
            return self._quick(keys, starts)
        res, tot, en = self.key_residuals(keys, starts)
        best = res.argmin(1)
        rows = torch.arange(n)
        frac = res[rows, best] / tot[rows, best].clamp_min(1e-30)
        return [
            Placement(int(p), float(f), float(e))
            for p, f, e in zip(starts[rows, best], frac, en[rows, best], strict=True)
        ]

    def at(self, keys: torch.Tensor, positions: Sequence[int], residual: bool = True) -> list[Placement]:
        """The key residual fractions and energies of N blocks at given first positions (a client
        sent them); ``residual=False``: the energies only (as ``place_many``)."""
        if keys.shape[0] == 0:
            return []
        starts = torch.tensor(list(positions), dtype=torch.int64)[:, None]
        if not residual and self.cal.config.undo_rope and self._split is not None:
            return self._quick(keys, starts)  # one candidate: its energy, no second pass
        res, tot, en = self.key_residuals(keys, starts)
        frac = res[:, 0] / tot[:, 0].clamp_min(1e-30)
        return [
            Placement(int(p), float(f), float(e)) for p, f, e in zip(positions, frac, en[:, 0], strict=True)
        ]

    def estimate(self, keys: torch.Tensor) -> int:
        """Most likely first position of one block whose keys [L, P, H, D] carry RoPE."""
        return self.place_many(keys[None])[0].position


def _centred(n: int, q: int) -> torch.Tensor:
    """``q`` of ``n`` indices, evenly spaced and centred (all of them when ``q >= n``)."""
    q = min(q, n)
    return ((torch.arange(q) + 0.5) * n / q).to(torch.int64)


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
    """The leading-component projections and energies of keys at many candidate positions, from
    one projection per token split by RoPE frequency (module docstring, step 2).

    For a feature f of frequency j and its rotate-half partner f' (f in the first half of a head),
    the key de-rotated to position q is z_f = c x_f + s x_f', z_f' = c x_f' - s x_f (c, s = cos,
    sin of q w_j over attention_scaling): normalised by the calibration's scale, z / scale = c u + s v
    with u = x / scale and v the partner's value over the feature's own scale (v_f = x_f' / scale_f,
    v_f' = -x_f / scale_f'). Then the projection (z - mean) / scale @ B = sum_j c_j U_j + s_j V_j -
    (mean / scale) @ B, with U_j, V_j the projections of u and v restricted to frequency j's features,
    and the energy |(z - mean) / scale|^2 a quadratic form in (c_j, s_j) with five sums per token,
    frequency and layer group (|u|^2, |v|^2, u.v, u.mean, v.mean over the group's layers and heads;
    each a weighted sum of x_f^2, x_f'^2, x_f x_f', x_f, x_f', so three batched matmuls give all of
    them). q is the candidate start plus the token's offset in the block, so the keys are read as they
    arrive (RoPE at their absolute position) and nothing is de-rotated. Exact up to float rounding:
    the same figures as de-rotating every candidate.

    Token rows are frequency-major, ``X [J, M, 2, L*H]`` (``rows``): the layout both batched
    matmuls read without a copy of their own."""

    def __init__(self, bases: ResidualBases, rope: RotaryParams) -> None:
        j = self.half = rope.head_dim // 2
        self.inv_freq = rope.inv_freq.to(torch.float64)
        self.scale = rope.attention_scaling
        inv, mus, mu2 = [], [], []
        self.groups: list[tuple[int, int, torch.Tensor, torch.Tensor]] = []
        for a, b, mean, scale, basis in bases.groups:
            lg, r = b - a, basis.shape[1]
            sc = scale.to(torch.float32)
            inv.append((1 / sc).reshape(lg, -1, 2, j))
            mus.append((mean.to(torch.float32) / sc).reshape(lg, -1, 2, j))
            mu2.append(float((mus[-1] * mus[-1]).sum()))
            wu = (basis.to(torch.float32) / sc[:, None]).reshape(lg, -1, 2, j, r)
            wv = torch.stack([-wu[:, :, 1], wu[:, :, 0]], 2)  # weights of x for v's projection
            # [J, 2*Lg*H, 2r]: rows in X's (half, layer, head) order, u's then v's components
            w = torch.cat([wu, wv], -1).permute(3, 2, 0, 1, 4).reshape(j, -1, 2 * r).contiguous()
            mu_b = (mus[-1].reshape(-1) @ basis.to(torch.float32)).contiguous()  # [r]
            self.groups.append((a, b, w, mu_b))
        heads = self.heads = inv[0].shape[1]
        iv, mu = torch.cat(inv), torch.cat(mus)  # [L, H, 2, J]
        ia, ib = iv[:, :, 0].reshape(-1, j).T, iv[:, :, 1].reshape(-1, j).T  # [J, L*H]
        ma, mb = mu[:, :, 0].reshape(-1, j).T, mu[:, :, 1].reshape(-1, j).T
        n_groups, lh = len(self.groups), iv.shape[0] * heads
        onehot = torch.zeros(lh, n_groups)  # which group each (layer, head) column sums into
        for gi, (a, b, _, _) in enumerate(self.groups):
            onehot[a * heads : b * heads, gi] = 1

        def weights(*rows: torch.Tensor) -> torch.Tensor:
            """rows[i][c]: [J, L*H] weights of input block i for sum c -> [J, blocks*L*H, sums*G]."""
            w = torch.stack([torch.stack(list(r), -1) for r in rows], 1)  # [J, blocks, L*H, sums]
            w = w[..., None] * onehot[None, None, :, None, :]  # [J, blocks, L*H, sums, G]
            return w.reshape(j, -1, w.shape[-2] * n_groups).contiguous()

        # the five sums (|u|^2, |v|^2, u.v, u.mean, v.mean) from three products of X: its square
        # ((x_f^2, x_f'^2) -> |u|^2, |v|^2), x_f x_f' (-> u.v), and X itself (-> u.mean, v.mean)
        self.w_sq = weights((ia * ia, ib * ib), (ib * ib, ia * ia))  # [J, 2*L*H, 2G]
        self.w_cross = weights((ia * ia - ib * ib,))  # [J, L*H, G]
        self.w_lin = weights((ia * ma, -ib * mb), (ib * mb, ia * ma))  # [J, 2*L*H, 2G]
        self.mu2 = torch.tensor(mu2, dtype=torch.float32)  # [G]

    def rows(self, keys: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
        """keys [N, L, P, H, D] (RoPE at their positions), sampled offsets [T] -> X [J, N*T, 2, L*H]
        float32, row n*T + t the block n's token tok[t]: one gather copy."""
        n, layers, page, heads, _ = keys.shape
        j = self.half
        x = keys.reshape(n, layers, page, heads, 2, j).permute(5, 0, 2, 4, 1, 3)  # [J, N, P, 2, L, H]
        # index_select writes its output contiguous: the gather is the one copy (x[:, :, tok] is not)
        return torch.index_select(x, 2, tok).to(torch.float32).reshape(j, -1, 2, layers * heads)

    def energy_sums(self, x: torch.Tensor) -> torch.Tensor:
        """X [J, M, 2, L*H] -> [M, 5J, G]: per frequency and layer group the five sums whose
        cos/sin-weighted total is the normalised energy at any position (class docstring)."""
        j, m = x.shape[:2]
        sq = torch.bmm(x.square().reshape(j, m, -1), self.w_sq).reshape(j, m, 2, -1)  # |u|^2, |v|^2
        cross = torch.bmm(x[:, :, 0] * x[:, :, 1], self.w_cross)[:, :, None]  # u.v
        lin = torch.bmm(x.reshape(j, m, -1), self.w_lin).reshape(j, m, 2, -1)  # u.mean, v.mean
        return torch.cat([sq, cross, lin], 2).transpose(0, 1).reshape(m, j * 5, -1)

    def projections(self, x: torch.Tensor, groups: Sequence[int]) -> list[torch.Tensor]:
        """X [J, M, 2, L*H] -> per asked layer group, the rows' projections split by frequency,
        [M, 2J, r] ((j, u|v)-major): one batched matmul per group."""
        j, m = x.shape[:2]
        out = []
        for gi in groups:
            a, b, w, _ = self.groups[gi]
            r = w.shape[-1] // 2
            h = self.heads
            xg = x[:, :, :, a * h : b * h].reshape(j, m, -1)  # copies: the group's columns only
            q = torch.bmm(xg, w)  # [J, M, 2r]
            out.append(q.reshape(j, m, 2, r).transpose(0, 1).reshape(m, 2 * j, r))
        return out

    def weights(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [M, K] (each row's candidate positions) -> (quadratic-form weights [M, K, 5J],
        projection weights [M, K, 2J]) of the rotation to each."""
        ang = positions.to(torch.float64)[..., None] * self.inv_freq  # [M, K, J]
        c, s = (ang.cos() / self.scale).to(torch.float32), (ang.sin() / self.scale).to(torch.float32)
        m, k, j = ang.shape
        quad = torch.stack([c * c, s * s, 2 * c * s, -2 * c, -2 * s], -1).reshape(m, k, j * 5)
        return quad, torch.stack([c, s], -1).reshape(m, k, j * 2)

    def energies(self, sums: torch.Tensor, quad: torch.Tensor) -> torch.Tensor:
        """[M, 5J, G] sums, [M, K, 5J] weights -> [M, K, G] normalised energy per layer group."""
        return torch.bmm(quad, sums) + self.mu2

    def explained(self, q: torch.Tensor, cs: torch.Tensor, gi: int) -> torch.Tensor:
        """A group's split projection [M, 2J, r] and weights [M, K, 2J] -> [M, K] energy inside
        the leading components at each candidate."""
        return (torch.bmm(cs, q) - self.groups[gi][3]).square().sum(-1)
