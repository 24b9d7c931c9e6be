"""Who is calling: mTLS credentials, bearer tokens, and the tenant every request is scoped to.

The tenant is part of every block key (``BlockKey``), so it must come from something the caller
proved, never from a field or header the caller merely states: the verified client certificate
(its CN, or a SAN/CN mapped to a tenant) or a bearer token looked up in a table the operator
provisioned. Kubernetes mounts secrets as files, so certificates, keys and token tables are read
from paths (a token table may also come from an environment variable).

Token handling: only SHA-256 digests of tokens are kept in memory, a presented token is hashed and
compared against *every* digest with ``hmac.compare_digest`` (no early exit, so timing says nothing
about which entry or how many bytes matched), and no token or digest ever reaches a log line or an
error message. Design and threat model: docs/security.md.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import grpc

from kvbm_codec.api.errors import PermissionDeniedError, ServiceError, UnauthenticatedError
from kvbm_codec.frontends.grpc.wire import abort

log = logging.getLogger(__name__)

AUTHORIZATION = "authorization"
BEARER = "bearer "
MAX_TOKEN_BYTES = 4096
"""Longer "tokens" are refused before hashing: no legitimate bearer token is that long."""
TENANT_ENV = "KVBM_CODEC_AUTH_TOKENS"


# ---- TLS --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of one side of an mTLS connection (Kubernetes: a mounted ``kubernetes.io/tls``
    secret gives ``tls.crt``/``tls.key``, the CA bundle ``ca.crt``)."""

    cert: Path
    key: Path
    ca: Path

    @classmethod
    def from_dir(cls, directory: str | os.PathLike[str]) -> TlsFiles:
        d = Path(directory)
        return cls(d / "tls.crt", d / "tls.key", d / "ca.crt")

    def read(self) -> tuple[bytes, bytes, bytes]:
        out = []
        for what, path in (("certificate", self.cert), ("private key", self.key), ("CA bundle", self.ca)):
            try:
                data = Path(path).read_bytes()
            except OSError as e:
                raise ValueError(f"cannot read TLS {what} {path}: {e.strerror}") from None
            if b"-----BEGIN " not in data:
                raise ValueError(f"TLS {what} {path} is not PEM")
            out.append(data)
        return out[0], out[1], out[2]


def server_credentials(files: TlsFiles, *, require_client_cert: bool = True) -> grpc.ServerCredentials:
    """TLS server credentials that (by default) demand a client certificate signed by ``files.ca``.

    Without a client certificate the handshake itself fails, before any handler or token check runs.
    """
    cert, key, ca = files.read()
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=require_client_cert
    )


def channel_credentials(
    ca: str | os.PathLike[str],
    cert: str | os.PathLike[str] | None = None,
    key: str | os.PathLike[str] | None = None,
) -> grpc.ChannelCredentials:
    """Client side: trust ``ca`` for the server and present ``cert``/``key`` when given."""
    chain = Path(cert).read_bytes() if cert else None
    private = Path(key).read_bytes() if key else None
    return grpc.ssl_channel_credentials(Path(ca).read_bytes(), private, chain)


# ---- bearer tokens ----------------------------------------------------------------------------------


def _digest(token: str | bytes) -> bytes:
    raw = token.encode("utf-8") if isinstance(token, str) else token
    return hashlib.sha256(raw).digest()


def _check_tenant(tenant: str) -> str:
    if not tenant or len(tenant) > 128 or not tenant.isascii() or any(c in tenant for c in "/\\\0 \t"):
        raise ValueError(f"tenant {tenant!r} must be 1-128 printable ASCII characters without separators")
    return tenant


