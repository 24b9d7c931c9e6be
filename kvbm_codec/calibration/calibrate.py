"""Offline calibration: real model KV on calibration text -> PCA bases, error tables, allocations.

Sink and recent-window positions are excluded (they are never compressed), keys are de-rotated
(RoPE undone) before entering the covariance. A separate held-out calibration sequence (never
used to fit the PCA) provides the measured quantization errors and the ratio measurements, so the
allocator is not tuned on the data the basis was fitted to.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from itertools import islice
from typing import TYPE_CHECKING, Protocol, cast

import torch
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

import kvbm_codec
from kvbm_codec.calibration.statistics import ModelStatistics, feature_weights, gather_statistics
from kvbm_codec.codec.allocation import Allocation, ErrorTable, allocate_for_ratio
from kvbm_codec.codec.config import CodecConfig
from kvbm_codec.codec.params import (
    Calibration,
    ModelShape,
    allocation_name,
    basis_name,
    block_allocation_name,
    context_allocation_name,
)
from kvbm_codec.codec.pca import CovarianceAccumulator, PCABasis, to_features
from kvbm_codec.codec.quantize import block_error_table
from kvbm_codec.codec.rope import RotaryParams, undo_rope
from kvbm_codec.core.heap import heap_kept
from kvbm_codec.core.matmul import exact_fp32
from kvbm_codec.kv import KVCache

if TYPE_CHECKING:
    from kvbm_codec.codec.kvtc import KVTCCodec

DEFAULT_TARGETS = (4.0, 8.0, 16.0, 20.0, 32.0, 64.0)
DEFAULT_BLOCK_TOKENS = (32,)
BLOCK_PROBE_BLOCKS = 64  # block frames a block allocation's ratio is measured on
"""Page sizes that get allocations sized on their block frames (KVBM's and the service's default)."""
BLOCK_ALLOCATION_VERSION = 2
"""How block allocations are sized; part of the calibration cache key, so a change reaches users as a
new calibration. 2: blocks measured at their true positions (1 renumbered them from 0 and sized the
allocations ~5% too rich; docs/benchmarks.md, "Block allocations measured at true positions")."""
CONTEXT_TOKENS = (2048, 1024, 512, 256)
"""Context lengths whose whole-context frames get allocations sized on frames of that length: a frame
stores better the longer it is (at cr20 18.8x at 256 compressed tokens, 20.2x at 1024, 20.6x at 1916,
the same on every text: docs/benchmarks.md, "Context allocations sized at the stored length"), so one
allocation per target cannot land at the target at every length. The first, the eval's and the
README's 2048-token context, gets the plain name (``cr20``); the others ``cr20@c1024`` etc., and
``Calibration.context_allocation`` picks the longest whose frames are no longer than the context's
(never below the target from 256-token contexts up)."""
CONTEXT_ALLOCATION_VERSION = 2
"""How context allocations are sized; part of the calibration cache key, like BLOCK_ALLOCATION_VERSION.
2: one allocation per CONTEXT_TOKENS length, each bisected on held-out frames of that length (1: one per
target, sized on the ~1020-token held-out mix, which landed 3% above the target at 2048 tokens and
below it under ~1000)."""


class CalibrationModel(Protocol):
    """What calibration needs of a model: a tokenizer, its shape, and a prefill returning only KV
    (no logits: calibration never reads them, and the work after the last layer's KV is skipped)."""

    tokenizer: object

    @property
    def info(self) -> object: ...

    def prefill_kv(self, input_ids: torch.Tensor) -> KVCache: ...


def _fit_model(lm: CalibrationModel, prefill_dtype: str) -> CalibrationModel:
    """The model the covariance prefills run on: ``lm`` itself in float32, else its copy in
    ``prefill_dtype`` (models.hf.CausalLM.in_dtype). Those prefills only feed sums (covariances,
    query and residual energies); the held-out prefill and the sensitivity probe, which measure
    errors, stay on ``lm``. Opt-in: on validation text a bf16 copy's calibration had 1.02-1.08x the
    float32 recipe's KL at 16-64x and 1.22x at 8x (docs/benchmarks.md, "Session 21: calibration
    prefills in bf16"), for 1.2x less calibration time."""
    if prefill_dtype == "float32":
        return lm
    in_dtype = getattr(lm, "in_dtype", None)
    if in_dtype is None:
        raise ValueError(f"prefill dtype {prefill_dtype!r} needs a model with in_dtype (models.hf.CausalLM)")
    return cast(CalibrationModel, in_dtype(getattr(torch, prefill_dtype)))


class PhaseClock:
    """Wall time of each calibration phase: printed as each ends (progress on a slow machine) and kept
    in the artifact's provenance, so a slow calibration says which phase was slow."""

    def __init__(self, progress: bool = True) -> None:
        self.progress = progress
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            dt_s = time.perf_counter() - t0
            self.seconds[name] = self.seconds.get(name, 0.0) + dt_s
            if self.progress:
                print(f"calibration: {name} took {dt_s:.1f} s", file=sys.stderr, flush=True)

    def rounded(self) -> dict[str, float]:
        return {k: round(v, 2) for k, v in self.seconds.items()}


def compressible(kv: KVCache, cfg: CodecConfig) -> KVCache:
    """The tokens KVTC would compress: no sinks, no recent window."""
    n = kv.n_tokens
    keep = (kv.positions >= cfg.sink_tokens) & (torch.arange(n) < n - cfg.window_tokens)
    return kv.select_tokens(torch.nonzero(keep).flatten())


def token_sequences(tokenizer: object, texts: Sequence[str], seq_len: int, count: int) -> list[torch.Tensor]:
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])  # type: ignore[operator]
        if len(ids) >= seq_len * count:
            break
    n = min(count, len(ids) // seq_len)
    if n < count:
        raise ValueError(f"calibration text gives {len(ids)} tokens, need {seq_len * count}")
    return [torch.tensor([ids[i * seq_len : (i + 1) * seq_len]]) for i in range(n)]


PREFILL_WORKERS = 2
"""Sequences prefilled at once, each on its share of torch's threads: on 2 cores two one-thread
prefills beat one two-thread prefill (no OpenMP barrier per op; docs/benchmarks.md "Calibration
speed"), and the KV is bit-identical either way."""


@contextmanager
def _threads_per_worker(workers: int) -> Iterator[None]:
    total = torch.get_num_threads()
    torch.set_num_threads(max(1, total // workers))
    try:
        yield
    finally:
        torch.set_num_threads(total)


def calibration_kv(
    lm: CalibrationModel,
    sequences: Sequence[torch.Tensor],
    progress: bool = True,
    workers: int = PREFILL_WORKERS,
) -> Iterator[KVCache]:
    """The one prefill loop of calibration: every sequence's KV (all layers), in order, so consumers
    (covariances here, other statistics elsewhere) stream it in bounded memory: at most workers + 1
    sequences' KV are in flight. Forward hooks on the model (the statistics) run in the workers."""
    bar = tqdm(total=len(sequences), desc="calibration: prefill", disable=not progress)
    if workers <= 1 or len(sequences) < 2:
        for seq in sequences:
            kv = lm.prefill_kv(seq)
            bar.update(1)
            yield kv
        bar.close()
        return
    todo = iter(sequences)
    # the consumer's numpy products (the covariances' syrk) run on this thread beside the workers: on
    # BLAS' own threads too they would oversubscribe the cores (and OpenBLAS' spin-waits then steal
    # from the prefills): 3-9% off the fit phase (docs/benchmarks.md, "Session 27")
    with (
        _threads_per_worker(workers),
        threadpool_limits(1, user_api="blas"),
        ThreadPoolExecutor(workers, thread_name_prefix="prefill") as pool,
    ):
        pending = deque(pool.submit(lm.prefill_kv, seq) for seq in islice(todo, workers + 1))
        while pending:
            kv = pending.popleft().result()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append(pool.submit(lm.prefill_kv, nxt))
            bar.update(1)
            yield kv
    bar.close()


def accumulate_covariances(
    kvs: Iterable[KVCache],
    cfg: CodecConfig,
    rope: RotaryParams,
    shape: ModelShape,
    into: dict[str, CovarianceAccumulator] | None = None,
) -> dict[str, CovarianceAccumulator]:
    """Stream KV into one covariance per basis (p x p each); no token's features are kept. ``into``
    continues earlier sums (a caller that interleaves other work with the prefills)."""
    accs: dict[str, CovarianceAccumulator] = {} if into is None else into
    groups = cfg.layer_groups(shape.n_layers)
    for full in kvs:
        kv = compressible(full, cfg)
        keys = undo_rope(kv.keys, kv.positions, rope) if cfg.undo_rope else kv.keys
        for gi, (a, b) in enumerate(groups):
            for kind, x in (("k", keys[a:b]), ("v", kv.values[a:b])):
                f = to_features(x)
                name = basis_name(gi, kind)
                if name not in accs:  # not setdefault: that builds (and zeroes) a p x p sum per call
                    accs[name] = CovarianceAccumulator(f.shape[1])
                accs[name].add(f)
    return accs


def metric_weights(
    accs: dict[str, CovarianceAccumulator],
    cfg: CodecConfig,
    shape: ModelShape,
    rope: RotaryParams,
    statistics: ModelStatistics | None,
) -> dict[str, tuple[torch.Tensor, float]] | None:
    """The distortion metric per basis (None for plain MSE)."""
    if cfg.distortion == "mse":
        return None
    if statistics is None or statistics.tokens == 0:
        raise ValueError(
            f"distortion {cfg.distortion!r} needs model statistics gathered during the calibration "
            "prefills (calibration.statistics.gather_statistics)"
        )
    return feature_weights(
        statistics,
        accs,
        cfg.layer_groups(shape.n_layers),
        shape.n_kv_heads,
        cfg.distortion,
        rope.attention_scaling,
        rope.head_dim,
    )


def finalize_bases(
    accs: dict[str, CovarianceAccumulator],
    cfg: CodecConfig,
    shape: ModelShape,
    progress: bool = True,
    metric: dict[str, tuple[torch.Tensor, float]] | None = None,
) -> dict[str, PCABasis]:
    # Features are laid out [layer, head, dim]: one normalisation run per head of each layer.
    head_dim = {"k": shape.key_head_dim, "v": shape.value_head_dim}
    return {
        name: acc.finalize(
            cfg.rank_cap,
            norm_block=head_dim[name[-1]] if cfg.normalize_heads and cfg.distortion != "attention" else 0,
            weight=None if metric is None else metric[name][0],
        )
        for name, acc in tqdm(accs.items(), desc="calibration: eigendecomposition", disable=not progress)
    }


def fit_bases(
    kvs: Iterable[KVCache], cfg: CodecConfig, rope: RotaryParams, shape: ModelShape, progress: bool = True
) -> dict[str, PCABasis]:
    """Plain-MSE bases straight from KV (the metric variants go through calibrate_from_kv)."""
    return finalize_bases(accumulate_covariances(kvs, cfg, rope, shape), cfg, shape, progress)


def error_tables(
    bases: dict[str, PCABasis],
    held_out: KVCache,
    cfg: CodecConfig,
    rope: RotaryParams,
    n_layers: int,
    factors: dict[str, float] | None = None,
) -> dict[str, ErrorTable]:
    """Measured quantization error of every block, in the basis' (metric-whitened) space; factors
    put each basis back in the metric's absolute unit so one lambda compares them."""
    keys = undo_rope(held_out.keys, held_out.positions, rope) if cfg.undo_rope else held_out.keys
    tables: dict[str, ErrorTable] = {}
    for gi, (a, b) in enumerate(cfg.layer_groups(n_layers)):
        for kind, x in (("k", keys[a:b]), ("v", held_out.values[a:b])):
            name = basis_name(gi, kind)
            f = to_features(x)
            coeffs = bases[name].project(f)
            total = float((bases[name].normalise(f) ** 2).sum(1).mean())
            kept = float((coeffs.to(torch.float64) ** 2).sum(1).mean())
            tables[name] = ErrorTable(
                rank=bases[name].rank,
                tables=block_error_table(
                    coeffs, cfg.group_sizes, cfg.max_bits, symmetric=cfg.quantizer == "symmetric"
                ),
                residual=max(0.0, total - kept),
                weight=(cfg.key_weight if kind == "k" else 1.0) * (factors or {}).get(name, 1.0),
            )
    return tables


def mixed_held_out(kvs: Sequence[KVCache], cfg: CodecConfig, tokens: int) -> KVCache:
    """About `tokens` compressible tokens, an equal contiguous slice from each domain's held-out KV:
    the allocator's error tables and ratio measurements then see every domain at the cost of one."""
    return context_probe_kv([compressible(kv, cfg) for kv in kvs], tokens)


def _concat(*kvs: KVCache) -> KVCache:
    return KVCache(
        torch.cat([k.keys for k in kvs], 2),
        torch.cat([k.values for k in kvs], 2),
        torch.cat([k.positions for k in kvs]),
    )


def context_probe_kv(sources: Sequence[KVCache], tokens: int) -> KVCache:
    """About ``tokens`` tokens (fewer if the sources hold fewer), an equal contiguous middle slice of
    each source (compressible tokens already): one frame that every domain shares in."""
    parts = []
    for c in sources:
        take = min(c.n_tokens, max(1, tokens // len(sources)))
        start = (c.n_tokens - take) // 2
        parts.append(c.select_tokens(torch.arange(start, start + take)))
    return _concat(*parts)


def _text_digest(texts: Sequence[str] | Mapping[str, Sequence[str]]) -> str:
    if isinstance(texts, Mapping):
        flat = [f"\x01{d}\x01" + "\x00".join(t) for d, t in sorted(texts.items())]
    else:
        flat = list(texts)
    return hashlib.sha256("\x00".join(flat).encode()).hexdigest()


@exact_fp32()  # the probe's KLs sit far below bf16-rounded operands' error (core/matmul.py)
@heap_kept()  # freed tensors reused, not faulted in afresh (core/heap.py)
def calibrate(
    lm: CalibrationModel,
    texts: Sequence[str] | Mapping[str, Sequence[str]],
    config: CodecConfig | None = None,
    *,
    targets: Sequence[float] = DEFAULT_TARGETS,
    fit_sequences: int | Mapping[str, int] = 16,
    seq_len: int = 1024,
    text_source: str = "",
    progress: bool = True,
    block_tokens: Sequence[int] = DEFAULT_BLOCK_TOKENS,
    prefill_dtype: str = "float32",
) -> Calibration:
    """texts: one corpus (a list of documents) or several domains ({name: documents}); with domains
    the fit sequences are split between them (evenly, or {domain: count}), each domain's next
    sequence is held out, and the held-out tokens mix all of them. prefill_dtype: what the fit
    prefills run in (float32 or bfloat16; see _fit_model)."""
    cfg = config or CodecConfig()
    clock = PhaseClock(progress)
    provenance: dict = {
        "text_source": text_source,
        "text_sha256": _text_digest(texts),
        "seq_len": seq_len,
        "distortion": cfg.distortion,
    }
    if prefill_dtype != "float32":  # absent from float32 ones, whose bytes (and ids) stay as they were
        provenance["fit_prefill_dtype"] = prefill_dtype
    if isinstance(texts, Mapping):
        if isinstance(fit_sequences, Mapping):
            counts = {d: int(fit_sequences.get(d, 0)) for d in texts}
        else:
            counts = dict.fromkeys(texts, -(-fit_sequences // len(texts)))
        by_domain = {d: token_sequences(lm.tokenizer, t, seq_len, counts[d] + 1) for d, t in texts.items()}
        fit = [s for d, seqs in by_domain.items() for s in seqs[: counts[d]]]
        with clock.phase("held-out prefill"):
            held_kvs = list(calibration_kv(lm, [seqs[counts[d]] for d, seqs in by_domain.items()], False))
        held_out = mixed_held_out(held_kvs, cfg, seq_len)
        probe_ids = [seqs[counts[d]] for d, seqs in by_domain.items()]
        probe_kvs = held_kvs
        provenance["domains"] = {d: counts[d] for d in texts}
    else:
        if isinstance(fit_sequences, Mapping):
            raise ValueError("per-domain fit_sequences need a corpus of domains")
        seqs = token_sequences(lm.tokenizer, texts, seq_len, fit_sequences + 1)
        fit = seqs[:fit_sequences]
        with clock.phase("held-out prefill"):
            held_out = lm.prefill_kv(seqs[fit_sequences])
        probe_kvs = [held_out]
        held_kvs = probe_kvs
    provenance.update(fit_tokens=len(fit) * seq_len, held_out_tokens=int(held_out.n_tokens))
    common = {
        "targets": targets,
        "provenance": provenance,
        "progress": progress,
        "held_out_compressible": isinstance(texts, Mapping),
        "clock": clock,
        "block_tokens": block_tokens,
        "ratio_sources": held_kvs if isinstance(texts, Mapping) else None,
    }
    fit_lm = _fit_model(lm, prefill_dtype)
    with _statistics_hook(fit_lm, cfg, weights_from=lm) as stats:
        if cfg.layer_sensitivity == "analytic":
            return calibrate_from_kv(
                lm.info, calibration_kv(fit_lm, fit, progress), held_out, cfg, statistics=stats, **common
            )  # type: ignore[arg-type]
        # measured: the probe needs the sums first, and must run with no statistics hook attached
        with clock.phase("prefill + covariances"):
            shape = _model_shape(lm.info)
            accs = accumulate_covariances(calibration_kv(fit_lm, fit, progress), cfg, lm.info.rope, shape)  # type: ignore[attr-defined]
    del fit_lm  # a bf16 copy's weights are not needed past the prefills
    assert stats is not None  # the config refuses 'measured' without the attention metric
    probes = probe_ids if isinstance(texts, Mapping) else [seqs[fit_sequences]]
    with clock.phase("sensitivity probe"):
        stats, measured = measured_sensitivity(
            lm, accs, held_out, cfg, stats, probes, held_out_compressible=isinstance(texts, Mapping),
            progress=progress, probe_kvs=probe_kvs,
        )  # fmt: skip
    provenance["layer_sensitivity"] = {
        "probe_cr": PROBE_CR,
        "probe_sequences": len(probes),
        "continuation": PROBE_CONTINUATION,
        "factors": _rounded(stats.layer_sensitivity),  # type: ignore[arg-type]
        "probe_kl": _rounded(measured["kl"], None),
    }
    return calibrate_from_kv(lm.info, accs, held_out, cfg, statistics=stats, **common)  # type: ignore[arg-type]


def _rounded(factors: torch.Tensor, digits: int | None = 4) -> list:
    """Nested lists ([L][2], or [L][H][2] per head) for the provenance, each entry Python-rounded as
    the per-layer provenance always was (so its bytes, and the calibration id, do not change)."""
    if factors.dim() == 1:
        return [float(x) if digits is None else round(float(x), digits) for x in factors]
    return [_rounded(row, digits) for row in factors]


PROBE_CR = 20.0
"""The allocation whose decoded error the sensitivity probe measures (the default ratio)."""
PROBE_CONTINUATION = 64
"""Tokens scored after each probe context: the last ones of every held-out calibration sequence."""


def measured_sensitivity(
    lm: CalibrationModel,
    accs: dict[str, CovarianceAccumulator],
    held_out: KVCache,
    cfg: CodecConfig,
    stats: ModelStatistics,
    probes: Sequence[torch.Tensor],
    *,
    held_out_compressible: bool,
    progress: bool = True,
    probe_kvs: Sequence[KVCache] | None = None,
) -> tuple[ModelStatistics, dict[str, torch.Tensor]]:
    """``stats`` with measured per-layer factors (``CodecConfig.layer_sensitivity="measured"``): the
    analytic metric's own calibration at PROBE_CR is built from the same sums, each probe sequence's
    context is restored with one layer's keys or values decoded at a time (calibration/sensitivity.py),
    and the output KL over the metric's predicted cost, damped by ``cfg.sensitivity_power``, rescales
    that layer's weights. Probe sequences are held-out calibration text, never evaluation text;
    ``probe_kvs`` (their whole-sequence KV from the held-out prefill) spares the probe a second prefill
    of each context."""
    from kvbm_codec.calibration.sensitivity import ProbeModel, measure_layer_sensitivity, sensitivity_factors
    from kvbm_codec.codec.kvtc import KVTCCodec

    if not hasattr(lm, "logits_with_cache"):
        raise ValueError(
            "layer_sensitivity='measured' needs a model that scores continuations (logits_with_cache)"
        )
    analytic = cfg.model_copy(
        update={"layer_sensitivity": "analytic", "sensitivity_power": 1.0, "sensitivity_heads": False}
        # an entropy-coded recipe's probe measures each layer with the DP's min/max codec: what a
        # layer's error costs the model is the metric's business, not the quantizer's
        | ({"quantizer": "minmax"} if cfg.quantizer == "ecsq" else {})
    )
    shape = _model_shape(lm.info)
    base = calibrate_from_kv(
        lm.info, accs, held_out, analytic, targets=[PROBE_CR], statistics=stats, progress=False,
        held_out_compressible=held_out_compressible, context_lengths=None,
    )  # fmt: skip
    metric = metric_weights(accs, analytic, shape, lm.info.rope, stats)  # type: ignore[attr-defined]
    assert metric is not None
    measured = measure_layer_sensitivity(
        cast(ProbeModel, lm),
        KVTCCodec(base, allocation_name(PROBE_CR)),
        metric,
        analytic.layer_groups(shape.n_layers),
        probes,
        continuation=PROBE_CONTINUATION,
        progress=progress,
        prefilled=probe_kvs,
        per_head=cfg.sensitivity_heads,
    )
    return stats.with_sensitivity(sensitivity_factors(measured, cfg.sensitivity_power)), measured


def _model_shape(info: object) -> ModelShape:
    return ModelShape(info.n_layers, info.n_kv_heads, info.key_head_dim, info.value_head_dim)  # type: ignore[attr-defined]


@contextmanager
def _statistics_hook(
    lm: CalibrationModel, cfg: CodecConfig, weights_from: CalibrationModel | None = None
) -> Iterator[ModelStatistics | None]:
    """Query/residual statistics gathered in the same prefills as the covariances (metric modes only);
    the o_proj grams come from ``weights_from``'s weights (the float32 model when ``lm`` is its bf16 copy)."""
    if cfg.distortion == "mse":
        yield None
        return
    model = getattr(lm, "model", None)
    if model is None:
        raise ValueError(
            f"distortion {cfg.distortion!r} needs the torch model (lm.model) to gather statistics"
        )
    n_q = int(model.config.num_attention_heads)
    source = getattr(weights_from or lm, "model", model)
    with gather_statistics(model, n_q, lm.info.key_head_dim, weights_from=source) as stats:  # type: ignore[attr-defined]
        yield stats


def calibrate_small(lm: CalibrationModel, quantizer: str = "minmax") -> Calibration:
    """A real but small calibration (4 x 512 tokens, 6-layer bases, 8x and 20x allocations): seconds
    instead of minutes on 2 cores. The test fixtures and the fuzz corpus share it. Plain MSE keeps it
    independent of the model statistics (tests/test_distortion.py covers the metric path)."""
    from kvbm_codec.texts import calibration_texts

    return calibrate(
        lm,
        calibration_texts(),
        CodecConfig(layer_group_size=6, distortion="mse", quantizer=quantizer),  # type: ignore[arg-type]
        targets=(8.0, 20.0),
        fit_sequences=4,
        seq_len=512,
        text_source="pydoc_data.topics",
        progress=False,
    )


@exact_fp32()
def calibrate_from_kv(
    info: object,
    fit_kvs: Iterable[KVCache] | dict[str, CovarianceAccumulator],
    held_out: KVCache,
    config: CodecConfig | None = None,
    *,
    targets: Sequence[float] = DEFAULT_TARGETS,
    provenance: dict | None = None,
    progress: bool = True,
    clock: PhaseClock | None = None,
    statistics: ModelStatistics | None = None,
    held_out_compressible: bool = False,
    block_tokens: Sequence[int] = (),
    ratio_sources: Sequence[KVCache] | None = None,
    context_lengths: Sequence[int] | None = CONTEXT_TOKENS,
) -> Calibration:
    """Calibration from already-computed KV, or from covariance sums (lets sweeps reuse one set of
    prefills, and mix corpus domains). held_out is the KV the error tables and ratios are measured on:
    a prefill's whole cache (sinks and window are dropped here), or, with held_out_compressible,
    tokens already chosen (mixed_held_out). block_tokens: page sizes whose block frames get their own
    allocation per target (``block_allocations``). ratio_sources: whole held-out prefills (one per
    domain) the context allocations' frames are cut from, so they can be longer than held_out (default:
    held_out alone); context_lengths: the lengths they are sized for (sized_context_allocations), or
    None: one allocation per target sized on held_out alone (version 1; the sensitivity probe's own)."""
    clock = clock or PhaseClock(progress)
    cfg = config or CodecConfig()
    shape = ModelShape(info.n_layers, info.n_kv_heads, info.key_head_dim, info.value_head_dim)  # type: ignore[attr-defined]
    rope: RotaryParams = info.rope  # type: ignore[attr-defined]
    if isinstance(fit_kvs, dict):
        accs = fit_kvs  # summed by the caller, which timed its own prefills
    else:
        with clock.phase("prefill + covariances"):
            accs = accumulate_covariances(fit_kvs, cfg, rope, shape)
    metric = metric_weights(accs, cfg, shape, rope, statistics)
    with clock.phase("eigendecomposition"):
        bases = finalize_bases(accs, cfg, shape, progress, metric)
    val_kv = held_out if held_out_compressible else compressible(held_out, cfg)
    factors = None if metric is None else {n: f for n, (_, f) in metric.items()}
    with clock.phase("error tables"):
        tables = error_tables(bases, val_kv, cfg, rope, shape.n_layers, factors)
    cal = Calibration(
        model_fingerprint=info.fingerprint,  # type: ignore[attr-defined]
        model_name=info.name,  # type: ignore[attr-defined]
        shape=shape,
        rope=rope,
        config=cfg,
        bases=bases,
        error_tables=tables,
        provenance={**(provenance or {}), "code_version": kvbm_codec.__version__},
        calibration_id="0" * 16,
    )
    sources = None if ratio_sources is None else [compressible(kv, cfg) for kv in ratio_sources]
    if cfg.quantizer == "ecsq":
        from kvbm_codec.calibration.entropy_fit import entropy_allocations

        probes = {
            page: BlockRatioProbe(cal, val_kv, page).measure
            for page in block_tokens
            if val_kv.n_tokens >= page
        }
        with clock.phase("code tables and steps"):
            entropy_allocations(cal, val_kv, sources or [], targets, probes)
    else:
        with clock.phase("bit allocation"):
            all_allocations(
                cal, val_kv, targets, block_tokens, progress, sources=sources, lengths=context_lengths
            )
    cal.provenance["created"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    cal.provenance["phase_seconds"] = clock.rounded()
    return cal


ALLOCATION_WORKERS = 1
"""Bisections run at once in the bit-allocation phase, each on its share of torch's threads: the
context allocations form one chain (each starts from the previous target's lambda), every block
allocation depends only on its own target's context allocation, so the block bisections can run
beside the chain. Every bisection is the serial one (same encodes, same answers). One since the
probes stopped re-projecting and re-joining their KV per encode: what is left of an encode is
mostly Python (quantization, packing, DEFLATE calls), which two threads convoy on the GIL with one
torch thread each: 9.7-10.2 s on two workers against 7.5-8.2 s serially for the default recipe's
allocation phase (docs/benchmarks.md, "Session 27-28")."""


def all_allocations(
    cal: Calibration,
    held_out: KVCache,
    targets: Sequence[float],
    block_tokens: Sequence[int],
    progress: bool = False,
    workers: int = ALLOCATION_WORKERS,
    *,
    sources: Sequence[KVCache] | None = None,
    lengths: Sequence[int] | None = CONTEXT_TOKENS,
) -> None:
    """Context and block allocations of every target into ``cal``, as ``sized_context_allocations``
    (frames cut from ``sources``, default ``held_out``; ``lengths`` None: one allocation per target on
    ``held_out``, version 1) then ``block_allocations`` give them; with ``workers`` > 1 a target's
    block bisections start as soon as its plain context allocation is known, on the other worker,
    while the context chains go on."""
    probes = {
        page: BlockRatioProbe(cal, held_out, page) for page in block_tokens if held_out.n_tokens >= page
    }

    def contexts(on_target: Callable[[float, Allocation], None] | None = None) -> None:
        if lengths is None:
            context_allocations(cal, RatioProbe(cal, held_out), targets, progress, on_target=on_target)
        else:
            sized_context_allocations(cal, sources or [held_out], targets, progress, lengths, on_target)

    if workers <= 1 or not probes:  # nothing to run beside the chain: it keeps every thread
        contexts()
        block_allocations(cal, held_out, targets, block_tokens, progress)
        return
    with _threads_per_worker(workers), ThreadPoolExecutor(workers, thread_name_prefix="allocation") as pool:
        pending: dict[tuple[int, float], Future[Allocation]] = {}

        def start_blocks(target: float, context: Allocation) -> None:
            for page, probe in probes.items():
                near = context.meta.get("lambda")
                pending[(page, target)] = pool.submit(block_allocation, cal, probe, target, near)

        pool.submit(contexts, start_blocks).result()
        for page in probes:  # the serial phase's order
            for target in targets:
                cal.allocations[block_allocation_name(target, page)] = pending[(page, target)].result()


def context_allocations(
    cal: Calibration,
    probe: RatioProbe,
    targets: Sequence[float],
    progress: bool = False,
    on_target: Callable[[float, Allocation], None] | None = None,
    *,
    name: Callable[[float], str] = allocation_name,
    near: Mapping[float, float] | None = None,
) -> None:
    """Add to ``cal`` an allocation per target whose whole-context frame of the held-out KV meets it.

    Each bisection step is a real encode (~1 s on 2 cores), a DP alone takes ~10 ms: lambda is first
    bisected on the nominal ratio (fp16 bits over code + scale bits, no DEFLATE or headers, DP only),
    scaled by the measured/nominal lambda of the previous target, and the measured bisection starts
    from that guess (``near``). Same lambda search and stopping precision as a cold start, in about
    half the encodes; a guess that is off only widens the first bracket. ``near``: a known lambda per
    target (the same target at another frame length) replaces the nominal guess."""
    bits = cal.config.scale_bits
    fp16_bits = 16 * sum(b.dim for b in cal.bases.values())

    def nominal(alloc: Allocation) -> float:
        return fp16_bits / max(1, alloc.bits_per_token(bits))

    offset = 1.0  # measured / nominal lambda: DEFLATE's gain, about the same at every target
    for target in tqdm(targets, desc="calibration: bit allocation", disable=not progress):
        if near is not None and target in near:
            alloc = allocate_for_ratio(cal.error_tables, target, bits, probe.measure, near=near[target])
        else:
            guess = allocate_for_ratio(cal.error_tables, target, bits, nominal).meta["lambda"]
            alloc = allocate_for_ratio(cal.error_tables, target, bits, probe.measure, near=guess * offset)
            offset = alloc.meta["lambda"] / guess
        alloc.meta["compressed_tokens"] = float(probe.kv.n_tokens)
        cal.allocations[name(target)] = alloc
        if on_target is not None:
            on_target(target, alloc)


def sized_context_allocations(
    cal: Calibration,
    sources: Sequence[KVCache],
    targets: Sequence[float],
    progress: bool = False,
    lengths: Sequence[int] = CONTEXT_TOKENS,
    on_target: Callable[[float, Allocation], None] | None = None,
) -> None:
    """Context allocations per target for every context length in ``lengths`` the held-out tokens
    (``sources``, compressible) can fill: each bisected on frames of that length's compressed tokens
    (context minus sinks and window), the longest under the plain name. When the sources cannot fill
    the longest, the longest they can fill takes the plain name, so ``crT`` always exists; lengths
    whose frames would be the same tokens are sized once. ``on_target`` hears each plain allocation
    (``all_allocations`` starts the block bisections from it)."""
    cfg = cal.config
    have = sum(s.n_tokens for s in sources)
    exact = cfg.sink_tokens + cfg.window_tokens
    sizes: list[tuple[int, int]] = []  # (context tokens, compressed tokens), longest first
    for length in sorted(lengths, reverse=True):
        n = min(have, length - exact)
        if n >= 1 and all(n < m for _, m in sizes):
            sizes.append((length if n == length - exact else n + exact, n))
    # the exact tokens a context of that length stores beside its compressed ones (their content is
    # stored raw and not counted; their records in the header are)
    exact_kv = sources[0].select_tokens(torch.arange(min(exact, sources[0].n_tokens))) if exact else None
    near: dict[float, float] | None = None
    for i, (length, n) in enumerate(sizes):
        probe = RatioProbe(cal, context_probe_kv(sources, n), exact_kv)
        named = allocation_name if i == 0 else partial(context_allocation_name, context_tokens=length)
        # each length's bisection starts at the previous (longer) one's lambda: they land close
        hook = on_target if i == 0 else None
        context_allocations(cal, probe, targets, progress, hook, name=named, near=near)
        near = {t: cal.allocations[named(t)].meta["lambda"] for t in targets}
        for t in targets:
            cal.allocations[named(t)].meta["context_tokens"] = float(length)


def block_allocations(
    cal: Calibration,
    held_out: KVCache,
    targets: Sequence[float],
    block_tokens: Sequence[int],
    progress: bool = False,
) -> None:
    """Add to ``cal`` an allocation per (target, page size) bisected on block frames of the held-out
    KV, so that a compressed block, not a whole context, meets the target: every block frame pays its
    own header and entropy-coder tables. Same error tables, same lambda search as the context
    allocations; only the measured ratio differs. A page size the held-out KV cannot fill is skipped."""
    for page in block_tokens:
        if held_out.n_tokens < page:
            continue
        probe = BlockRatioProbe(cal, held_out, page)
        for target in tqdm(targets, desc=f"calibration: {page}-token block allocation", disable=not progress):
            context = cal.allocations.get(allocation_name(target))
            near = context.meta.get("lambda") if context is not None else None
            cal.allocations[block_allocation_name(target, page)] = block_allocation(cal, probe, target, near)


def block_allocation(
    cal: Calibration, probe: BlockRatioProbe, target: float, near: float | None
) -> Allocation:
    """One target's allocation for ``probe``'s page size, bisected from ``near`` (its context
    allocation's lambda) when known."""
    alloc = allocate_for_ratio(cal.error_tables, target, cal.config.scale_bits, probe.measure, near=near)
    alloc.meta["page_tokens"] = float(probe.page_tokens)
    return alloc


def measure_ratio(cal: Calibration, alloc: Allocation, kv: KVCache) -> float:
    """fp16 bytes of kv / frame bytes when every token is compressed (headers included)."""
    from kvbm_codec.codec.kvtc import KVTCCodec

    data = KVTCCodec(cal, alloc).encode(kv, raw_mask=torch.zeros(kv.n_tokens, dtype=torch.bool))
    return kv.nbytes(2) / len(data)


class RatioProbe:
    """Measures the ratio of many allocations on the same held-out KV, as the bisection does ~12 times
    per target: the real encoder (quantization, packing, DEFLATE, header), with each basis's full
    projection done once instead of once per allocation (a third of the encode time). With ``exact``
    (tokens stored uncompressed, as a context's sinks and window are) the frame carries them too and
    the ratio is over the compressed tokens' share of it, as a context frame's is reported."""

    def __init__(self, cal: Calibration, kv: KVCache, exact: KVCache | None = None) -> None:
        self.cal, self.kv, self.exact = cal, kv, exact
        # the frame a measure encodes: the same tokens every time, so joined once
        self._whole = kv if exact is None else _concat(kv, exact)
        self._raw_mask = torch.arange(self._whole.n_tokens) >= kv.n_tokens
        self.coeffs = _projections(cal, kv)

    def codec(self, alloc: Allocation) -> KVTCCodec:
        """The real encoder at ``alloc`` whose projection is a column selection of the stored one:
        it only encodes the KV this probe was built for (in its token order)."""
        from kvbm_codec.codec.kvtc import KVTCCodec

        coeffs = self.coeffs

        class _Codec(KVTCCodec):
            def _coefficients(self, name: str, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
                if x.shape[2] != coeffs[name].shape[0]:
                    raise ValueError("a RatioProbe only encodes the KV it was built for")
                return coeffs[name][:, self._active[name]]

        return _Codec(self.cal, alloc)

    def measure(self, alloc: Allocation) -> float:
        if self.exact is None:
            data = self.codec(alloc).encode(self.kv, raw_mask=self._raw_mask)
            return self.kv.nbytes(2) / len(data)
        # a context's frame also carries its sinks and window: their sections' records and position
        # runs are header bytes the compressed tokens pay for (EncodeStats.achieved_cr, as eval reports)
        return self.codec(alloc).encode_with_stats(self._whole, raw_mask=self._raw_mask)[1].achieved_cr


def _projections(cal: Calibration, kv: KVCache) -> dict[str, torch.Tensor]:
    """Every basis' full projection [n, r] of kv's tokens (keys de-rotated at their positions): an
    allocation's coefficients are a column selection of it, so probes that encode the same tokens at
    many allocations project once."""
    keys = undo_rope(kv.keys, kv.positions, cal.rope) if cal.config.undo_rope else kv.keys
    coeffs: dict[str, torch.Tensor] = {}
    for gi, (a, b) in enumerate(cal.config.layer_groups(cal.shape.n_layers)):
        for kind, x in (("k", keys[a:b]), ("v", kv.values[a:b])):
            name = cal.basis_name(gi, kind)
            coeffs[name] = cal.bases[name].project(to_features(x.to(torch.float32)))
    return coeffs


class BlockRatioProbe:
    """Measures block frames as the service stores them: the held-out tokens cut into
    ``page_tokens``-token blocks of consecutive positions (a block never spans two held-out slices,
    whose positions jump), each block's keys de-rotated at its own positions, every token compressed,
    encoded by the batched block encoder (format v2); the ratio is fp16 bytes over the frames' sum.

    The blocks must carry their true positions: the batched encoder undoes RoPE at the positions a
    block names, and blocks renumbered from 0 (as this probe once did) de-rotated their keys at the
    wrong angles, which stored ~5% better than real blocks and sized the block allocations too
    rich (docs/benchmarks.md, "Block allocations measured at true positions")."""

    def __init__(
        self, cal: Calibration, kv: KVCache, page_tokens: int, max_blocks: int = BLOCK_PROBE_BLOCKS
    ) -> None:
        starts = block_starts(kv.positions, page_tokens)
        if not starts:
            raise ValueError(f"{kv.n_tokens} held-out tokens cannot fill one {page_tokens}-token block")
        # evenly spaced blocks (every held-out domain keeps its share): the ratio of a few thousand
        # tokens is as exact as the bisection needs, at a fraction of the encodes
        chosen = torch.linspace(0, len(starts) - 1, min(len(starts), max_blocks)).round().to(torch.int64)
        self.cal, self.page_tokens = cal, page_tokens
        chosen_starts = [starts[i] for i in chosen.unique().tolist()]
        self.blocks = [kv.select_tokens(torch.arange(s, s + page_tokens)) for s in chosen_starts]
        self.masks = [torch.zeros(page_tokens, dtype=torch.bool)] * len(self.blocks)
        self.raw_bytes = sum(b.nbytes(2) for b in self.blocks)
        # the blocks' tokens block-major, as the batched encoder orders its rows
        self.coeffs = _projections(cal, _concat(*self.blocks))

    def codec(self, alloc: Allocation) -> KVTCCodec:
        """The real batched encoder at ``alloc``, its projection a column selection of the stored one
        (as RatioProbe's): it only encodes this probe's blocks, all in one batch."""
        from kvbm_codec.codec.kvtc import KVTCCodec

        coeffs = self.coeffs

        class _Codec(KVTCCodec):
            def _group_coefficients(self, name, sources, tables, scratch):  # type: ignore[no-untyped-def]
                rows = len(sources) * int(sources[0].shape[2])
                if rows != coeffs[name].shape[0]:
                    raise ValueError("a BlockRatioProbe only encodes the blocks it was built for")
                return coeffs[name][:, self._active[name]]

        return _Codec(self.cal, alloc)

    def measure(self, alloc: Allocation) -> float:
        frames = self.codec(alloc).encode_batch(self.blocks, self.masks)
        return self.raw_bytes / sum(len(f) for f, _ in frames)


def block_starts(positions: torch.Tensor, page_tokens: int) -> list[int]:
    """Token indices where a whole block of ``page_tokens`` consecutive positions starts, blocks cut
    from the start of every run of consecutive positions (the rest of a run is left out)."""
    pos = positions.to(torch.int64).flatten()
    cuts = [0, *(torch.nonzero(pos[1:] - pos[:-1] != 1).flatten() + 1).tolist(), pos.numel()]
    starts: list[int] = []
    for a, b in itertools.pairwise(cuts):
        starts += range(a, b - page_tokens + 1, page_tokens)
    return starts
