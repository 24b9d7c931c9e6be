"""Code tables and steps of an entropy-coded calibration (``CodecConfig.quantizer="ecsq"``).

Both come from held-out calibration KV, never evaluation text: the tables pool the codes of every
basis at a spread of steps (a class is a ``sigma / step`` bin, so one table serves every step),
then each target ratio gets the smallest global step whose codes, by the tables' own code lengths,
fit the target's bits per token. The tables are refitted once at the steps found and the steps
bisected again, so each table is fitted where it is used. The frames' real ratio on the held-out
mix is recorded beside each allocation (``calibration_cr``), as for the DP's allocations.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from kvbm_codec.codec.allocation import Allocation
from kvbm_codec.codec.ecsq import EcsqBasis, quantize_basis
from kvbm_codec.codec.entropy import ClassRuns, CodeTables
from kvbm_codec.codec.params import Calibration, allocation_name
from kvbm_codec.codec.pca import to_features
from kvbm_codec.codec.quantize import Block
from kvbm_codec.codec.rope import undo_rope
from kvbm_codec.kv import KVCache

FIRST_STEPS = tuple(0.05 * 2.0**i for i in range(8))
"""Global steps the first tables are fitted at: 0.05 .. 6.4, wider than any target's step."""
BISECTIONS = 16  # log-step bisection over [1e-3, 1e2]: the step to 0.02%
BISECT_EVERY = 2
"""The bisection reads every other token of the sources: the codes' mean length to ~0.5%, at half
the cost of the phase's many passes."""


def _coefficients(cal: Calibration, kv: KVCache) -> dict[str, torch.Tensor]:
    """Every basis' full-rank coefficients of ``kv``'s tokens (all compressible, as held_out is)."""
    keys = undo_rope(kv.keys, kv.positions, cal.rope) if cal.config.undo_rope else kv.keys
    out = {}
    for gi, (a, b) in enumerate(cal.config.layer_groups(cal.shape.n_layers)):
        for kind, x in (("k", keys[a:b]), ("v", kv.values[a:b])):
            name = cal.basis_name(gi, kind)
            out[name] = cal.bases[name].project(to_features(x)).to(torch.float32)
    return out


def _codes(
    cal: Calibration, coeffs: dict[str, torch.Tensor], step: float
) -> Iterator[tuple[np.ndarray, ClassRuns]]:
    """(codes, classes) of each basis at a global step, as a frame codes them."""
    for name, c in coeffs.items():
        eb = EcsqBasis.of(cal.bases[name].eigenvalues, cal.error_tables[name].weight, step)
        q, _, classes = quantize_basis(c[:, : eb.n_kept], eb)
        yield q, classes


def _bits_per_token(
    cal: Calibration, tables: CodeTables, sets: Sequence[dict[str, torch.Tensor]], step: float
) -> float:
    tokens = sum(next(iter(c.values())).shape[0] for c in sets)
    bits = sum(tables.code_bits(q, k) for c in sets for q, k in _codes(cal, c, step))
    return (bits + 16 * len(cal.bases) * tokens) / tokens  # + one fp16 gain per token and basis


def _step_for(
    cal: Calibration, tables: CodeTables, sets: Sequence[dict[str, torch.Tensor]], budget: float
) -> float:
    """Smallest global step whose codes fit ``budget`` bits per token."""
    lo, hi = math.log(1e-3), math.log(1e2)
    for _ in range(BISECTIONS):
        mid = (lo + hi) / 2
        if _bits_per_token(cal, tables, sets, math.exp(mid)) > budget:
            lo = mid
        else:
            hi = mid
    return math.exp(hi)


def entropy_allocation(cal: Calibration, step: float) -> Allocation:
    """The allocation at a global step: each basis one block of its kept components."""
    blocks = {}
    for name, basis in cal.bases.items():
        n = EcsqBasis.of(basis.eigenvalues, cal.error_tables[name].weight, step).n_kept
        blocks[name] = [Block(0, n, 8)] if n else []
    return Allocation(blocks=blocks, step=step)


def entropy_allocations(
    cal: Calibration, held_out: KVCache, sources: Sequence[KVCache], targets: Sequence[float]
) -> None:
    """Fit ``cal.code_tables`` and put one entropy-coded allocation per target into ``cal``
    (replacing the DP's, which this calibration does not use); ``sources``: compressible held-out
    KV (one per domain) the tables and steps are fitted on, ``held_out``: the mix the frames'
    recorded ratio is measured on."""
    from kvbm_codec.codec.kvtc import KVTCCodec

    with torch.inference_mode():
        sets = [_coefficients(cal, kv) for kv in (sources or [held_out])]
        thin = [{n: c[::BISECT_EVERY] for n, c in cs.items()} for cs in sets]
        s = cal.shape
        fp16_bits = 16 * s.n_layers * s.n_kv_heads * (s.key_head_dim + s.value_head_dim)
        tables = CodeTables.fit(pair for c in sets for st in FIRST_STEPS for pair in _codes(cal, c, st))
        steps = [_step_for(cal, tables, thin, fp16_bits / t) for t in targets]
        tables = CodeTables.fit(pair for c in sets for st in steps for pair in _codes(cal, c, st))
        steps = [_step_for(cal, tables, thin, fp16_bits / t) for t in targets]
        cal.code_tables = tables
        cal.allocations.clear()
        for target, step in zip(targets, steps, strict=True):
            alloc = entropy_allocation(cal, step)
            every = torch.zeros(held_out.n_tokens, dtype=torch.bool)  # held_out is all compressible
            _, stats = KVTCCodec(cal, alloc).encode_with_stats(held_out, every)
            alloc.meta.update(target_cr=float(target), calibration_cr=stats.achieved_cr)
            cal.allocations[allocation_name(target)] = alloc
