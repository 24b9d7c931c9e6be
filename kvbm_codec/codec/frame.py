"""The KVTC frame: one self-describing, integrity-checked blob holding every section of an encoded cache.

A frame travels between processes, disks and machines (KVBM tiers, remote peers), so it must be
readable without out-of-band state, refuse anything it does not fully understand, and never hand
back bytes that differ from what was written. Layout and rationale: docs/format.md.

    prefix   b"KVTC" | u16 version | u16 flags | u32 header_length   (little-endian, 12 bytes)
    header   UTF-8 JSON of FrameHeader (header_length bytes)
    payload  every section's raw-DEFLATE chunks, concatenated in header order
    trailer  xxh3-128 of everything before it (16 bytes, canonical big-endian)
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import torch
import xxhash
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kvbm_codec.codec.deflate import (
    DEFAULT_LEVEL,
    MAX_CHUNK_BYTES,
    ChunkInfo,
    DeflateBackend,
    IsalDeflate,
)
from kvbm_codec.codec.errors import (
    FrameChecksumError,
    FrameHeaderError,
    FrameMagicError,
    FrameSizeError,
    FrameTruncatedError,
    FrameVersionError,
)

MAGIC = b"KVTC"
FORMAT_VERSION = 1
FORMAT_VERSION_BLOCK = 2
"""Compact block frames: a fixed binary header; the section layout is implied by calibration + allocation."""
SUPPORTED_VERSIONS = frozenset({FORMAT_VERSION, FORMAT_VERSION_BLOCK})
PREFIX = struct.Struct("<4sHHI")  # magic, format_version, flags, header_length
PREFIX_BYTES = PREFIX.size  # 12
TRAILER_BYTES = 16  # xxh3-128 digest
MIN_FRAME_BYTES = PREFIX_BYTES + TRAILER_BYTES
MAX_HEADER_BYTES = 16 << 20
"""A header is a few KiB per GiB of payload; anything near 16 MiB is hostile or corrupt."""
DEFAULT_MAX_FRAME_BYTES = 2 << 30
MAX_POSITION = 1 << 62
"""Token positions (and so token counts) stay far inside int64, which tensors of positions use."""
KNOWN_FLAGS = 0  # version 1 defines no flag bits; a set bit means a writer we do not understand

NonNegInt = Annotated[int, Field(ge=0)]
PosInt = Annotated[int, Field(gt=0)]
Run = tuple[NonNegInt, PosInt]
"""(start, length): a run of consecutive integers, start .. start + length - 1."""


class SectionHeader(BaseModel):
    """One named byte stream of the encoder, as stored: its size and its chunks in payload order."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=256)
    raw_size: NonNegInt
    chunks: list[ChunkInfo]

    @model_validator(mode="after")
    def _chunking_rule(self) -> SectionHeader:
        # Canonical chunking (every chunk full but the last) makes chunk i cover bytes
        # [i * 64 KiB, ...), so a header can be checked against raw_size and sections sliced
        # without inflating; it is also exactly what nvCOMP's batched API produces.
        total = sum(c.raw_size for c in self.chunks)
        if total != self.raw_size:
            raise ValueError(f"section {self.name!r}: chunk raw sizes sum to {total}, not {self.raw_size}")
        for i, c in enumerate(self.chunks[:-1]):
            if c.raw_size != MAX_CHUNK_BYTES:
                raise ValueError(
                    f"section {self.name!r}: chunk {i} holds {c.raw_size} bytes; only the last chunk "
                    f"may hold fewer than {MAX_CHUNK_BYTES}"
                )
        return self

    @property
    def compressed_size(self) -> int:
        return sum(c.compressed_size for c in self.chunks)


