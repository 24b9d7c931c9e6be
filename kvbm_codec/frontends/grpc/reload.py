"""TLS material and token tables that follow their files: rotation without a restart.

A restart drops the memory tier (every block in it becomes a miss), so a cert-manager renewal or a token
rotation must not need one. Kubernetes updates a mounted Secret by swapping a symlink (``..data``) to a
new directory, so the paths stay the same and what they resolve to changes; both classes here compare a
cheap fingerprint of the files (device, inode, size, mtime of the resolved path) and re-read only when it
changed.

* TLS: ``grpc.dynamic_ssl_server_credentials`` asks ``TlsReloader.fetch`` for a configuration on every
  new handshake; it returns one only when the files changed (and a consistent cert/key pair was read),
  so new connections get the new certificate while established ones, and the requests on them, carry on.
  A half-written pair (certificate updated, key not yet) is skipped with a warning and the previous
  material stays in use until the next handshake finds a matching pair.
* Tokens: ``TokenFile`` re-parses the table at most once per ``min_interval_s`` when the file changed;
  a table that fails to parse is logged (line number only, never its text) and the previous one is kept,
  so a bad edit cannot lock every client out.
"""

from __future__ import annotations

import os
import ssl
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import grpc

from kvbm_codec.frontends.grpc.auth import TokenTable
from kvbm_codec.service.logging import fields, get_logger

log = get_logger(__name__)

Stamp = tuple[tuple[int, int, int, int], ...]


def _stamp(paths: Sequence[Path]) -> Stamp:
    out = []
    for p in paths:
        st = os.stat(p)  # follows the Secret volume's symlinks
        out.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


def _read_pem(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read TLS {what} {path}: {e.strerror}") from None
    if b"-----BEGIN " not in data:
        raise ValueError(f"TLS {what} {path} is not PEM")
    return data


class TlsReloader:
    """Server certificate, key and optional client CA, re-read when their files change."""

    def __init__(
        self, cert: Path, key: Path, client_ca: Path | None = None, *, require_client_cert: bool = False
    ) -> None:
        self.cert, self.key, self.client_ca = Path(cert), Path(key), client_ca and Path(client_ca)
        self.require_client_cert = require_client_cert
        self._lock = threading.Lock()
        self._stamp: Stamp | None = None
        self.loads = 0
        """How many configurations were handed to gRPC (the first one included)."""
        self._initial = self._load()  # raises on unreadable or mismatched files: fail at start

    @property
    def _paths(self) -> list[Path]:
        return [self.cert, self.key] + ([self.client_ca] if self.client_ca else [])

    def _load(self) -> grpc.ServerCertificateConfiguration:
        before = _stamp(self._paths)
        cert = _read_pem(self.cert, "certificate")
        key = _read_pem(self.key, "private key")
        ca = _read_pem(self.client_ca, "CA bundle") if self.client_ca else None
        try:  # the pair must match, or every handshake would fail until the next rotation
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(self.cert, self.key)
        except ssl.SSLError as e:
            raise ValueError(
                f"TLS key {self.key} does not match certificate {self.cert} ({e.reason})"
            ) from None
        if _stamp(self._paths) != before:  # changed while we read: not one consistent snapshot
            raise ValueError("TLS files changed while being read")
        self._stamp = before
        self.loads += 1
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's per-handshake callback: a new configuration when the files changed, else None."""
        with self._lock:
            try:
                if _stamp(self._paths) == self._stamp:
                    return None
                cfg = self._load()
            except (OSError, ValueError) as e:
                log.warning("TLS reload skipped; keeping the old certificate", extra=fields(error=str(e)))
                return None
        log.info("TLS certificate reloaded", extra=fields(cert=str(self.cert), loads=self.loads))
        return cfg

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._initial, self.fetch, require_client_authentication=self.require_client_cert
        )


class TokenFile:
    """A ``TokenTable`` backed by a file, re-read when the file changes (the AuthPolicy interface)."""

    def __init__(self, path: str | os.PathLike[str], *, min_interval_s: float = 1.0) -> None:
        self.path = Path(path)
        self.min_interval_s = min_interval_s
        self._lock = threading.Lock()
        self._stamp = _stamp([self.path])
        self._table = TokenTable.from_file(self.path)  # raises at start: a broken table is fatal then
        self._checked = time.monotonic()
        self.loads = 1

    def _current(self) -> TokenTable:
        now = time.monotonic()
        if now - self._checked < self.min_interval_s:
            return self._table
        with self._lock:
            if now - self._checked < self.min_interval_s:
                return self._table
            self._checked = now
            try:
                stamp = _stamp([self.path])
                if stamp != self._stamp:
                    table = TokenTable.from_file(self.path)
                    self._table, self._stamp = table, stamp
                    self.loads += 1
                    log.info(
                        "token table reloaded",
                        extra=fields(path=str(self.path), tokens=len(table), tenants=len(table.tenants)),
                    )
            except (OSError, ValueError, UnicodeDecodeError) as e:
                # ValueError messages of TokenTable name a line, never a token
                log.error("token table reload failed; keeping the previous table", extra=fields(error=str(e)))
        return self._table

    def tenant_for(self, token: str | bytes) -> str | None:
        return self._current().tenant_for(token)

    def __len__(self) -> int:
        return len(self._current())

    @property
    def tenants(self) -> frozenset[str]:
        return self._current().tenants


__all__ = ["TlsReloader", "TokenFile"]
