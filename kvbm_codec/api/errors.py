"""Service errors, each with a stable ``code`` and the gRPC status it maps to.

Front ends (gRPC, S3) translate these and nothing else into protocol errors, so every refusal an
operator can see has one name across logs, metrics (``reason`` label) and client errors.
"""

from __future__ import annotations

from typing import ClassVar


class ServiceError(Exception):
    code: ClassVar[str] = "internal"
    grpc_status: ClassVar[str] = "INTERNAL"  # grpc.StatusCode member name; the core does not import grpc

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(f"[{self.code}] {message}")
        self.message = message
        self.retry_after_s = retry_after_s


class InvalidRequestError(ServiceError):
    code = "invalid_request"
    grpc_status = "INVALID_ARGUMENT"


class InvalidBlockRequestError(InvalidRequestError):
    code = "invalid_block"


class RequestTooLargeError(InvalidRequestError):
    code = "too_large"
    grpc_status = "RESOURCE_EXHAUSTED"


class UnknownModelError(ServiceError):
    code = "unknown_model"
    grpc_status = "NOT_FOUND"


class OverloadedError(ServiceError):
    """Admission control refused: too many requests in flight. Carries a retry hint."""

    code = "overloaded"
    grpc_status = "RESOURCE_EXHAUSTED"


class CapacityError(ServiceError):
    """Every tier is full and the configured policy is to refuse new blocks."""

    code = "store_full"
    grpc_status = "RESOURCE_EXHAUSTED"


class CorruptBlockError(ServiceError):
    """A stored or submitted frame failed its checksums; it was refused (and dropped if stored)."""

    code = "corrupt_block"
    grpc_status = "DATA_LOSS"


class IncompatibleFrameError(ServiceError):
    """A frame is intact but was written for another model or an unavailable calibration."""

    code = "incompatible_frame"
    grpc_status = "FAILED_PRECONDITION"


class UnauthenticatedError(ServiceError):
    code = "unauthenticated"
    grpc_status = "UNAUTHENTICATED"


class PermissionDeniedError(ServiceError):
    code = "permission_denied"
    grpc_status = "PERMISSION_DENIED"


class ShuttingDownError(ServiceError):
    code = "shutting_down"
    grpc_status = "UNAVAILABLE"
