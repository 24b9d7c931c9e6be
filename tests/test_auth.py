"""Authentication and tenant isolation over real gRPC with real (test-time generated) certificates.

The PKI: one CA, a server certificate for localhost/127.0.0.1, client certificates for two tenants,
and a rogue CA with a client certificate that claims tenant-a. Keys are P-256 (generation takes
milliseconds). A tiny gRPC service whose only method returns ``authenticate(context)`` checks the
hook itself; isolation of blocks is checked against the service's own gRPC server.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import ipaddress
import logging
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kvbm_codec.api.errors import PermissionDeniedError, UnauthenticatedError
from kvbm_codec.frontends.grpc.auth import (
    Authenticator,
    AuthPolicy,
    PeerIdentity,
    TlsFiles,
    TokenTable,
    bearer_token,
    channel_credentials,
    policy_from_settings,
    server_credentials,
)

TOKEN_A = "tok-A-7d1f0c9e4b2a48e1b0c3a5d6e7f80912"
TOKEN_B = "tok-B-0a9b8c7d6e5f40312a3b4c5d6e7f8091"
SECRETS = (
    TOKEN_A,
    TOKEN_B,
    hashlib.sha256(TOKEN_A.encode()).hexdigest(),
    hashlib.sha256(TOKEN_B.encode()).hexdigest(),
)


# ---- PKI ----------------------------------------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    server: bool = False,
    uri: str | None = None,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer[0].subject if issuer else _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        b = b.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    elif not ca:
        if uri:
            b = b.add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False
            )
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return b.sign(issuer[1] if issuer else key, hashes.SHA256())


def _write(
    d: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, ca: x509.Certificate
) -> TlsFiles:
    sub = d / name
    sub.mkdir()
    (sub / "tls.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (sub / "tls.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    (sub / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return TlsFiles.from_dir(sub)


@dataclass
class Pki:
    server: TlsFiles
    tenant_a: TlsFiles
    tenant_b: TlsFiles
    rogue_a: TlsFiles  # claims CN=tenant-a but is signed by another CA


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca_key, rogue_key = _key(), _key()
    ca = _cert("kvbm-codec test CA", ca_key, None, ca=True)
    rogue = _cert("rogue CA", rogue_key, None, ca=True)
    out = {}
    for name, issuer, root, kw in (
        ("server", (ca, ca_key), ca, {"server": True}),
        ("tenant-a", (ca, ca_key), ca, {"uri": "spiffe://test/ns/a/sa/engine"}),
        ("tenant-b", (ca, ca_key), ca, {}),
        ("rogue-a", (rogue, rogue_key), rogue, {}),
    ):
        key = _key()
        cn = "localhost" if name == "server" else name.replace("rogue-", "tenant-")
        out[name] = _write(d, name, _cert(cn, key, issuer, **kw), key, root)
    return Pki(out["server"], out["tenant-a"], out["tenant-b"], out["rogue-a"])


# ---- a tiny service whose one method answers with the authenticated tenant ------------------------------


CODE_KEY = "kvbm-error-code"
WHOAMI = "/kvbm_codec.test.Auth/WhoAmI"


@contextlib.contextmanager
def whoami_server(auth: Authenticator, creds: grpc.ServerCredentials | None) -> Iterator[str]:
    def whoami(request: bytes, context: grpc.ServicerContext) -> bytes:
        return auth.abort_or_tenant(context).encode()

    handler = grpc.method_handlers_generic_handler(
        "kvbm_codec.test.Auth", {"WhoAmI": grpc.unary_unary_rpc_method_handler(whoami)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=[handler])
    port = server.add_secure_port("127.0.0.1:0", creds) if creds else server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"localhost:{port}"
    finally:
        server.stop(grace=None).wait(5)


def _call(
    target: str, creds: grpc.ChannelCredentials | None, metadata: tuple = ()
) -> tuple[str | None, grpc.StatusCode, dict[str, str]]:
    """(tenant or None, status, trailing metadata) of one WhoAmI call; a short deadline bounds it."""
    channel = grpc.secure_channel(target, creds) if creds else grpc.insecure_channel(target)
    with channel:
        call = channel.unary_unary(WHOAMI)
        try:
            reply, rpc = call.with_call(b"", metadata=metadata, timeout=10)
        except grpc.RpcError as e:
            return None, e.code(), dict(e.trailing_metadata() or ())
        return reply.decode(), grpc.StatusCode.OK, dict(rpc.trailing_metadata() or ())


def _client(
    files: TlsFiles, *, trust: TlsFiles | None = None, with_cert: bool = True
) -> grpc.ChannelCredentials:
    return channel_credentials(
        (trust or files).ca, files.cert if with_cert else None, files.key if with_cert else None
    )


def _bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


@pytest.fixture
def tokens(tmp_path: Path) -> TokenTable:
    f = tmp_path / "tokens"
    f.write_text(f"# mounted from a Kubernetes secret\ntenant-a:{TOKEN_A}\n\ntenant-b: {TOKEN_B}\n")
    return TokenTable.from_file(f)


# ---- mTLS ---------------------------------------------------------------------------------------------


def test_mtls_tenant_from_client_certificate(pki: Pki) -> None:
    with whoami_server(Authenticator(AuthPolicy()), server_credentials(pki.server)) as target:
        assert _call(target, _client(pki.tenant_a, trust=pki.server))[:2] == ("tenant-a", grpc.StatusCode.OK)
        assert _call(target, _client(pki.tenant_b, trust=pki.server))[:2] == ("tenant-b", grpc.StatusCode.OK)
        # A header naming another tenant changes nothing: only the verified certificate counts.
        got = _call(target, _client(pki.tenant_a, trust=pki.server), (("x-tenant", "tenant-b"),))
        assert got[:2] == ("tenant-a", grpc.StatusCode.OK)


def test_mtls_refuses_missing_or_foreign_client_certificates(pki: Pki) -> None:
    with whoami_server(Authenticator(AuthPolicy()), server_credentials(pki.server)) as target:
        # No client certificate: the TLS handshake fails, no handler runs.
        assert _call(target, _client(pki.tenant_a, trust=pki.server, with_cert=False))[:2] == (
            None,
            grpc.StatusCode.UNAVAILABLE,
        )
        # A certificate claiming tenant-a from a CA the server does not trust.
        assert _call(target, _client(pki.rogue_a, trust=pki.server))[:2] == (
            None,
            grpc.StatusCode.UNAVAILABLE,
        )
        # The client refuses a server whose certificate its CA did not sign.
        assert _call(target, _client(pki.rogue_a))[:2] == (None, grpc.StatusCode.UNAVAILABLE)
        # And plaintext to the TLS port gets nowhere.
        assert _call(target, None)[0] is None


def test_cert_mapping_by_san(pki: Pki) -> None:
    policy = AuthPolicy(cert_tenants={"spiffe://test/ns/a/sa/engine": "team-alpha"})
    with whoami_server(Authenticator(policy), server_credentials(pki.server)) as target:
        assert _call(target, _client(pki.tenant_a, trust=pki.server))[:2] == (
            "team-alpha",
            grpc.StatusCode.OK,
        )
        tenant, code, trailers = _call(target, _client(pki.tenant_b, trust=pki.server))
        assert (tenant, code, trailers.get(CODE_KEY)) == (
            None,
            grpc.StatusCode.PERMISSION_DENIED,
            "permission_denied",
        )


# ---- tokens -------------------------------------------------------------------------------------------


def test_tokens_over_tls(pki: Pki, tokens: TokenTable) -> None:
    with whoami_server(Authenticator(AuthPolicy(tokens=tokens)), server_credentials(pki.server)) as target:
        creds = _client(pki.tenant_b, trust=pki.server)
        assert _call(target, creds, _bearer(TOKEN_A))[:2] == ("tenant-a", grpc.StatusCode.OK)
        assert _call(target, creds, _bearer(TOKEN_B))[:2] == ("tenant-b", grpc.StatusCode.OK)
        for md in (_bearer(TOKEN_A[:-1] + "x"), _bearer(TOKEN_A + "x"), (), (("authorization", TOKEN_A),)):
            tenant, code, trailers = _call(target, creds, md)
            assert (tenant, code, trailers.get(CODE_KEY)) == (
                None,
                grpc.StatusCode.UNAUTHENTICATED,
                "unauthenticated",
            )


def test_token_and_certificate_must_agree(pki: Pki, tokens: TokenTable) -> None:
    policy = AuthPolicy(tokens=tokens, cert_tenants={"tenant-a": "tenant-a", "tenant-b": "tenant-b"})
    with whoami_server(Authenticator(policy), server_credentials(pki.server)) as target:
        a_cert = _client(pki.tenant_a, trust=pki.server)
        assert _call(target, a_cert, _bearer(TOKEN_A))[:2] == ("tenant-a", grpc.StatusCode.OK)
        # tenant-b's token used from tenant-a's workload: a stolen token is no use elsewhere.
        assert _call(target, a_cert, _bearer(TOKEN_B))[1] == grpc.StatusCode.PERMISSION_DENIED


def test_no_credentials_is_refused_unless_anonymous_configured() -> None:
    with whoami_server(Authenticator(AuthPolicy()), None) as target:
        tenant, code, trailers = _call(target, None)
        assert (tenant, code, trailers.get(CODE_KEY)) == (
            None,
            grpc.StatusCode.UNAUTHENTICATED,
            "unauthenticated",
        )
    with whoami_server(Authenticator(AuthPolicy(anonymous_tenant="dev")), None) as target:
        assert _call(target, None)[:2] == ("dev", grpc.StatusCode.OK)
        assert _call(target, None, (("x-tenant", "tenant-a"),))[:2] == ("dev", grpc.StatusCode.OK)


def test_no_secret_reaches_the_logs(pki: Pki, tokens: TokenTable, caplog: pytest.LogCaptureFixture) -> None:
    refused: list[str] = []
    auth = Authenticator(AuthPolicy(tokens=tokens), on_refused=refused.append)
    with (
        caplog.at_level(logging.DEBUG, logger="kvbm_codec"),
        whoami_server(auth, server_credentials(pki.server)) as target,
    ):
        creds = _client(pki.tenant_a, trust=pki.server)
        assert _call(target, creds, _bearer(TOKEN_A))[0] == "tenant-a"
        assert _call(target, creds, _bearer(TOKEN_B + "0"))[1] == grpc.StatusCode.UNAUTHENTICATED
        assert (
            _call(target, creds, (("authorization", f"Basic {TOKEN_B}"),))[1]
            == grpc.StatusCode.UNAUTHENTICATED
        )
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "refused unauthenticated" in text and "as tenant tenant-a" in text  # the log is not empty
    for secret in SECRETS:
        assert secret not in text
        assert secret[:12] not in text
    assert refused == ["unauthenticated", "unauthenticated"]


# ---- pieces -------------------------------------------------------------------------------------------


def test_token_table_keeps_only_digests(tokens: TokenTable, monkeypatch: pytest.MonkeyPatch) -> None:
    assert len(tokens) == 2 and tokens.tenants == {"tenant-a", "tenant-b"}
    assert tokens.tenant_for(TOKEN_A) == "tenant-a" and tokens.tenant_for("nope" * 8) is None
    held = repr(vars(tokens))
    assert TOKEN_A not in held and TOKEN_B not in held
    monkeypatch.setenv("KVBM_CODEC_AUTH_TOKENS", f"tenant-a:{TOKEN_A},tenant-c:{TOKEN_B}")
    env = TokenTable.from_env()
    assert env is not None and env.tenant_for(TOKEN_B) == "tenant-c"
    assert policy_from_settings().tokens is not None
    monkeypatch.delenv("KVBM_CODEC_AUTH_TOKENS")
    assert policy_from_settings().tokens is None


@pytest.mark.parametrize(
    "text",
    [
        "tenant-a",
        f"tenant-a:{TOKEN_A}\ntenant-b:{TOKEN_A}",
        "tenant-a:short",
        f"a/b:{TOKEN_A}",
        f":{TOKEN_A}",
    ],
)
def test_token_table_rejects_bad_tables_without_echoing_secrets(text: str) -> None:
    with pytest.raises(ValueError) as info:
        TokenTable.parse(text)
    assert TOKEN_A not in str(info.value)


def test_bearer_parsing_and_peer_identity() -> None:
    assert bearer_token(()) is None
    assert bearer_token((("Authorization", "bearer abc"),)) == "abc"
    for md in ((("authorization", "Bearer "),), (("authorization", "x" * 5000),)):
        with pytest.raises(UnauthenticatedError):
            bearer_token(md)
    with pytest.raises(UnauthenticatedError, match="more than one"):
        bearer_token((("authorization", "Bearer a"), ("authorization", "Bearer b")))
    assert not PeerIdentity.from_auth_context({"x509_common_name": [b"tenant-a"]}).verified  # no TLS: ignored
    peer = PeerIdentity.from_auth_context(
        {"transport_security_type": [b"ssl"], "x509_common_name": [b"bad/cn"]}
    )
    with pytest.raises(PermissionDeniedError):
        AuthPolicy().tenant((), peer)
    with pytest.raises(UnauthenticatedError, match="not accepted"):
        AuthPolicy(anonymous_tenant="dev").tenant(
            (("authorization", "Bearer abcdefabcdefabcdef"),), PeerIdentity()
        )


def test_tls_files_errors(tmp_path: Path) -> None:
    (tmp_path / "tls.crt").write_text("not a pem")
    with pytest.raises(ValueError, match="not PEM"):
        TlsFiles.from_dir(tmp_path).read()
    with pytest.raises(ValueError, match="cannot read"):
        TlsFiles(tmp_path / "x", tmp_path / "y", tmp_path / "z").read()


# ---- the service itself: mTLS + tokens through CodecServer, isolation, metrics ---------------------------


@pytest.fixture(scope="module")
def one_block(smollm) -> bytes:  # type: ignore[no-untyped-def]
    import _smollm2

    from kvbm_codec.texts import calibration_texts

    return _smollm2.block_bytes(smollm, 1, text=calibration_texts()[5])[0]


def _service_config(pki: Pki, tmp_path: Path, **auth: object):  # type: ignore[no-untyped-def]
    from kvbm_codec.service.config import ServiceConfig

    tls = {
        "enabled": True,
        "cert_file": pki.server.cert,
        "key_file": pki.server.key,
        "client_ca_file": pki.server.ca,
        "require_client_cert": True,
    }
    return ServiceConfig.load(
        grpc_port=0, metrics_port=0, workers=2, nixl={"enabled": False}, tls=tls, auth=auth
    )


@pytest.mark.slow
def test_tenant_isolation_over_mtls(pki: Pki, small_calibration, one_block: bytes, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import urllib.request

    import _smollm2

    from kvbm_codec.api.types import PutItem
    from kvbm_codec.frontends.grpc.client import CodecClient, RpcFailedError
    from kvbm_codec.frontends.grpc.security import from_config
    from kvbm_codec.frontends.grpc.server import CodecServer
    from kvbm_codec.server.app import build_service

    cfg = _service_config(pki, tmp_path, mode="mtls")
    creds, authenticate = from_config(cfg)
    svc = build_service(cfg, models=[_smollm2.served(small_calibration)])
    server = CodecServer(svc, cfg, authenticate=authenticate, credentials=creds).start()
    target = f"localhost:{server.port}"
    hashes = [0xDEADBEEF12345678, 987654321]

    def client(files: TlsFiles, **kw: object) -> CodecClient:
        return CodecClient(
            target, root_cert=pki.server.ca, client_cert=files.cert, client_key=files.key, timeout_s=60, **kw
        )

    try:
        with client(pki.tenant_a) as a, client(pki.tenant_b, tenant="tenant-a") as b:
            a.put_blocks([PutItem(h, one_block) for h in hashes])
            # B knows the exact hashes and even claims tenant-a in the x-kvbm-tenant header.
            assert b.contains(hashes) == [False, False]
            assert [g.status for g in b.get_blocks(hashes)] == ["miss", "miss"]
            assert [g.status for g in b.get_blocks(hashes, as_frames=True)] == ["miss", "miss"]
            assert [e.stored for e in b.lookup(hashes)] == [False, False]
            assert b.delete(hashes) == 0
            b.put_blocks([PutItem(hashes[0], one_block, first_position=64)])  # lands in B's namespace
            got = a.get_blocks(hashes)
            assert [g.status for g in got] == ["hit", "hit"] and got[0].positions[0] == 0
            assert b.get_blocks(hashes[:1])[0].positions[0] == 64
        with CodecClient(target, root_cert=pki.server.ca, timeout_s=10, max_attempts=1) as anon:
            with pytest.raises(RpcFailedError) as info:  # no client certificate: the handshake fails
                anon.contains(hashes)
            assert info.value.status == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read()
        text = metrics.decode()
        assert "kvbm_codec_blocks_put_total" in text  # the scrape is real and saw the traffic
        for secret in ("tenant-a", "tenant-b", *(str(h) for h in hashes), *(f"{h:x}" for h in hashes)):
            assert secret not in text, secret
    finally:
        server.stop(1.0)


def test_from_config_refuses_unsafe_combinations(pki: Pki, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from kvbm_codec.frontends.grpc.security import from_config
    from kvbm_codec.service.config import ServiceConfig

    monkeypatch.delenv("KVBM_CODEC_AUTH_TOKENS", raising=False)
    creds, hook = from_config(_service_config(pki, tmp_path, mode="mtls"))
    assert creds is not None and isinstance(hook, Authenticator)
    assert from_config(ServiceConfig.load(grpc_port=0)) == (None, None)
    tokens = tmp_path / "tokens"
    tokens.write_text(f"tenant-a:{TOKEN_A}\n")
    plain = ServiceConfig.load(host="0.0.0.0", auth={"mode": "token", "tokens_file": tokens})
    with pytest.raises(ValueError, match="plaintext"):
        from_config(plain)
    loopback = ServiceConfig.load(host="127.0.0.1", auth={"mode": "token", "tokens_file": tokens})
    assert from_config(loopback)[1] is not None
    with pytest.raises(ValueError, match=r"needs auth\.tokens_file"):
        from_config(ServiceConfig.load(auth={"mode": "token"}))
    with pytest.raises(ValueError, match="require_client_cert"):
        from_config(ServiceConfig.load(auth={"mode": "mtls"}))
