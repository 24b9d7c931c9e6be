"""The gRPC server's security from its configuration: TLS credentials and the authenticate hook.

Kept apart from ``auth`` (what a policy is) and ``reload`` (files followed on change) because it
wires the two together: ``reload`` builds on ``auth``'s token table, and this module on both, so
neither of them needs the other's module at import time.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import grpc

from kvbm_codec.frontends.grpc.auth import TENANT_ENV, Authenticator, AuthPolicy, TokenLookup, TokenTable
from kvbm_codec.frontends.grpc.reload import TlsReloader, TokenFile


def _is_loopback(host: str) -> bool:
    """Exactly a loopback address (or ``localhost``): ``127.example.com`` is a DNS name, not loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def from_config(cfg: Any) -> tuple[grpc.ServerCredentials | None, Authenticator | None]:
    """(server credentials, authenticate hook) for a ``ServiceConfig``; None means the server default.

    Refuses combinations that would leak or fake identity: bearer tokens in plaintext off loopback,
    and mode ``mtls`` without client certificates being required.
    """
    tls, auth = cfg.tls, cfg.auth
    creds = None
    if tls.enabled:
        if tls.cert_file is None or tls.key_file is None:
            raise ValueError("tls.enabled needs tls.cert_file and tls.key_file")
        ca = tls.client_ca_file
        if tls.require_client_cert and ca is None:
            raise ValueError("tls.require_client_cert needs tls.client_ca_file")
        creds = TlsReloader(
            tls.cert_file, tls.key_file, ca, require_client_cert=tls.require_client_cert
        ).credentials()
    if auth.mode == "none":
        return creds, None
    if auth.mode == "mtls":
        if not (tls.enabled and tls.require_client_cert):
            raise ValueError("auth.mode mtls needs tls.enabled and tls.require_client_cert")
        return creds, Authenticator(AuthPolicy(cert_tenants=auth.cert_tenants))
    if not tls.enabled and not _is_loopback(cfg.host):
        raise ValueError(f"auth.mode token sends bearer tokens in plaintext on {cfg.host}: enable tls")
    tokens: TokenLookup | None = TokenFile(auth.tokens_file) if auth.tokens_file else TokenTable.from_env()
    if tokens is None or not len(tokens):
        raise ValueError(f"auth.mode token needs auth.tokens_file or ${TENANT_ENV} with at least one token")
    # bind_token_to_cert: with mTLS, the token's tenant must be the one the certificate maps to
    bound = auth.cert_tenants if auth.bind_token_to_cert else None
    if auth.bind_token_to_cert and not (tls.enabled and tls.require_client_cert and auth.cert_tenants):
        raise ValueError("auth.bind_token_to_cert needs tls.require_client_cert and auth.cert_tenants")
    return creds, Authenticator(AuthPolicy(tokens=tokens, cert_tenants=bound))


__all__ = ["from_config"]
