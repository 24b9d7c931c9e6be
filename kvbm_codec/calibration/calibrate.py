"""Offline calibration: real model KV on calibration text -> PCA bases, error tables, allocations.

Sink and recent-window positions are excluded (they are never compressed), keys are de-rotated
(RoPE undone) before entering the covariance. A separate held-out calibration sequence (never
used to fit the PCA) provides the measured quantization errors and the ratio measurements, so the
allocator is not tuned on the data the basis was fitted to.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Protocol

import torch
from tqdm.auto import tqdm

import kvbm_codec
from kvbm_codec.codec.allocation import Allocation, ErrorTable, allocate_for_ratio
from kvbm_codec.codec.config import CodecConfig
from kvbm_codec.codec.params import Calibration, ModelShape, allocation_name
from kvbm_codec.codec.pca import CovarianceAccumulator, PCABasis
from kvbm_codec.codec.quantize import block_error_table
from kvbm_codec.codec.rope import RotaryParams, undo_rope
from kvbm_codec.kv import KVCache

DEFAULT_TARGETS = (4.0, 8.0, 16.0, 20.0, 32.0, 64.0)


class CalibrationModel(Protocol):
    """What calibration needs of a model: a tokenizer, its shape, and a prefill returning KV."""

    tokenizer: object

    @property
    def info(self) -> object: ...

    def prefill(
        self, input_ids: torch.Tensor, return_logits: bool = True
    ) -> tuple[KVCache, torch.Tensor | None]: ...


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


def _features(x: torch.Tensor) -> torch.Tensor:
    """[layers, heads, tokens, dim] -> [tokens, layers*heads*dim] (one vector per token)."""
    return x.permute(2, 0, 1, 3).reshape(x.shape[2], -1)


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


def calibration_kv(
    lm: CalibrationModel, sequences: list[torch.Tensor], progress: bool = True
) -> Iterator[KVCache]:
    """The one prefill loop of calibration: every sequence's KV (all layers), one at a time, so
    consumers (covariances here, other statistics elsewhere) stream it in bounded memory."""
    for seq in tqdm(sequences, desc="calibration: prefill", disable=not progress):
        kv, _ = lm.prefill(seq, return_logits=False)
        yield kv


def accumulate_covariances(
    kvs: Iterable[KVCache], cfg: CodecConfig, rope: RotaryParams, shape: ModelShape
) -> dict[str, CovarianceAccumulator]:
    """Stream KV into one covariance per basis (p x p each); no token's features are kept."""
    accs: dict[str, CovarianceAccumulator] = {}
    groups = cfg.layer_groups(shape.n_layers)
    for full in kvs:
        kv = compressible(full, cfg)
        keys = undo_rope(kv.keys, kv.positions, rope) if cfg.undo_rope else kv.keys
        for gi, (a, b) in enumerate(groups):
            for kind, x in (("k", keys[a:b]), ("v", kv.values[a:b])):
                f = _features(x)
                name = f"g{gi}.{kind}"
                accs.setdefault(name, CovarianceAccumulator(f.shape[1])).add(f)
    return accs


def finalize_bases(
    accs: dict[str, CovarianceAccumulator], cfg: CodecConfig, shape: ModelShape, progress: bool = True
) -> dict[str, PCABasis]:
    # Features are laid out [layer, head, dim]: one normalisation run per head of each layer.
    head_dim = {"k": shape.key_head_dim, "v": shape.value_head_dim}
    return {
        name: acc.finalize(cfg.rank_cap, norm_block=head_dim[name[-1]] if cfg.normalize_heads else 0)
        for name, acc in tqdm(accs.items(), desc="calibration: eigendecomposition", disable=not progress)
    }


def fit_bases(
    kvs: Iterable[KVCache], cfg: CodecConfig, rope: RotaryParams, shape: ModelShape, progress: bool = True
) -> dict[str, PCABasis]:
    return finalize_bases(accumulate_covariances(kvs, cfg, rope, shape), cfg, shape, progress)


def error_tables(
    bases: dict[str, PCABasis], held_out: KVCache, cfg: CodecConfig, rope: RotaryParams, n_layers: int
) -> dict[str, ErrorTable]:
    keys = undo_rope(held_out.keys, held_out.positions, rope) if cfg.undo_rope else held_out.keys
    tables: dict[str, ErrorTable] = {}
    for gi, (a, b) in enumerate(cfg.layer_groups(n_layers)):
        for kind, x in (("k", keys[a:b]), ("v", held_out.values[a:b])):
            name = f"g{gi}.{kind}"
            f = _features(x)
            coeffs = bases[name].project(f)
            total = float((bases[name].normalise(f) ** 2).sum(1).mean())
            kept = float((coeffs.to(torch.float64) ** 2).sum(1).mean())
            tables[name] = ErrorTable(
                rank=bases[name].rank,
                tables=block_error_table(coeffs, cfg.group_sizes, cfg.max_bits),
                residual=max(0.0, total - kept),
                weight=cfg.key_weight if kind == "k" else 1.0,
            )
    return tables


