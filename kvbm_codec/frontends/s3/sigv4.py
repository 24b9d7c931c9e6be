"""AWS Signature Version 4 verification (header and presigned-query forms, and aws-chunked chunk and
trailer signatures), against the credentials configured for the endpoint.

The canonical request is rebuilt from the request exactly as it came off the wire (raw path, raw
query), because S3 signs the path as the client encoded it (no normalisation, no double encoding).
Signatures are compared in constant time. Reference: the SigV4 and "signature calculations for the
Authorization header / streaming uploads" pages of the S3 API documentation; the tests check this
module against botocore's signer.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import quote, unquote

from kvbm_codec.frontends.s3.errors import S3Error, access_denied

ALGORITHM = "AWS4-HMAC-SHA256"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
UNSIGNED = "UNSIGNED-PAYLOAD"
STREAMING_SIGNED = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"
STREAMING_SIGNED_TRAILER = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER"
STREAMING_UNSIGNED_TRAILER = "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
_AUTH_RE = re.compile(
    r"^AWS4-HMAC-SHA256\s+Credential=([^,\s]+)\s*,\s*SignedHeaders=([^,\s]+)\s*,\s*Signature=([0-9a-f]{64})\s*$"
)
_SPACES = re.compile(r"\s+")


@dataclass(frozen=True)
class Credential:
    access_key: str
    secret_key: str
    tenant: str


def signature_mismatch() -> S3Error:
    return S3Error(
        403,
        "SignatureDoesNotMatch",
        "The request signature we calculated does not match the signature you provided. "
        "Check your key and signing method.",
    )


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def signing_key(secret: str, date: str, region: str, service: str = "s3") -> bytes:
    k = _hmac(("AWS4" + secret).encode(), date)
    k = _hmac(k, region)
    k = _hmac(k, service)
    return _hmac(k, "aws4_request")


def _uri_encode(s: str) -> str:
    return quote(s, safe="-_.~")


def canonical_query(raw_query: str, *, drop: str | None = None) -> str:
    pairs = []
    for part in raw_query.split("&") if raw_query else []:
        k, _, v = part.partition("=")
        k, v = unquote(k), unquote(v)
        if k == drop:
            continue
        pairs.append((_uri_encode(k), _uri_encode(v)))
    return "&".join(f"{k}={v}" for k, v in sorted(pairs))


def canonical_request(
    method: str,
    raw_path: str,
    raw_query: str,
    headers: Callable[[str], Sequence[str]],
    signed_headers: list[str],
    payload_hash: str,
    *,
    drop_query: str | None = None,
) -> str:
    lines = []
    for name in signed_headers:
        values = headers(name)
        lines.append(f"{name}:{','.join(_SPACES.sub(' ', v.strip()) for v in values)}\n")
    return "\n".join(
        [
            method,
            raw_path or "/",
            canonical_query(raw_query, drop=drop_query),
            "".join(lines),
            ";".join(signed_headers),
            payload_hash,
        ]
    )


@dataclass(frozen=True)
class Verified:
    """A request whose signature checked out; carries what chunk/trailer signatures chain from."""

    credential: Credential
    amz_date: str
    scope: str
    seed_signature: str
    key: bytes
    payload_hash: str  # the declared x-amz-content-sha256 (hex, UNSIGNED-PAYLOAD or STREAMING-*)

    def _check(self, string_to_sign: str, signature: str) -> None:
        expected = hmac.new(self.key, string_to_sign.encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, signature):
            raise signature_mismatch()

    def verify_chunk(self, previous: str, chunk: bytes, signature: str) -> None:
        sts = "\n".join(
            [
                "AWS4-HMAC-SHA256-PAYLOAD",
                self.amz_date,
                self.scope,
                previous,
                EMPTY_SHA256,
                hashlib.sha256(chunk).hexdigest(),
            ]
        )
        self._check(sts, signature)

    def verify_trailer(self, previous: str, trailer_block: bytes, signature: str) -> None:
        sts = "\n".join(
            [
                "AWS4-HMAC-SHA256-TRAILER",
                self.amz_date,
                self.scope,
                previous,
                hashlib.sha256(trailer_block).hexdigest(),
            ]
        )
        self._check(sts, signature)


class Verifier:
    def __init__(self, credentials: Sequence[Credential], region: str, max_skew_s: float = 900.0) -> None:
        self._creds = {c.access_key: c for c in credentials}
        self.region = region
        self.max_skew_s = max_skew_s

    def verify(
        self,
        method: str,
        raw_path: str,
        raw_query: str,
        headers: Callable[[str], Sequence[str]],
        query: Mapping[str, str],
        now: dt.datetime | None = None,
    ) -> Verified:
        now = now or dt.datetime.now(dt.UTC)
        auth = headers("authorization")
        if auth:
            return self._verify_header(method, raw_path, raw_query, headers, auth[0], now)
        if "X-Amz-Signature" in query:
            return self._verify_presigned(method, raw_path, raw_query, headers, query, now)
        raise access_denied("anonymous requests are not accepted: sign with SigV4")

    def _credential(self, credential: str, amz_date: str, now: dt.datetime) -> tuple[Credential, str, bytes]:
        parts = credential.split("/")
        if len(parts) != 5 or parts[3] != "s3" or parts[4] != "aws4_request":
            raise S3Error(400, "AuthorizationHeaderMalformed", f"malformed credential scope {credential!r}")
        access_key, date, region = parts[0], parts[1], parts[2]
        cred = self._creds.get(access_key)
        if cred is None:
            raise S3Error(
                403, "InvalidAccessKeyId", "The AWS access key Id you provided does not exist in our records."
            )
        if region != self.region:
            raise S3Error(
                400,
                "AuthorizationHeaderMalformed",
                f"the region {region!r} is wrong; expecting {self.region!r}",
            )
        try:
            when = dt.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.UTC)
        except ValueError:
            raise access_denied(f"X-Amz-Date {amz_date!r} is not ISO 8601 basic format") from None
        if date != amz_date[:8]:
            raise S3Error(400, "AuthorizationHeaderMalformed", "credential date does not match X-Amz-Date")
        if abs((now - when).total_seconds()) > self.max_skew_s:
            raise S3Error(
                403,
                "RequestTimeTooSkewed",
                "The difference between the request time and the current time is too large.",
            )
        scope = "/".join(parts[1:])
        return cred, scope, signing_key(cred.secret_key, date, region)

    def _verify_header(
        self,
        method: str,
        raw_path: str,
        raw_query: str,
        headers: Callable[[str], Sequence[str]],
        auth: str,
        now: dt.datetime,
    ) -> Verified:
        m = _AUTH_RE.match(auth.strip())
        if not m:
            raise S3Error(400, "AuthorizationHeaderMalformed", "the Authorization header is not SigV4")
        credential, signed, signature = m.groups()
        amz_date = (headers("x-amz-date") or [""])[0]
        cred, scope, key = self._credential(credential, amz_date, now)
        signed_headers = signed.split(";")
        if "host" not in signed_headers or signed_headers != sorted(signed_headers):
            raise access_denied("SignedHeaders must be sorted and include host")
        payload = (headers("x-amz-content-sha256") or [""])[0]
        if not payload:
            raise invalid_content_sha()
        creq = canonical_request(method, raw_path, raw_query, headers, signed_headers, payload)
        sts = "\n".join([ALGORITHM, amz_date, scope, hashlib.sha256(creq.encode()).hexdigest()])
        v = Verified(cred, amz_date, scope, signature, key, payload)
        v._check(sts, signature)
        return v

    def _verify_presigned(
        self,
        method: str,
        raw_path: str,
        raw_query: str,
        headers: Callable[[str], Sequence[str]],
        query: Mapping[str, str],
        now: dt.datetime,
    ) -> Verified:
        if query.get("X-Amz-Algorithm") != ALGORITHM:
            raise access_denied("presigned URL must use AWS4-HMAC-SHA256")
        amz_date = query.get("X-Amz-Date", "")
        cred, scope, key = self._credential(query.get("X-Amz-Credential", ""), amz_date, now)
        try:
            expires = int(query.get("X-Amz-Expires", "0"))
        except ValueError:
            raise access_denied("X-Amz-Expires is not an integer") from None
        when = dt.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.UTC)
        if not 1 <= expires <= 604800 or (now - when).total_seconds() > expires:
            raise access_denied("Request has expired")
        signed_headers = query.get("X-Amz-SignedHeaders", "").split(";")
        payload = (headers("x-amz-content-sha256") or [UNSIGNED])[0]
        creq = canonical_request(
            method, raw_path, raw_query, headers, signed_headers, payload, drop_query="X-Amz-Signature"
        )
        sts = "\n".join([ALGORITHM, amz_date, scope, hashlib.sha256(creq.encode()).hexdigest()])
        v = Verified(cred, amz_date, scope, query["X-Amz-Signature"], key, payload)
        v._check(sts, query["X-Amz-Signature"])
        return v


def invalid_content_sha() -> S3Error:
    return S3Error(400, "InvalidArgument", "x-amz-content-sha256 must be sent with SigV4 requests")


def check_payload_hash(declared: str, body: bytes) -> None:
    """A hex x-amz-content-sha256 binds the body into the signature; verify it."""
    if declared == UNSIGNED or declared.startswith("STREAMING-"):
        return
    if not re.fullmatch(r"[0-9a-f]{64}", declared):
        raise invalid_content_sha()
    if not hmac.compare_digest(hashlib.sha256(body).hexdigest(), declared):
        raise S3Error(
            400,
            "XAmzContentSHA256Mismatch",
            "The provided 'x-amz-content-sha256' header does not match what was computed.",
        )
