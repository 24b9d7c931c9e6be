"""The verbs of the tier: put/get/contains/delete of blocks by tenant, model and sequence hash.

:class:`BlockTransport` is what a client of the tier needs (tenant and model already bound); the
in-process core (``kvbm_codec.core.service.ServiceTransport``), the gRPC client and the sharded client
all implement it, so the KVBM adapter and the benchmarks run unchanged over any of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

DEFAULT_MODEL = "smollm2-135m"  # the embedded model: the default everywhere a model name is optional


@dataclass
class PutItem:
    sequence_hash: int
    data: bytes | memoryview  # a raw block in the model's BlockSpec, or a frame when is_frame
    positions: torch.Tensor | None = None  # default: first_position .. first_position + page_size
    first_position: int = 0
    is_frame: bool = False
    compress: bool = True


@dataclass(frozen=True)
class PutResult:
    sequence_hash: int
    stored_bytes: int
    raw_bytes: int

    @property
    def ratio(self) -> float:
        return self.raw_bytes / max(1, self.stored_bytes)


@dataclass(frozen=True)
class GetResult:
    sequence_hash: int
    status: str  # "hit" | "miss" | "corrupt" (a damaged stored frame: dropped, counts as a miss)
    data: bytes | memoryview | None = None  # raw block bytes, or the frame when frames were asked for
    positions: tuple[int, ...] = ()
    frame: bytes | None = None  # with ``with_frames``: the stored frame ``data`` was decoded from


@dataclass(frozen=True)
class LookupResult:
    """What the store holds under one hash, read from the frame header alone (nothing decoded)."""

    sequence_hash: int
    stored: bool
    stored_bytes: int = 0
    raw_bytes: int = 0
    calibration_id: str = ""
    positions: tuple[int, ...] = ()
    layers: tuple[int, int] = (0, 0)


@runtime_checkable
class BlockTransport(Protocol):
    """What the tier client needs from the service, tenant and model already bound.

    Implemented by ``ServiceTransport`` (in-process core), ``CodecClient`` (one replica over gRPC)
    and ``kvbm_codec.cluster.sharding.ShardedClient`` (many replicas).
    """

    def put_blocks(self, items: Sequence[PutItem]) -> list[PutResult]: ...

    def get_blocks(self, hashes: Sequence[int], *, views: bool = False) -> list[GetResult]:
        """``views``: the caller copies each block's data out at once, so ``data`` may be a read-only
        view into the transport's own buffer (the gRPC client's received message) instead of bytes."""
        ...

    def contains(self, hashes: Sequence[int]) -> list[bool]: ...

    def delete(self, hashes: Sequence[int]) -> int: ...
