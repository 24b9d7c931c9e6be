"""Bulk-data transports: how block bytes move between a KVBM client and the service, beside gRPC."""

from kvbm_codec.transport.nixl import (
    NixlAgent,
    NixlClosedError,
    NixlError,
    NixlTimeoutError,
    NixlTransferError,
    Registration,
    RemoteRegion,
)

__all__ = [
    "NixlAgent",
    "NixlClosedError",
    "NixlError",
    "NixlTimeoutError",
    "NixlTransferError",
    "Registration",
    "RemoteRegion",
]
