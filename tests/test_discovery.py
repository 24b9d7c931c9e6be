"""Dynamo discovery with real DistributedRuntimes (file discovery store, TCP request plane on 127.0.0.1):
replicas register, a client finds and describes them, and a replica that leaves drops out."""

from __future__ import annotations

import os
import time
import uuid

import pytest

from kvbm_codec.cluster.discovery import (
    DynamoDiscovery,
    DynamoRegistration,
    DynamoSettings,
    advertised_target,
    register_server,
)


@pytest.fixture
def dynamo_env(tmp_path, monkeypatch) -> DynamoSettings:
    monkeypatch.setenv("DYN_FILE_KV", str(tmp_path / "dynamo-kv"))
    monkeypatch.setenv("DYN_TCP_RPC_HOST", "127.0.0.1")
    monkeypatch.setenv("DYN_TCP_RESPONSE_STREAM_HOST", "127.0.0.1")
    monkeypatch.setenv("DYN_DISCOVERY_BACKEND", "file")
    monkeypatch.setenv("DYN_REQUEST_PLANE", "tcp")
    return DynamoSettings(namespace=f"kvtest{uuid.uuid4().hex[:8]}", start_timeout_s=30, call_timeout_s=5)


def _wait(pred, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


def test_two_replicas_are_discovered_and_described(dynamo_env):
    settings = dynamo_env
    a = DynamoRegistration("127.0.0.1:50001", settings, ["smollm2-135m"]).start()
    b = DynamoRegistration("127.0.0.1:50002", settings).start()
    discovery = DynamoDiscovery(settings).start()
    try:
        found = discovery.wait_for(2, timeout_s=20)
        assert {m.grpc_target for m in found.values()} == {"127.0.0.1:50001", "127.0.0.1:50002"}
        by_target = {m.grpc_target: m for m in found.values()}
        assert by_target["127.0.0.1:50001"].instance_id == a.instance_id
        assert by_target["127.0.0.1:50002"].instance_id == b.instance_id
        assert by_target["127.0.0.1:50001"].models == ("smollm2-135m",)
        assert by_target["127.0.0.1:50001"].pid == os.getpid()
        assert sorted(discovery.instance_ids()) == sorted([a.instance_id, b.instance_id])

        # Another namespace sees neither (deployments are isolated).
        other = DynamoDiscovery(DynamoSettings(namespace=settings.namespace + "x")).start()
        try:
            assert other.members() == {}
        finally:
            other.close()

        a.close()
        assert _wait(lambda: set(discovery.members()) == {f"{b.instance_id:x}"})
    finally:
        discovery.close()
        b.close()
        a.close()


def test_wait_for_is_bounded_and_settings_are_checked(dynamo_env):
    discovery = DynamoDiscovery(dynamo_env).start()
    try:
        t0 = time.monotonic()
        with pytest.raises(Exception, match="0 of 1 replicas"):
            discovery.wait_for(1, timeout_s=0.5)
        assert time.monotonic() - t0 < 5
    finally:
        discovery.close()
    with pytest.raises(ValueError, match="namespace"):
        DynamoSettings(namespace="a.b")


def test_register_server_advertises_a_dialable_target(dynamo_env, monkeypatch):
    from kvbm_codec.service.config import ServiceConfig

    assert advertised_target("127.0.0.1", 5) == "127.0.0.1:5"
    monkeypatch.setenv("KVBM_CODEC_ADVERTISE_HOST", "10.1.2.3")
    assert advertised_target("0.0.0.0", 50151) == "10.1.2.3:50151"
    assert advertised_target("::", 1) == "10.1.2.3:1"
    monkeypatch.setenv("KVBM_CODEC_ADVERTISE_HOST", "fd00::7")
    assert advertised_target("0.0.0.0", 2) == "[fd00::7]:2"

    cfg = ServiceConfig(
        host="127.0.0.1",
        dynamo={
            "enabled": True,
            "namespace": dynamo_env.namespace,
            "component": "codec",
            "endpoint": "blocks",
        },
    )
    reg = register_server(cfg, 40404)
    discovery = DynamoDiscovery(DynamoSettings.from_config(cfg.dynamo)).start()
    try:
        (member,) = discovery.wait_for(1, timeout_s=20).values()
        assert member.grpc_target == "127.0.0.1:40404" and member.instance_id == reg.instance_id
    finally:
        discovery.close()
        reg.close()
