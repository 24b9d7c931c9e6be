"""Local calibration cache: calibrate once per (model, codec config, corpus), reuse afterwards.

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
from kvbm_codec.calibration.calibrate import DEFAULT_TARGETS, CalibrationModel, calibrate
from kvbm_codec.calibration.registry import Registry, default_root
from kvbm_codec.codec.config import CodecConfig
from kvbm_codec.codec.errors import CodecError
from kvbm_codec.codec.params import Calibration
from kvbm_codec.texts import calibration_texts


def cache_dir() -> Path:
    return Path(os.environ.get("KVBM_CODEC_CACHE_DIR", Path.home() / ".cache" / "kvbm-codec"))


def cache_key(config: CodecConfig, fit_sequences: int, seq_len: int) -> str:
    key = json.dumps(
        {
            "config": json.loads(config.model_dump_json()),
            "fit": fit_sequences,
            "seq_len": seq_len,
            "targets": DEFAULT_TARGETS,
            "corpus": "pydoc_data.topics",
        },
        sort_keys=True,
    )
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def calibration_path(fingerprint: str, config: CodecConfig, fit_sequences: int, seq_len: int) -> Path:
    """Where the pre-registry cache kept this calibration (still read, so old caches are reused)."""
    h = cache_key(config, fit_sequences, seq_len)
    return cache_dir() / "calibrations" / f"{fingerprint}-{h}.kvtc"


def local_registry() -> Registry:
    return Registry.from_url(default_root())


def load_or_calibrate(
    lm: CalibrationModel,
    config: CodecConfig | None = None,
    *,
    fit_sequences: int = 16,
    seq_len: int = 1024,
    progress: bool = True,
) -> tuple[Calibration, Path, bool]:
    """(calibration, its file, whether it was computed now).

    A registry entry that fails verification is skipped (it stays for `registry verify` to report)
    and the calibration is recomputed, never used.
    """
    cfg = config or CodecConfig()
    fp = lm.info.fingerprint  # type: ignore[attr-defined]
    key = cache_key(cfg, fit_sequences, seq_len)
    reg = local_registry()
    for _, manifest in reg.find(fp, cache_key=key):
        try:
            cal = reg.get(fp, manifest.calibration_id)
        except CodecError:  # damaged, another model's, or collected meanwhile: recompute
            continue
        path = reg.artifact_path(fp, cal.calibration_id)
        assert path is not None
        return cal, path, False
    legacy = calibration_path(fp, cfg, fit_sequences, seq_len)
    cal = None
    if legacy.exists():
        try:
            cal = load_calibration(legacy, expected_fingerprint=fp)
        except CalibrationIntegrityError:
            legacy.unlink()
    fresh = cal is None
    if cal is None:
        cal = calibrate(
            lm,
            calibration_texts(),
            cfg,
            fit_sequences=fit_sequences,
            seq_len=seq_len,
            text_source="pydoc_data.topics",
            progress=progress,
        )
    reg.publish(cal, labels={"cache_key": key})
    reg.promote(fp, cal.calibration_id, only_if_unset=True)
    path = reg.artifact_path(fp, cal.calibration_id)
    assert path is not None
    return cal, path, fresh
