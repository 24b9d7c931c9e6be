"""Running in production, over real gRPC on 127.0.0.1 with TLS and bearer tokens: secrets rotate under a
running server, probes see a wedged server through TLS, readiness flips before and during the drain.

One ``CodecServer`` serves the whole module (TLS from certificates generated here, token auth from a
file, the HTTP probe port, a 1 s stuck threshold). It serves no model: Stats needs none, and Stats goes
through the same authentication, admission control and handler pool as every block RPC. To hold a
request in flight on purpose, the store's ``stats`` is gated by an event (``Gate``): the handler thread
really blocks inside the serving path, exactly as a hung disk or a deadlock would hold it. The tests
run in file order; the last one drains and stops the server.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvbm_codec._proto import kvbm_codec_pb2 as pb
from kvbm_codec._proto import kvbm_codec_pb2_grpc as pb_grpc
from kvbm_codec.api.errors import ServiceError
from kvbm_codec.frontends.grpc.client import CodecClient
from kvbm_codec.frontends.grpc.security import from_config
from kvbm_codec.frontends.grpc.server import CodecServer
from kvbm_codec.server.app import build_service
from kvbm_codec.service import probes
from kvbm_codec.service.config import ServiceConfig

OLD_TOKEN = "old-token-5b1e9a7c3d2f4e6a8b0c"
NEW_TOKEN = "new-token-9f8e7d6c5b4a39281706"
STABLE_TOKEN = "stable-token-3c4d5e6f708192a3b4"  # tenant-b keeps it through the rotation


# ---- PKI -------------------------------------------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca(cn: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _server_cert(ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca[0].subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca[1], hashes.SHA256())
    )
    pem_key = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), pem_key


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _swap(directory: Path, files: dict[str, bytes]) -> None:
    """Replace files the way the kubelet updates a Secret volume: new files, then an atomic rename."""
    for name, data in files.items():
        tmp = directory / f".{name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, directory / name)


# ---- the module's server -------------------------------------------------------------------------------


class Gate:
    """Holds the next ``stats`` call after ``arm()`` until ``open()``: a handler stuck in the serving path."""

    def __init__(self, inner: Callable[[], Any]) -> None:
        self._inner = inner
        self.armed = False
        self._lock = threading.Lock()
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self) -> Any:
        with self._lock:  # only the first call after arm() is held; later ones pass
            hold, self.armed = self.armed, False
        if hold:
            self.entered.set()
            assert self.release.wait(30), "gate never released"
        return self._inner()

    def arm(self) -> None:
        self.entered.clear()
        self.release.clear()
        self.armed = True

    def open(self) -> None:
        self.armed = False
        self.release.set()


@dataclass
class Running:
    server: CodecServer
    tls_dir: Path
    tokens: Path
    ca_old: bytes
    ca_new: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]
    gate: Gate
    pool: ThreadPoolExecutor

    @property
    def target(self) -> str:
        return f"localhost:{self.server.port}"

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.probes.port}{path}"

    def client(self, token: str, ca: bytes, **kw: Any) -> CodecClient:
        return CodecClient(
            self.target, model="", token=token, root_cert=ca, timeout_s=20, max_attempts=1, **kw
        )


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    d = tmp_path_factory.mktemp("ops")
    tls_dir = d / "tls"
    tls_dir.mkdir()
    ca_old, ca_new = _ca("ca before rotation"), _ca("ca after rotation")
    cert, key = _server_cert(ca_old)
    _swap(tls_dir, {"tls.crt": cert, "tls.key": key})
    tokens = d / "tokens"
    _swap(d, {"tokens": f"tenant-a:{OLD_TOKEN}\ntenant-b:{STABLE_TOKEN}\n".encode()})
    cfg = ServiceConfig.load(
        grpc_port=0,
        metrics_port=None,
        workers=2,
        max_inflight_requests=4,
        request_timeout_s=0.5,  # the default deadline (clients here set their own); below stuck_after_s
        drain_timeout_s=20,
        nixl={"enabled": False},
        tls={"enabled": True, "cert_file": tls_dir / "tls.crt", "key_file": tls_dir / "tls.key"},
        auth={"mode": "token", "tokens_file": tokens},
        probes={"port": 0, "stuck_after_s": 1.0, "check_timeout_s": 2.0},
    )
    creds, authenticate = from_config(cfg)
    svc = build_service(cfg, models=[])
    gate = Gate(svc.store.stats)
    svc.store.stats = gate  # type: ignore[method-assign]
    server = CodecServer(svc, cfg, authenticate=authenticate, credentials=creds).start()
    pool = ThreadPoolExecutor(4)
    try:
        yield Running(server, tls_dir, tokens, _pem(ca_old[0]), ca_new, gate, pool)
    finally:
        gate.open()
        server.stop(1.0)
        pool.shutdown(wait=True)


def _http(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _until(pred: Callable[[], bool], timeout_s: float = 15.0) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.1)
    return pred()


def _held_call(r: Running, client: CodecClient) -> Future[Any]:
    """A Stats call that is in flight (blocked inside the handler) when this returns."""
    r.gate.arm()
    fut = r.pool.submit(client.stats)
    assert r.gate.entered.wait(10), "the call never reached the handler"
    return fut


def _new_connections(r: Running, stop: threading.Event) -> tuple[int, list[str]]:
    """Stats on a fresh connection (a fresh TLS handshake) per call until ``stop``: (calls, failures)."""
    both = r.ca_old + _pem(r.ca_new[0])
    calls, failures = 0, []
    while not stop.is_set() and calls < 200:
        try:
            with r.client(STABLE_TOKEN, both) as c:
                c.stats()
        except ServiceError as e:
            failures.append(f"{e.code}: {e.message}")
        calls += 1
    return calls, failures


def _peer_cert(port: int, ca: bytes) -> bytes:
    """DER of the certificate a brand-new TLS connection is served."""
    ctx = ssl.create_default_context(cadata=ca.decode())
    ctx.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as s,
    ):
        der = s.getpeercert(binary_form=True)
    assert der is not None
    return der


# ---- rotation ------------------------------------------------------------------------------------------


def test_certificate_and_token_rotate_without_restart(running: Running) -> None:
    r = running
    server_before = r.server
    old = r.client(OLD_TOKEN, r.ca_old)
    try:
        assert old.stats().version  # the old certificate and token work
        held = _held_call(r, old)  # in flight on the old connection, authenticated with the old token

        # rotate: a certificate from a new CA (the hardest case: old clients cannot verify it) and a new token
        cert, key = _server_cert(r.ca_new)
        stop_load = threading.Event()
        load = r.pool.submit(_new_connections, r, stop_load)  # a client trusting both CAs, reconnecting
        time.sleep(0.5)
        _swap(r.tls_dir, {"tls.crt": cert, "tls.key": key})
        _swap(r.tokens.parent, {"tokens": f"tenant-a:{NEW_TOKEN}\ntenant-b:{STABLE_TOKEN}\n".encode()})
        time.sleep(1.2)  # TokenFile re-checks the file at most once a second
        stop_load.set()
        calls, failures = load.result(timeout=30)
        assert calls >= 4 and failures == [], failures  # no call failed across the rotation

        # new connections get the new certificate ...
        new_ca = _pem(r.ca_new[0])
        assert _peer_cert(r.server.port, new_ca) == x509.load_pem_x509_certificate(cert).public_bytes(
            serialization.Encoding.DER
        )
        with r.client(NEW_TOKEN, new_ca) as fresh:
            assert fresh.stats().version
        # trusting only the old CA fails the handshake
        with r.client(NEW_TOKEN, r.ca_old) as stale_trust, pytest.raises(ServiceError):
            stale_trust.stats()
        # ... and the new token table: the removed token is refused on any new call
        with r.client(OLD_TOKEN, new_ca) as revoked:
            with pytest.raises(ServiceError) as info:
                revoked.stats()
            assert info.value.code == "unauthenticated"

        # the request in flight since before the rotation finishes normally
        r.gate.open()
        assert held.result(timeout=20).version
    finally:
        r.gate.open()
        old.close()
    assert r.server is server_before and not r.server.wait(0)  # the same server, still serving
    assert _http(r.url("/readyz"))[0] == 200


def test_a_broken_rotation_keeps_the_previous_material(running: Running) -> None:
    """A key that does not match the certificate, or an unparsable token table, is not taken up."""
    r = running
    new_ca = _pem(r.ca_new[0])
    good_cert = (r.tls_dir / "tls.crt").read_bytes()
    good_key = (r.tls_dir / "tls.key").read_bytes()
    good_tokens = r.tokens.read_bytes()
    _, other_key = _server_cert(r.ca_new)
    try:
        _swap(r.tls_dir, {"tls.key": other_key})  # certificate and key no longer match
        _swap(r.tokens.parent, {"tokens": b"this line has no colon\n"})
        time.sleep(1.2)
        with r.client(NEW_TOKEN, new_ca) as c:
            assert c.stats().version  # old pair still served, old table still in force
    finally:
        _swap(r.tls_dir, {"tls.crt": good_cert, "tls.key": good_key})
        _swap(r.tokens.parent, {"tokens": good_tokens})


# ---- probes --------------------------------------------------------------------------------------------


def test_loopback_probe_port_serves_health_only(running: Running) -> None:
    r = running
    with grpc.insecure_channel(f"127.0.0.1:{r.server.loopback_port}") as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.KvbmCodecStub(ch).Stats(
                pb.StatsRequest(), metadata=(("authorization", f"Bearer {NEW_TOKEN}"),), timeout=10
            )
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_wedged_handler_fails_liveness_with_tls_on(running: Running) -> None:
    r = running
    assert _http(r.url("/livez"))[0] == 200
    with r.client(NEW_TOKEN, _pem(r.ca_new[0])) as c:
        held = _held_call(r, c)
        try:
            assert _until(lambda: _http(r.url("/livez"))[0] == 503), "liveness never saw the stuck handler"
            body = _http(r.url("/livez"))[1]
            assert "stuck" in body, body
        finally:
            r.gate.open()
        assert held.result(timeout=20).version
    assert _until(lambda: _http(r.url("/livez"))[0] == 200), "liveness did not recover"
    assert _http(r.url("/nope"))[0] == 404


def test_prestop_then_drain_flip_readiness(running: Running) -> None:
    """Last in the module: it stops the server."""
    r = running
    new_ca = _pem(r.ca_new[0])
    assert probes.main(["check", r.url("/readyz"), "--attempts", "1"]) == 0
    assert probes.main(["prestop", "--port", str(r.server.probes.port), "--delay", "0"]) == 0
    code, body = _http(r.url("/readyz"))
    assert code == 503 and "NOT_SERVING" in body
    assert probes.main(["check", r.url("/readyz"), "--attempts", "1"]) == 1
    assert _http(r.url("/livez"))[0] == 200  # not ready, but alive: no restart
    with r.client(NEW_TOKEN, new_ca) as c:
        assert c.stats().version  # after preStop, requests that still arrive are served
        held = _held_call(r, c)
        stopping = r.pool.submit(r.server.stop)
        try:
            with r.client(NEW_TOKEN, new_ca) as late:  # admission is closed during the drain
                assert _until(lambda: _refused_as_draining(late))
            assert _http(r.url("/readyz"))[0] == 503
        finally:
            r.gate.open()
        assert held.result(timeout=20).version  # the in-flight request finished inside the drain
    assert stopping.result(timeout=30) is True  # drained: every request finished


def _refused_as_draining(c: CodecClient) -> bool:
    try:
        c.stats()
    except ServiceError as e:
        return e.code == "shutting_down"
    return False


def test_stuck_threshold_must_exceed_the_request_deadline() -> None:
    """A request inside its deadline is not stuck: a liveness threshold below it is refused."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=r"probes.stuck_after_s \(20\) must exceed request_timeout_s"):
        ServiceConfig.load(request_timeout_s=30, probes={"port": 0, "stuck_after_s": 20})
    assert ServiceConfig.load(request_timeout_s=30, probes={"stuck_after_s": 20}).probes.port is None
