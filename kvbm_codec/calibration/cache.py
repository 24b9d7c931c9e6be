"""Local calibration cache: calibrate once per (model, codec config, corpus), reuse afterwards.

Until the versioned registry (issue "calibration registry") lands, this is how `demo` and `eval`
find a calibration: a file named by model fingerprint and a hash of the parameters that shape it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from kvbm_codec.calibration.artifact import Calibration, CalibrationIntegrityError
from kvbm_codec.calibration.calibrate import DEFAULT_TARGETS, CalibrationModel, calibrate
from kvbm_codec.codec.config import CodecConfig
from kvbm_codec.eval.texts import calibration_texts


def cache_dir() -> Path:
    return Path(os.environ.get("KVBM_CODEC_CACHE_DIR", Path.home() / ".cache" / "kvbm-codec"))


def calibration_path(fingerprint: str, config: CodecConfig, fit_sequences: int, seq_len: int) -> Path:
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
    h = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_dir() / "calibrations" / f"{fingerprint}-{h}.kvtc"


def load_or_calibrate(
    lm: CalibrationModel,
    config: CodecConfig | None = None,
    *,
    fit_sequences: int = 16,
    seq_len: int = 1024,
    progress: bool = True,
) -> tuple[Calibration, Path, bool]:
    """(calibration, its file, whether it was computed now). A corrupt cached file is recomputed."""
    cfg = config or CodecConfig()
    fp = lm.info.fingerprint  # type: ignore[attr-defined]
    path = calibration_path(fp, cfg, fit_sequences, seq_len)
    if path.exists():
        try:
            return Calibration.load(path, expected_fingerprint=fp), path, False
        except CalibrationIntegrityError:
            path.unlink()
    cal = calibrate(
        lm,
        calibration_texts(),
        cfg,
        fit_sequences=fit_sequences,
        seq_len=seq_len,
        text_source="pydoc_data.topics",
        progress=progress,
    )
    cal.save(path)
    return cal, path, True
