"""The block-codec plug-in point: a protocol and a registry by name (after LMCache's serde factory).

A frame names the codec that wrote it (``FrameHeader.codec``); the core asks :func:`get_codec` for that
name to decode it, and for the served model's configured name to encode. A new codec is a module that
implements :class:`BlockCodec` and calls :func:`register_codec` at import; the core imports the
built-in ones (``kvbm_codec.codec.block`` registers "kvtc").
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch

from kvbm_codec.api.blocks import BlockSpec


@runtime_checkable
class BlockCodec(Protocol):
    """One block <-> one frame for one block spec. Must be thread-safe (the core shares it)."""

    name: str
    spec: BlockSpec

    def encode(
        self, block: torch.Tensor, positions: torch.Tensor, *, compress: bool = True
    ) -> tuple[bytes, Any]:
        """(frame, codec-specific stats). ``compress=False`` stores the block exactly."""
        ...

    def decode(
        self, frame: bytes | memoryview, device: str | torch.device = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(block in ``spec``'s layout and dtype, its positions); raises a FrameError on damage."""
        ...

    def describe(self) -> dict[str, str]:
        """Identifiers an operator sees in ``kvbm_codec_calibration_info`` (e.g. calibration id)."""
        ...


# (codec parameters, e.g. a Calibration; block spec; target compression ratio) -> codec
BlockCodecFactory = Callable[[Any, BlockSpec, float], BlockCodec]


class UnknownCodecError(KeyError):
    code = "unknown_codec"


_registry: dict[str, BlockCodecFactory] = {}
_lock = threading.Lock()


def register_codec(name: str, factory: BlockCodecFactory, *, replace: bool = False) -> None:
    """Make ``name`` (the frame header's ``codec`` value) build codecs with ``factory``."""
    if not name or not name.isascii() or len(name) > 32:
        raise ValueError(f"codec name must be 1-32 ASCII characters, got {name!r}")
    with _lock:
        if name in _registry and not replace and _registry[name] is not factory:
            raise ValueError(f"codec {name!r} is already registered")
        _registry[name] = factory


def get_codec(name: str) -> BlockCodecFactory:
    with _lock:
        factory = _registry.get(name)
        if factory is None:
            raise UnknownCodecError(f"no block codec named {name!r} (registered: {sorted(_registry)})")
        return factory


def codec_names() -> list[str]:
    with _lock:
        return sorted(_registry)
