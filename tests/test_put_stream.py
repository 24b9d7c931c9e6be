"""PutBlocksStream over real gRPC on 127.0.0.1, real SmolLM2 KV and a real (small) calibration.

The streamed put must store exactly what the unary put stores, and, like it, nothing at all when any
part fails: a stream cut or cancelled in the middle, a chunk over the message limit, too many blocks
over the whole stream, a stream shorter than the count its first chunk declares, a bad block in a
later chunk (whose earlier chunks are already encoded), a client that stops sending (the deadline).
A client against a server without the call puts unary.
A prefetched streamed get (``get_prefetch``) returns what the codec restores and frees its slot."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures

import _smollm2
import grpc
import pytest
from _smollm2 import MODEL, SPEC

from kvbm_codec._proto import kvbm_codec_pb2 as pb
from kvbm_codec._proto import kvbm_codec_pb2_grpc as pb_grpc
from kvbm_codec.adapters.kv_blocks import KVBlock, kv_blocks
from kvbm_codec.api.errors import InvalidBlockRequestError, InvalidRequestError, RequestTooLargeError
from kvbm_codec.api.types import PutItem
from kvbm_codec.core.service import ServedModel
from kvbm_codec.frontends.grpc.client import CodecClient, translate
from kvbm_codec.frontends.grpc.server import CodecServer, KvbmCodecServicer
from kvbm_codec.server.app import build_service
from kvbm_codec.service.config import NixlConfig, ServiceConfig
from kvbm_codec.texts import demo_document

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(small_calibration) -> ServedModel:
    return _smollm2.served(small_calibration)


@pytest.fixture(scope="module")
def blocks(smollm) -> list[KVBlock]:
    return kv_blocks(smollm, demo_document(), SPEC, max_tokens=6 * SPEC.page_size)


class Running:
    def __init__(self, served: ServedModel, **kw: object) -> None:
        base: dict[str, object] = dict(
            grpc_port=0, metrics_port=None, workers=4, nixl=NixlConfig(enabled=False)
        )
        base.update(kw)
        self.cfg = ServiceConfig.load(**base)
        self.svc = build_service(self.cfg, models=[served])
        self.server = CodecServer(self.svc, self.cfg).start()
        self.target = f"127.0.0.1:{self.server.port}"
        self.channel = grpc.insecure_channel(
            self.target,
            options=[
                ("grpc.max_send_message_length", 64 << 20),
                ("grpc.max_receive_message_length", 64 << 20),
            ],
        )
        self.stub = pb_grpc.KvbmCodecStub(self.channel)

    def client(self, **kw: object) -> CodecClient:
        return CodecClient(self.target, model=MODEL, timeout_s=60, **kw)  # type: ignore[arg-type]

    def stored(self) -> int:
        return sum(t.blocks for t in self.svc.tier_stats())

    def inflight(self) -> float:
        return self.svc.metrics.registry.get_sample_value("kvbm_codec_inflight_requests") or 0.0

    def stop(self) -> None:
        self.channel.close()
        self.server.stop(1.0)


@pytest.fixture
def running(served) -> Iterator[Running]:
    r = Running(served, put_stream_encode_blocks=3)  # encodes mid-stream and a remainder at the end
    yield r
    r.stop()


def _chunk(
    blocks: list[KVBlock], salt: int = 0, model: str = MODEL, data: bytes | None = None, declare: int = 0
) -> pb.PutBlocksRequest:
    return pb.PutBlocksRequest(
        model=model,
        stream_blocks=declare,
        blocks=[
            pb.Block(
                sequence_hash=b.sequence_hash ^ salt,
                first_position=b.first_position,
                encoding=pb.ENCODING_RAW,
                data=b.data if data is None else data,
            )
            for b in blocks
        ],
    )


def _hashes(blocks: list[KVBlock], salt: int = 0) -> list[int]:
    return [b.sequence_hash ^ salt for b in blocks]


def test_streamed_put_stores_what_the_unary_put_stores(running, blocks):
    salt = 0x5A5A
    resp = running.stub.PutBlocksStream(
        iter([_chunk(blocks[:2], salt, declare=6), _chunk(blocks[2:5], salt), _chunk(blocks[5:], salt)])
    )
    assert [r.sequence_hash for r in resp.results] == _hashes(blocks, salt)
    assert all(r.raw_bytes == SPEC.nbytes and 0 < r.stored_bytes < SPEC.nbytes / 4 for r in resp.results)
    with running.client(stream_chunk_blocks=0) as unary, running.client(stream_chunk_blocks=2) as streamed:
        unary.put_blocks([PutItem(b.sequence_hash, b.data, first_position=b.first_position) for b in blocks])
        # the client's default path: a batch of more than stream_chunk_blocks goes as one stream
        items = [
            PutItem(h, b.data, first_position=b.first_position)
            for h, b in zip(_hashes(blocks, 7), blocks, strict=True)
        ]
        assert [r.sequence_hash for r in streamed.put_blocks(items)] == _hashes(blocks, 7)
        assert streamed.stream_chunk_blocks == 2  # the server has the call: no fallback happened
        ref = unary.get_blocks([b.sequence_hash for b in blocks], as_frames=True)
        for s in (salt, 7):
            got = unary.get_blocks(_hashes(blocks, s), as_frames=True)
            assert [g.data for g in got] == [g.data for g in ref]  # the same frames, byte for byte
    assert running.stored() == 3 * len(blocks)


def test_a_stream_cut_in_the_middle_stores_nothing(running, blocks):
    sent = threading.Event()

    def cut() -> Iterator[pb.PutBlocksRequest]:
        yield _chunk(
            blocks[:3], declare=6
        )  # encoded by the server (put_stream_encode_blocks=3) before the cut
        sent.set()
        time.sleep(0.5)
        raise RuntimeError("client process dies mid-stream")

    with pytest.raises(grpc.RpcError) as ei:
        running.stub.PutBlocksStream(cut(), timeout=30)
    assert (
        sent.is_set() and ei.value.code() == grpc.StatusCode.UNKNOWN
    )  # gRPC's code for a broken request stream
    release = time.monotonic() + 10
    while running.inflight() and time.monotonic() < release:
        time.sleep(0.01)
    assert running.inflight() == 0 and running.stored() == 0

    go = threading.Event()

    def stalls() -> Iterator[pb.PutBlocksRequest]:
        yield _chunk(blocks[:3], declare=6)
        go.wait(30)
        yield _chunk(blocks[3:])

    call = running.stub.PutBlocksStream.future(stalls(), timeout=30)
    deadline = time.monotonic() + 10
    while not running.inflight() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)
    call.cancel()
    go.set()
    while running.inflight() and time.monotonic() < deadline + 10:
        time.sleep(0.01)
    assert call.cancelled() and running.inflight() == 0 and running.stored() == 0


def test_refusals_in_a_later_chunk_store_nothing(served, blocks):
    r = Running(served, put_stream_encode_blocks=1, max_blocks_per_request=4)
    try:
        nan = bytearray(blocks[4].data)
        nan[0:2] = b"\x00\x7e"  # float16 NaN
        cases = {
            "a NaN block after two encoded chunks": (
                [_chunk(blocks[:2], declare=4), _chunk(blocks[2:3]), _chunk(blocks[4:5], data=bytes(nan))],
                InvalidBlockRequestError,
            ),
            "more blocks over the stream than one request may hold": (
                [_chunk(blocks[:3], declare=5), _chunk(blocks[3:5])],
                RequestTooLargeError,
            ),
            "a later chunk naming another model": (
                [_chunk(blocks[:2], declare=3), _chunk(blocks[2:3], model="other-model")],
                InvalidRequestError,
            ),
            "a NIXL region in a stream": (
                [_chunk(blocks[:2], declare=3), pb.PutBlocksRequest(region=pb.RemoteRegion(agent_name="x"))],
                InvalidRequestError,
            ),
            "an empty stream": ([], InvalidRequestError),
            "a stream that ends short of the blocks it declared (as gRPC ends a failed one)": (
                [_chunk(blocks[:2], declare=4), _chunk(blocks[2:3])],
                InvalidRequestError,
            ),
            "a first chunk that declares no stream_blocks": ([_chunk(blocks[:2])], InvalidRequestError),
            "more blocks than declared": (
                [_chunk(blocks[:2], declare=2), _chunk(blocks[2:3])],
                InvalidRequestError,
            ),
        }
        for what, (chunks, err) in cases.items():
            with pytest.raises(grpc.RpcError) as ei:
                r.stub.PutBlocksStream(iter(chunks), timeout=60)
            e = translate(ei.value)
            assert isinstance(e, err), (what, e)
            assert e.status == grpc.StatusCode.INVALID_ARGUMENT or isinstance(e, RequestTooLargeError), what
            assert r.stored() == 0, what
    finally:
        r.stop()


def test_an_oversize_chunk_is_refused_and_nothing_stored(served, blocks):
    r = Running(served, max_message_bytes=1 << 20)  # one raw block (720 KiB) fits a chunk, two do not
    try:
        with pytest.raises(grpc.RpcError) as ei:
            r.stub.PutBlocksStream(iter([_chunk(blocks[:1], declare=3), _chunk(blocks[1:3])]), timeout=60)
        assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert r.stored() == 0
        resp = r.stub.PutBlocksStream(iter([_chunk(blocks[:1], declare=2), _chunk(blocks[1:2])]), timeout=60)
        assert len(resp.results) == 2 and r.stored() == 2
    finally:
        r.stop()


def test_a_client_that_stops_sending_is_cut_at_the_deadline(served, blocks):
    r = Running(served, request_timeout_s=1.0)  # the call sets no deadline: the server's default holds
    go = threading.Event()

    def stalls() -> Iterator[pb.PutBlocksRequest]:
        yield _chunk(blocks[:2], declare=4)
        go.wait(20)

    try:
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as ei:
            r.stub.PutBlocksStream(stalls())
        assert time.monotonic() - t0 < 15
        assert ei.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED)
        go.set()
        end = time.monotonic() + 10
        while r.inflight() and time.monotonic() < end:
            time.sleep(0.01)
        assert r.inflight() == 0 and r.stored() == 0
    finally:
        go.set()
        r.stop()


class _OldServicer(KvbmCodecServicer):
    """A server from before PutBlocksStream: the generated base class answers UNIMPLEMENTED."""

    PutBlocksStream = pb_grpc.KvbmCodecServicer.PutBlocksStream


def test_a_client_falls_back_to_unary_puts_on_an_older_server(served, blocks):
    cfg = ServiceConfig.load(grpc_port=0, metrics_port=None, nixl=NixlConfig(enabled=False))
    svc = build_service(cfg, models=[served])
    server = grpc.server(
        futures.ThreadPoolExecutor(4),
        options=[("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)],
    )
    pb_grpc.add_KvbmCodecServicer_to_server(_OldServicer(svc, cfg), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with CodecClient(f"127.0.0.1:{port}", model=MODEL, timeout_s=60, stream_chunk_blocks=2) as c:
            items = [PutItem(b.sequence_hash, b.data, first_position=b.first_position) for b in blocks]
            assert [x.sequence_hash for x in c.put_blocks(items)] == _hashes(blocks)
            assert c.stream_chunk_blocks == 0  # unary from now on
            assert c.contains(_hashes(blocks)) == [True] * len(blocks)
    finally:
        server.stop(1.0)
        svc.close()


def test_a_prefetched_get_returns_what_the_codec_restores_and_frees_its_slot(served, blocks):
    r = Running(served, get_prefetch=True)
    try:
        with r.client() as c:
            c.put_blocks([PutItem(b.sequence_hash, b.data, first_position=b.first_position) for b in blocks])
            frames = c.get_blocks(_hashes(blocks), as_frames=True)
            got = c.get_blocks([*_hashes(blocks), 12345], batch_size=2)  # 4 batches: 3 prefetched
        assert [g.status for g in got] == ["hit"] * len(blocks) + ["miss"]
        for f, g in zip(frames, got, strict=False):
            assert g.data == SPEC.to_bytes(served.encoder.decode(f.data)[0])
        stream = r.stub.GetBlocks(
            pb.GetBlocksRequest(model=MODEL, sequence_hashes=_hashes(blocks), batch_size=1)
        )
        assert len(next(stream).blocks) == 1
        stream.cancel()  # the helper decoding batch 2 must finish inside the request's admission
        end = time.monotonic() + 10
        while r.inflight() and time.monotonic() < end:
            time.sleep(0.01)
        assert r.inflight() == 0
    finally:
        r.stop()
