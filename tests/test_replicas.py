"""End to end: two `kvbm-codec serve` replicas register with Dynamo (file discovery, TCP on 127.0.0.1),
a ShardedClient found through Dynamo spreads a real conversation's KVBM blocks over both, one replica is
SIGKILLed, and the client keeps working: the dead replica's blocks are misses, the survivor's still hit,
new blocks go to the survivor."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from _smollm2 import MODEL, SPEC

from kvbm_codec.adapters.kvbm import (
    KvbmBlocks,
    KvbmLayout,
    KvbmTierClient,
    kv_to_kvbm,
)
from kvbm_codec.calibration.registry import Registry
from kvbm_codec.cluster.discovery import DynamoDiscovery, DynamoSettings
from kvbm_codec.cluster.sharding import ShardedClient
from kvbm_codec.frontends.grpc.client import CodecClient
from kvbm_codec.texts import demo_conversation

START_TIMEOUT_S = 180  # two service processes importing torch on a busy 2-core box


@pytest.fixture
def replica_env(tmp_path, small_calibration, monkeypatch):
    """A calibration registry and a service config shared by the replicas, plus Dynamo's environment."""
    registry = tmp_path / "registry"
    Registry.from_url(registry).publish(small_calibration, promote=True)
    namespace = f"kvtest{uuid.uuid4().hex[:8]}"
    config = tmp_path / "service.toml"
    config.write_text(
        f"""
host = "127.0.0.1"
grpc_port = 0
metrics_port = 0
workers = 4
drain_timeout_s = 2.0

[[models]]
name = "{MODEL}"
fingerprint = "{small_calibration.model_fingerprint}"
registry = "{registry}"

[nixl]
enabled = false

[dynamo]
enabled = true
namespace = "{namespace}"
component = "kvbm-codec"
endpoint = "blocks"

[logging]
format = "text"
level = "WARNING"
"""
    )
    env = {
        "DYN_DISCOVERY_BACKEND": "file",
        "DYN_REQUEST_PLANE": "tcp",
        "DYN_FILE_KV": str(tmp_path / "dynamo-kv"),
        "DYN_TCP_RPC_HOST": "127.0.0.1",
        "DYN_TCP_RESPONSE_STREAM_HOST": "127.0.0.1",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return config, DynamoSettings(namespace=namespace, component="kvbm-codec", endpoint="blocks")


def _serve(config: Path, log: Path) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("kvbm-codec")
    with open(log, "wb") as out:
        return subprocess.Popen(
            [str(exe), "serve", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
            start_new_session=True,
        )


def test_two_replicas_one_killed(replica_env, smollm, tmp_path):
    config, settings = replica_env
    procs = [_serve(config, tmp_path / f"replica{i}.log") for i in range(2)]
    discovery = None
    sharded = None
    try:
        discovery = DynamoDiscovery(settings).start()
        try:
            members = discovery.wait_for(2, timeout_s=START_TIMEOUT_S, poll_s=0.5)
        except Exception:
            logs = "\n".join((tmp_path / f"replica{i}.log").read_text()[-2000:] for i in range(2))
            pytest.fail(f"replicas not discovered; logs:\n{logs}")
        assert len({m.grpc_target for m in members.values()}) == 2

        def connect(_key, member):
            return CodecClient(
                member.grpc_target, model=MODEL, tenant="tenant-a", timeout_s=20, max_attempts=2
            )

        sharded = ShardedClient(discovery, connect, refresh_interval_s=1.0)
        tier = KvbmTierClient(sharded, SPEC, layout=KvbmLayout.FULLY_CONTIGUOUS, window_tokens=64)

        # A real conversation's KV: 20 full blocks (the 10-token tail stays with the engine).
        ids = smollm.tokenizer(
            demo_conversation(smollm.tokenizer), add_special_tokens=False, return_tensors="pt"
        )["input_ids"][:, :650]
        kv, _ = smollm.prefill(ids, return_logits=False)
        blocks, tail = kv_to_kvbm(kv, ids[0], SPEC)
        assert blocks.n_blocks == 20 and tail is not None
        report = tier.offload(blocks, context_tokens=650)
        assert (report.compressed, report.exact) == (18, 2)
        hashes, firsts = blocks.sequence_hashes, blocks.first_positions

        owners = {h: sharded.owner(h) for h in hashes}
        assert set(owners.values()) == set(members), "blocks did not spread over both replicas"
        got = tier.onboard(hashes, firsts)
        assert got.complete
        original = blocks.canonical()
        onboarded = got.blocks.canonical()
        assert torch.equal(onboarded[-2:], original[-2:])  # the exact window
        err = (onboarded[:-2].float() - original[:-2].float()).norm() / original[:-2].float().norm()
        assert 0 < err < 0.5

        # SIGKILL one replica: no drain, no unregister; its Dynamo entry may linger until the lease lapses.
        victim_key = owners[hashes[0]]
        victim = next(p for p in procs if p.pid == members[victim_key].pid)
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait(timeout=10)

        t0 = time.monotonic()
        after = sharded.get_blocks(hashes)
        assert time.monotonic() - t0 < 60  # bounded by the client's retries and deadlines
        for r in after:
            assert r.status == ("miss" if owners[r.sequence_hash] == victim_key else "hit")
        survivor = next(k for k in members if k != victim_key)
        assert sharded.replicas == {survivor} and sharded.failovers >= 1
        # The hits are the same bytes as before the kill: never another replica's data.
        for i, r in enumerate(after):
            if r.status == "hit":
                assert torch.equal(SPEC.from_bytes(r.data), onboarded[i])
        partial = tier.onboard(hashes, firsts)
        assert hashes[0] in partial.misses and partial.blocks.n_blocks == 0

        # New blocks all land on the survivor and read back.
        fresh = [h ^ 0x5A5A5A5A5A5A5A5A for h in hashes[:6]]  # same KV under other keys (another salt)
        head = KvbmBlocks.from_canonical(original[:6], SPEC, blocks.layout, fresh, firsts[:6])
        tier.offload(head)
        assert {sharded.owner(h) for h in fresh} == {survivor}
        assert sharded.contains(fresh) == [True] * 6
        assert tier.onboard(fresh, head.first_positions).complete
    finally:
        if sharded is not None:
            sharded.close()
        if discovery is not None:
            discovery.close()
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
