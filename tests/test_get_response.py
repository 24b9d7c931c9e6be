"""The hand-joined GetBlocks response is byte for byte what protobuf writes for the same message, so
every client (ours, or any protobuf implementation) parses it unchanged; and the server really sends it."""

from __future__ import annotations

import os

import grpc
import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from kvbm_codec._proto import kvbm_codec_pb2 as pb
from kvbm_codec._proto import kvbm_codec_pb2_grpc as pb_grpc
from kvbm_codec.frontends.grpc.get_response import (
    add_servicer,
    decode_get_response,
    encode_get_response,
    serialize_get_response,
)
from kvbm_codec.frontends.grpc.wire import SERVICE_NAME

_result = st.tuples(
    st.integers(0, 2**64 - 1),
    st.sampled_from([pb.BLOCK_STATUS_HIT, pb.BLOCK_STATUS_MISS, pb.BLOCK_STATUS_CORRUPT]),
    st.lists(st.integers(0, 2**64 - 1), max_size=40),
    st.sampled_from([pb.ENCODING_UNSPECIFIED, pb.ENCODING_RAW, pb.ENCODING_FRAME]),
    st.one_of(st.none(), st.binary(max_size=300), st.integers(1, 1 << 20).map(lambda n: b"\x5a" * n)),
)


def _pair(h: int, status: int, positions: list[int], encoding: int, data: bytes | None):
    head = pb.BlockResult(sequence_hash=h, status=status, positions=positions, encoding=encoding)
    full = pb.BlockResult()
    full.CopyFrom(head)
    if data is not None:
        full.data = data
    return head, data, full


@settings(max_examples=300, deadline=None)
@given(st.lists(_result, max_size=6))
def test_the_joined_response_is_what_protobuf_serializes(results):
    pairs = [_pair(*r) for r in results]
    wire = encode_get_response((head, data) for head, data, _ in pairs)
    expected = pb.GetBlocksResponse(blocks=[full for _, _, full in pairs])
    assert wire == expected.SerializeToString()
    assert pb.GetBlocksResponse.FromString(wire) == expected


@settings(max_examples=300, deadline=None)
@given(st.lists(_result, max_size=6))
def test_the_client_reads_what_protobuf_wrote_without_copying_the_data(results):
    pairs = [_pair(*r) for r in results]
    wire = pb.GetBlocksResponse(blocks=[full for _, _, full in pairs]).SerializeToString()
    got = decode_get_response(wire)
    assert [(head, None if data is None else bytes(data)) for head, data in got] == [
        (head, data) for head, data, _ in pairs
    ]
    for _, data in got:
        assert data is None or (isinstance(data, memoryview) and data.obj is wire)


def test_the_client_reader_follows_protobuf_on_odd_but_valid_messages():
    span = pb.BlockResult(sequence_hash=3, nixl=pb.NixlSpan(offset=8))
    with_data = pb.BlockResult(sequence_hash=4, data=b"abc")
    # one result written as two concatenated messages: they merge, and of a oneof the last one wins
    for first, second in ((span, with_data), (with_data, span)):
        inner = first.SerializeToString() + second.SerializeToString()
        wire = b"\x0a" + bytes([len(inner)]) + inner
        ((head, data),) = decode_get_response(wire)
        (expected,) = pb.GetBlocksResponse.FromString(wire).blocks
        got = "data" if data is not None else head.WhichOneof("payload")
        assert got == expected.WhichOneof("payload") and head.sequence_hash == expected.sequence_hash
        assert data is None or bytes(data) == expected.data
        assert head.nixl == expected.nixl
    unknown = (
        b"\x12\x03xyz" + pb.GetBlocksResponse(blocks=[with_data]).SerializeToString()
    )  # field 2: skipped
    ((head, data),) = decode_get_response(unknown)
    assert head.sequence_hash == 4 and bytes(data) == b"abc"


@pytest.mark.parametrize("cut", [1, 2, 5, 9])
def test_a_truncated_response_is_refused(cut):
    wire = pb.GetBlocksResponse(
        blocks=[pb.BlockResult(sequence_hash=2**63, data=b"x" * 40)]
    ).SerializeToString()
    with pytest.raises(DecodeError):
        decode_get_response(wire[:-cut])


def test_a_nixl_span_passes_and_a_result_carrying_data_is_refused():
    span = pb.BlockResult(
        sequence_hash=7, status=pb.BLOCK_STATUS_HIT, nixl=pb.NixlSpan(offset=4096, nbytes=128)
    )
    assert encode_get_response([(span, None)]) == pb.GetBlocksResponse(blocks=[span]).SerializeToString()
    with pytest.raises(ValueError, match="already carries its data"):
        encode_get_response([(pb.BlockResult(data=b"x"), b"x")])
    msg = pb.GetBlocksResponse(blocks=[span])
    assert serialize_get_response(msg) == msg.SerializeToString()


class _Servicer(pb_grpc.KvbmCodecServicer):
    def __init__(self, blocks: list[bytes]) -> None:
        self.blocks = blocks

    def GetBlocks(self, request, context):
        yield encode_get_response(
            (pb.BlockResult(sequence_hash=h, status=pb.BLOCK_STATUS_HIT, positions=[h]), self.blocks[h])
            for h in request.sequence_hashes
        )

    def Stats(self, request, context):
        return pb.StatsResponse(max_inflight_requests=7)


def test_the_server_sends_the_joined_bytes_and_other_methods_are_unchanged():
    from concurrent import futures

    blocks = [os.urandom(737280) for _ in range(3)]
    server = grpc.server(futures.ThreadPoolExecutor(2), options=[("grpc.max_send_message_length", 8 << 20)])
    add_servicer(_Servicer(blocks), server, SERVICE_NAME)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", 8 << 20)]
        ) as ch:
            stub = pb_grpc.KvbmCodecStub(ch)
            (msg,) = list(stub.GetBlocks(pb.GetBlocksRequest(sequence_hashes=[2, 0]), timeout=30))
            assert [(b.sequence_hash, list(b.positions), b.data) for b in msg.blocks] == [
                (2, [2], blocks[2]),
                (0, [0], blocks[0]),
            ]
            assert stub.Stats(pb.StatsRequest(), timeout=30).max_inflight_requests == 7
    finally:
        server.stop(0)
