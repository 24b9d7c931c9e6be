"""The Prometheus /metrics endpoint, optionally behind a bearer token.

Why not prometheus_client's ``start_http_server`` alone: it serves every path to anyone who can
connect, and the service's metrics say how busy each model and tier is, what is refused and why.
With a token configured, a scrape must send ``Authorization: Bearer <token>`` (what a
prometheus-operator ServiceMonitor/PodMonitor sends from a Secret); anything else gets 401 and is
counted as an auth failure (frontend ``metrics``). The token is read from a file (a mounted Secret)
at start, never from the command line or the environment.
"""

from __future__ import annotations

import hmac
import socket
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import CollectorRegistry

MAX_TOKEN_BYTES = 4096


class MetricsTokenError(ValueError):
    """The configured token file cannot serve as a token (missing, empty, too long)."""


def read_token(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise MetricsTokenError(f"metrics token file {path}: {e.strerror}") from e
    token = raw.decode("ascii", "replace").strip()
    if not token or len(raw) > MAX_TOKEN_BYTES or any(c.isspace() or c == "\ufffd" for c in token):
        raise MetricsTokenError(
            f"metrics token file {path} must hold one ASCII token without spaces (at most "
            f"{MAX_TOKEN_BYTES} bytes)"
        )
    return token


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # scrapes are not news
        return


def _guarded(app: Callable[..., Iterable[bytes]], token: str, on_refused: Callable[[], None]) -> Any:
    want = f"Bearer {token}".encode()

    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        got = environ.get("HTTP_AUTHORIZATION", "").encode("latin-1", "replace")
        if not hmac.compare_digest(got, want):
            on_refused()
            start_response(
                "401 Unauthorized",
                [("Content-Type", "text/plain"), ("WWW-Authenticate", 'Bearer realm="metrics"')],
            )
            return [b"a bearer token is required for /metrics\n"]
        return app(environ, start_response)

    return guarded


def start_metrics_server(
    host: str,
    port: int,
    registry: CollectorRegistry,
    *,
    token: str | None = None,
    on_refused: Callable[[], None] = lambda: None,
) -> ThreadingWSGIServer:
    """Serve ``registry`` on ``host:port`` (0: a free port) in a daemon thread; with ``token``, only
    to scrapes that present it. Stop with ``shutdown()`` and ``server_close()``."""
    app: Any = make_wsgi_app(registry)
    if token is not None:
        app = _guarded(app, token, on_refused)

    class Server(ThreadingWSGIServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    httpd = make_server(host, port, app, Server, handler_class=_QuietHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True, name="metrics-http").start()
    return httpd
