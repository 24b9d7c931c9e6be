"""A short bounded load test: 16 clients for 8 s against a `kvbm-codec serve` subprocess that admits 2.

Uses the load generator of bench/load_test.py (the full run, at more levels and for longer, is the
benchmark). The server loads a small real calibration from a temporary registry (no model load) and
clients put and get real SmolLM2 KV blocks with retries disabled, so every refusal reaches the test.

The server gets more gRPC handler threads than there are clients: gRPC's own concurrency cap
(``maximum_concurrent_rpcs``) answers RESOURCE_EXHAUSTED without the service's retry hint and without
counting the refusal, so only admission control's refusals are under test here; bench/load_test.py
measures what happens beyond that cap.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import _smollm2
import pytest
from _smollm2 import SPEC

from kvbm_codec.adapters.kv_blocks import kv_blocks
from kvbm_codec.calibration.registry import Registry
from kvbm_codec.texts import demo_document

pytestmark = pytest.mark.slow

_BENCH = Path(__file__).resolve().parents[1] / "bench" / "load_test.py"
_spec = importlib.util.spec_from_file_location("kvbm_load_test", _BENCH)
assert _spec is not None and _spec.loader is not None
lt = importlib.util.module_from_spec(_spec)
sys.modules["kvbm_load_test"] = lt  # dataclasses resolve their module by name
_spec.loader.exec_module(lt)

CLIENTS = 16
DURATION_S = 8.0
RSS_GROWTH_LIMIT = 768 << 20  # generous: 2 admitted requests, 20 idle-or-refusing handler threads


def test_overload_is_refused_with_hints_nothing_lost_server_stays_correct(
    small_calibration, smollm, tmp_path
):
    registry = tmp_path / "registry"
    Registry.from_url(registry).publish(small_calibration)
    served = _smollm2.served(small_calibration)
    pool = kv_blocks(smollm, demo_document(), SPEC, max_tokens=4 * SPEC.page_size)
    expected = [lt.expected_restore(served, b) for b in pool]
    limits = lt.ServerLimits(
        workers=CLIENTS + 4, max_inflight_requests=2, memory_capacity_bytes=1 << 20, retry_after_s=0.05
    )
    server = lt.ServerProcess(
        tmp_path,
        registry=registry,
        fingerprint=small_calibration.model_fingerprint,
        calibration_id=small_calibration.calibration_id,
        limits=limits,
    )
    try:
        warm = lt.check_after(server, pool[0], expected[0], SPEC)
        assert warm["known_block_restored_exactly"], warm
        base = lt.baseline_rss(server)
        row = lt.run_level(server, pool, expected, n_clients=CLIENTS, duration_s=DURATION_S, salt=1)
        after = lt.check_after(server, pool[1], expected[1], SPEC)
    finally:
        code = server.stop()
    detail = f"{row}\nserver log tail:\n{server.log_tail()}"

    # every request was answered: ok or refused with a hint, nothing else, nothing lost
    assert row["lost"] == 0 and row["stuck_clients"] == 0, detail
    assert row["other_errors"] == {} and row["refused_without_retry_hint"] == {}, detail
    refused = sum(row["refused_with_retry_hint"].values())
    assert refused > 0, f"16 clients against 2 admitted requests were never refused: {detail}"
    assert row["retry_hint_s"] == [pytest.approx(0.05)], detail
    assert row["ok"].get("put", 0) > 0 and row["ok"].get("get", 0) > 0, detail
    # under load every hit was the codec's exact restore; the server saw what the clients saw
    assert row["wrong_data"] == 0 and row["get_hits"] > 0, detail
    counted = row["server_counted"]
    assert counted["refused_overloaded"] == refused, detail
    assert (counted["put_ok"], counted["get_ok"]) == (row["ok"]["put"], row["ok"]["get"]), detail

    # afterwards: healthy, serving the right bytes, the memory tier within its capacity
    assert after["health"] == "SERVING" and after["known_block_restored_exactly"], after
    assert after["tier_used_bytes"]["memory"] <= limits.memory_capacity_bytes, after
    assert base > 0 and row["rss_samples"] >= DURATION_S / lt.SAMPLE_S / 2, detail
    growth = row["rss_peak_mb"] * 2**20 - base
    assert growth < RSS_GROWTH_LIMIT, f"server RSS grew {growth / 2**20:.0f} MiB under load: {detail}"
    assert code == 0, f"server did not drain and exit cleanly on SIGTERM:\n{server.log_tail()}"