class FrameHeader(BaseModel):
    """Everything a decoder needs besides the calibration artifact, which it names by id.

    Strict and closed (``extra="forbid"``): a field this reader does not know means a newer
    writer, and silently ignoring it could mean decoding with a wrong assumption.
    """

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)

    model_fingerprint: str
    calibration_id: str
    allocation_id: str
    codec: str = Field(min_length=1)
    dtype: Literal["float16", "bfloat16", "float32"]
    layer_start: NonNegInt
    layer_end: int
    n_kv_heads: PosInt
    key_head_dim: PosInt
    value_head_dim: PosInt
    positions: list[Run]
    n_tokens: NonNegInt
    raw_token_index: list[Run] = Field(default_factory=list)
    meta: dict[str, str | int | float] = Field(default_factory=dict)
    sections: list[SectionHeader] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> FrameHeader:
        if self.layer_end <= self.layer_start:
            raise ValueError(f"layer_end ({self.layer_end}) must exceed layer_start ({self.layer_start})")
        for start, length in self.positions:
            if start + length > MAX_POSITION:
                raise ValueError(f"position run ({start}, {length}) reaches beyond {MAX_POSITION}")
        total = sum(length for _, length in self.positions)
        if total != self.n_tokens:
            raise ValueError(f"n_tokens is {self.n_tokens} but the position runs cover {total} tokens")
        prev_end = 0
        for start, length in self.raw_token_index:
            if start < prev_end:
                raise ValueError("raw_token_index runs must be sorted and non-overlapping")
            prev_end = start + length
        if prev_end > self.n_tokens:
            raise ValueError(f"raw_token_index reaches index {prev_end - 1}, beyond n_tokens {self.n_tokens}")
        names = [s.name for s in self.sections]
        if len(set(names)) != len(names):
            dupes = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"duplicate section names: {dupes}")
        return self

    @property
    def n_layers(self) -> int:
        return self.layer_end - self.layer_start


def _byte_view(data: bytes | bytearray | memoryview) -> memoryview:
    view = memoryview(data)
    if not view.contiguous:
        raise ValueError("a frame must be a contiguous buffer")
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def write_frame(
    header: FrameHeader,
    sections: Sequence[tuple[str, bytes | bytearray | memoryview]],
    *,
    level: int = DEFAULT_LEVEL,
    backend: DeflateBackend | None = None,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
) -> bytes:
    """Deflate ``sections`` and serialize one frame (see ``encode_frame``)."""
    return encode_frame(header, sections, level=level, backend=backend, max_frame_bytes=max_frame_bytes)[0]


def encode_frame(
    header: FrameHeader,
    sections: Sequence[tuple[str, bytes | bytearray | memoryview]],
    *,
    level: int = DEFAULT_LEVEL,
    backend: DeflateBackend | None = None,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
) -> tuple[bytes, FrameHeader]:
    """Deflate ``sections`` (in the given order), fill ``header.sections`` and serialize one frame.

    Returns the frame and its completed header, so a writer that wants section sizes need not
    parse and re-verify the frame it just wrote.

    ``header`` carries every field except ``sections``, which must be left empty: section records
    are derived from the data, so a caller cannot make them disagree with the payload.
    The CPU backend is the default so that output bytes are deterministic across machines.
    """
    if header.sections:
        raise ValueError("header.sections must be empty: write_frame derives them from `sections`")
    backend = backend or IsalDeflate()
    section_headers: list[SectionHeader] = []
    payloads: list[bytes] = []
    for name, data in sections:
        view = _byte_view(data)
        infos, payload = backend.deflate(view, level)
        section_headers.append(SectionHeader(name=name, raw_size=len(view), chunks=infos))
        payloads.append(payload)
    try:
        full = FrameHeader(**{**dict(header), "sections": section_headers})
    except ValidationError as exc:
        raise FrameHeaderError(f"cannot build a valid header: {exc}") from exc
    header_json = full.model_dump_json().encode("utf-8")
    if len(header_json) > MAX_HEADER_BYTES:
        raise FrameSizeError(f"header is {len(header_json)} bytes, limit {MAX_HEADER_BYTES}")
    payload_bytes = sum(len(p) for p in payloads)
    total = PREFIX_BYTES + len(header_json) + payload_bytes + TRAILER_BYTES
    if total > max_frame_bytes:
        raise FrameSizeError(f"frame would be {total} bytes, limit {max_frame_bytes}")
    prefix = PREFIX.pack(MAGIC, FORMAT_VERSION, KNOWN_FLAGS, len(header_json))
    digest = xxhash.xxh3_128()
    for part in (prefix, header_json, *payloads):
        digest.update(part)
    return b"".join((prefix, header_json, *payloads, digest.digest())), full


