"""The calibration artifact: a Calibration (``kvbm_codec.codec.params``) in one checked file.

A frame names its calibration by id; the id is the sha256 of the artifact's content, so an id can
never silently point at different matrices. Stored as safetensors (tensors + a JSON header in the
metadata) so it loads without pickle and memory-maps cheaply.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save_file

from kvbm_codec.codec.allocation import Allocation, ErrorTable
from kvbm_codec.codec.config import CodecConfig
from kvbm_codec.codec.entropy import CodeTables
from kvbm_codec.codec.errors import CodecError, ModelMismatchError
from kvbm_codec.codec.params import Calibration, ModelShape
from kvbm_codec.codec.pca import PCABasis
from kvbm_codec.codec.rope import RotaryParams

ARTIFACT_FORMAT = "kvbm-codec-calibration"
ARTIFACT_VERSION = 1
_META_KEY = "kvbm_codec"
_CODE_TABLES = "entropy.code_tables"


class CalibrationIntegrityError(CodecError):
    code = "calibration_corrupt"


def _tensors(cal: Calibration) -> dict[str, torch.Tensor]:
    t: dict[str, torch.Tensor] = {"rope.inv_freq": cal.rope.inv_freq.to(torch.float32).contiguous()}
    for name, b in cal.bases.items():
        t[f"{name}.mean"] = b.mean.contiguous()
        t[f"{name}.scale"] = b.scale.contiguous()
        t[f"{name}.basis"] = b.basis.contiguous()
        t[f"{name}.eigenvalues"] = b.eigenvalues.contiguous()
    for name, et in cal.error_tables.items():
        for g, arr in et.tables.items():
            t[f"{name}.err.{g}"] = torch.from_numpy(np.ascontiguousarray(arr))
    if cal.code_tables is not None:  # absent from calibrations without entropy-coded allocations
        t[_CODE_TABLES] = torch.from_numpy(cal.code_tables.to_array())
    return t


def _header(cal: Calibration) -> dict[str, Any]:
    return {
        "format": ARTIFACT_FORMAT,
        "version": ARTIFACT_VERSION,
        "model_fingerprint": cal.model_fingerprint,
        "model_name": cal.model_name,
        "shape": cal.shape.__dict__,
        "rope_attention_scaling": cal.rope.attention_scaling,
        "config": json.loads(cal.config.model_dump_json()),
        "bases": {
            n: {
                "residual_variance": b.residual_variance,
                "weight": cal.error_tables[n].weight,
                "error_residual": cal.error_tables[n].residual,
            }
            for n, b in sorted(cal.bases.items())
        },
        "allocations": {n: json.loads(a.to_json()) for n, a in sorted(cal.allocations.items())},
        "provenance": cal.provenance,
    }


def save_calibration(cal: Calibration, path: str | os.PathLike[str]) -> str:
    """Write atomically (temp file + rename) and return the calibration id."""
    tensors = _tensors(cal)
    header = _header(cal)
    digest = _content_digest(header, tensors)
    cal.calibration_id = digest[:16]
    meta = {_META_KEY: json.dumps(header, sort_keys=True), "sha256": digest}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return cal.calibration_id


def load_calibration(path: str | os.PathLike[str], expected_fingerprint: str | None = None) -> Calibration:
    """Load and verify the content hash; refuse a calibration of another model."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        tensors = load_bytes(raw)
        header_len = int.from_bytes(raw[:8], "little")
        st_meta = json.loads(raw[8 : 8 + header_len]).get("__metadata__", {})
    except (SafetensorError, ValueError, json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise CalibrationIntegrityError(f"calibration file {path} is unreadable: {e}") from e
    if _META_KEY not in st_meta or "sha256" not in st_meta:
        raise CalibrationIntegrityError(f"{path} is not a kvbm-codec calibration (no header)")
    try:
        header = json.loads(st_meta[_META_KEY])
    except json.JSONDecodeError as e:
        raise CalibrationIntegrityError(f"calibration header of {path} is not JSON: {e}") from e
    digest = _content_digest(header, tensors)
    if digest != st_meta["sha256"]:
        raise CalibrationIntegrityError(
            f"calibration {path} fails its checksum (stored {st_meta['sha256'][:16]}, "
            f"computed {digest[:16]}): the file is corrupt"
        )
    if header.get("format") != ARTIFACT_FORMAT or header.get("version") != ARTIFACT_VERSION:
        raise CalibrationIntegrityError(
            f"{path}: unsupported calibration format {header.get('format')} v{header.get('version')}"
        )
    if expected_fingerprint is not None and header["model_fingerprint"] != expected_fingerprint:
        raise ModelMismatchError(
            f"calibration {digest[:16]} was made for model {header['model_fingerprint']}, "
            f"not {expected_fingerprint}"
        )
    return _from_parts(header, tensors, digest[:16])


def _from_parts(header: dict[str, Any], t: dict[str, torch.Tensor], cal_id: str) -> Calibration:
    # Artifacts from before the distortion field were all plain-MSE calibrations, and those from before
    # the layer_sensitivity field all analytic (and every header without sensitivity_heads per layer).
    before = {
        "distortion": "mse",
        "layer_sensitivity": "analytic",
        "sensitivity_power": 1.0,
        "sensitivity_heads": False,
    }
    config = CodecConfig.model_validate({**before, **header["config"]})
    bases, tables = {}, {}
    for name, info in header["bases"].items():
        bases[name] = PCABasis(
            mean=t[f"{name}.mean"],
            scale=t[f"{name}.scale"],
            basis=t[f"{name}.basis"],
            eigenvalues=t[f"{name}.eigenvalues"],
            residual_variance=float(info["residual_variance"]),
        )
        errs = {int(k.rsplit(".", 1)[1]): v.numpy() for k, v in t.items() if k.startswith(f"{name}.err.")}
        tables[name] = ErrorTable(
            rank=bases[name].rank,
            tables=errs,
            residual=float(info["error_residual"]),
            weight=float(info["weight"]),
        )
    return Calibration(
        model_fingerprint=header["model_fingerprint"],
        model_name=header["model_name"],
        shape=ModelShape(**header["shape"]),
        rope=RotaryParams(t["rope.inv_freq"], float(header["rope_attention_scaling"])),
        config=config,
        bases=bases,
        error_tables=tables,
        allocations={n: Allocation.from_json(json.dumps(a)) for n, a in header["allocations"].items()},
        provenance=header["provenance"],
        code_tables=CodeTables.from_array(t[_CODE_TABLES].numpy()) if _CODE_TABLES in t else None,
        calibration_id=cal_id,
    )


def _content_digest(header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(header, sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()
