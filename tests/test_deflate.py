"""Chunked raw DEFLATE: round trips, RFC 1951 interoperability, and refusal of every damaged chunk."""

from __future__ import annotations

import os
import random
import zlib

import google_crc32c
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from kvbm_codec.codec import errors
from kvbm_codec.codec.deflate import (
    DEFAULT_LEVEL,
    MAX_CHUNK_BYTES,
    ChunkInfo,
    IsalDeflate,
    NvcompDeflate,
    deflate_chunks,
    gpu_available,
    inflate_chunks,
    select_backend,
    stdlib_inflate,
)

SIZES = [0, 1, 1000, MAX_CHUNK_BYTES - 1, MAX_CHUNK_BYTES, MAX_CHUNK_BYTES + 1, 3 * MAX_CHUNK_BYTES + 17]


def _repetitive(n: int) -> bytes:
    return (b"kv-cache codes \x00\x01\x02\x03" * (n // 19 + 1))[:n]


def _split(chunks: list[ChunkInfo], payload: bytes) -> list[bytes]:
    out, off = [], 0
    for c in chunks:
        out.append(payload[off : off + c.compressed_size])
        off += c.compressed_size
    assert off == len(payload)
    return out


def _stdlib_inflate(piece: bytes) -> bytes:
    d = zlib.decompressobj(-15)
    out = d.decompress(piece) + d.flush()
    assert d.eof and not d.unused_data
    return out


def _chunk(raw_size: int, piece: bytes) -> ChunkInfo:
    return ChunkInfo(raw_size=raw_size, compressed_size=len(piece), crc32c=google_crc32c.value(piece))


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("kind", ["random", "repetitive"])
def test_round_trip_and_chunking(size: int, kind: str) -> None:
    data = os.urandom(size) if kind == "random" else _repetitive(size)
    chunks, payload = deflate_chunks(data)
    assert sum(c.raw_size for c in chunks) == size
    assert len(chunks) == -(-size // MAX_CHUNK_BYTES)
    assert all(c.raw_size == MAX_CHUNK_BYTES for c in chunks[:-1])
    assert inflate_chunks(chunks, payload) == data
    # Every chunk is a complete, independent RFC 1951 stream that stdlib zlib inflates.
    pieces = _split(chunks, payload)
    assert b"".join(_stdlib_inflate(p) for p in pieces) == data
    for c, p in zip(chunks, pieces, strict=True):
        assert c.crc32c == google_crc32c.value(p)


@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_every_isal_level_round_trips(level: int) -> None:
    data = _repetitive(200_000) + os.urandom(5000)
    chunks, payload = deflate_chunks(memoryview(bytearray(data)), level)
    assert inflate_chunks(chunks, memoryview(payload)) == data


def test_bad_level_rejected() -> None:
    with pytest.raises(ValueError):
        deflate_chunks(b"abc", 4)


def test_default_level_compresses_repetitive() -> None:
    _, payload = deflate_chunks(_repetitive(MAX_CHUNK_BYTES), DEFAULT_LEVEL)
    assert len(payload) < MAX_CHUNK_BYTES // 20


def test_stdlib_zlib_chunks_inflate_with_isal() -> None:
    """Interop the other way: a foreign RFC 1951 encoder's chunks are accepted."""
    data = _repetitive(70_000)
    pieces, chunks = [], []
    for i in range(0, len(data), MAX_CHUNK_BYTES):
        c = zlib.compressobj(9, zlib.DEFLATED, -15)
        piece = c.compress(data[i : i + MAX_CHUNK_BYTES]) + c.flush()
        pieces.append(piece)
        chunks.append(_chunk(len(data[i : i + MAX_CHUNK_BYTES]), piece))
    assert inflate_chunks(chunks, b"".join(pieces)) == data


@settings(max_examples=40, deadline=None)
@given(st.binary(max_size=3 * MAX_CHUNK_BYTES // 2), st.integers(0, 3))
def test_round_trip_property(data: bytes, level: int) -> None:
    chunks, payload = deflate_chunks(data, level)
    assert inflate_chunks(chunks, payload) == data


@settings(max_examples=40, deadline=None)
@given(
    st.binary(max_size=3 * MAX_CHUNK_BYTES // 2), st.lists(st.integers(-5, 2 * MAX_CHUNK_BYTES), max_size=12)
)
def test_cuts_keep_one_plain_stream_per_chunk(data: bytes, cuts: list[int]) -> None:
    """Block boundaries anywhere (even outside the data, or on a chunk edge) change no byte read back,
    and each chunk stays one raw-DEFLATE stream that another inflater reads whole."""
    chunks, payload = deflate_chunks(data, DEFAULT_LEVEL, cuts)
    assert [c.raw_size for c in chunks] == [c.raw_size for c in deflate_chunks(data)[0]]
    assert inflate_chunks(chunks, payload) == data
    off = 0
    out = b""
    for c in chunks:
        out += stdlib_inflate(payload[off : off + c.compressed_size])
        off += c.compressed_size
    assert out == data


def test_cuts_at_changes_of_statistics_shrink_the_stream() -> None:
    """Two halves with different symbol sets: a table each beats one table for the mixture."""
    rng = random.Random(1)
    a = bytes(rng.choice(b"abcd") for _ in range(20_000))
    b = bytes(rng.choice(b"0123456789ABCDEFGHIJ") for _ in range(20_000))
    plain = deflate_chunks(a + b)[1]
    cut = deflate_chunks(a + b, DEFAULT_LEVEL, [len(a)])[1]
    assert len(cut) < len(plain)


def test_crc_mismatch_names_chunk() -> None:
    data = os.urandom(2 * MAX_CHUNK_BYTES + 5)
    chunks, payload = deflate_chunks(data)
    bad = bytearray(payload)
    bad[chunks[0].compressed_size + 3] ^= 0x10  # inside chunk 1
    with pytest.raises(errors.FrameChecksumError, match=r"section 'x' chunk 1") as info:
        inflate_chunks(chunks, bytes(bad), where="section 'x'")
    assert info.value.code == "checksum_mismatch"


def test_payload_length_mismatch() -> None:
    chunks, payload = deflate_chunks(os.urandom(1000))
    with pytest.raises(errors.FrameTruncatedError):
        inflate_chunks(chunks, payload[:-1])
    with pytest.raises(errors.FrameHeaderError):
        inflate_chunks(chunks, payload + b"\x00")


def test_crc_valid_but_stream_inconsistent() -> None:
    """Damage the checksum cannot see (a lying writer): refused, never wrong bytes."""
    data = _repetitive(5000)
    (_,), payload = deflate_chunks(data)
    # raw_size lies in both directions
    with pytest.raises(errors.FrameHeaderError):
        inflate_chunks([_chunk(4999, payload)], payload)
    with pytest.raises(errors.FrameHeaderError):
        inflate_chunks([_chunk(5001, payload)], payload)
    # truncated DEFLATE stream with a matching CRC
    with pytest.raises((errors.FrameTruncatedError, errors.FrameHeaderError)):
        inflate_chunks([_chunk(5000, payload[:-2])], payload[:-2])
    # garbage after the end-of-stream inside the chunk
    padded = payload + b"junk"
    with pytest.raises(errors.FrameHeaderError, match="follow"):
        inflate_chunks([_chunk(5000, padded)], padded)
    # not DEFLATE at all
    junk = b"\xff" * 40
    with pytest.raises(errors.FrameError):
        inflate_chunks([_chunk(100, junk)], junk)


def test_decompression_bomb_is_bounded() -> None:
    """A tiny chunk claiming 10 bytes that would inflate to 64 KiB is stopped at raw_size + 1."""
    (_,), payload = deflate_chunks(bytes(MAX_CHUNK_BYTES))
    assert len(payload) < 200
    with pytest.raises(errors.FrameHeaderError, match="more than"):
        inflate_chunks([_chunk(10, payload)], payload)


def test_chunk_info_validation() -> None:
    ChunkInfo(raw_size=MAX_CHUNK_BYTES, compressed_size=1, crc32c=0xFFFFFFFF)
    for bad in (
        {"raw_size": 0, "compressed_size": 1, "crc32c": 0},
        {"raw_size": MAX_CHUNK_BYTES + 1, "compressed_size": 1, "crc32c": 0},
        {"raw_size": 1, "compressed_size": 0, "crc32c": 0},
        {"raw_size": 1, "compressed_size": 1, "crc32c": 1 << 32},
        {"raw_size": "1", "compressed_size": 1, "crc32c": 0},
        {"raw_size": 1, "compressed_size": 1, "crc32c": 0, "extra": 1},
    ):
        with pytest.raises(ValidationError):
            ChunkInfo(**bad)


def test_error_codes_are_stable_and_distinct() -> None:
    expected = {
        errors.FrameTruncatedError: "frame_truncated",
        errors.FrameMagicError: "bad_magic",
        errors.FrameVersionError: "unsupported_version",
        errors.FrameChecksumError: "checksum_mismatch",
        errors.FrameHeaderError: "bad_header",
        errors.FrameSizeError: "frame_too_large",
        errors.CalibrationMismatchError: "calibration_mismatch",
        errors.ModelMismatchError: "model_mismatch",
    }
    for cls, code in expected.items():
        assert cls.code == code
        assert issubclass(cls, errors.CodecError)
        err = cls("boom", where="section 's' chunk 2")
        assert code in str(err) and "chunk 2" in str(err) and err.where.endswith("2")
    frame_errors = [c for c in expected if issubclass(c, errors.FrameError)]
    assert len(frame_errors) == 6
    assert not issubclass(errors.ModelMismatchError, errors.FrameError)


def test_select_backend_falls_back_to_cpu() -> None:
    assert isinstance(select_backend(prefer_gpu=False), IsalDeflate)
    if not gpu_available():
        assert isinstance(select_backend(), IsalDeflate)
    cpu = IsalDeflate()
    chunks, payload = cpu.deflate(_repetitive(100_000))
    assert cpu.inflate(chunks, payload) == _repetitive(100_000)


@pytest.mark.gpu
def test_nvcomp_interoperates_with_cpu() -> None:
    if not gpu_available():
        pytest.skip("needs CUDA and nvidia-nvcomp-cu12 (pip install kvbm-codec[gpu]); not present here")
    gpu = NvcompDeflate()
    data = _repetitive(3 * MAX_CHUNK_BYTES + 123) + os.urandom(MAX_CHUNK_BYTES + 7)
    # GPU-compressed chunks are plain RFC 1951: stdlib zlib and isal inflate them.
    chunks, payload = gpu.deflate(data)
    assert all(c.raw_size == MAX_CHUNK_BYTES for c in chunks[:-1])
    assert b"".join(_stdlib_inflate(p) for p in _split(chunks, payload)) == data
    assert inflate_chunks(chunks, payload) == data
    # CPU-compressed chunks inflate on the GPU.
    cpu_chunks, cpu_payload = deflate_chunks(data)
    assert gpu.inflate(cpu_chunks, cpu_payload) == data
    # and the GPU path checks CRC32C before inflating
    bad = bytearray(cpu_payload)
    bad[-1] ^= 1
    with pytest.raises(errors.FrameChecksumError):
        gpu.inflate(cpu_chunks, bytes(bad))
