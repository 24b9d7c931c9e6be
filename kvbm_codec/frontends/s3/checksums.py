"""The flexible checksums S3 clients attach (header or aws-chunked trailer), verified on upload.

CRC32 and CRC32C come from awscrt (the library botocore[crt] and the AWS SDKs' CRT use), as does
CRC64NVME, the default of current AWS SDKs including the aws-sdk-cpp inside NIXL's OBJ plugin.
Values travel base64 of the big-endian digest.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable

from awscrt import checksums as crt

from kvbm_codec.frontends.s3.errors import S3Error, invalid_request


def _crc(fn: Callable[[bytes], int], width: int) -> Callable[[bytes], bytes]:
    return lambda data: fn(data).to_bytes(width, "big")


ALGORITHMS: dict[str, Callable[[bytes], bytes]] = {
    "crc32": _crc(crt.crc32, 4),
    "crc32c": _crc(crt.crc32c, 4),
    "crc64nvme": _crc(crt.crc64nvme, 8),
    "sha1": lambda d: hashlib.sha1(d).digest(),
    "sha256": lambda d: hashlib.sha256(d).digest(),
}
PREFIX = "x-amz-checksum-"


def digest_b64(algorithm: str, data: bytes) -> str:
    return base64.b64encode(ALGORITHMS[algorithm](data)).decode()


def verify(name: str, value: str, data: bytes) -> None:
    """name is the header/trailer (x-amz-checksum-<alg>); raises BadDigest on mismatch."""
    alg = name.lower().removeprefix(PREFIX)
    if alg not in ALGORITHMS:
        raise invalid_request(f"unsupported checksum {name!r} (supported: {sorted(ALGORITHMS)})")
    if value.strip() != digest_b64(alg, data):
        raise S3Error(400, "BadDigest", f"the {alg} checksum you specified did not match what we received")


def verify_headers(headers: dict[str, str], data: bytes) -> None:
    """Checksums sent as headers (Content-MD5 and x-amz-checksum-*); trailers are checked elsewhere."""
    md5 = headers.get("content-md5")
    if md5 is not None and md5.strip() != base64.b64encode(hashlib.md5(data).digest()).decode():
        raise S3Error(400, "BadDigest", "the Content-MD5 you specified did not match what we received")
    for name, value in headers.items():
        if name.startswith(PREFIX) and name not in (
            "x-amz-checksum-mode",
            "x-amz-checksum-algorithm",
            "x-amz-checksum-type",
        ):
            verify(name, value, data)
