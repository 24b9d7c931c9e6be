"""The calibration artifact: everything a decoder needs besides the frame, in one checked file.

A frame names its calibration by id; the id is the sha256 of the artifact's content, so an id can
never silently point at different matrices. Stored as safetensors (tensors + a JSON header in the
metadata) so it loads without pickle and memory-maps cheaply.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save_file

from kvbm_codec.codec.allocation import Allocation, ErrorTable
from kvbm_codec.codec.config import CodecConfig
from kvbm_codec.codec.errors import CodecError, ModelMismatchError
from kvbm_codec.codec.pca import PCABasis
from kvbm_codec.codec.rope import RotaryParams

ARTIFACT_FORMAT = "kvbm-codec-calibration"
ARTIFACT_VERSION = 1
_META_KEY = "kvbm_codec"


class CalibrationIntegrityError(CodecError):
    code = "calibration_corrupt"


@dataclass
class ModelShape:
    n_layers: int
    n_kv_heads: int
    key_head_dim: int
    value_head_dim: int


@dataclass
class Calibration:
    model_fingerprint: str
    model_name: str
    shape: ModelShape
    rope: RotaryParams
    config: CodecConfig
    bases: dict[str, PCABasis]  # "g{i}.k" / "g{i}.v"
    error_tables: dict[str, ErrorTable]
    allocations: dict[str, Allocation] = field(default_factory=dict)  # "cr20" -> Allocation
    provenance: dict[str, Any] = field(default_factory=dict)
    calibration_id: str = ""

    def basis_name(self, group: int, kind: str) -> str:
        return f"g{group}.{kind}"

    def allocation(self, name_or_ratio: str | float) -> Allocation:
        name = name_or_ratio if isinstance(name_or_ratio, str) else allocation_name(name_or_ratio)
        if name not in self.allocations:
            raise KeyError(
                f"calibration {self.calibration_id} has no allocation {name!r}; "
                f"available: {sorted(self.allocations, key=_ratio_of)}"
            )
        return self.allocations[name]

    def allocation_by_id(self, allocation_id: str) -> Allocation | None:
        for a in self.allocations.values():
            if a.allocation_id == allocation_id:
                return a
        return None

    # ---- serialization -------------------------------------------------------------------------

    def _tensors(self) -> dict[str, torch.Tensor]:
        t: dict[str, torch.Tensor] = {"rope.inv_freq": self.rope.inv_freq.to(torch.float32).contiguous()}
        for name, b in self.bases.items():
            t[f"{name}.mean"] = b.mean.contiguous()
            t[f"{name}.scale"] = b.scale.contiguous()
            t[f"{name}.basis"] = b.basis.contiguous()
            t[f"{name}.eigenvalues"] = b.eigenvalues.contiguous()
        for name, et in self.error_tables.items():
            for g, arr in et.tables.items():
                t[f"{name}.err.{g}"] = torch.from_numpy(np.ascontiguousarray(arr))
        return t

    def _header(self) -> dict[str, Any]:
        return {
            "format": ARTIFACT_FORMAT,
            "version": ARTIFACT_VERSION,
            "model_fingerprint": self.model_fingerprint,
            "model_name": self.model_name,
            "shape": self.shape.__dict__,
            "rope_attention_scaling": self.rope.attention_scaling,
            "config": json.loads(self.config.model_dump_json()),
            "bases": {
                n: {
                    "residual_variance": b.residual_variance,
                    "weight": self.error_tables[n].weight,
                    "error_residual": self.error_tables[n].residual,
                }
                for n, b in sorted(self.bases.items())
            },
            "allocations": {n: json.loads(a.to_json()) for n, a in sorted(self.allocations.items())},
            "provenance": self.provenance,
        }

    def save(self, path: str | os.PathLike[str]) -> str:
        """Write atomically (temp file + rename) and return the calibration id."""
        tensors = self._tensors()
        header = self._header()
        digest = _content_digest(header, tensors)
        self.calibration_id = digest[:16]
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
        return self.calibration_id

    @classmethod
    def load(cls, path: str | os.PathLike[str], expected_fingerprint: str | None = None) -> Calibration:
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
        return cls._from_parts(header, tensors, digest[:16])

    @classmethod
    def _from_parts(cls, header: dict[str, Any], t: dict[str, torch.Tensor], cal_id: str) -> Calibration:
        # Artifacts from before the distortion field were all plain-MSE calibrations.
        config = CodecConfig.model_validate({"distortion": "mse", **header["config"]})
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
        return cls(
            model_fingerprint=header["model_fingerprint"],
            model_name=header["model_name"],
            shape=ModelShape(**header["shape"]),
            rope=RotaryParams(t["rope.inv_freq"], float(header["rope_attention_scaling"])),
            config=config,
            bases=bases,
            error_tables=tables,
            allocations={n: Allocation.from_json(json.dumps(a)) for n, a in header["allocations"].items()},
            provenance=header["provenance"],
            calibration_id=cal_id,
        )


def allocation_name(ratio: float) -> str:
    return f"cr{ratio:g}"


def _ratio_of(name: str) -> float:
    try:
        return float(name.removeprefix("cr"))
    except ValueError:
        return float("inf")


def _content_digest(header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(header, sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()
