"""SIGKILL `kvbm-codec serve` at random points of a write-heavy workload, many times: with the durable
store (no memory tier: a put is acknowledged only once its frame is fsynced on the disk tier), every
acknowledged block is present and the same after each restart, nothing partial is ever served, and
the disk tier's index is rebuilt from disk by the restarted process."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from _smollm2 import MODEL, SPEC, restore_offset, same_restore

from kvbm_codec.adapters.kv_blocks import kv_blocks
from kvbm_codec.api.blocks import block_positions
from kvbm_codec.api.types import PutItem
from kvbm_codec.calibration.registry import Registry
from kvbm_codec.codec.block import KVTCBlockCodec
from kvbm_codec.frontends.grpc.client import CodecClient
from kvbm_codec.texts import demo_document

KILLS = 4
START_TIMEOUT_S = 180.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def durable_config(tmp_path, small_calibration):
    registry = tmp_path / "registry"
    Registry.from_url(registry).publish(small_calibration, promote=True)
    port = _free_port()
    config = tmp_path / "service.toml"
    config.write_text(
        f"""
host = "127.0.0.1"
grpc_port = {port}
metrics_port = 0
memory_capacity_bytes = 0
disk_path = "{tmp_path / "disk"}"
disk_capacity_bytes = 1073741824
drain_timeout_s = 2.0

[[models]]
name = "{MODEL}"
fingerprint = "{small_calibration.model_fingerprint}"
registry = "{registry}"

[nixl]
enabled = false

[logging]
format = "text"
level = "WARNING"
"""
    )
    return config, f"127.0.0.1:{port}"


def _serve(config: Path, log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "kvbm_codec", "serve", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
            start_new_session=True,
        )


def _wait_serving(client: CodecClient, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"service exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            if client.health() == "SERVING":
                return
        except Exception:
            pass
        time.sleep(0.2)
    pytest.fail(f"service not SERVING after {START_TIMEOUT_S} s: {log.read_text()[-2000:]}")


class _Writes:
    def __init__(self) -> None:
        self.acked: dict[int, int] = {}  # sequence hash -> first position of the block stored under it
        self.next_hash = 1


def _write_until_killed(client: CodecClient, blocks: list, stop: threading.Event, state: _Writes) -> None:
    """One put at a time; a put counts as acknowledged only once its call returned."""
    while not stop.is_set():
        h = state.next_hash
        state.next_hash += 1
        b = blocks[h % len(blocks)]
        try:
            client.put_blocks([PutItem(h, b.data, first_position=b.first_position)])
        except Exception:
            return  # the kill landed during this put: not acknowledged, may or may not be stored
        state.acked[h] = b.first_position


def test_sigkill_never_loses_an_acknowledged_block(durable_config, smollm, small_calibration, tmp_path):
    config, target = durable_config
    log = tmp_path / "serve.log"
    blocks = kv_blocks(smollm, demo_document(), SPEC, max_tokens=6 * SPEC.page_size)
    codec = KVTCBlockCodec.create(small_calibration, SPEC, 20.0)  # as the service builds it
    # What each block must restore to, computed by the codec itself: the service must match it (to float
    # rounding where this CPU's MKL rounds another thread count's matmuls differently, _smollm2.SAME_RESTORE).
    expected = {}
    original = {b.first_position: b.data for b in blocks}
    for b in blocks:
        frame, _ = codec.encode(SPEC.from_bytes(b.data), block_positions(b.first_position, SPEC.page_size))
        expected[b.first_position] = SPEC.to_bytes(codec.decode(frame)[0])
    rng = random.Random(20261126)
    state = _Writes()
    acked = state.acked
    for kill in range(KILLS + 1):
        proc = _serve(config, log)
        client = CodecClient(target, model=MODEL, timeout_s=30, max_attempts=1)
        try:
            _wait_serving(client, proc, log)
            # After a restart: every block acknowledged before any earlier kill is there, and the same.
            hashes = sorted(acked)
            got = client.get_blocks(hashes) if hashes else []
            for g in got:
                assert g.status == "hit", f"acknowledged block {g.sequence_hash:#x} lost after kill {kill}"
                first = acked[g.sequence_hash]
                got_block, want = SPEC.from_bytes(g.data), SPEC.from_bytes(expected[first])
                share, off = restore_offset(got_block, want, SPEC.from_bytes(original[first]))
                assert same_restore(got_block, want, SPEC.from_bytes(original[first])), (
                    f"acknowledged block {g.sequence_hash:#x} differs after kill {kill}: "
                    f"{share:.2%} of values by {off:.2e}"
                )
            if kill == KILLS:
                break
            stop = threading.Event()
            t = threading.Thread(target=_write_until_killed, args=(client, blocks, stop, state), daemon=True)
            t.start()
            time.sleep(rng.uniform(0.5, 3.0))
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
            stop.set()
            t.join(30)
            assert not t.is_alive()
        finally:
            client.close()
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)
    assert len(acked) >= KILLS, f"too few puts were acknowledged ({len(acked)}) for the test to mean anything"
    # An unacknowledged block written at the kill is either whole or absent: never served partial.
    proc = _serve(config, log)
    client = CodecClient(target, model=MODEL, timeout_s=30, max_attempts=1)
    try:
        _wait_serving(client, proc, log)
        probe = list(range(1, state.next_hash + 1))
        for g in client.get_blocks(probe):
            assert g.status in ("hit", "miss"), f"block {g.sequence_hash:#x} came back {g.status}"
            if g.status == "hit":
                b = blocks[g.sequence_hash % len(blocks)]
                got_block, want = SPEC.from_bytes(g.data), SPEC.from_bytes(expected[b.first_position])
                same = same_restore(got_block, want, SPEC.from_bytes(b.data))
                assert same, f"block {g.sequence_hash:#x} came back different from what was written"
            else:
                assert g.sequence_hash not in acked
    finally:
        client.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