@dataclass(frozen=True)
class Frame:
    """A frame whose structure and whole-frame digest are verified; sections inflate on demand.

    Holds a view of the caller's buffer (no copy of a possibly 2 GiB blob), so the buffer must not
    be mutated while the Frame is in use; each chunk's CRC32C is re-checked when it is inflated.
    """

    header: FrameHeader
    total_bytes: int
    header_bytes: int
    payload_bytes: int
    _payload: memoryview = field(repr=False)
    _index: dict[str, tuple[int, SectionHeader]] = field(repr=False)
    version: int = FORMAT_VERSION

    @property
    def section_names(self) -> list[str]:
        return [s.name for s in self.header.sections]

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def section_header(self, name: str) -> SectionHeader:
        try:
            return self._index[name][1]
        except KeyError:
            raise FrameHeaderError(
                f"frame has no section {name!r} (it has {self.section_names})", where=name
            ) from None

    def section(self, name: str, *, backend: DeflateBackend | None = None) -> bytes:
        """The section's original bytes, every chunk CRC32C-checked before it is inflated."""
        sec = self.section_header(name)
        offset = self._index[name][0]
        data = self._payload[offset : offset + sec.compressed_size]
        return (backend or IsalDeflate()).inflate(sec.chunks, data, where=f"section {name!r}")

    def verify(self, *, backend: DeflateBackend | None = None) -> None:
        """Inflate every section once, so corruption anywhere surfaces now rather than at decode time."""
        for name in self.section_names:
            self.section(name, backend=backend)


def _check_digest(view: memoryview, end: int, what: str) -> None:
    body, stored = view[: end - TRAILER_BYTES], view[end - TRAILER_BYTES : end]
    actual = xxhash.xxh3_128(body).digest()
    if actual != stored:
        raise FrameChecksumError(
            f"xxh3-128 of the frame is {actual.hex()}, trailer says {bytes(stored).hex()}{what}",
            where="whole frame",
        )


