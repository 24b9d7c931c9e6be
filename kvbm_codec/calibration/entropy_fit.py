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
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch

from kvbm_codec.codec.allocation import Allocation
from kvbm_codec.codec.ecsq import EcsqBasis, basis_step, quantize_basis, sigmas
from kvbm_codec.codec.entropy import ClassRuns, CodeTables
from kvbm_codec.codec.params import Calibration, allocation_name, block_allocation_name
from kvbm_codec.codec.pca import to_features
from kvbm_codec.codec.quantize import Block
from kvbm_codec.codec.rope import undo_rope
from kvbm_codec.kv import KVCache

FIRST_STEPS = tuple(0.05 * 2.0**i for i in range(8))
"""Global steps the first tables are fitted at: 0.05 .. 6.4, wider than any target's step."""
MIN_SCALE = 0.3
"""Components under this many steps of calibrated standard deviation are dropped: their codes are
nearly all zero, yet each costs the matmuls and the coder as much as a rich one. Chosen on the
validation texts at 20x (docs/benchmarks.md, "Session 25", the component floor): at 0.3 a
calibration keeps 4654 components instead of 8032 (0.1) and codes 1.6x faster, for 6-15% more KL,
still 0.54-0.81x of the DP's; at 1.0 The Tempest lost the gain. Frames never re-derive it: the
allocation records how many components each basis keeps."""
FRAME_CORRECTIONS = 3
"""Rebisections of a target whose real frames of the held-out mix store less than it (the step is
bisected on code lengths alone; headers, stream words and the gains' DEFLATE are not in them): each
scales the bit budget by measured / target, less CORRECTION_MARGIN. At floor 0.3 the 20x frames
stored 19.97x before; two corrections without the margin left 32-token blocks at 19.998x."""
CORRECTION_MARGIN = 1e-3
CORRECTION_BISECTIONS = 8  # log-step bisection over [step, 1.05 step]: the step to 0.02% again
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
        eb = ecsq_basis(cal, name, step)
        q, _, classes = quantize_basis(c[:, : eb.n_kept], eb)
        yield q, classes


def _bits_per_token(
    cal: Calibration, tables: CodeTables, sets: Sequence[dict[str, torch.Tensor]], step: float
) -> float:
    tokens = sum(next(iter(c.values())).shape[0] for c in sets)
    bits = sum(tables.code_bits(q, k) for c in sets for q, k in _codes(cal, c, step))
    return (bits + 16 * len(cal.bases) * tokens) / tokens  # + one fp16 gain per token and basis


def _step_for(
    cal: Calibration,
    tables: CodeTables,
    sets: Sequence[dict[str, torch.Tensor]],
    budget: float,
    bracket: tuple[float, float] = (1e-3, 1e2),
    bisections: int = BISECTIONS,
) -> float:
    """Smallest global step in ``bracket`` whose codes fit ``budget`` bits per token."""
    lo, hi = math.log(bracket[0]), math.log(bracket[1])
    for _ in range(bisections):
        mid = (lo + hi) / 2
        if _bits_per_token(cal, tables, sets, math.exp(mid)) > budget:
            lo = mid
        else:
            hi = mid
    return math.exp(hi)


def entropy_allocation(cal: Calibration, step: float) -> Allocation:
    """The allocation at a global step: each basis one block of its kept components."""
    blocks = {}
    for name in cal.bases:
        n = ecsq_basis(cal, name, step).n_kept
        blocks[name] = [Block(0, n, 8)] if n else []
    alloc = Allocation(blocks=blocks, step=step)
    alloc.meta["min_scale"] = MIN_SCALE
    return alloc


def ecsq_basis(cal: Calibration, name: str, step: float) -> EcsqBasis:
    """One basis at a global step, its kept components those of at least MIN_SCALE steps of sigma."""
    weight = cal.error_tables[name].weight
    eigenvalues = cal.bases[name].eigenvalues
    kept = int(np.count_nonzero(sigmas(eigenvalues) / basis_step(step, weight) >= MIN_SCALE))
    return EcsqBasis.of(eigenvalues, weight, step, kept)


def entropy_allocations(
    cal: Calibration,
    held_out: KVCache,
    sources: Sequence[KVCache],
    targets: Sequence[float],
    block_ratios: Mapping[int, Callable[[Allocation], float]] | None = None,
) -> None:
    """Fit ``cal.code_tables`` and put one entropy-coded allocation per target into ``cal``
    (replacing the DP's, which this calibration does not use); ``sources``: compressible held-out
    KV (one per domain) the tables and steps are fitted on, ``held_out``: the mix the frames'
    recorded ratio is measured on. ``block_ratios``: per page size, the ratio of an allocation's
    block frames of held-out KV (``BlockRatioProbe.measure``); each page size gets its own
    allocation per target (``cr20@p32``), corrected on those frames as the context's are on
    ``held_out``'s, so a block, not only a whole context, meets the target."""
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
        every = torch.zeros(held_out.n_tokens, dtype=torch.bool)  # held_out is all compressible

        def frames_cr(alloc: Allocation) -> float:
            return KVTCCodec(cal, alloc).encode_with_stats(held_out, every)[1].achieved_cr

        def meeting(target: float, step: float, measure: Callable[[Allocation], float]) -> Allocation:
            """The allocation at ``step``, made coarser until ``measure`` says its frames meet
            ``target`` (the code lengths leave out what frames add: headers, stream words, the
            gains' DEFLATE)."""
            alloc = entropy_allocation(cal, step)
            cr, budget = measure(alloc), fp16_bits / target
            for _ in range(FRAME_CORRECTIONS):
                if cr >= target:
                    break
                budget *= cr / target * (1 - CORRECTION_MARGIN)
                # a coarser step by well under 5%: bisected in that bracket to the same precision
                step = _step_for(cal, tables, thin, budget, (step, step * 1.05), CORRECTION_BISECTIONS)
                alloc = entropy_allocation(cal, step)
                cr = measure(alloc)
            alloc.meta.update(target_cr=float(target), calibration_cr=cr)
            return alloc

        for target, step in zip(targets, steps, strict=True):
            context = cal.allocations[allocation_name(target)] = meeting(target, step, frames_cr)
            for page, measure in (block_ratios or {}).items():
                block = meeting(target, context.step, measure)
                block.meta["page_tokens"] = float(page)
                cal.allocations[block_allocation_name(target, page)] = block
