"""The frame container: round trips, and refusal of every truncated, flipped, foreign or malformed frame."""

from __future__ import annotations

import itertools
import json
import os
import random
import struct
import zlib

import pytest
import torch
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from kvbm_codec.codec import errors
from kvbm_codec.codec.deflate import MAX_CHUNK_BYTES
from kvbm_codec.codec.frame import (
    MAGIC,
    MAX_HEADER_BYTES,
    FrameHeader,
    inspect_frame,
    mask_to_runs,
    positions_to_runs,
    read_frame,
    runs_to_mask,
    runs_to_positions,
    write_frame,
)

PREFIX = struct.Struct("<4sHHI")


def _header(**overrides: object) -> FrameHeader:
    fields: dict[str, object] = {
        "model_fingerprint": "sha256:abc",
        "calibration_id": "cal-1",
        "allocation_id": "alloc-1",
        "codec": "kvtc",
        "dtype": "bfloat16",
        "layer_start": 4,
        "layer_end": 8,
        "n_kv_heads": 8,
        "key_head_dim": 64,
        "value_head_dim": 64,
        "positions": [(0, 100), (150, 28)],
        "n_tokens": 128,
        "raw_token_index": [(0, 4), (112, 16)],
        "meta": {"pca_rank": 48, "scale": 0.5, "note": "x"},
    }
    fields.update(overrides)
    return FrameHeader(**fields)  # type: ignore[arg-type]


