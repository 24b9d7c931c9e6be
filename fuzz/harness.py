"""Oracles shared by the atheris targets and tests/test_fuzz_frame.py.

A frame carries a whole-frame XXH3-128 and a CRC32C per chunk, so random byte mutations almost
never get past ``read_frame``. To reach the schema checks, the inflater and the decoder, every
input is also tried in two *resealed* forms: with the trailer digest recomputed, and with every
chunk CRC32C (and then the digest) recomputed. A resealed frame is a well-formed forgery, so it may
decode; what it may never do is raise anything but a ``CodecError`` or decode into KV that
contradicts its own header.

For the input as given (not resealed), success is only legitimate for an unaltered seed: any
other success means a checksum let damage through, and is reported as a wrong decode.
"""

from __future__ import annotations

import json
import struct
import sys
from collections import Counter
from collections.abc import Iterable

import google_crc32c
import torch
import xxhash

from kvbm_codec.api.blocks import DTYPES
from kvbm_codec.codec import frame as fr
from kvbm_codec.codec.errors import CodecError
from kvbm_codec.codec.kvtc import KVTCCodec
from kvbm_codec.kv import KVCache

PREFIX = struct.Struct("<4sHHI")
TRAILER = 16
_NOT_A_FRAME = (
    ValueError,  # includes json.JSONDecodeError and UnicodeDecodeError
    TypeError,
    KeyError,
    AttributeError,
    IndexError,
    RecursionError,
    OverflowError,
    struct.error,
)


class WrongDecodeError(AssertionError):
    """The decoder returned KV it should not have: the one outcome checksums exist to prevent."""


def reseal(data: bytes) -> bytes | None:
    """The same bytes with the trailer digest recomputed (None if too short to have one)."""
    if len(data) < fr.PREFIX_BYTES + TRAILER:
        return None
    body = data[:-TRAILER]
    return body + xxhash.xxh3_128(body).digest()


def reseal_chunks(data: bytes) -> bytes | None:
    """Recompute every chunk CRC32C the header lists over the payload as it is, then the digest
    (version 1 JSON headers and version 2 binary block headers alike).

    Returns None when the header is not JSON of the expected outline: such inputs are already
    covered, unresealed, by the parser's own checks.
    """
    try:
        if len(data) < fr.PREFIX_BYTES + TRAILER:
            return None
        magic, version, flags, hlen = PREFIX.unpack_from(data)
        end = fr.PREFIX_BYTES + hlen
        if end > len(data) - TRAILER:
            return None
        if version == fr.FORMAT_VERSION_BLOCK:
            return _reseal_block_chunks(data, end)
        header = json.loads(data[fr.PREFIX_BYTES : end])
        payload = data[end:-TRAILER]
        off = 0
        for sec in header["sections"]:
            for chunk in sec["chunks"]:
                n = chunk["compressed_size"]
                if type(n) is not int or n < 0 or off + n > len(payload):
                    return None
                chunk["crc32c"] = int(google_crc32c.value(payload[off : off + n]))
                off += n
        header_json = json.dumps(header, separators=(",", ":")).encode()
        body = PREFIX.pack(magic, version, flags, len(header_json)) + header_json + payload
    except _NOT_A_FRAME:
        return None
    return body + xxhash.xxh3_128(body).digest()