def read_frame(
    data: bytes | bytearray | memoryview, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
) -> Frame:
    """Parse and verify a frame: structure, header schema, lengths and the whole-frame digest.

    Order of checks (docs/format.md): magic, length of prefix, version, flags, size limits,
    header presence, header JSON/schema, payload length, digest. A corrupted header that fails to
    parse is reported as checksum_mismatch when the digest disagrees too, since damage is then the
    likelier story than a writer bug.
    """
    view = _byte_view(data)
    n = len(view)
    if bytes(view[: min(n, len(MAGIC))]) != MAGIC[: min(n, len(MAGIC))]:
        raise FrameMagicError(f"frame starts with {bytes(view[:4])!r}, expected {MAGIC!r}")
    if n < MIN_FRAME_BYTES:
        raise FrameTruncatedError(f"{n} bytes cannot hold a frame (minimum {MIN_FRAME_BYTES})")
    _, version, flags, header_length = PREFIX.unpack_from(view, 0)
    if version not in SUPPORTED_VERSIONS:
        raise FrameVersionError(
            f"format version {version} is not supported (this reader knows {sorted(SUPPORTED_VERSIONS)})"
        )
    if flags & ~KNOWN_FLAGS:
        raise FrameHeaderError(f"unknown flag bits {flags:#06x} for format version {version}")
    if n > max_frame_bytes:
        raise FrameSizeError(f"frame is {n} bytes, limit {max_frame_bytes}")
    if header_length > MAX_HEADER_BYTES:
        raise FrameSizeError(f"header_length {header_length} exceeds limit {MAX_HEADER_BYTES}")
    header_end = PREFIX_BYTES + header_length
    if n < header_end + TRAILER_BYTES:
        raise FrameTruncatedError(
            f"{n} bytes cannot hold the {header_length}-byte header plus prefix and trailer"
        )
    try:
        if version == FORMAT_VERSION_BLOCK:
            header = _parse_block_header(view[PREFIX_BYTES:header_end])
        else:
            header = FrameHeader.model_validate_json(bytes(view[PREFIX_BYTES:header_end]))
    except (ValidationError, ValueError) as exc:
        _check_digest(view, n, " (and the header does not parse)")
        raise FrameHeaderError(f"header is not a valid FrameHeader: {exc}") from exc
    payload_bytes = sum(s.compressed_size for s in header.sections)
    expected = header_end + payload_bytes + TRAILER_BYTES
    if n < expected:
        try:
            _check_digest(view, n, "")
        except FrameChecksumError:
            raise FrameTruncatedError(f"frame is {n} bytes but its header describes {expected}") from None
        # Intact by its own digest, yet shorter than its header says: the writer lied, not the wire.
        raise FrameHeaderError(f"header describes {expected} bytes but the intact frame holds {n}")
    if n > expected:
        try:
            _check_digest(view, expected, "")
        except FrameChecksumError:
            _check_digest(view, n, " (and the frame is longer than its header says)")
            # Intact by its own digest, yet longer than its header says: the writer lied.
            raise FrameHeaderError(
                f"header describes {expected} bytes but the intact frame holds {n}"
            ) from None
        raise FrameHeaderError(f"{n - expected} unexpected bytes after the trailer")
    _check_digest(view, expected, "")
    index: dict[str, tuple[int, SectionHeader]] = {}
    offset = 0
    for sec in header.sections:
        index[sec.name] = (offset, sec)
        offset += sec.compressed_size
    return Frame(
        header=header,
        total_bytes=n,
        header_bytes=header_length,
        payload_bytes=payload_bytes,
        _payload=view[header_end : header_end + payload_bytes],
        _index=index,
        version=version,
    )


def inspect_frame(
    data: bytes | bytearray | memoryview, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
) -> dict[str, Any]:
    """A JSON-able summary of a frame, produced only after EVERY checksum and chunk has been verified."""
    frame = read_frame(data, max_frame_bytes=max_frame_bytes)
    frame.verify()
    sections = [
        {
            "name": s.name,
            "raw_bytes": s.raw_size,
            "compressed_bytes": s.compressed_size,
            "n_chunks": len(s.chunks),
        }
        for s in frame.header.sections
    ]
    raw_total = sum(s.raw_size for s in frame.header.sections)
    return {
        "format_version": frame.version,
        "total_bytes": frame.total_bytes,
        "header_bytes": frame.header_bytes,
        "payload_bytes": frame.payload_bytes,
        "raw_bytes": raw_total,
        "header": frame.header.model_dump(mode="json", exclude={"sections"}),
        "sections": sections,
    }


# ---- format version 2: compact block frames ----

