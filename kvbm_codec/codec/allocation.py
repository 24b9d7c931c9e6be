"""Dynamic-programming bit allocation over principal components.

For every basis (keys or values of a layer group) the DP tiles the components 0..r-1 with blocks
whose size comes from the allowed scale/shift group sizes (aligned to their size) and gives each
block a bit width 0..max_bits (0 drops it). It minimises measured calibration MSE + lambda * bits,
an exact DP over the tiling (rate-distortion optimisation as in image/video coders); a bisection on
lambda meets a bit budget. One lambda across all bases spends bits where they buy the most error,
across layers and between keys and values.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from kvbm_codec.codec.quantize import Block


@dataclass
class ErrorTable:
    """Measured errors of one basis: {group size: [max_bits + 1, rank // g]}."""

    rank: int
    tables: dict[int, np.ndarray]
    residual: float = 0.0  # error of components beyond the stored rank (always dropped)
    weight: float = 1.0


@dataclass
class Allocation:
    blocks: dict[str, list[Block]]  # basis name (e.g. "g0.k") -> tiling of its components
    meta: dict[str, float] = field(default_factory=dict)
    step: float = 0.0
    """> 0: an entropy-coded allocation (codec/ecsq.py) with this global step, each basis one block
    of its kept components (their ``bits`` unused); 0: the DP's bit widths per group."""

    @property
    def entropy_coded(self) -> bool:
        return self.step > 0

    def bits_per_token(self, scale_bits: int) -> int:
        return sum(b.size * b.bits + scale_bits for bl in self.blocks.values() for b in bl if b.bits > 0)

    def to_json(self) -> str:
        return json.dumps(
            {
                "blocks": {k: [[b.start, b.size, b.bits] for b in v] for k, v in sorted(self.blocks.items())},
                "meta": self.meta,
            }
            | ({"step": self.step} if self.entropy_coded else {}),
            sort_keys=True,
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> Allocation:
        d = json.loads(text)
        return cls(
            blocks={k: [Block(*map(int, b)) for b in v] for k, v in d["blocks"].items()},
            meta=d.get("meta", {}),
            step=float(d.get("step", 0.0)),
        )

    @property
    def allocation_id(self) -> str:
        """Content hash of the tiling (and an entropy-coded one's step) only: two allocations decode
        alike iff their ids match. A DP allocation's id is what it was before steps existed."""
        tiling: dict = {k: [[b.start, b.size, b.bits] for b in v] for k, v in sorted(self.blocks.items())}
        body = json.dumps(
            tiling | ({"step": repr(self.step)} if self.entropy_coded else {}), separators=(",", ":")
        )
        return hashlib.sha256(body.encode()).hexdigest()[:16]

    def summary(self) -> dict[str, dict[str, int]]:
        """Per basis: components kept and bits per token, for docs and `inspect`."""
        out = {}
        for name, bl in sorted(self.blocks.items()):
            kept = [b for b in bl if b.bits > 0]
            out[name] = {"components": sum(b.size for b in kept), "groups": len(kept)}
            if not self.entropy_coded:  # an entropy-coded allocation's bits depend on the data
                out[name]["code_bits"] = sum(b.size * b.bits for b in kept)
        return out


def _dp_one(table: ErrorTable, lam: float, scale_bits: int) -> list[Block]:
    """Exact DP over aligned tilings, bottom-up.

    Group sizes form a divisibility chain (1 | 16 | 64 | ...), so aligned blocks nest like a
    quadtree: the best cost of an aligned block of size g is min(coding it as one group, the best
    costs of its aligned sub-blocks of the next smaller size). That makes the DP a handful of
    vectorised reductions instead of a Python loop over components. Components past the last full
    block of a size are tiled by the smaller sizes.
    """
    sizes = sorted(table.tables)
    r = table.rank
    single_cost: dict[int, np.ndarray] = {}
    single_bits: dict[int, np.ndarray] = {}
    for g in sizes:
        t = table.tables[g]
        bits = np.arange(t.shape[0])
        rate = np.where(bits > 0, g * bits + scale_bits, 0).astype(np.float64)
        cost = table.weight * t + lam * rate[:, None]
        single_bits[g] = cost.argmin(0)
        single_cost[g] = cost.min(0)
    best = {sizes[0]: single_cost[sizes[0]]}
    split: dict[int, np.ndarray] = {sizes[0]: np.zeros(len(single_cost[sizes[0]]), dtype=bool)}
    for small, g in itertools.pairwise(sizes):
        n = r // g
        k = g // small
        children = best[small][: n * k].reshape(n, k).sum(1)
        split[g] = children < single_cost[g]
        best[g] = np.where(split[g], children, single_cost[g])

    blocks: list[Block] = []

    def emit(start: int, level: int) -> None:
        g = sizes[level]
        if level > 0 and split[g][start // g]:
            small = sizes[level - 1]
            for s in range(start, start + g, small):
                emit(s, level - 1)
        else:
            blocks.append(Block(start, g, int(single_bits[g][start // g])))

    pos = 0
    for level in range(len(sizes) - 1, -1, -1):
        g = sizes[level]
        while pos + g <= r:
            emit(pos, level)
            pos += g
    return blocks


def allocate(tables: dict[str, ErrorTable], lam: float, scale_bits: int) -> Allocation:
    return Allocation({name: _dp_one(t, lam, scale_bits) for name, t in tables.items()})


def predicted_error(tables: dict[str, ErrorTable], alloc: Allocation) -> dict[str, float]:
    """Calibration MSE per token the allocation is expected to give, per basis (unweighted)."""
    out = {}
    for name, t in tables.items():
        err = t.residual
        for b in alloc.blocks[name]:
            err += float(t.tables[b.size][b.bits, b.start // b.size])
        out[name] = err
    return out


def _memo(measure_cr: Callable[[Allocation], float], seen: dict[str, float]) -> Callable[[Allocation], float]:
    def measure(alloc: Allocation) -> float:
        key = alloc.allocation_id
        if key not in seen:
            seen[key] = measure_cr(alloc)
        return seen[key]

    return measure


NEAR_SPAN = 0.15  # log10 lambda: block and context allocations of one target land this close


def allocate_for_ratio(
    tables: dict[str, ErrorTable],
    target_cr: float,
    scale_bits: int,
    measure_cr: Callable[[Allocation], float],
    iterations: int = 24,
    near: float | None = None,
) -> Allocation:
    """Best allocation whose measured ratio (after packing + DEFLATE, headers included) >= target_cr.

    DEFLATE's gain depends on the allocation, so lambda is bisected against real encodes of
    held-out calibration tokens rather than against a nominal bit count. ``near`` (a lambda known to
    land close, e.g. the same target's context allocation when sizing block allocations) narrows the
    first bracket to +-NEAR_SPAN decades around it, widened while it does not hold the answer: the
    same result to the bisection's precision in fewer encodes.
    """
    lo, hi = -12.0, 12.0  # log10 lambda; the ratio grows with lambda
    best: Allocation | None = None
    # Nearby lambdas often give the same tiling (the DP's answer is piecewise constant in lambda),
    # and a tiling's ratio is the same every time: measure each tiling once (~10% of the encodes).
    seen: dict[str, float] = {}
    measure = _memo(measure_cr, seen)
    if near is not None and near > 0:
        c, span = math.log10(near), NEAR_SPAN
        while c + span < hi:
            a = allocate(tables, 10.0 ** (c + span), scale_bits)
            cr = measure(a)
            if cr >= target_cr:
                best, hi = a, c + span
                best.meta.update(calibration_cr=cr, **{"lambda": 10.0**hi})
                break
            lo, span = c + span, span * 4
        span = NEAR_SPAN
        while best is not None and c - span > lo:
            a = allocate(tables, 10.0 ** (c - span), scale_bits)
            cr = measure(a)
            if cr < target_cr:
                lo = c - span
                break
            best, hi = a, c - span
            best.meta.update(calibration_cr=cr, **{"lambda": 10.0**hi})
            span *= 4
        if best is None:
            lo = max(lo, -12.0)
    for _ in range(iterations):
        mid = (lo + hi) / 2
        a = allocate(tables, 10.0**mid, scale_bits)
        cr = measure(a)
        if cr >= target_cr:
            best, hi = a, mid
            best.meta.update(calibration_cr=cr, **{"lambda": 10.0**mid})
        else:
            lo = mid
        if hi - lo < 0.01:
            break
    if best is None:
        raise ValueError(f"no allocation reaches {target_cr}x on the calibration data")
    best.meta["target_cr"] = float(target_cr)
    best.meta["nominal_bits_per_token"] = float(best.bits_per_token(scale_bits))
    return best