class TokenTable:
    """Bearer token -> tenant, holding only SHA-256 digests of the tokens.

    Text format (file or environment variable), one ``tenant:token`` per line, ``#`` comments and
    blank lines ignored; several tokens may map to one tenant (rotation), one token to one tenant.
    """

    def __init__(self, entries: Sequence[tuple[str, str]]) -> None:
        self._entries: list[tuple[bytes, str]] = []
        seen: set[bytes] = set()
        for tenant, token in entries:
            _check_tenant(tenant)
            if len(token) < 16:
                raise ValueError(f"a token of tenant {tenant!r} is shorter than 16 characters")
            d = _digest(token)
            if d in seen:
                raise ValueError(f"a token is listed twice (second time for tenant {tenant!r})")
            seen.add(d)
            self._entries.append((d, tenant))

    @classmethod
    def parse(cls, text: str, *, source: str = "token table") -> TokenTable:
        entries = []
        for n, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            tenant, sep, token = line.partition(":")
            if not sep or not token.strip():
                # The line may hold a secret: name the line, never echo it.
                raise ValueError(f"{source} line {n}: expected 'tenant:token'")
            entries.append((tenant.strip(), token.strip()))
        return cls(entries)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> TokenTable:
        return cls.parse(Path(path).read_text(encoding="utf-8"), source=str(path))

    @classmethod
    def from_env(cls, name: str = TENANT_ENV) -> TokenTable | None:
        text = os.environ.get(name)
        return None if text is None else cls.parse(text.replace(",", "\n"), source=f"${name}")

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def tenants(self) -> frozenset[str]:
        return frozenset(t for _, t in self._entries)

    def tenant_for(self, token: str | bytes) -> str | None:
        """The token's tenant, or None. Every entry is compared, matched or not."""
        presented = _digest(token)
        found: str | None = None
        for digest, tenant in self._entries:
            if hmac.compare_digest(presented, digest):
                found = tenant
        return found


class TokenLookup(Protocol):
    """What a policy needs of a token table: a ``TokenTable``, or ``reload.TokenFile`` that follows its
    file."""

    def tenant_for(self, token: str | bytes) -> str | None: ...

    def __len__(self) -> int: ...


# ---- identities and the tenant of a call ------------------------------------------------------------


@dataclass(frozen=True)
class PeerIdentity:
    """What the transport proved about the caller (empty when the channel is not mTLS)."""

    common_name: str | None = None
    sans: tuple[str, ...] = ()

    @property
    def verified(self) -> bool:
        return self.common_name is not None or bool(self.sans)

    @classmethod
    def from_auth_context(cls, auth_context: Mapping[str, Sequence[bytes]]) -> PeerIdentity:
        """gRPC fills ``x509_*`` properties only after it verified the chain against the CA."""
        if b"ssl" not in auth_context.get("transport_security_type", ()):
            return cls()
        cn = [v.decode("utf-8", "replace") for v in auth_context.get("x509_common_name", ())]
        sans = tuple(
            v.decode("utf-8", "replace") for v in auth_context.get("x509_subject_alternative_name", ())
        )
        return cls(cn[0] if cn else None, sans)


def bearer_token(metadata: Sequence[tuple[str, str | bytes]]) -> str | None:
    """The bearer token of ``authorization`` metadata; raises on anything but exactly one bearer."""
    values = [v for k, v in metadata if k.lower() == AUTHORIZATION]
    if not values:
        return None
    if len(values) > 1:
        raise UnauthenticatedError("more than one authorization header")
    value = values[0]
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if len(value) > MAX_TOKEN_BYTES + len(BEARER) or not value.lower().startswith(BEARER):
        raise UnauthenticatedError("authorization must be 'Bearer <token>'")
    token = value[len(BEARER) :].strip()
    if not token:
        raise UnauthenticatedError("authorization must be 'Bearer <token>'")
    return token