BLOCK_HEADER = struct.Struct("<8s16s8s8sBBHHHHHIQIIB")
"""codec, model fingerprint, calibration id, allocation id (raw bytes of their hex), dtype, reserved,
layer_start, layer_end, n_kv_heads, key_head_dim, value_head_dim, n_tokens, first position,
raw-token run (start, length), stream count; then a u32 raw size per stream, then one
(compressed_size, crc32c) per chunk of every stream. docs/format.md, "Format version 2"."""
BLOCK_STREAM_SIZE = struct.Struct("<I")
BLOCK_CHUNK = struct.Struct("<II")
BLOCK_STREAMS = ("codes", "scales", "raw")
"""The sections of a v2 frame, in payload order (a frame holds the first 1-3). Each is one DEFLATE
stream (64 KiB chunks) holding, in the codec's fixed order, every stream of that kind in the block:
quantized codes, scale/shift pairs, uncompressed tokens. Codes and scales apart measured 3.5% smaller
than one stream per block (docs/format.md)."""
_DTYPE_CODES = {"float16": 0, "bfloat16": 1, "float32": 2}
_DTYPE_NAMES = {v: k for k, v in _DTYPE_CODES.items()}
_MAX_U16 = 0xFFFF
_MAX_U32 = 0xFFFFFFFF


def _hex_field(value: str, nbytes: int, what: str) -> bytes:
    if len(value) != 2 * nbytes or value != value.lower():
        raise ValueError(f"{what} {value!r} is not {2 * nbytes} lowercase hex digits")
    return bytes.fromhex(value)


def block_header_fits(header: FrameHeader) -> bool:
    """Whether ``header`` can travel as a v2 block header (else the writer uses version 1)."""
    try:
        _pack_block_fields(header, 1)
    except ValueError:
        return False
    return True


def _pack_block_fields(header: FrameHeader, n_streams: int) -> bytes:
    h = header
    codec = h.codec.encode("ascii", errors="strict") if h.codec.isascii() else b""
    if not 1 <= len(codec) <= 8 or b"\0" in codec or not codec.isalnum():
        raise ValueError(f"codec name {h.codec!r} does not fit 8 alphanumeric ASCII bytes")
    if len(h.positions) > 1 or len(h.raw_token_index) > 1 or h.meta:
        raise ValueError("v2 holds one position run, at most one raw-token run and no meta")
    first = h.positions[0][0] if h.positions else 0
    raw_start, raw_len = h.raw_token_index[0] if h.raw_token_index else (0, 0)
    small = (h.layer_start, h.layer_end, h.n_kv_heads, h.key_head_dim, h.value_head_dim)
    if not 1 <= n_streams <= len(BLOCK_STREAMS):
        raise ValueError(f"v2 holds 1..{len(BLOCK_STREAMS)} streams, not {n_streams}")
    if max(small) > _MAX_U16 or max(h.n_tokens, raw_start, raw_len) > _MAX_U32:
        raise ValueError("a field exceeds its v2 width")
    return BLOCK_HEADER.pack(
        codec,
        _hex_field(h.model_fingerprint, 16, "model fingerprint"),
        _hex_field(h.calibration_id, 8, "calibration id"),
        _hex_field(h.allocation_id, 8, "allocation id"),
        _DTYPE_CODES[h.dtype],
        0,
        h.layer_start,
        h.layer_end,
        h.n_kv_heads,
        h.key_head_dim,
        h.value_head_dim,
        h.n_tokens,
        first,
        raw_start,
        raw_len,
        n_streams,
    )


