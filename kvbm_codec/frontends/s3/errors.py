"""S3 error responses: the standard codes, an XML body, and the mapping from the service's errors.

Every refusal the endpoint makes is one of these, so an S3 client (NIXL's OBJ backend, boto3, the
AWS CLI) sees the code it knows, and nothing is stored on any of them.
"""

from __future__ import annotations

from xml.sax.saxutils import escape

from kvbm_codec.api import errors as svc


class S3Error(Exception):
    def __init__(
        self, status: int, code: str, message: str, *, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}

    def xml(self, resource: str = "", request_id: str = "") -> bytes:
        return (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{self.code}</Code><Message>{escape(self.message)}</Message>"
            f"<Resource>{escape(resource)}</Resource><RequestId>{request_id}</RequestId></Error>"
        ).encode()


def access_denied(message: str) -> S3Error:
    return S3Error(403, "AccessDenied", message)


def invalid_argument(message: str) -> S3Error:
    return S3Error(400, "InvalidArgument", message)


def invalid_request(message: str) -> S3Error:
    return S3Error(400, "InvalidRequest", message)


def entity_too_large(message: str) -> S3Error:
    return S3Error(400, "EntityTooLarge", message)


def no_such_bucket(bucket: str) -> S3Error:
    return S3Error(404, "NoSuchBucket", f"bucket {bucket!r} does not exist (buckets are bound in config)")


def no_such_key(key: str, why: str = "") -> S3Error:
    return S3Error(404, "NoSuchKey", f"no object {key!r}" + (f": {why}" if why else ""))


def from_service(e: svc.ServiceError) -> S3Error:
    """The one translation of core refusals into S3 terms (retry hints become Retry-After)."""
    retry = {"Retry-After": f"{max(1, round(e.retry_after_s or 1))}"} if e.retry_after_s else {}
    if isinstance(e, svc.RequestTooLargeError):
        return entity_too_large(e.message)
    if isinstance(e, svc.InvalidBlockRequestError):
        return invalid_argument(e.message)
    if isinstance(e, svc.InvalidRequestError):
        return invalid_request(e.message)
    if isinstance(e, svc.OverloadedError | svc.CapacityError):
        return S3Error(503, "SlowDown", e.message, headers=retry)
    if isinstance(e, svc.ShuttingDownError | svc.CodecUnavailableError):
        return S3Error(503, "ServiceUnavailable", e.message, headers=retry)
    if isinstance(e, svc.UnauthenticatedError):
        return S3Error(403, "InvalidAccessKeyId", e.message)
    if isinstance(e, svc.PermissionDeniedError):
        return access_denied(e.message)
    return S3Error(500, "InternalError", e.message)
