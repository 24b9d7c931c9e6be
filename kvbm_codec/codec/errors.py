"""Exceptions of the KVTC codec, each with a stable machine-readable ``code``.

Callers (the KVBM tier, the CLI, remote peers) must tell "this blob is damaged, refetch it" from
"this blob is fine but was written for another model/calibration, recompute" without parsing
messages, so every class carries a ``code`` string that never changes once released, and
catching ``FrameError`` covers every way a stored frame can be unusable.
"""

from __future__ import annotations

from typing import ClassVar


class CodecError(Exception):
    """Base of every error the codec raises on purpose."""

    code: ClassVar[str] = "codec_error"

    def __init__(self, message: str, *, where: str = "") -> None:
        # ``where`` names the section/chunk so an operator can see which part of a frame failed.
        self.message = message
        self.where = where
        super().__init__(f"[{self.code}] {where + ': ' if where else ''}{message}")


class FrameError(CodecError):
    """A frame cannot be trusted: damaged, truncated, foreign, or malformed."""

    code: ClassVar[str] = "frame_error"


class FrameTruncatedError(FrameError):
    """The buffer ends before the frame (or one of its chunks) does."""

    code: ClassVar[str] = "frame_truncated"


class FrameMagicError(FrameError):
    """The buffer does not start with ``b"KVTC"``: not a KVTC frame at all."""

    code: ClassVar[str] = "bad_magic"


class FrameVersionError(FrameError):
    """The frame was written in a format version this reader does not understand."""

    code: ClassVar[str] = "unsupported_version"


class FrameChecksumError(FrameError):
    """A digest did not match; ``where`` says whether the whole-frame xxh3-128 or which chunk's CRC32C."""

    code: ClassVar[str] = "checksum_mismatch"


class FrameHeaderError(FrameError):
    """The header (or the layout it promises) is malformed or inconsistent with the payload."""

    code: ClassVar[str] = "bad_header"


class FrameSizeError(FrameError):
    """The frame or its header exceeds the size a reader is willing to handle."""

    code: ClassVar[str] = "frame_too_large"


class CalibrationMismatchError(CodecError):
    """The frame was encoded with a different calibration artifact than the one offered to decode it."""

    code: ClassVar[str] = "calibration_mismatch"


class ModelMismatchError(CodecError):
    """The frame belongs to a different model (fingerprint) than the decoder was set up for."""

    code: ClassVar[str] = "model_mismatch"


__all__ = [
    "CalibrationMismatchError",
    "CodecError",
    "FrameChecksumError",
    "FrameError",
    "FrameHeaderError",
    "FrameMagicError",
    "FrameSizeError",
    "FrameTruncatedError",
    "FrameVersionError",
    "ModelMismatchError",
]
