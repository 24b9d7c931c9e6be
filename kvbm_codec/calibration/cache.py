"""Local calibration cache: calibrate once per (model, codec config, corpus), reuse afterwards.

The default corpus is the broad one (calibration/corpus.py: six domains, 66 x 1024 tokens), chosen on
validation text over the old single-domain pydoc corpus (docs/benchmarks.md, "Accuracy at 20x");
``corpus="pydoc"`` reproduces the old calibration (16 x 1024 tokens of the CPython manual).

Backed by the local calibration registry (``calibration/registry.py``): a computed calibration is
published there with a ``cache_key`` label (a hash of the parameters that shape it), so `demo`,
`eval` and `calibrate` reuse it and it is also versioned, checksummed and visible to
`kvbm-codec registry`. The first calibration of a model also becomes its ``latest``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from kvbm_codec.calibration.artifact import CalibrationIntegrityError, load_calibration
from kvbm_codec.calibration.calibrate import (
    BLOCK_ALLOCATION_VERSION,
    CONTEXT_ALLOCATION_VERSION,
    DEFAULT_TARGETS,
    CalibrationModel,
    calibrate,
)
from kvbm_codec.calibration.registry import Registry, default_root
from kvbm_codec.codec.config import CodecConfig
from kvbm_codec.codec.errors import CodecError
from kvbm_codec.codec.params import Calibration
from kvbm_codec.texts import calibration_texts

CORPORA = ("broad", "pydoc")
DEFAULT_CORPUS = "broad"
DEFAULT_FIT_SEQUENCES = {"broad": 66, "pydoc": 16}  # broad: corpus.FIT_SEQUENCES (67.6k tokens)


def fit_plan(corpus: str, fit_sequences: int) -> int | dict[str, int]:
    """The broad corpus' default size is a per-domain plan (corpus.FIT_SEQUENCES); any other
    count is split evenly between its domains."""
    if corpus == "broad" and fit_sequences == DEFAULT_FIT_SEQUENCES["broad"]:
        from kvbm_codec.calibration.corpus import FIT_SEQUENCES

        return dict(FIT_SEQUENCES)
    return fit_sequences


def corpus_texts(tokenizer: object, corpus: str) -> tuple[list[str] | dict[str, list[str]], str]:
    """(texts, the name the cache key and provenance use). A broad corpus built where some domain's
    files are missing gets another name, so it never shares a cache entry with the full one."""
    if corpus == "pydoc":
        return calibration_texts(), "pydoc_data.topics"
    if corpus == "broad":
        from kvbm_codec.calibration.corpus import CORPUS_NAME, broad_corpus

        texts = broad_corpus(tokenizer)
        return texts, f"{CORPUS_NAME}:{','.join(sorted(texts))}"
    raise ValueError(f"unknown calibration corpus {corpus!r}; known: {', '.join(CORPORA)}")


def cache_dir() -> Path:
    return Path(os.environ.get("KVBM_CODEC_CACHE_DIR", Path.home() / ".cache" / "kvbm-codec"))


def cache_key(
    config: CodecConfig,
    fit_sequences: int,
    seq_len: int,
    corpus_name: str = "pydoc_data.topics",
    prefill_dtype: str = "float32",
) -> str:
    cfg = json.loads(config.model_dump_json())
    if cfg.get("distortion") == "mse":
        cfg.pop("distortion")  # keeps the keys of calibrations cached before the field existed
    if cfg.get("layer_sensitivity") == "analytic":  # likewise (the power only applies to measured)
        cfg.pop("layer_sensitivity")
        cfg.pop("sensitivity_power", None)
    key = json.dumps(
        {
            "config": cfg,
            "fit": fit_sequences,
            "seq_len": seq_len,
            "targets": DEFAULT_TARGETS,
            "corpus": corpus_name,
            "block_allocations": BLOCK_ALLOCATION_VERSION,
            "context_allocations": CONTEXT_ALLOCATION_VERSION,
        }
        | ({} if prefill_dtype == "float32" else {"prefill_dtype": prefill_dtype}),  # float32 keys unchanged
        sort_keys=True,
    )
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def calibration_path(
    fingerprint: str,
    config: CodecConfig,
    fit_sequences: int,
    seq_len: int,
    corpus_name: str = "pydoc_data.topics",
) -> Path:
    """Where the pre-registry cache kept this calibration (still read, so old caches are reused)."""
    h = cache_key(config, fit_sequences, seq_len, corpus_name)
    return cache_dir() / "calibrations" / f"{fingerprint}-{h}.kvtc"


def local_registry() -> Registry:
    return Registry.from_url(default_root())


def given_or_default(lm: CalibrationModel, path: Path | None, progress: bool = False) -> Calibration:
    """The calibration file a bench was pointed at (checked against the model), else the default
    recipe's: one rule for every "--calibration, or the default" command."""
    if path is not None:
        return load_calibration(path, expected_fingerprint=lm.info.fingerprint)  # type: ignore[attr-defined]
    return load_or_calibrate(lm, progress=progress)[0]


def load_or_calibrate(
    lm: CalibrationModel,
    config: CodecConfig | None = None,
    *,
    corpus: str = DEFAULT_CORPUS,
    fit_sequences: int | None = None,
    seq_len: int = 1024,
    progress: bool = True,
    prefill_dtype: str = "float32",
) -> tuple[Calibration, Path, bool]:
    """(calibration, its file, whether it was computed now).

    prefill_dtype: what the fit prefills run in: float32 (the default recipe), bfloat16, or auto
    (bfloat16 where the CPU multiplies it natively: models.hf.fast_prefill_dtype). A bf16 recipe is
    cached under its own key, so no machine silently reuses a recipe it did not ask for.
    A registry entry that fails verification is skipped (it stays for `registry verify` to report)
    and the calibration is recomputed, never used.
    """
    from kvbm_codec.models.hf import resolve_prefill_dtype

    cfg = config or CodecConfig()
    fp = lm.info.fingerprint  # type: ignore[attr-defined]
    fit_sequences = fit_sequences or DEFAULT_FIT_SEQUENCES[corpus]
    prefill_dtype = resolve_prefill_dtype(prefill_dtype)
    texts, corpus_name = corpus_texts(lm.tokenizer, corpus)
    key = cache_key(cfg, fit_sequences, seq_len, corpus_name, prefill_dtype)
    fit = fit_plan(corpus, fit_sequences)
    reg = local_registry()
    for _, manifest in reg.find(fp, cache_key=key):
        try:
            cal = reg.get(fp, manifest.calibration_id)
        except CodecError:  # damaged, another model's, or collected meanwhile: recompute
            continue
        path = reg.artifact_path(fp, cal.calibration_id)
        assert path is not None
        return cal, path, False
    legacy = calibration_path(fp, cfg, fit_sequences, seq_len, corpus_name)
    cal = None
    if legacy.exists() and prefill_dtype == "float32":  # the pre-registry cache only held float32 ones
        try:
            cal = load_calibration(legacy, expected_fingerprint=fp)
        except CalibrationIntegrityError:
            legacy.unlink()
    fresh = cal is None
    if cal is None:
        cal = calibrate(
            lm,
            texts,
            cfg,
            fit_sequences=fit,
            seq_len=seq_len,
            text_source=corpus_name,
            progress=progress,
            prefill_dtype=prefill_dtype,
        )
    reg.publish(cal, labels={"cache_key": key})
    reg.promote(fp, cal.calibration_id, only_if_unset=True)
    path = reg.artifact_path(fp, cal.calibration_id)
    assert path is not None
    return cal, path, fresh