def _parse_block_header(view: memoryview) -> FrameHeader:
    """The v2 binary header -> the same FrameHeader a v1 reader builds, its sections the streams."""
    if len(view) < BLOCK_HEADER.size:
        raise ValueError(f"v2 header is {len(view)} bytes, needs at least {BLOCK_HEADER.size}")
    (codec, fp, cal, alloc, dtype, reserved, ls, le, nh, dk, dv, n_tokens, first, raw_start, raw_len,
     n_streams) = BLOCK_HEADER.unpack_from(view, 0)  # fmt: skip
    name = codec.rstrip(b"\0")
    if not name or not name.isascii() or not name.isalnum():
        raise ValueError(f"codec field {codec!r} is not a NUL-padded alphanumeric name")
    if dtype not in _DTYPE_NAMES or reserved:
        raise ValueError(f"dtype code {dtype} / reserved byte {reserved} invalid")
    if (raw_len == 0 and raw_start != 0) or (n_tokens == 0 and first != 0):
        raise ValueError("an empty run must be written as zeros")
    if not 1 <= n_streams <= len(BLOCK_STREAMS):
        raise ValueError(f"stream count {n_streams} is not 1..{len(BLOCK_STREAMS)}")
    off = BLOCK_HEADER.size
    if len(view) < off + n_streams * BLOCK_STREAM_SIZE.size:
        raise ValueError("v2 header ends inside its stream sizes")
    sizes = [BLOCK_STREAM_SIZE.unpack_from(view, off + 4 * i)[0] for i in range(n_streams)]
    off += n_streams * BLOCK_STREAM_SIZE.size
    n_chunks = [-(-size // MAX_CHUNK_BYTES) for size in sizes]
    want = off + sum(n_chunks) * BLOCK_CHUNK.size
    if len(view) != want:
        raise ValueError(f"v2 header is {len(view)} bytes; its streams' chunks need {want}")
    sections = []
    for stream, size, count in zip(BLOCK_STREAMS, sizes, n_chunks, strict=False):
        chunks = []
        for i in range(count):
            csize, crc = BLOCK_CHUNK.unpack_from(view, off)
            off += BLOCK_CHUNK.size
            raw = min(MAX_CHUNK_BYTES, size - i * MAX_CHUNK_BYTES)
            chunks.append(ChunkInfo(raw_size=raw, compressed_size=csize, crc32c=crc))
        sections.append(SectionHeader(name=stream, raw_size=size, chunks=chunks))
    return FrameHeader(
        model_fingerprint=fp.hex(),
        calibration_id=cal.hex(),
        allocation_id=alloc.hex(),
        codec=name.decode("ascii"),
        dtype=_DTYPE_NAMES[dtype],  # type: ignore[arg-type]
        layer_start=ls,
        layer_end=le,
        n_kv_heads=nh,
        key_head_dim=dk,
        value_head_dim=dv,
        positions=[(first, n_tokens)] if n_tokens else [],
        n_tokens=n_tokens,
        raw_token_index=[(raw_start, raw_len)] if raw_len else [],
        sections=sections,
    )


def encode_block_frame(
    header: FrameHeader,
    streams: Sequence[bytes | bytearray | memoryview],
    *,
    level: int = DEFAULT_LEVEL,
    backend: DeflateBackend | None = None,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    cuts: Sequence[Sequence[int]] = (),
) -> tuple[bytes, FrameHeader]:
    """One v2 frame from 1-3 streams (named ``BLOCK_STREAMS`` in order), each DEFLATEd in 64 KiB
    chunks; ``cuts[i]`` are stream i's DEFLATE block boundaries (``deflate_chunks``), a choice of the
    writer that no reader sees. Raises ValueError when ``header`` does not fit v2 (``block_header_fits``)."""
    if header.sections:
        raise ValueError("header.sections must be empty: the writer derives them")
    fields = _pack_block_fields(header, len(streams))
    backend = backend or IsalDeflate()
    sections, payloads, sizes, records = [], [], [], []
    for i, (name, data) in enumerate(zip(BLOCK_STREAMS, streams, strict=False)):
        view = _byte_view(data)
        if len(view) > _MAX_U32:
            raise FrameSizeError(f"stream {name} is {len(view)} bytes, v2 limit {_MAX_U32}")
        infos, payload = backend.deflate(view, level, cuts[i] if i < len(cuts) else ())
        sections.append(SectionHeader(name=name, raw_size=len(view), chunks=infos))
        payloads.append(payload)
        sizes.append(BLOCK_STREAM_SIZE.pack(len(view)))
        records += [BLOCK_CHUNK.pack(c.compressed_size, c.crc32c) for c in infos]
    body = b"".join((fields, *sizes, *records))
    total = PREFIX_BYTES + len(body) + sum(len(p) for p in payloads) + TRAILER_BYTES
    if total > max_frame_bytes:
        raise FrameSizeError(f"frame would be {total} bytes, limit {max_frame_bytes}")
    head = PREFIX.pack(MAGIC, FORMAT_VERSION_BLOCK, KNOWN_FLAGS, len(body)) + body
    digest = xxhash.xxh3_128(head)
    for p in payloads:
        digest.update(p)
    full = FrameHeader(**{**dict(header), "sections": sections})
    return b"".join((head, *payloads, digest.digest())), full


# ---- runs: compact storage of (mostly contiguous) token positions and index sets ----


def positions_to_runs(positions: Sequence[int] | torch.Tensor) -> list[tuple[int, int]]:
    """Maximal (start, length) runs of +1 steps, in order; positions need not be sorted or contiguous."""
    t = torch.as_tensor(positions, dtype=torch.int64).reshape(-1)
    if t.numel() == 0:
        return []
    breaks = torch.nonzero(t[1:] - t[:-1] != 1).reshape(-1) + 1
    starts_idx = torch.cat([torch.zeros(1, dtype=torch.int64), breaks])
    ends_idx = torch.cat([breaks, torch.tensor([t.numel()], dtype=torch.int64)])
    return [
        (int(s), int(e - i))
        for s, i, e in zip(t[starts_idx].tolist(), starts_idx.tolist(), ends_idx.tolist(), strict=True)
    ]


def runs_to_positions(runs: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Inverse of positions_to_runs: the int64 tensor of every integer the runs cover, in order."""
    if not runs:
        return torch.zeros(0, dtype=torch.int64)
    if len(runs) == 1 and runs[0][1] >= 0:  # the block case, ~100x cheaper than the general path
        return torch.arange(runs[0][0], runs[0][0] + runs[0][1], dtype=torch.int64)
    rt = torch.as_tensor(list(runs), dtype=torch.int64).reshape(-1, 2)
    if bool((rt[:, 1] < 0).any()):
        raise ValueError("run lengths must be non-negative")
    rt = rt[rt[:, 1] > 0]
    if rt.shape[0] == 0:
        return torch.zeros(0, dtype=torch.int64)
    starts, lengths = rt[:, 0], rt[:, 1]
    # A cumulative sum of steps: +1 inside a run, a jump to the next start at each run boundary.
    # (torch.repeat_interleave would be the obvious tool but costs ~10 ms per call on CPU.)
    steps = torch.ones(int(lengths.sum()), dtype=torch.int64)
    offsets = torch.cumsum(lengths, 0) - lengths
    steps[0] = starts[0]
    steps[offsets[1:]] = starts[1:] - (starts[:-1] + lengths[:-1] - 1)
    return torch.cumsum(steps, 0)


def mask_to_runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """Runs of the True indices of a 1-D bool mask (e.g. which tokens are stored raw)."""
    if mask.dim() != 1 or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a 1-D bool tensor, got {mask.dtype} {tuple(mask.shape)}")
    return positions_to_runs(torch.nonzero(mask).reshape(-1))


def runs_to_mask(runs: Sequence[tuple[int, int]], n: int) -> torch.Tensor:
    """Inverse of mask_to_runs for a mask of length ``n``; rejects runs outside [0, n)."""
    idx = runs_to_positions(runs)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise ValueError(f"runs cover indices outside [0, {n})")
    mask = torch.zeros(n, dtype=torch.bool)
    mask[idx] = True
    return mask


__all__ = [
    "BLOCK_STREAMS",
    "DEFAULT_MAX_FRAME_BYTES",
    "FORMAT_VERSION",
    "FORMAT_VERSION_BLOCK",
    "MAGIC",
    "MAX_HEADER_BYTES",
    "Frame",
    "FrameHeader",
    "SectionHeader",
    "block_header_fits",
    "encode_block_frame",
    "inspect_frame",
    "mask_to_runs",
    "positions_to_runs",
    "read_frame",
    "runs_to_mask",
    "runs_to_positions",
    "write_frame",
]