def _repetitive(n: int) -> bytes:
    return (bytes(range(37)) * (n // 37 + 1))[:n]


SECTIONS = [
    ("g0.k.codes", _repetitive(3 * MAX_CHUNK_BYTES + 1000)),  # 4 chunks
    ("g0.k.scales", os.urandom(700)),
    ("g0.empty", b""),
    ("g0.raw.k", _repetitive(MAX_CHUNK_BYTES)),  # exactly one full chunk
]


@pytest.fixture(scope="module")
def small_frame() -> bytes:
    """A frame of a few KiB with a multi-chunk section, so every byte can be cut/flipped quickly."""
    return write_frame(_header(), SECTIONS)


def _parts(frame: bytes) -> tuple[bytes, bytes, bytes]:
    _, _, _, hlen = PREFIX.unpack_from(frame)
    return frame[12 : 12 + hlen], frame[12 + hlen : -16], frame[-16:]


def _reframe(header_json: bytes, payload: bytes, *, version: int = 1, flags: int = 0) -> bytes:
    """Assemble a frame with a *valid* digest around arbitrary content, to test the schema checks."""
    body = PREFIX.pack(MAGIC, version, flags, len(header_json)) + header_json + payload
    return body + xxhash.xxh3_128(body).digest()


def test_round_trip(small_frame: bytes) -> None:
    frame = read_frame(small_frame)
    assert frame.section_names == [n for n, _ in SECTIONS]
    for name, data in SECTIONS:
        assert frame.section(name) == data
        assert name in frame
    assert frame.header.n_tokens == 128 and frame.header.n_layers == 4
    assert frame.header.meta == {"pca_rank": 48, "scale": 0.5, "note": "x"}
    assert [len(s.chunks) for s in frame.header.sections] == [4, 1, 0, 1]
    assert frame.total_bytes == len(small_frame)
    with pytest.raises(errors.FrameHeaderError, match="no section"):
        frame.section("nope")
    # memoryview / bytearray inputs read the same
    assert read_frame(memoryview(bytearray(small_frame))).section("g0.k.scales") == SECTIONS[1][1]


def test_round_trip_random_large_and_deterministic() -> None:
    big = os.urandom(5 * MAX_CHUNK_BYTES + 3)
    sections = [("a", big), ("b", memoryview(big)[10:20]), ("c", bytearray(b"q" * 10))]
    blob = write_frame(_header(), sections)
    assert blob == write_frame(_header(), sections)  # CPU output is deterministic
    frame = read_frame(blob)
    assert frame.section("a") == big and frame.section("b") == big[10:20] and frame.section("c") == b"q" * 10


def test_payload_chunks_are_raw_rfc1951(small_frame: bytes) -> None:
    frame = read_frame(small_frame)
    _, payload, _ = _parts(small_frame)
    off = 0
    for (_, data), sec in zip(SECTIONS, frame.header.sections, strict=True):
        out = b""
        for c in sec.chunks:
            d = zlib.decompressobj(-15)
            out += d.decompress(payload[off : off + c.compressed_size]) + d.flush()
            assert d.eof and not d.unused_data
            off += c.compressed_size
        assert out == data
    assert off == len(payload)


def test_inspect_frame(small_frame: bytes) -> None:
    info = inspect_frame(small_frame)
    json.dumps(info)  # JSON-able
    assert info["total_bytes"] == len(small_frame)
    assert info["format_version"] == 1
    assert info["header"]["positions"] == [[0, 100], [150, 28]]
    assert info["header"]["calibration_id"] == "cal-1"
    assert "sections" not in info["header"]
    assert [s["name"] for s in info["sections"]] == [n for n, _ in SECTIONS]
    assert [s["raw_bytes"] for s in info["sections"]] == [len(d) for _, d in SECTIONS]
    assert sum(s["compressed_bytes"] for s in info["sections"]) == info["payload_bytes"]
    assert info["raw_bytes"] == sum(len(d) for _, d in SECTIONS)
    assert 12 + info["header_bytes"] + info["payload_bytes"] + 16 == info["total_bytes"]


def test_every_truncation_is_refused(small_frame: bytes) -> None:
    for cut in range(len(small_frame)):
        with pytest.raises((errors.FrameTruncatedError, errors.FrameChecksumError)):
            read_frame(small_frame[:cut])


def test_every_byte_flip_is_refused(small_frame: bytes) -> None:
    rng = random.Random(1234)
    n = len(small_frame)
    for pos in range(n):
        # All 8 bits in prefix and trailer, one random bit elsewhere (keeps the test at ~1 s).
        bits = range(8) if pos < 12 or pos >= n - 16 else [rng.randrange(8)]
        for bit in bits:
            bad = bytearray(small_frame)
            bad[pos] ^= 1 << bit
            with pytest.raises(errors.FrameError):
                read_frame(bytes(bad))


def test_payload_flip_with_forged_digest_caught_by_chunk_crc(small_frame: bytes) -> None:
    header_json, payload, _ = _parts(small_frame)
    frame = read_frame(small_frame)
    first = frame.header.sections[0]
    bad = bytearray(payload)
    bad[first.chunks[0].compressed_size + 1] ^= 0x04  # inside chunk 1 of the first section
    forged = _reframe(header_json, bytes(bad))
    frame = read_frame(forged)  # the whole-frame digest is fine now ...
    with pytest.raises(errors.FrameChecksumError, match=r"'g0.k.codes' chunk 1"):
        frame.section("g0.k.codes")  # ... but the chunk's CRC32C is not
    assert frame.section("g0.k.scales") == SECTIONS[1][1]
    with pytest.raises(errors.FrameChecksumError):
        inspect_frame(forged)


def test_whole_frame_checksum_error_says_so(small_frame: bytes) -> None:
    bad = bytearray(small_frame)
    bad[-1] ^= 0x80
    with pytest.raises(errors.FrameChecksumError, match="whole frame"):
        read_frame(bytes(bad))


def test_wrong_magic(small_frame: bytes) -> None:
    with pytest.raises(errors.FrameMagicError):
        read_frame(b"KVTD" + small_frame[4:])
    with pytest.raises(errors.FrameMagicError):
        read_frame(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(errors.FrameMagicError):
        read_frame(b"X")


def test_unsupported_version_and_flags(small_frame: bytes) -> None:
    header_json, payload, _ = _parts(small_frame)
    with pytest.raises(errors.FrameVersionError) as info:
        read_frame(_reframe(header_json, payload, version=3))
    assert info.value.code == "unsupported_version"
    with pytest.raises(errors.FrameVersionError):
        read_frame(_reframe(header_json, payload, version=0))
    with pytest.raises(errors.FrameHeaderError, match="flag"):
        read_frame(_reframe(header_json, payload, flags=1))


def _edit_header(frame: bytes, edit: object) -> bytes:
    header_json, payload, _ = _parts(frame)
    obj = json.loads(header_json)
    edit(obj)  # type: ignore[operator]
    return _reframe(json.dumps(obj).encode(), payload)


@pytest.mark.parametrize(
    "edit",
    [
        lambda h: h.update(surprise=1),  # extra field
        lambda h: h.update(n_tokens=129),  # n_tokens != sum of runs
        lambda h: h.update(n_kv_heads="8"),  # strict: no str -> int coercion
        lambda h: h.update(n_kv_heads=True),  # strict: no bool -> int
        lambda h: h.update(dtype="int8"),
        lambda h: h.update(layer_end=4),  # layer_end must exceed layer_start
        lambda h: h.update(positions=[[0, 0], [150, 128]]),  # zero-length run
        lambda h: h.update(positions=[[-1, 128]]),
        lambda h: h.update(raw_token_index=[[0, 4], [2, 4]]),  # overlapping
        lambda h: h.update(raw_token_index=[[120, 16]]),  # beyond n_tokens
        lambda h: h.pop("calibration_id"),
        lambda h: h["sections"][1].update(name="g0.k.codes"),  # duplicate name
        lambda h: h["sections"][1].update(raw_size=701),  # chunk sizes do not sum
        lambda h: h["sections"][0]["chunks"][0].update(extra=1),
        lambda h: h["meta"].update(bad=[1]),
        lambda h: h["meta"].update(bad=True),
    ],
)
def test_bad_header_json(small_frame: bytes, edit: object) -> None:
    with pytest.raises(errors.FrameHeaderError):
        read_frame(_edit_header(small_frame, edit))


def test_non_canonical_chunking_rejected(small_frame: bytes) -> None:
    def edit(h: dict) -> None:
        a, b = h["sections"][0]["chunks"][2:4]  # a full chunk, then the short last one
        a["raw_size"], b["raw_size"] = a["raw_size"] - 1, b["raw_size"] + 1

    with pytest.raises(errors.FrameHeaderError, match="only the last chunk"):
        read_frame(_edit_header(small_frame, edit))


def test_header_not_json_or_not_utf8(small_frame: bytes) -> None:
    _, payload, _ = _parts(small_frame)
    for junk in (b"{not json", b"\xff\xfe{}", b"", b"[]"):
        with pytest.raises(errors.FrameHeaderError):
            read_frame(_reframe(junk, payload))


def test_payload_length_mismatch_with_valid_digest(small_frame: bytes) -> None:
    header_json, payload, _ = _parts(small_frame)
    with pytest.raises(errors.FrameHeaderError):
        read_frame(_reframe(header_json, payload[:-1]))  # intact frame whose header overstates it
    with pytest.raises(errors.FrameHeaderError):
        read_frame(_reframe(header_json, payload + b"x"))
    with pytest.raises(errors.FrameHeaderError, match="after the trailer"):
        read_frame(small_frame + b"\x00")


def test_oversize(small_frame: bytes) -> None:
    with pytest.raises(errors.FrameSizeError) as info:
        read_frame(small_frame, max_frame_bytes=len(small_frame) - 1)
    assert info.value.code == "frame_too_large"
    read_frame(small_frame, max_frame_bytes=len(small_frame))
    with pytest.raises(errors.FrameSizeError):
        write_frame(_header(), SECTIONS, max_frame_bytes=1000)
    huge = PREFIX.pack(MAGIC, 1, 0, MAX_HEADER_BYTES + 1) + bytes(64)
    with pytest.raises(errors.FrameSizeError):
        read_frame(huge)


def test_write_frame_rejects_bad_input() -> None:
    with pytest.raises(errors.FrameHeaderError, match="duplicate"):
        write_frame(_header(), [("a", b"1"), ("a", b"2")])
    with pytest.raises(ValueError, match="sections must be empty"):
        write_frame(read_frame(write_frame(_header(), [("a", b"1")])).header, [("b", b"")])


def test_header_model_validation() -> None:
    with pytest.raises(ValidationError):
        _header(layer_end=4)
    with pytest.raises(ValidationError):
        _header(n_tokens=127)
    with pytest.raises(ValidationError):
        _header(meta={"x": float("nan")})
    with pytest.raises(ValidationError):
        _header(dtype="float64")
    h = _header(positions=positions_to_runs(torch.arange(10, 20)), n_tokens=10, raw_token_index=[])
    assert h.positions == [(10, 10)]


# ---- runs helpers ----


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=300), max_size=200))
def test_positions_runs_round_trip(positions: list[int]) -> None:
    runs = positions_to_runs(positions)
    assert runs_to_positions(runs).tolist() == positions
    assert positions_to_runs(torch.tensor(positions, dtype=torch.int64)) == runs
    assert runs_to_positions(runs).dtype == torch.int64
    for (s0, l0), (s1, _) in itertools.pairwise(runs):
        assert s1 != s0 + l0  # maximal: adjacent runs never continue each other
    assert all(length > 0 for _, length in runs)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.booleans(), max_size=300))
def test_mask_runs_round_trip(bits: list[bool]) -> None:
    mask = torch.tensor(bits, dtype=torch.bool)
    runs = mask_to_runs(mask)
    assert torch.equal(runs_to_mask(runs, len(bits)), mask)
    assert runs_to_positions(runs).tolist() == [i for i, b in enumerate(bits) if b]


def test_runs_helpers_edges() -> None:
    assert positions_to_runs([]) == []
    assert runs_to_positions([]).shape == (0,)
    assert positions_to_runs([5, 6, 7, 2, 3, 9]) == [(5, 3), (2, 2), (9, 1)]
    assert positions_to_runs([4, 4]) == [(4, 1), (4, 1)]
    with pytest.raises(ValueError):
        runs_to_mask([(8, 4)], 10)
    with pytest.raises(ValueError):
        mask_to_runs(torch.ones(3, dtype=torch.int64))