def calibrate(
    lm: CalibrationModel,
    texts: Sequence[str],
    config: CodecConfig | None = None,
    *,
    targets: Sequence[float] = DEFAULT_TARGETS,
    fit_sequences: int = 16,
    seq_len: int = 1024,
    text_source: str = "",
    progress: bool = True,
) -> Calibration:
    clock = PhaseClock(progress)
    seqs = token_sequences(lm.tokenizer, texts, seq_len, fit_sequences + 1)
    provenance = {
        "text_source": text_source,
        "text_sha256": hashlib.sha256("\x00".join(texts).encode()).hexdigest(),
        "fit_tokens": fit_sequences * seq_len,
        "held_out_tokens": seq_len,
        "seq_len": seq_len,
    }
    with clock.phase("held-out prefill"):
        held_out, _ = lm.prefill(seqs[fit_sequences], return_logits=False)
    return calibrate_from_kv(
        lm.info,
        calibration_kv(lm, seqs[:fit_sequences], progress),
        held_out,
        config,
        targets=targets,
        provenance=provenance,
        progress=progress,
        clock=clock,
    )


def calibrate_small(lm: CalibrationModel) -> Calibration:
    """A real but small calibration (4 x 512 tokens, 6-layer bases, 8x and 20x allocations): seconds
    instead of minutes on 2 cores. The test fixtures and the fuzz corpus share it."""
    from kvbm_codec.texts import calibration_texts

    return calibrate(
        lm,
        calibration_texts(),
        CodecConfig(layer_group_size=6),
        targets=(8.0, 20.0),
        fit_sequences=4,
        seq_len=512,
        text_source="pydoc_data.topics",
        progress=False,
    )


def calibrate_from_kv(
    info: object,
    fit_kvs: Iterable[KVCache],
    held_out: KVCache,
    config: CodecConfig | None = None,
    *,
    targets: Sequence[float] = DEFAULT_TARGETS,
    provenance: dict | None = None,
    progress: bool = True,
    clock: PhaseClock | None = None,
) -> Calibration:
    """Calibration from already-computed KV (lets sweeps reuse one set of prefills)."""
    clock = clock or PhaseClock(progress)
    cfg = config or CodecConfig()
    shape = ModelShape(info.n_layers, info.n_kv_heads, info.key_head_dim, info.value_head_dim)  # type: ignore[attr-defined]
    rope: RotaryParams = info.rope  # type: ignore[attr-defined]
    with clock.phase("prefill + covariances"):
        accs = accumulate_covariances(fit_kvs, cfg, rope, shape)
    with clock.phase("eigendecomposition"):
        bases = finalize_bases(accs, cfg, shape, progress)
    val_kv = compressible(held_out, cfg)
    with clock.phase("error tables"):
        tables = error_tables(bases, val_kv, cfg, rope, shape.n_layers)
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
    probe = RatioProbe(cal, val_kv)
    with clock.phase("bit allocation"):
        for target in tqdm(targets, desc="calibration: bit allocation", disable=not progress):
            cal.allocations[allocation_name(target)] = allocate_for_ratio(
                tables, target, cfg.scale_bits, probe.measure
            )
    cal.provenance["created"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    cal.provenance["phase_seconds"] = clock.rounded()
    return cal


def measure_ratio(cal: Calibration, alloc: Allocation, kv: KVCache) -> float:
    """fp16 bytes of kv / frame bytes when every token is compressed (headers included)."""
    from kvbm_codec.codec.kvtc import KVTCCodec

    data = KVTCCodec(cal, alloc).encode(kv, raw_mask=torch.zeros(kv.n_tokens, dtype=torch.bool))
    return kv.nbytes(2) / len(data)


class _ProjectedBasis:
    """A basis whose projection of one fixed feature matrix is already computed: `project` selects the
    active components' columns instead of multiplying again. Only the encoder's `project` is used."""

    def __init__(self, basis: PCABasis, features: torch.Tensor) -> None:
        self._n = features.shape[0]
        self._coeffs = basis.project(features)

    def project(self, x: torch.Tensor, components: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape[0] != self._n:
            raise ValueError("a RatioProbe only encodes the KV it was built for")
        return self._coeffs if components is None else self._coeffs[:, components]


class RatioProbe:
    """Measures the ratio of many allocations on the same held-out KV, as the bisection does ~12 times
    per target: the real encoder (quantization, packing, DEFLATE, header), with each basis's full
    projection done once instead of once per allocation (a third of the encode time)."""

    def __init__(self, cal: Calibration, kv: KVCache) -> None:
        self.cal, self.kv = cal, kv
        keys = undo_rope(kv.keys, kv.positions, cal.rope) if cal.config.undo_rope else kv.keys
        self._bases: dict[str, _ProjectedBasis] = {}
        for gi, (a, b) in enumerate(cal.config.layer_groups(cal.shape.n_layers)):
            for kind, x in (("k", keys[a:b]), ("v", kv.values[a:b])):
                name = cal.basis_name(gi, kind)
                self._bases[name] = _ProjectedBasis(cal.bases[name], _features(x.to(torch.float32)))

    def measure(self, alloc: Allocation) -> float:
        from kvbm_codec.codec.kvtc import KVTCCodec

        bases = self._bases

        class _Codec(KVTCCodec):
            def _basis(self, name: str, device: torch.device) -> PCABasis:
                return bases[name]  # type: ignore[return-value]

        data = _Codec(self.cal, alloc).encode(
            self.kv, raw_mask=torch.zeros(self.kv.n_tokens, dtype=torch.bool)
        )
        return self.kv.nbytes(2) / len(data)
