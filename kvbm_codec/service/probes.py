"""Health probes that see what a client sees, TLS or not: /livez, /readyz and /prestop over plain HTTP.

The kubelet cannot speak TLS to a gRPC probe, and a TCP probe only proves the socket accepts, not that a
request would be served. So the service listens on a small plaintext HTTP port (``probes.port``) whose
handlers call the service's *own* gRPC server through a loopback-only plaintext port (127.0.0.1,
ephemeral, bound by ``CodecServer``). That port serves health checks only when TLS is on: every block
RPC arriving on it is refused (``plaintext_guard``), so it opens no way around TLS or auth.

* ``/readyz``: 200 when gRPC health says SERVING (models loaded, not draining); 503 otherwise. The
  startup and readiness probes use it, so readiness flips as soon as a drain (or /prestop) begins.
* ``/livez``: 200 when (a) a gRPC health call through the server's handler pool answers within
  ``probes.check_timeout_s`` (any status: a draining server is alive) and (b) the serving path makes
  progress: if requests are in flight and none has finished for ``probes.stuck_after_s``, the handlers
  are wedged (a deadlock, a hung disk or NIXL peer) and only a restart helps.
* ``/prestop``: marks the server NOT_SERVING without closing admission, so endpoints and clients move
  away while in-flight and late requests still succeed; the preStop hook then waits, and SIGTERM drains.

``python -m kvbm_codec.service.probes prestop|check`` is what the chart's preStop hook and ``helm test``
run: it needs only the standard library (no grpc, no torch), so it starts fast in the pod.
"""

from __future__ import annotations

import argparse
import http.server
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any


class Progress:
    """Has a request finished recently whenever some are in flight? Read from the service's metrics."""

    def __init__(self, inflight: Callable[[], float], finished: Callable[[], float], stuck_after_s: float):
        self._inflight, self._finished = inflight, finished
        self.stuck_after_s = stuck_after_s
        self._lock = threading.Lock()
        self._last_count = finished()
        self._last_change = time.monotonic()

    def stuck_for(self) -> float:
        """Seconds without a finished request while some were in flight (0 when idle or progressing)."""
        now = time.monotonic()
        with self._lock:
            count = self._finished()
            if count != self._last_count or self._inflight() <= 0:
                self._last_count, self._last_change = count, now
                return 0.0
            return now - self._last_change

    @classmethod
    def of_metrics(cls, metrics: Any, stuck_after_s: float) -> Progress:
        def total(metric: Any) -> float:
            return sum(s.value for fam in metric.collect() for s in fam.samples if s.name.endswith("_total"))

        def inflight() -> float:
            return sum(s.value for fam in metrics.inflight.collect() for s in fam.samples)

        return cls(inflight, lambda: total(metrics.requests), stuck_after_s)


def plaintext_guard(authenticate: Callable[[Any], str]) -> Callable[[Any], str]:
    """Refuse block RPCs that arrive without TLS (the loopback probe port) when TLS is on."""
    from kvbm_codec.api.errors import PermissionDeniedError

    def guarded(context: Any) -> str:
        if b"ssl" not in context.auth_context().get("transport_security_type", ()):
            raise PermissionDeniedError("the plaintext loopback port serves health checks only; use TLS")
        return authenticate(context)

    return guarded


class ProbeServer:
    """The HTTP side: a threading HTTP server whose handlers ask the gRPC server over loopback."""

    def __init__(
        self,
        host: str,
        port: int,
        grpc_target: str,
        *,
        progress: Progress,
        check_timeout_s: float,
        set_not_serving: Callable[[], None],
    ) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        self._health_pb2 = health_pb2
        self._channel = grpc.insecure_channel(grpc_target)
        self._stub = health_pb2_grpc.HealthStub(self._channel)
        self.progress = progress
        self.check_timeout_s = check_timeout_s
        self._set_not_serving = set_not_serving
        probe = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                route = {"/livez": probe.live, "/readyz": probe.ready, "/prestop": probe.prestop}.get(path)
                code, body = route() if route else (404, "unknown path; use /livez, /readyz or /prestop")
                data = (body + "\n").encode()
                self.send_response(code)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:  # probes every few seconds: no noise
                pass

        self.httpd = http.server.ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, name="kvbm-codec-probes", daemon=True
        )

    def start(self) -> ProbeServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._channel.close()

    def _status(self) -> tuple[str | None, str]:
        """(SERVING / NOT_SERVING / OVERLOADED, "") or (None, why the server did not answer)."""
        import grpc

        try:
            resp = self._stub.Check(
                self._health_pb2.HealthCheckRequest(service=""), timeout=self.check_timeout_s
            )
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                # gRPC's own concurrency cap refused it: the server answers, it is busy, not dead.
                # Restarting it would drop its memory tier and shift the load onto the other shards.
                return "OVERLOADED", ""
            return None, f"gRPC health call through the server failed: {e.code().name}"
        return self._health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status), ""

    def live(self) -> tuple[int, str]:
        status, err = self._status()
        if status is None:
            return 503, err
        stuck = self.progress.stuck_for()
        if stuck > self.progress.stuck_after_s:
            return 503, f"requests in flight and none finished for {stuck:.0f}s: handlers are stuck"
        return 200, f"alive ({status})"

    def ready(self) -> tuple[int, str]:
        status, err = self._status()
        if status != "SERVING":
            return 503, err or f"not ready: {status}"
        return 200, "SERVING"

    def prestop(self) -> tuple[int, str]:
        self._set_not_serving()
        return 200, "NOT_SERVING: readiness fails from now on; SIGTERM will drain"


# ---- the pod-side command (preStop hook, helm test): standard library only -------------------------


def _get(url: str, timeout_s: float) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return r.status, r.read().decode(errors="replace").strip()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace").strip()
    except OSError as e:
        return 0, str(e)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m kvbm_codec.service.probes", description=__doc__.split("\n")[0]
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    pre = sub.add_parser("prestop", help="flip readiness to NOT_SERVING, then wait --delay seconds")
    pre.add_argument("--port", type=int, required=True)
    pre.add_argument("--delay", type=float, default=5.0)
    chk = sub.add_parser("check", help="GET each URL; exit 0 only if every one answers 200")
    chk.add_argument("urls", nargs="+")
    chk.add_argument("--timeout", type=float, default=5.0)
    chk.add_argument("--attempts", type=int, default=12, help="tries per URL, 5 s apart")
    a = ap.parse_args(argv)
    if a.cmd == "prestop":
        code, body = _get(f"http://127.0.0.1:{a.port}/prestop", 5.0)
        print(f"prestop: {code} {body}", file=sys.stderr)
        time.sleep(max(0.0, a.delay))
        return 0  # a failed flip must not block termination: SIGTERM still drains
    failed = 0
    for url in a.urls:
        for attempt in range(a.attempts):
            code, body = _get(url, a.timeout)
            if code == 200:
                break
            if attempt + 1 < a.attempts:
                time.sleep(5)
        print(f"{url}: {code} {body}")
        failed += code != 200
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
