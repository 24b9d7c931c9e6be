"""Bad input against the BlockService core: a specific error, nothing stored, and the service keeps serving.

Every case is a real block of SmolLM2-135M KV (or a real frame of it) damaged one way. The table in
docs/reliability.md lists the same cases with the code each one gets.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import _smollm2
import grpc
import pytest
import torch
import xxhash
from _smollm2 import MODEL, SPEC

from kvbm_codec.api.blocks import block_to_kv
from kvbm_codec.api.errors import (
    CorruptBlockError,
    IncompatibleFrameError,
    InvalidBlockRequestError,
    InvalidRequestError,
    RequestTooLargeError,
    ServiceError,
    UnknownModelError,
)
from kvbm_codec.api.types import PutItem
from kvbm_codec.core.service import BlockService, Limits
from kvbm_codec.store.base import BlockKey
from kvbm_codec.store.memory import MemoryTier
from kvbm_codec.store.tiered import TieredStore

pytestmark = pytest.mark.slow
PREFIX = struct.Struct("<4sHHI")
TENANT = "tenant-a"
MAX_FRAME = 1 << 20  # above an all-raw fp16 block's frame (~0.7 MB)


@dataclass
class Blocks:
    raw: list[bytes]  # two real raw blocks, positions 0..31 and 32..63
    frames: list[bytes]  # the same blocks encoded by the service's own encoder


@pytest.fixture(scope="module")
def blocks(smollm, small_calibration) -> Blocks:  # type: ignore[no-untyped-def]
    from kvbm_codec.texts import calibration_texts

    raw = _smollm2.block_bytes(smollm, 2, text=calibration_texts()[3])
    model = _smollm2.served(small_calibration)

    # Version-1 frames (JSON header), which a client may still submit: the cases below edit their
    # headers. Damage to compact version-2 frames is covered in tests/test_block_frames.py.
    def v1(r: bytes, i: int) -> bytes:
        kv = block_to_kv(SPEC.from_bytes(r), torch.arange(i, i + 32), SPEC)
        sinks = kv.positions < small_calibration.config.sink_tokens
        return model.encoder.codec.encode(kv, sinks, window_tokens=0, dtype=SPEC.dtype)

    frames = [v1(r, i) for r, i in zip(raw, (0, 32), strict=True)]
    return Blocks(raw, frames)


@pytest.fixture
def svc(small_calibration) -> BlockService:  # type: ignore[no-untyped-def]
    store = TieredStore([MemoryTier(64 << 20)])
    limits = Limits(max_blocks_per_request=8, max_frame_bytes=MAX_FRAME)
    return BlockService([_smollm2.served(small_calibration)], store, limits=limits)


# ---- frame forgery: valid digests around wrong content, so the checks past the checksums are reached ----


def _split(frame: bytes) -> tuple[int, int, dict, bytes]:
    _, version, flags, hlen = PREFIX.unpack_from(frame)
    return version, flags, json.loads(frame[12 : 12 + hlen]), frame[12 + hlen : -16]


def _seal(header: dict, payload: bytes, *, version: int = 1, flags: int = 0) -> bytes:
    hj = json.dumps(header).encode()
    body = PREFIX.pack(b"KVTC", version, flags, len(hj)) + hj + payload
    return body + xxhash.xxh3_128(body).digest()


def _edit(frame: bytes, edit: Callable[[dict], object]) -> bytes:
    version, flags, header, payload = _split(frame)
    edit(header)
    return _seal(header, payload, version=version, flags=flags)


def _flip(frame: bytes, pos: int) -> bytes:
    b = bytearray(frame)
    b[pos] ^= 0x10
    return bytes(b)


def _nan_block(raw: bytes) -> bytes:
    t = SPEC.from_bytes(raw).clone()
    t[3, 1, 7, 11] = float("nan")
    return SPEC.to_bytes(t)


def _inf_block(raw: bytes) -> bytes:
    t = SPEC.from_bytes(raw).clone()
    t[0, 0, 0, 0] = float("inf")
    return SPEC.to_bytes(t)


def _sub_frame(
    svc: BlockService, raw: bytes, *, tokens: int = 32, layers: int = 30, dtype: str = "float16"
) -> bytes:
    """A genuine frame of this model and calibration that is not one whole block of the served spec."""

    codec = svc.model(MODEL).encoder.codec
    kv = block_to_kv(SPEC.from_bytes(raw), torch.arange(32), SPEC)
    kv = kv.select_tokens(torch.arange(tokens)).select_layers(0, layers)
    return codec.encode(kv, torch.zeros(tokens, dtype=torch.bool), dtype=dtype)


def _fi(data: bytes) -> PutItem:
    return PutItem(7, data, is_frame=True)


# (case id, builder of the bad PutItem, error class, error code, message fragment)
PUT_CASES: list[tuple[str, Callable[[BlockService, Blocks], PutItem], type[ServiceError], str, str]] = [
    ("frame_truncated", lambda s, b: _fi(b.frames[0][:-100]),
     CorruptBlockError, "corrupt_block", "frame_truncated"),
    ("frame_cut_to_prefix", lambda s, b: _fi(b.frames[0][:20]),
     CorruptBlockError, "corrupt_block", "frame_truncated"),
    ("frame_bit_flip_payload", lambda s, b: _fi(_flip(b.frames[0], len(b.frames[0]) // 2)),
     CorruptBlockError, "corrupt_block", "checksum_mismatch"),
    ("frame_bit_flip_header", lambda s, b: _fi(_flip(b.frames[0], 40)),
     CorruptBlockError, "corrupt_block", "checksum_mismatch"),
    ("frame_bit_flip_trailer", lambda s, b: _fi(_flip(b.frames[0], len(b.frames[0]) - 3)),
     CorruptBlockError, "corrupt_block", "checksum_mismatch"),
    ("frame_wrong_magic", lambda s, b: _fi(b"KVTX" + b.frames[0][4:]),
     CorruptBlockError, "corrupt_block", "bad_magic"),
    ("frame_wrong_version", lambda s, b: _fi(_seal(*_split(b.frames[0])[2:], version=3)),
     CorruptBlockError, "corrupt_block", "unsupported_version"),
    ("frame_unknown_flags", lambda s, b: _fi(_seal(*_split(b.frames[0])[2:], flags=4)),
     CorruptBlockError, "corrupt_block", "bad_header"),
    ("frame_trailing_bytes", lambda s, b: _fi(b.frames[0] + b"\0"),
     CorruptBlockError, "corrupt_block", "bad_header"),
    ("frame_chunk_crc_forged_digest",
     lambda s, b: _fi(_seal(_split(b.frames[0])[2], _flip(_split(b.frames[0])[3], 5))),
     CorruptBlockError, "corrupt_block", "CRC32C"),
    ("frame_zero_length", lambda s, b: _fi(b""),
     CorruptBlockError, "corrupt_block", "frame_truncated"),
    ("frame_oversized", lambda s, b: _fi(b.frames[0] + bytes(MAX_FRAME)),
     RequestTooLargeError, "too_large", "frame_too_large"),
    ("frame_wrong_model",
     lambda s, b: PutItem(7, _edit(b.frames[0], lambda h: h.update(model_fingerprint="sha256:" + "0" * 64)),
                          is_frame=True),
     IncompatibleFrameError, "incompatible_frame", "is for model"),
    ("frame_wrong_calibration",
     lambda s, b: PutItem(7, _edit(b.frames[0], lambda h: h.update(calibration_id="feedfacefeedface")),
                          is_frame=True),
     IncompatibleFrameError, "incompatible_frame", "feedfacefeedface"),
    ("frame_too_few_tokens", lambda s, b: _fi(_sub_frame(s, b.raw[0], tokens=16)),
     InvalidBlockRequestError, "invalid_block", "not one whole block"),
    ("frame_too_few_layers", lambda s, b: _fi(_sub_frame(s, b.raw[0], layers=6)),
     InvalidBlockRequestError, "invalid_block", "not one whole block"),
    ("frame_wrong_dtype", lambda s, b: _fi(_sub_frame(s, b.raw[0], dtype="bfloat16")),
     InvalidBlockRequestError, "invalid_block", "dtype"),
    ("raw_too_short", lambda s, b: PutItem(7, b.raw[0][:-2]),
     InvalidBlockRequestError, "invalid_block", f"must be {SPEC.nbytes} bytes"),
    ("raw_too_long", lambda s, b: PutItem(7, b.raw[0] + b"\0\0"),
     InvalidBlockRequestError, "invalid_block", f"must be {SPEC.nbytes} bytes"),
    ("raw_zero_length", lambda s, b: PutItem(7, b""),
     InvalidBlockRequestError, "invalid_block", "got 0"),
    ("raw_nan", lambda s, b: PutItem(7, _nan_block(b.raw[0])),
     InvalidBlockRequestError, "invalid_block", "NaN or Inf"),
    ("raw_inf", lambda s, b: PutItem(7, _inf_block(b.raw[0])),
     InvalidBlockRequestError, "invalid_block", "NaN or Inf"),
    ("raw_positions_wrong_length", lambda s, b: PutItem(7, b.raw[0], positions=torch.arange(31)),
     InvalidBlockRequestError, "invalid_block", "32 positions"),
    ("hash_negative", lambda s, b: PutItem(-1, b.raw[0]),
     InvalidRequestError, "invalid_request", "unsigned 64-bit"),
    ("hash_over_64_bits", lambda s, b: PutItem(2**64, b.raw[0]),
     InvalidRequestError, "invalid_request", "unsigned 64-bit"),
]  # fmt: skip


def _stored(svc: BlockService) -> int:
    return sum(t.blocks for t in svc.store.stats())


def _assert_serving(svc: BlockService, b: Blocks) -> None:
    """A good put and get right after a refusal: the refusal left no state behind."""
    svc.put_blocks(TENANT, MODEL, [PutItem(100, b.raw[1], first_position=32)])
    (got,) = svc.get_blocks(TENANT, MODEL, [100])
    assert got.status == "hit" and got.positions == tuple(range(32, 64))
    assert SPEC.from_bytes(got.data).isfinite().all()
    assert svc.delete(TENANT, MODEL, [100]) == 1


@pytest.mark.parametrize("case", PUT_CASES, ids=[c[0] for c in PUT_CASES])
def test_bad_put_is_refused_and_nothing_stored(svc: BlockService, blocks: Blocks, case: tuple) -> None:
    _, build, cls, code, fragment = case
    item = build(svc, blocks)
    good = PutItem(8, blocks.raw[0])  # a valid block in the same batch is not stored either
    before = _stored(svc)
    with pytest.raises(cls) as info:
        svc.put_blocks(TENANT, MODEL, [good, item])
    err = info.value
    assert type(err) is cls and err.code == code
    assert fragment in err.message, err.message
    assert _stored(svc) == before == 0
    assert svc.contains(TENANT, MODEL, [8]) == [False]
    if 0 <= item.sequence_hash < 2**64:
        assert svc.contains(TENANT, MODEL, [item.sequence_hash]) == [False]
    assert svc.metrics.refused.labels(reason=code, tenant_class="default")._value.get() == 1
    _assert_serving(svc, blocks)


def test_request_level_refusals(svc: BlockService, blocks: Blocks) -> None:
    cases: list[tuple[Callable[[], object], type[ServiceError], str]] = [
        (lambda: svc.put_blocks(TENANT, "no-such-model", [PutItem(1, blocks.raw[0])]), UnknownModelError,
         "unknown_model"),
        (lambda: svc.put_blocks(TENANT, MODEL, [PutItem(i, blocks.raw[0]) for i in range(9)]),
         RequestTooLargeError, "too_large"),
        (lambda: svc.get_blocks(TENANT, MODEL, list(range(9))), RequestTooLargeError, "too_large"),
        (lambda: svc.put_blocks("a/b", MODEL, [PutItem(1, blocks.raw[0])]), InvalidRequestError,
         "invalid_request"),
        (lambda: svc.put_blocks("", MODEL, [PutItem(1, blocks.raw[0])]), InvalidRequestError,
         "invalid_request"),
        (lambda: svc.get_blocks(TENANT, MODEL, [2**64]), InvalidRequestError, "invalid_request"),
        (lambda: svc.delete(TENANT, MODEL, [-5]), InvalidRequestError, "invalid_request"),
    ]  # fmt: skip
    for call, cls, code in cases:
        with pytest.raises(cls) as info:
            call()
        assert info.value.code == code
        assert _stored(svc) == 0
        _assert_serving(svc, blocks)


# Damages that edit a JSON header apply to version-1 frames (still readable, e.g. from an older
# store): those cases store the fixture's v1 frame; byte-level damages hit the v2 frame a put writes.
JSON_DAMAGES = {"chunk_crc_forged_digest", "header_tokens_forged"}


def _first_item(blocks: Blocks, damage_name: str) -> PutItem:
    if damage_name in JSON_DAMAGES:
        return PutItem(5, blocks.frames[0], is_frame=True)
    return PutItem(5, blocks.raw[0])


def _corrupt_in_store(svc: BlockService, key: BlockKey, damage: Callable[[bytes], bytes]) -> None:
    data = svc.store.get(key)
    assert data is not None
    svc.store.delete(key)
    svc.store.put(key, damage(data))


STORE_DAMAGE: list[tuple[str, Callable[[bytes], bytes], str]] = [
    ("bit_flip", lambda f: _flip(f, len(f) // 3), "store"),
    ("truncated", lambda f: f[: len(f) // 2], "store_format"),
    ("zeroed", lambda f: bytes(len(f)), "store_format"),
    ("chunk_crc_forged_digest", lambda f: _seal(_split(f)[2], _flip(_split(f)[3], 9)), "store"),
    ("header_tokens_forged", lambda f: _edit(f, lambda h: h.update(positions=[[0, 16]], n_tokens=16)),
     "store_format"),
]  # fmt: skip


@pytest.mark.parametrize("as_frames", [False, True])
@pytest.mark.parametrize("damage", STORE_DAMAGE, ids=[d[0] for d in STORE_DAMAGE])
def test_get_of_corrupted_stored_frame(
    svc: BlockService, blocks: Blocks, damage: tuple, as_frames: bool
) -> None:
    name, fn, source = damage
    svc.put_blocks(TENANT, MODEL, [_first_item(blocks, name), PutItem(6, blocks.raw[1], first_position=32)])
    key = BlockKey(TENANT, svc.model(MODEL).fingerprint, 5)
    _corrupt_in_store(svc, key, fn)
    got = svc.get_blocks(TENANT, MODEL, [5, 6], as_frames=as_frames)
    assert [g.status for g in got] == ["corrupt", "hit"]
    assert got[0].data is None  # never a byte of the damaged frame, decoded or not
    assert not svc.store.contains(key)  # dropped, so the next get is a clean miss
    assert svc.metrics.checksum_failures.labels(source=source)._value.get() == 1
    assert [g.status for g in svc.get_blocks(TENANT, MODEL, [5, 6])] == ["miss", "hit"]
    _assert_serving(svc, blocks)


def test_stored_frame_of_unloadable_calibration(svc: BlockService, blocks: Blocks) -> None:
    """A stored frame naming a calibration this replica cannot load is refused by name, not decoded."""
    svc.put_blocks(TENANT, MODEL, [PutItem(5, blocks.frames[0], is_frame=True)])  # v1: JSON header
    key = BlockKey(TENANT, svc.model(MODEL).fingerprint, 5)
    _corrupt_in_store(svc, key, lambda f: _edit(f, lambda h: h.update(calibration_id="0123456789abcdef")))
    with pytest.raises(IncompatibleFrameError, match="0123456789abcdef"):
        svc.get_blocks(TENANT, MODEL, [5])
    assert svc.store.contains(key)  # kept: intact, and a replica with that calibration can serve it
    _assert_serving(svc, blocks)


def test_put_that_encodes_over_the_frame_limit_is_refused(small_calibration, blocks: Blocks) -> None:  # type: ignore[no-untyped-def]
    """A frame the service could never read back (over max_frame_bytes) is refused at put, not stored."""
    svc = BlockService(
        [_smollm2.served(small_calibration)],
        TieredStore([MemoryTier(64 << 20)]),
        limits=Limits(max_frame_bytes=256 << 10),
    )
    with pytest.raises(RequestTooLargeError, match="encodes to"):
        svc.put_blocks(TENANT, MODEL, [PutItem(9, blocks.raw[0], compress=False)])
    assert _stored(svc) == 0
    _assert_serving(svc, blocks)


def test_uncompressed_block_round_trips_exactly(svc: BlockService, blocks: Blocks) -> None:
    """compress=False stores every token raw (0 compressed tokens): once a RuntimeError in the encoder."""
    svc.put_blocks(TENANT, MODEL, [PutItem(9, blocks.raw[1], first_position=32, compress=False)])
    (got,) = svc.get_blocks(TENANT, MODEL, [9])
    assert got.status == "hit" and got.data == blocks.raw[1]


# ---- the same refusals over real gRPC (127.0.0.1): status code + kvbm-error-code trailer -------------


@dataclass
class GrpcRig:
    svc: BlockService
    stub: object
    channel: grpc.Channel


@pytest.fixture(scope="module")
def rig(small_calibration) -> Iterator[GrpcRig]:  # type: ignore[no-untyped-def]
    from kvbm_codec._proto import kvbm_codec_pb2_grpc as pb_grpc
    from kvbm_codec.frontends.grpc.server import CodecServer
    from kvbm_codec.service.config import NixlConfig, ServiceConfig

    cfg = ServiceConfig.load(grpc_port=0, metrics_port=None, workers=2, nixl=NixlConfig(enabled=False))
    store = TieredStore([MemoryTier(64 << 20)])
    limits = Limits(max_blocks_per_request=8, max_frame_bytes=MAX_FRAME)
    svc = BlockService([_smollm2.served(small_calibration)], store, limits=limits)
    server = CodecServer(svc, cfg).start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield GrpcRig(svc, pb_grpc.KvbmCodecStub(channel), channel)
    finally:
        channel.close()
        server.stop(1.0)


def _pb_block(item: PutItem):  # type: ignore[no-untyped-def]
    from kvbm_codec._proto import kvbm_codec_pb2 as pb

    b = pb.Block(
        sequence_hash=item.sequence_hash,
        first_position=item.first_position,
        encoding=pb.ENCODING_FRAME if item.is_frame else pb.ENCODING_RAW,
        data=bytes(item.data),
    )
    if item.positions is not None:
        b.positions.extend(int(p) for p in item.positions.tolist())
    return b


def _grpc_put(rig: GrpcRig, blocks: list) -> tuple[grpc.StatusCode, str | None, str]:  # type: ignore[type-arg]
    from kvbm_codec._proto import kvbm_codec_pb2 as pb

    try:
        rig.stub.PutBlocks(pb.PutBlocksRequest(model=MODEL, blocks=blocks), timeout=60)  # type: ignore[attr-defined]
    except grpc.RpcError as e:
        return e.code(), dict(e.trailing_metadata() or ()).get("kvbm-error-code"), e.details() or ""
    return grpc.StatusCode.OK, None, ""


def _grpc_serving(rig: GrpcRig, b: Blocks) -> None:
    from kvbm_codec._proto import kvbm_codec_pb2 as pb

    assert _grpc_put(rig, [_pb_block(PutItem(100, b.raw[1], first_position=32))])[0] == grpc.StatusCode.OK
    req = pb.GetBlocksRequest(model=MODEL, sequence_hashes=[100])
    (msg,) = list(rig.stub.GetBlocks(req, timeout=60))  # type: ignore[attr-defined]
    assert msg.blocks[0].status == pb.BLOCK_STATUS_HIT and len(msg.blocks[0].data) == SPEC.nbytes
    assert rig.stub.Delete(pb.HashesRequest(model=MODEL, sequence_hashes=[100]), timeout=60).deleted == 1  # type: ignore[attr-defined]


GRPC_CASES = [c for c in PUT_CASES if not c[0].startswith("hash_")]  # uint64 on the wire: cannot be sent


@pytest.mark.parametrize("case", GRPC_CASES, ids=[c[0] for c in GRPC_CASES])
def test_bad_put_over_grpc(rig: GrpcRig, blocks: Blocks, case: tuple) -> None:
    from kvbm_codec.frontends.grpc.wire import status_of

    _, build, cls, code, fragment = case
    item = build(rig.svc, blocks)
    status, trailer, details = _grpc_put(rig, [_pb_block(PutItem(8, blocks.raw[0])), _pb_block(item)])
    assert (status, trailer) == (status_of(cls), code)
    assert fragment in details, details
    assert _stored(rig.svc) == 0
    _grpc_serving(rig, blocks)


def test_bad_requests_over_grpc(rig: GrpcRig, blocks: Blocks) -> None:
    from kvbm_codec._proto import kvbm_codec_pb2 as pb

    good = _pb_block(PutItem(8, blocks.raw[0]))

    def variant(**kw: object) -> pb.Block:
        b = _pb_block(PutItem(9, blocks.raw[0]))
        for k, v in kw.items():
            if k == "layers":
                b.layers.CopyFrom(v)  # type: ignore[arg-type]
            elif k == "positions":
                b.positions.extend(v)  # type: ignore[arg-type]
            else:
                setattr(b, k, v)
        return b

    cases = [
        ([good, variant(layers=pb.LayerRange(start=0, end=6))], "INVALID_ARGUMENT", "invalid_request"),
        ([good, variant(encoding=7)], "INVALID_ARGUMENT", "invalid_request"),
        ([good, variant(positions=[1 << 62] * 32)], "INVALID_ARGUMENT", "invalid_request"),
        ([good, variant(first_position=(1 << 62) - 1)], "INVALID_ARGUMENT", "invalid_request"),
        ([good] * 9, "RESOURCE_EXHAUSTED", "too_large"),
    ]
    for msgs, status, code in cases:
        got = _grpc_put(rig, msgs)
        assert got[:2] == (getattr(grpc.StatusCode, status), code), got
        assert _stored(rig.svc) == 0
    try:
        rig.stub.PutBlocks(pb.PutBlocksRequest(model="nope", blocks=[good]), timeout=60)  # type: ignore[attr-defined]
        raise AssertionError("unknown model accepted")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.NOT_FOUND
        assert dict(e.trailing_metadata())["kvbm-error-code"] == "unknown_model"
    _grpc_serving(rig, blocks)


@pytest.mark.parametrize("damage", STORE_DAMAGE, ids=[d[0] for d in STORE_DAMAGE])
def test_corrupted_stored_frame_over_grpc(rig: GrpcRig, blocks: Blocks, damage: tuple) -> None:
    from kvbm_codec._proto import kvbm_codec_pb2 as pb

    assert _grpc_put(rig, [_pb_block(_first_item(blocks, damage[0]))])[0] == grpc.StatusCode.OK
    key = BlockKey("default", rig.svc.model(MODEL).fingerprint, 5)  # the server's no-auth tenant
    _corrupt_in_store(rig.svc, key, damage[1])
    for encoding in (pb.ENCODING_RAW, pb.ENCODING_FRAME):
        req = pb.GetBlocksRequest(model=MODEL, sequence_hashes=[5], encoding=encoding)
        (msg,) = list(rig.stub.GetBlocks(req, timeout=60))  # type: ignore[attr-defined]
        expect = pb.BLOCK_STATUS_CORRUPT if encoding == pb.ENCODING_RAW else pb.BLOCK_STATUS_MISS
        assert msg.blocks[0].status == expect  # corrupt once (then dropped), a miss afterwards
        assert msg.blocks[0].WhichOneof("payload") is None
    assert _stored(rig.svc) == 0
    _grpc_serving(rig, blocks)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_non_finite_values_are_found_by_their_bits_in_every_dtype(dtype: torch.dtype) -> None:
    """The put path's NaN/Inf check reads exponent bits; extremes that are finite must pass."""
    from kvbm_codec.api.blocks import all_finite

    fi = torch.finfo(dtype)
    ok = torch.tensor([fi.max, -fi.max, fi.tiny, fi.tiny / 4, 0.0, -0.0, 1.0]).to(dtype)
    assert all_finite(ok) and all_finite(ok[:0])
    for bad in (float("inf"), float("-inf"), float("nan"), -float("nan")):
        x = torch.randn(2, 3, 5).to(dtype)
        x[1, 2, 4] = bad
        assert not all_finite(x) and not all_finite(x.transpose(0, 2)), bad
