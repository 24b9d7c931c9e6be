"""aws-chunked request bodies (``Content-Encoding: aws-chunked``): chunk framing, chunk signatures
and trailing checksums, as S3 clients stream uploads.

HTTP ``Transfer-Encoding: chunked`` is removed by aiohttp first; what remains is S3's own framing::

    <hex size>[;chunk-signature=<sig>]\\r\\n<data>\\r\\n ... 0[;chunk-signature=<sig>]\\r\\n
    [<trailer>:<value>\\r\\n ...][x-amz-trailer-signature:<sig>\\r\\n]\\r\\n

Anything off that grammar, a size that disagrees with ``x-amz-decoded-content-length``, a missing
declared trailer, a bad chunk/trailer signature or checksum is refused; nothing is stored.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvbm_codec.frontends.s3 import checksums, sigv4
from kvbm_codec.frontends.s3.errors import S3Error, entity_too_large, invalid_argument


def _incomplete(why: str) -> S3Error:
    return S3Error(400, "IncompleteBody", f"aws-chunked body is malformed: {why}")


@dataclass
class Decoded:
    data: bytes
    trailers: dict[str, str] = field(default_factory=dict)


def decode(
    body: bytes,
    *,
    verified: sigv4.Verified,
    declared_trailers: list[str],
    decoded_length: int | None,
    max_bytes: int,
) -> Decoded:
    mode = verified.payload_hash
    signed = mode in (sigv4.STREAMING_SIGNED, sigv4.STREAMING_SIGNED_TRAILER)
    if mode not in (sigv4.STREAMING_SIGNED, sigv4.STREAMING_SIGNED_TRAILER, sigv4.STREAMING_UNSIGNED_TRAILER):
        raise invalid_argument(f"aws-chunked body with x-amz-content-sha256 {mode!r}")
    out = bytearray()
    pos, previous = 0, verified.seed_signature
    while True:
        eol = body.find(b"\r\n", pos)
        if eol < 0:
            raise _incomplete("chunk header without CRLF")
        header = body[pos:eol].decode("ascii", "replace")
        size_s, _, ext = header.partition(";")
        try:
            size = int(size_s, 16)
        except ValueError:
            raise _incomplete(f"bad chunk size {size_s!r}") from None
        if size < 0 or size_s.strip() != size_s or not size_s:
            raise _incomplete(f"bad chunk size {size_s!r}")
        start, end = eol + 2, eol + 2 + size
        if end > len(body):
            raise _incomplete("chunk runs past the end of the body")
        chunk = body[start:end]
        if signed:
            name, _, sig = ext.partition("=")
            if name != "chunk-signature" or not sig:
                raise sigv4.signature_mismatch()
            verified.verify_chunk(previous, chunk, sig)
            previous = sig
        if len(out) + size > max_bytes:
            raise entity_too_large(f"decoded body exceeds {max_bytes} bytes")
        out += chunk
        if size == 0:
            pos = start
            break
        if body[end : end + 2] != b"\r\n":
            raise _incomplete("chunk data not followed by CRLF")
        pos = end + 2
    trailers, trailer_sig = _trailers(body[pos:])
    if decoded_length is not None and decoded_length != len(out):
        raise _incomplete(
            f"x-amz-decoded-content-length {decoded_length} but the chunks hold {len(out)} bytes"
        )
    for name in declared_trailers:
        if name not in trailers:
            raise _incomplete(f"declared trailer {name!r} is missing")
    if mode == sigv4.STREAMING_SIGNED_TRAILER:
        if trailer_sig is None:
            raise sigv4.signature_mismatch()
        block = "".join(f"{k}:{v}\n" for k, v in trailers.items()).encode()
        verified.verify_trailer(previous, block, trailer_sig)
    data = bytes(out)
    for name, value in trailers.items():
        if name.startswith(checksums.PREFIX):
            checksums.verify(name, value, data)
    return Decoded(data, trailers)


def _trailers(rest: bytes) -> tuple[dict[str, str], str | None]:
    trailers: dict[str, str] = {}
    signature = None
    for raw in rest.split(b"\r\n"):
        if not raw:
            continue
        line = raw.decode("ascii", "replace")
        name, sep, value = line.partition(":")
        if not sep:
            raise _incomplete(f"bad trailer line {line!r}")
        name, value = name.strip().lower(), value.strip()
        if name == "x-amz-trailer-signature":
            signature = value
        else:
            trailers[name] = value
    return trailers, signature
