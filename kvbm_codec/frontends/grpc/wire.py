"""What the gRPC server and client agree on beyond the .proto: metadata keys, the front end's own
errors, and the one map from a service error's stable ``code`` to a gRPC status.

The core's errors carry no gRPC names (``kvbm_codec.api.errors``); this module is where the gRPC front
end gives them one, so the server, its auth interceptor and the client cannot disagree. It imports
neither torch nor the server, so the client and auth stay light.
"""

from __future__ import annotations

import math
from typing import NoReturn

import grpc

from kvbm_codec._proto import kvbm_codec_pb2 as pb
from kvbm_codec.api.errors import ServiceError

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["KvbmCodec"].full_name
ERROR_CODE_KEY = "kvbm-error-code"
RETRY_AFTER_KEY = "retry-after-ms"
PUSHBACK_KEY = "grpc-retry-pushback-ms"
TENANT_KEY = "x-kvbm-tenant"


class DeadlineError(ServiceError):
    code = "deadline_exceeded"


class NixlUnavailableError(ServiceError):
    code = "nixl_unavailable"


class NixlPathError(ServiceError):
    """The NIXL transfer itself failed (peer unreachable, timed out); the request stored nothing."""

    code = "nixl_transfer"


_S = grpc.StatusCode
STATUS_BY_CODE: dict[str, grpc.StatusCode] = {
    "internal": _S.INTERNAL,
    "invalid_request": _S.INVALID_ARGUMENT,
    "invalid_block": _S.INVALID_ARGUMENT,
    "too_large": _S.RESOURCE_EXHAUSTED,
    "unknown_model": _S.NOT_FOUND,
    "overloaded": _S.RESOURCE_EXHAUSTED,
    "store_full": _S.RESOURCE_EXHAUSTED,
    "corrupt_block": _S.DATA_LOSS,
    "incompatible_frame": _S.FAILED_PRECONDITION,
    "unauthenticated": _S.UNAUTHENTICATED,
    "permission_denied": _S.PERMISSION_DENIED,
    "shutting_down": _S.UNAVAILABLE,
    "codec_unavailable": _S.UNAVAILABLE,
    "no_replica": _S.UNAVAILABLE,
    "deadline_exceeded": _S.DEADLINE_EXCEEDED,
    "nixl_unavailable": _S.UNIMPLEMENTED,
    "nixl_transfer": _S.UNAVAILABLE,
}

# Refusals that would fail the same way again: tell gRPC's retry policy not to replay them.
_NO_RETRY = frozenset({"too_large", "invalid_request", "invalid_block", "unknown_model"})


def status_of(e: ServiceError | type[ServiceError]) -> grpc.StatusCode:
    """The gRPC status for a service error; an unmapped code is a bug on our side, so INTERNAL."""
    return STATUS_BY_CODE.get(e.code, _S.INTERNAL)


def trailers(e: ServiceError) -> tuple[tuple[str, str], ...]:
    md: list[tuple[str, str]] = [(ERROR_CODE_KEY, e.code)]
    if e.retry_after_s is not None:
        ms = str(max(0, math.ceil(e.retry_after_s * 1000)))
        md += [(RETRY_AFTER_KEY, ms), (PUSHBACK_KEY, ms)]
    elif status_of(e) in (_S.RESOURCE_EXHAUSTED, _S.UNAVAILABLE) and e.code in _NO_RETRY:
        md.append((PUSHBACK_KEY, "-1"))
    return tuple(md)


def abort(context: grpc.ServicerContext, e: ServiceError) -> NoReturn:
    context.set_trailing_metadata(trailers(e))
    context.abort(status_of(e), e.message)
    raise AssertionError("unreachable: context.abort raises") from e
