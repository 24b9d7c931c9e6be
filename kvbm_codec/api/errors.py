"""Service errors, each with a stable ``code``; no protocol names (each front end maps the codes).

Front ends (gRPC, S3) translate these and nothing else into protocol errors, so every refusal an
operator can see has one name across logs, metrics (``reason`` label) and client errors.
"""

from __future__ import annotations

from typing import ClassVar


class ServiceError(Exception):
    code: ClassVar[str] = "internal"

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(f"[{self.code}] {message}")
        self.message = message
        self.retry_after_s = retry_after_s


class InvalidRequestError(ServiceError):
    code = "invalid_request"


class InvalidBlockRequestError(InvalidRequestError):
    code = "invalid_block"


class RequestTooLargeError(InvalidRequestError):
    code = "too_large"


class UnknownModelError(ServiceError):
    code = "unknown_model"


class OverloadedError(ServiceError):
    """Admission control refused: too many requests in flight. Carries a retry hint."""

    code = "overloaded"


class CapacityError(ServiceError):
    """Every tier is full and the configured policy is to refuse new blocks."""

    code = "store_full"


class CorruptBlockError(ServiceError):
    """A stored or submitted frame failed its checksums; it was refused (and dropped if stored)."""

    code = "corrupt_block"


class IncompatibleFrameError(ServiceError):
    """A frame is intact but was written for another model or an unavailable calibration."""

    code = "incompatible_frame"


class UnauthenticatedError(ServiceError):
    code = "unauthenticated"


class PermissionDeniedError(ServiceError):
    code = "permission_denied"


class ShuttingDownError(ServiceError):
    code = "shutting_down"


class CodecUnavailableError(ServiceError):
    """A codec worker process died or did not answer in time; the request may be retried."""

    code = "codec_unavailable"