def _reseal_block_chunks(data: bytes, end: int) -> bytes | None:
    """reseal_chunks for a version-2 (binary) header: its (compressed_size, crc32c) records follow
    the fixed fields and one u32 raw size per stream; the chunk count of a stream is implied by its
    raw size. None when the binary outline does not hold together."""
    head = bytearray(data[:end])
    payload = data[end:-TRAILER]
    off = fr.PREFIX_BYTES + fr.BLOCK_HEADER.size
    if off > end:
        return None
    n_streams = head[off - 1]
    sizes = []
    for i in range(n_streams):
        at = off + i * fr.BLOCK_STREAM_SIZE.size
        if at + fr.BLOCK_STREAM_SIZE.size > end:
            return None
        sizes.append(fr.BLOCK_STREAM_SIZE.unpack_from(head, at)[0])
    off += n_streams * fr.BLOCK_STREAM_SIZE.size
    pos = 0
    for size in sizes:
        for _ in range(-(-size // fr.MAX_CHUNK_BYTES)):
            if off + fr.BLOCK_CHUNK.size > end:
                return None
            n, _crc = fr.BLOCK_CHUNK.unpack_from(head, off)
            if pos + n > len(payload):
                return None
            fr.BLOCK_CHUNK.pack_into(head, off, n, int(google_crc32c.value(payload[pos : pos + n])))
            pos += n
            off += fr.BLOCK_CHUNK.size
    body = bytes(head) + payload
    return body + xxhash.xxh3_128(body).digest()


def variants(data: bytes) -> list[tuple[str, bytes]]:
    out = [("asis", data)]
    seen = {data}
    for name, fn in (("reseal", reseal), ("rechunk", reseal_chunks)):
        v = fn(data)
        if v is not None and v not in seen:
            out.append((name, v))
            seen.add(v)
    return out


def kv_bytes(kv: KVCache) -> bytes:
    """Bit pattern of a decoded cache (bfloat16-safe), for bit-identity comparisons."""
    parts = [kv.layer_start.to_bytes(4, "little")]
    for t in (kv.keys, kv.values, kv.positions):
        parts.append(str((t.dtype, tuple(t.shape))).encode())
        parts.append(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return b"".join(parts)


def _semantic_key(frame: fr.Frame, data: bytes) -> tuple[str, bytes]:
    """Header content (not its spelling) and payload: equal keys must decode identically."""
    start = fr.PREFIX_BYTES + frame.header_bytes
    return frame.header.model_dump_json(), xxhash.xxh3_128(data[start : start + frame.payload_bytes]).digest()


class _Oracle:
    def __init__(self, seeds: Iterable[bytes]) -> None:
        self.seeds = {xxhash.xxh3_128(s).digest() for s in seeds}
        self.stats: Counter[str] = Counter()
        self.executions = 0

    def __call__(self, data: bytes) -> None:
        self.executions += 1
        for variant, frame_bytes in variants(bytes(data)):
            self._one(variant, frame_bytes)

    def forged(self, data: bytes) -> None:
        """Check an input whose digests the caller already made valid (a deliberate forgery)."""
        self.executions += 1
        self._one("forged", bytes(data))

    def _one(self, variant: str, data: bytes) -> None:
        raise NotImplementedError

    def report(self, stream: object = sys.stderr) -> str:
        line = json.dumps({"executions": self.executions, "outcomes": dict(sorted(self.stats.items()))})
        print(f"#kvbm-fuzz {line}", file=stream, flush=True)  # type: ignore[call-overload]
        return line


class ParseOracle(_Oracle):
    """read_frame + verify + inspect_frame: only CodecError; a success inflates to the declared sizes."""

    def _one(self, variant: str, data: bytes) -> None:
        try:
            frame = fr.read_frame(data)
            sections = {name: frame.section(name) for name in frame.section_names}
            fr.inspect_frame(data)
        except CodecError as e:
            self.stats[f"{variant}:{e.code}"] += 1
            return
        self.stats[f"{variant}:ok"] += 1
        if variant == "asis" and xxhash.xxh3_128(data).digest() not in self.seeds:
            raise WrongDecodeError("an altered frame passed read_frame + verify with its digest intact")
        for sec in frame.header.sections:
            if len(sections[sec.name]) != sec.raw_size:
                raise WrongDecodeError(f"section {sec.name} inflated to {len(sections[sec.name])} bytes")


class DecodeOracle(_Oracle):
    """KVTCCodec.decode: only CodecError; a success matches its header, and decodes bit-identically
    to the seed whenever header content and payload equal that seed's."""

    def __init__(self, codec: KVTCCodec, seeds: Iterable[bytes]) -> None:
        seeds = list(seeds)
        super().__init__(seeds)
        self.codec = codec
        self.reference: dict[tuple[str, bytes], bytes] = {}
        for s in seeds:
            self.reference[_semantic_key(fr.read_frame(s), s)] = kv_bytes(codec.decode(s))

    def _one(self, variant: str, data: bytes) -> None:
        try:
            kv = self.codec.decode(data)
        except CodecError as e:
            self.stats[f"{variant}:{e.code}"] += 1
            return
        self.stats[f"{variant}:ok"] += 1
        if variant == "asis" and xxhash.xxh3_128(data).digest() not in self.seeds:
            raise WrongDecodeError("an altered frame decoded with its digest intact")
        frame = fr.read_frame(data)
        h = frame.header
        expect = (h.layer_start, h.layer_end, h.n_tokens, h.n_kv_heads, h.key_head_dim, h.value_head_dim)
        got = (kv.layer_start, kv.layer_end, kv.n_tokens, kv.n_heads, kv.key_head_dim, kv.value_head_dim)
        if got != expect or kv.keys.dtype != DTYPES[h.dtype]:
            raise WrongDecodeError(
                f"decoded KV {got} {kv.keys.dtype} contradicts its header {expect} {h.dtype}"
            )
        if not torch.equal(kv.positions, fr.runs_to_positions(h.positions)):
            raise WrongDecodeError("decoded positions differ from the header's runs")
        ref = self.reference.get(_semantic_key(frame, data))
        if ref is not None:
            self.stats[f"{variant}:ok_compared"] += 1
            if kv_bytes(kv) != ref:
                raise WrongDecodeError("a frame equal in content to a seed decoded to different KV")
