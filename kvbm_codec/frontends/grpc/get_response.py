"""GetBlocks responses written straight to wire bytes, so a block's data is copied once, not four times.

Building a ``pb.GetBlocksResponse`` of raw blocks copies every 737 KB block into a ``BlockResult``,
again into the response that holds the results, and again when gRPC serializes it; each copy lands in
freshly mapped memory: in isolation on the 2-core build machine the three cost ~37 ms per 16 blocks
(0.3 GB/s) against ~2 ms joined once. End to end the server side did not show (its time is in the
decode; docs/benchmarks.md, session 19); the client's side, below, did (0.86x of the restore).
Here each block's small fields (hash, status, positions, encoding) still go through protobuf;
only the ``data`` field (number 5, the last one set: ``nixl`` shares its oneof) is appended by hand,
and the message is joined once. The bytes are exactly what ``SerializeToString`` gives for the same
message (tests/test_get_response.py), so any protobuf client parses them unchanged. The client's side
reads any GetBlocksResponse the same way round: the small fields through protobuf, each block's data
as a view into the received message, so a restore copies it once, into its destination.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from kvbm_codec._proto import kvbm_codec_pb2 as pb
from kvbm_codec._proto import kvbm_codec_pb2_grpc as pb_grpc

_BLOCKS_TAG = b"\x0a"  # GetBlocksResponse.blocks: field 1, length-delimited
_DATA_TAG = b"\x2a"  # BlockResult.data: field 5, length-delimited


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def encode_get_response(results: Iterable[tuple[pb.BlockResult, bytes | None]]) -> bytes:
    """The wire bytes of a GetBlocksResponse of these results: each ``BlockResult`` without its
    payload, and its ``data`` (None: a miss, or a NIXL span already set in the result)."""
    parts: list[bytes] = []
    for head, data in results:
        if head.WhichOneof("payload") == "data":
            raise ValueError("the result already carries its data; pass it separately")
        fields = head.SerializeToString()
        if data is None:
            parts += [_BLOCKS_TAG, _varint(len(fields)), fields]
            continue
        size = _varint(len(data))
        parts += [
            _BLOCKS_TAG,
            _varint(len(fields) + 1 + len(size) + len(data)),
            fields,
            _DATA_TAG,
            size,
            data,
        ]
    return b"".join(parts)


def _read_varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise DecodeError("truncated or overlong varint in a GetBlocks response")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _fields(buf: memoryview, pos: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, start of the field's tag, start of its value, end) of each field in buf[pos:end]."""
    while pos < end:
        start = pos
        key, pos = _read_varint(buf, pos, end)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            _, pos = _read_varint(buf, pos, end)
            value = start
        elif wire_type == 2:
            size, value = _read_varint(buf, pos, end)
            pos = value + size
        elif wire_type in (1, 5):
            value, pos = pos, pos + (8 if wire_type == 1 else 4)
        else:
            raise DecodeError(f"wire type {wire_type} in a GetBlocks response")
        if pos > end or number == 0:
            raise DecodeError("truncated GetBlocks response")
        yield number, start, value, pos


def decode_get_response(wire: bytes) -> list[tuple[pb.BlockResult, memoryview | None]]:
    """The client's side of ``encode_get_response``, for any valid GetBlocksResponse: each result
    without its data, and the data as a view into ``wire`` (no copy; protobuf would copy each block
    twice, into the parsed message and again into the ``bytes`` that ``.data`` returns)."""
    buf = memoryview(wire)
    out: list[tuple[pb.BlockResult, memoryview | None]] = []
    for number, _, value, end in _fields(buf, 0, len(buf)):
        if number != 1:
            continue  # a field this client does not know, as protobuf would skip it
        rest: list[tuple[int, memoryview]] = []
        data: memoryview | None = None
        for n, start, v, e in _fields(buf, value, end):
            if n == 5:  # data and nixl share a oneof: as in protobuf, the last one read wins
                data, rest = buf[v:e], [(k, f) for k, f in rest if k != 6]
            else:
                rest.append((n, buf[start:e]))
                data = None if n == 6 else data
        out.append((pb.BlockResult.FromString(b"".join(f for _, f in rest)), data))
    return out


def serialize_get_response(message: pb.GetBlocksResponse | bytes) -> bytes:
    """GetBlocks' response serializer: bytes from ``encode_get_response`` pass as they are."""
    return message if isinstance(message, bytes) else message.SerializeToString()


class _Collect:
    """Stands in for the server while the generated code registers the service: keeps its table."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, _handlers: Any) -> None:
        pass  # the same table also comes through add_registered_method_handlers

    def add_registered_method_handlers(
        self, _service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        self.handlers = dict(handlers)


def add_servicer(servicer: pb_grpc.KvbmCodecServicer, server: grpc.Server, service_name: str) -> None:
    """The generated registration, with GetBlocks' response serializer swapped for one that takes
    pre-encoded bytes; every other method keeps the generated handler as it is."""
    table = _Collect()
    pb_grpc.add_KvbmCodecServicer_to_server(servicer, table)  # type: ignore[arg-type]
    get = table.handlers["GetBlocks"]
    table.handlers["GetBlocks"] = get._replace(response_serializer=serialize_get_response)  # type: ignore[attr-defined]
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service_name, table.handlers),))
    server.add_registered_method_handlers(service_name, table.handlers)