@dataclass
class AuthPolicy:
    """How a call's tenant is decided.

    * ``tokens`` set: every call needs a valid bearer token; its tenant is the call's tenant. If the
      channel is also mTLS and ``cert_tenants`` maps the certificate to a tenant, the two must agree
      (PERMISSION_DENIED otherwise), so a stolen token is useless from another tenant's workload.
    * no ``tokens``, mTLS: the tenant is ``cert_tenants[CN or SAN]`` when a mapping is given (a
      certificate it does not list is PERMISSION_DENIED), else the certificate's CN.
    * neither: refused, unless ``anonymous_tenant`` is set (development only; every caller shares
      that one tenant).
    """

    tokens: TokenLookup | None = None
    cert_tenants: Mapping[str, str] | None = None
    anonymous_tenant: str | None = None

    def __post_init__(self) -> None:
        for t in (self.cert_tenants or {}).values():
            _check_tenant(t)
        if self.anonymous_tenant is not None:
            _check_tenant(self.anonymous_tenant)

    def _cert_tenant(self, peer: PeerIdentity) -> str | None:
        if not peer.verified:
            return None
        if self.cert_tenants is None:
            if peer.common_name is None:
                raise PermissionDeniedError("client certificate has no common name to use as tenant")
            try:
                return _check_tenant(peer.common_name)
            except ValueError:
                raise PermissionDeniedError("client certificate common name is not a valid tenant") from None
        for ident in (peer.common_name, *peer.sans):
            if ident is not None and ident in self.cert_tenants:
                return self.cert_tenants[ident]
        raise PermissionDeniedError(f"client certificate {peer.common_name!r} is not mapped to a tenant")

    def tenant(self, metadata: Sequence[tuple[str, str | bytes]], peer: PeerIdentity) -> str:
        """The caller's tenant, or UnauthenticatedError / PermissionDeniedError. Transport-agnostic."""
        token = bearer_token(metadata)
        if self.tokens is not None:
            if token is None:
                raise UnauthenticatedError("a bearer token is required")
            tenant = self.tokens.tenant_for(token)
            if tenant is None:
                raise UnauthenticatedError("bearer token not recognised")
            cert_tenant = self._cert_tenant(peer) if self.cert_tenants is not None else None
            if cert_tenant is not None and cert_tenant != tenant:
                raise PermissionDeniedError("token and client certificate belong to different tenants")
            return tenant
        if token is not None:
            raise UnauthenticatedError("bearer tokens are not accepted by this server")
        cert_tenant = self._cert_tenant(peer)
        if cert_tenant is not None:
            return cert_tenant
        if self.anonymous_tenant is not None:
            return self.anonymous_tenant
        raise UnauthenticatedError("no client certificate and no token")


class Authenticator:
    """The gRPC ``authenticate(context) -> tenant`` hook of ``frontends.grpc.server.CodecServer``.

    Calling it returns the tenant or raises ``UnauthenticatedError`` / ``PermissionDeniedError``,
    which the server turns into UNAUTHENTICATED / PERMISSION_DENIED with the stable code in trailing
    metadata, like every other refusal. ``abort_or_tenant`` is the same for a bare gRPC servicer.
    Refusals are logged with the reason and the peer address, never the token or its digest.
    """

    def __init__(self, policy: AuthPolicy, *, on_refused: Callable[[str], None] | None = None) -> None:
        self.policy = policy
        self._on_refused = on_refused

    def __call__(self, context: Any) -> str:
        peer = PeerIdentity.from_auth_context(context.auth_context())
        try:
            tenant = self.policy.tenant(tuple(context.invocation_metadata() or ()), peer)
        except ServiceError as e:
            log.warning("auth refused %s: %s (peer %s)", e.code, e.message, context.peer())
            if self._on_refused is not None:
                self._on_refused(e.code)
            raise
        log.debug("authenticated peer %s as tenant %s", context.peer(), tenant)
        return tenant

    def abort_or_tenant(self, context: grpc.ServicerContext) -> str:
        try:
            return self(context)
        except ServiceError as e:
            abort(context, e)


def policy_from_settings(
    *,
    token_file: str | os.PathLike[str] | None = None,
    token_env: str | None = TENANT_ENV,
    cert_tenants: Mapping[str, str] | None = None,
    anonymous_tenant: str | None = None,
) -> AuthPolicy:
    """Build the policy from configuration values (paths of mounted secrets, env var name)."""
    tokens = TokenTable.from_file(token_file) if token_file else None
    if tokens is None and token_env:
        tokens = TokenTable.from_env(token_env)
    return AuthPolicy(tokens=tokens, cert_tenants=cert_tenants, anonymous_tenant=anonymous_tenant)


__all__ = [
    "AuthPolicy",
    "Authenticator",
    "PeerIdentity",
    "TlsFiles",
    "TokenLookup",
    "TokenTable",
    "bearer_token",
    "channel_credentials",
    "policy_from_settings",
    "server_credentials",
]
