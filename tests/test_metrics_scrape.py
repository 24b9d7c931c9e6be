"""A real Prometheus scrapes a real service while a workload runs; what it stored must agree with what
the workload did, and every dashboard query must return data from it.

Prometheus (Debian package; scripts/test.sh installs it) runs on 127.0.0.1 with a 1 s scrape
interval, a temporary data directory and deploy/prometheus/alerts.yml loaded as its rule file. The
service is built from a ServiceConfig by ``kvbm_codec.server.app.build_service`` with the shared small
calibration, its registry served by ``prometheus_client`` on a free port (what ``kvbm-codec serve``
does on ``metrics_port``). The workload drives the core directly, so the front-end-only transfer-bytes
series is the one dashboard query allowed to be empty here; the gRPC tests cover that path.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import _smollm2
import pytest
import yaml
from _smollm2 import MODEL, SPEC

from kvbm_codec.api.blocks import BlockSpec
from kvbm_codec.api.errors import CorruptBlockError, OverloadedError, RequestTooLargeError
from kvbm_codec.api.types import PutItem
from kvbm_codec.core.service import BlockService
from kvbm_codec.server.app import build_service
from kvbm_codec.service.config import ServiceConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "deploy"))
sys.path.insert(0, str(ROOT / "deploy" / "grafana"))
import dashboard  # noqa: E402
import promql  # noqa: E402

PROMETHEUS = shutil.which("prometheus")
TENANT = "tenant-secret-q7x3"  # must never appear on the metrics page
JOB = "kvbm-codec"
# Series only a network front end (gRPC/NIXL/S3) writes; the in-process workload cannot produce them.
FRONT_END_ONLY = {"kvbm_codec_transfer_bytes_total", "kvbm_codec_data_path_active"}


# ---- static checks of the dashboard ------------------------------------------------------------------


def test_dashboard_json_is_the_generators_output() -> None:
    committed = (ROOT / "deploy" / "grafana" / "kvbm-codec.json").read_text()
    assert committed == dashboard.render(), "run: .venv/bin/python deploy/grafana/dashboard.py"


def test_dashboard_covers_the_operators_questions() -> None:
    d = dashboard.build()
    titles = {p["title"] for p in d["panels"] if p["type"] != "row"}
    wanted = {
        "Compression ratio",
        "Restore latency (per block)",
        "Encode latency (per block)",
        "Throughput (blocks/s)",
        "Throughput (bytes/s)",
        "Hit ratio",
        "Tier occupancy vs capacity",
        "Evictions and drops",
        "Checksum failures",
        "Refusals by reason",
        "Requests in flight",
    }
    assert wanted <= titles, wanted - titles
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))


def test_dashboard_queries_read_only_exported_metrics() -> None:
    exposed = set(promql.exposed_series()) | {"up"}
    seen: set[str] = set()
    for title, expr in dashboard.queries():
        names = promql.metric_names(expr)
        assert names, title
        assert names <= exposed, f"{title}: {names - exposed}"
        assert '$job"' in expr and '$instance"' in expr, f"{title} ignores the job/instance variables"
        seen |= {promql.exposed_series().get(n, n) for n in names}
    # every family but the build info (used by the variables) is on some panel
    unused = set(promql.exposed_series().values()) - seen - {"kvbm_codec_build_info"}
    assert not unused, f"metrics no panel shows: {unused}"


# ---- the live scrape ---------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prom:
    """A Prometheus process on 127.0.0.1 and its HTTP API."""

    def __init__(self, tmp: Path, target: str, jobs: list[dict] | None = None) -> None:
        """``jobs``: scrape configs instead of the one plain job of ``target``."""
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "900ms"},
            "rule_files": [str(ROOT / "deploy" / "prometheus" / "alerts.yml")],
            "scrape_configs": jobs or [{"job_name": JOB, "static_configs": [{"targets": [target]}]}],
        }
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(cfg))
        self.log = (tmp / "prometheus.log").open("wb")
        self.proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={tmp / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1h",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited {self.proc.returncode}: see {self.log.name}")
            with contextlib.suppress(OSError), urllib.request.urlopen(self.url + "/-/ready", timeout=2) as r:
                if r.status == 200:
                    return
            time.sleep(0.2)
        raise TimeoutError("prometheus did not become ready")

    def api(self, path: str, **params: str) -> object:
        q = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{q}", timeout=10) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        data = self.api("query", query=expr)
        assert isinstance(data, dict)
        return data["result"]

    def scalar(self, expr: str) -> float:
        res = self.query(expr)
        assert len(res) == 1, (expr, res)
        return float(res[0]["value"][1])

    def by(self, expr: str, label: str) -> dict[str, float]:
        return {r["metric"].get(label, ""): float(r["value"][1]) for r in self.query(expr)}

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


@dataclass
class Done:
    """What the workload did, counted from the service's own replies."""

    put_ratios: list[float] = field(default_factory=list)
    raw_in: int = 0
    stored: int = 0
    lookups: Counter[str] = field(default_factory=Counter)
    deleted: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    checksum_failures: int = 0
    hashes: set[int] = field(default_factory=set)
    requests: Counter[tuple[str, str]] = field(default_factory=Counter)


@pytest.fixture(scope="module")
def blocks(smollm) -> tuple[BlockSpec, list[bytes]]:
    """Eight real 32-token KV blocks of held-out text (not the calibration texts)."""
    from kvbm_codec.texts import demo_conversation

    return SPEC, _smollm2.block_bytes(smollm, 8, text=demo_conversation(smollm.tokenizer))


@contextlib.contextmanager
def _serve(svc: BlockService) -> Iterator[int]:
    from prometheus_client import start_http_server

    httpd, thread = start_http_server(0, "127.0.0.1", registry=svc.metrics.registry)
    try:
        yield httpd.server_port
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def _request(svc: BlockService, done: Done, method: str, fn):  # type: ignore[no-untyped-def]
    code = "ok"  # each verb admits and counts itself: one verb call is one request
    try:
        return fn()
    except Exception as e:
        code = getattr(e, "code", "internal")
        raise
    finally:
        if code not in (OverloadedError.code,):
            done.requests[(method, code)] += 1


def _workload(svc: BlockService, blocks: list[bytes], rounds: int, pause_s: float) -> Done:
    done = Done()
    rng = random.Random(7)
    prev: list[int] = []
    for r in range(rounds):
        hashes = [rng.getrandbits(62) | 1 << 62 for _ in blocks]
        done.hashes |= set(hashes)
        items = [
            PutItem(h, b, first_position=32 * i) for i, (h, b) in enumerate(zip(hashes, blocks, strict=True))
        ]
        res = _request(svc, done, "put", lambda items=items: svc.put_blocks(TENANT, MODEL, items))
        for p in res:
            done.put_ratios.append(p.ratio)
            done.raw_in += p.raw_bytes
            done.stored += p.stored_bytes
        # this round's blocks, the previous round's oldest (some evicted by now) and one never stored
        want = hashes + prev[:4] + [hashes[0] ^ 1]
        done.hashes.add(hashes[0] ^ 1)
        got = _request(svc, done, "get", lambda want=want: svc.get_blocks(TENANT, MODEL, want))
        done.lookups.update(g.status for g in got)
        prev = hashes
        if r == 1:
            done.deleted += _request(svc, done, "delete", lambda h=hashes[:2]: svc.delete(TENANT, MODEL, h))
            prev = hashes[2:]
        if r == 2:
            # a client-compressed frame damaged in flight is refused, never stored
            (frame,) = _request(
                svc, done, "get", lambda h=hashes[3]: svc.get_blocks(TENANT, MODEL, [h], as_frames=True)
            )
            assert (frame.status, frame.sequence_hash) == ("hit", hashes[3])
            done.lookups[frame.status] += 1
            damaged = bytearray(frame.data)
            damaged[len(damaged) // 2] ^= 0x40
            bad = [PutItem(1, bytes(damaged), is_frame=True)]
            with pytest.raises(CorruptBlockError):
                _request(
                    svc,
                    done,
                    "put",
                    lambda bad=bad: svc.put_blocks(TENANT, MODEL, bad),
                )
            done.checksum_failures += 1
            done.refused[CorruptBlockError.code] += 1
            # one block too many in a request
            with pytest.raises(RequestTooLargeError):
                _request(
                    svc,
                    done,
                    "contains",
                    lambda: svc.contains(TENANT, MODEL, list(range(svc.limits.max_blocks_per_request + 1))),
                )
            done.refused[RequestTooLargeError.code] += 1
            # admission control: every slot taken, the next request is turned away at once
            with contextlib.ExitStack() as held:
                for _ in range(svc.limits.max_inflight_requests):
                    held.enter_context(svc.request("contains"))
                    done.requests[("contains", "ok")] += 1
                with pytest.raises(OverloadedError):
                    _request(svc, done, "contains", lambda: svc.contains(TENANT, MODEL, [1]))
                done.refused[OverloadedError.code] += 1
        time.sleep(pause_s)
    return done


def _wait_for(prom: Prom, expr: str, want: float, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        res = prom.query(expr)
        last = float(res[0]["value"][1]) if res else None
        if last == want:
            return
        time.sleep(0.5)
    raise AssertionError(f"{expr} = {last} after {timeout_s} s, expected {want}")


@pytest.mark.slow
@pytest.mark.skipif(
    PROMETHEUS is None, reason="prometheus not installed (scripts/test.sh installs it as root)"
)
def test_prometheus_scrape_agrees_with_workload(blocks, small_calibration, tmp_path: Path) -> None:
    spec, raw = blocks
    frame_estimate = spec.nbytes // 12
    cfg = ServiceConfig(
        memory_capacity_bytes=12 * frame_estimate,  # about 1.5 rounds of 8 blocks: evictions and drops
        memory_quota_bytes_per_tenant=12 * frame_estimate,  # one tenant: the quota panel has data
        max_inflight_requests=4,
        max_blocks_per_request=8 + 8 + 1,
        nixl={"enabled": False},
    )
    served = _smollm2.served(small_calibration, spec)
    svc = build_service(cfg, models=[served])
    store_stats = svc.store.stats
    with _serve(svc) as metrics_port:
        prom = Prom(tmp_path, f"127.0.0.1:{metrics_port}")
        try:
            prom.wait_ready()
            _wait_for(prom, f'up{{job="{JOB}"}}', 1.0)
            t0 = time.monotonic()
            done = _workload(svc, raw, rounds=4, pause_s=1.0)
            workload_s = time.monotonic() - t0
            n_put = len(done.put_ratios)
            _wait_for(prom, "sum(kvbm_codec_blocks_put_total)", float(n_put))
            time.sleep(2.5)  # two more scrapes, so every rate() window holds the final values
            _check_numbers(prom, svc, done, store_stats())
            _check_dashboard_queries(prom, workload_s)
            _check_rules_loaded(prom)
            _check_labels_bounded(prom, metrics_port, done)
        finally:
            prom.close()


def _check_numbers(prom: Prom, svc: BlockService, done: Done, stats) -> None:  # type: ignore[no-untyped-def]
    n_put = len(done.put_ratios)
    assert prom.scalar("sum(kvbm_codec_blocks_put_total)") == n_put
    lookups = prom.by("sum by (result) (kvbm_codec_block_lookups_total)", "result")
    assert lookups == {k: float(v) for k, v in done.lookups.items()}, (lookups, done.lookups)
    assert done.lookups["hit"] > 0 and done.lookups["miss"] > 0
    # achieved compression: the histogram's sum/count is the mean of the per-put ratios the service returned
    mean = prom.scalar("sum(kvbm_codec_compression_ratio_sum) / sum(kvbm_codec_compression_ratio_count)")
    assert math.isclose(mean, statistics.fmean(done.put_ratios), rel_tol=1e-9)
    assert prom.scalar("sum(kvbm_codec_compression_ratio_count)") == n_put
    overall = prom.scalar(
        'sum(kvbm_codec_raw_bytes_total{direction="in"}) / sum(kvbm_codec_stored_bytes_total)'
    )
    assert math.isclose(overall, done.raw_in / done.stored, rel_tol=1e-9)
    # the median from buckets lands within one bucket of the true median
    p50 = prom.scalar("histogram_quantile(0.5, sum by (le) (kvbm_codec_compression_ratio_bucket))")
    assert abs(p50 - statistics.median(done.put_ratios)) <= 4.0, (p50, statistics.median(done.put_ratios))
    assert prom.scalar("sum(kvbm_codec_restore_seconds_count)") == done.lookups["hit"] - 1  # one as frame
    assert prom.scalar("sum(kvbm_codec_encode_seconds_count)") == n_put
    # tiers: what Prometheus holds is what the store reports now (nothing moved after the workload)
    for s in stats:
        assert prom.scalar(f'kvbm_codec_tier_used_bytes{{tier="{s.name}"}}') == s.used_bytes
        assert prom.scalar(f'kvbm_codec_tier_capacity_bytes{{tier="{s.name}"}}') == s.capacity_bytes
        assert prom.scalar(f'kvbm_codec_tier_blocks{{tier="{s.name}"}}') == s.blocks
        assert prom.scalar(f'kvbm_codec_tier_evictions_total{{tier="{s.name}"}}') == s.evictions
    assert sum(s.evictions for s in stats) > 0
    # one tier: every eviction out of it is a block lost from the cache
    assert prom.scalar("kvbm_codec_blocks_dropped_total") == stats[-1].evictions
    assert prom.scalar("sum(kvbm_codec_blocks_deleted_total)") == done.deleted == 2
    assert prom.by("sum by (source) (kvbm_codec_checksum_failures_total)", "source") == {
        "request": float(done.checksum_failures)
    }
    assert prom.by("sum by (reason) (kvbm_codec_requests_refused_total)", "reason") == {
        k: float(v) for k, v in done.refused.items()
    }
    reqs = {
        (r["metric"]["method"], r["metric"]["code"]): float(r["value"][1])
        for r in prom.query("sum by (method, code) (kvbm_codec_requests_total)")
    }
    assert reqs == {k: float(v) for k, v in done.requests.items()}, (reqs, done.requests)
    assert prom.scalar("kvbm_codec_inflight_requests") == 0
    cal = prom.query("kvbm_codec_calibration_info")
    assert [c["metric"]["calibration_id"] for c in cal] == [svc.model(MODEL).calibration.calibration_id]


def _check_dashboard_queries(prom: Prom, workload_s: float, exempt: set[str] = FRONT_END_ONLY) -> None:
    """Every panel query, as Grafana would send it, returns data (rate windows cover the workload)."""
    window = f"{math.ceil(workload_s) + 10}s"
    empty = []
    for title, expr in dashboard.queries():
        q = dashboard.expand(expr, job=JOB, rate_interval=window)
        if not prom.query(q) and not (promql.metric_names(expr) & exempt):
            empty.append((title, q))
    assert not empty, f"dashboard queries without data: {empty}"


def _check_rules_loaded(prom: Prom) -> None:
    groups = prom.api("rules")["groups"]  # type: ignore[index]
    rules = [r for g in groups for r in g["rules"]]
    names = {r["name"] for r in rules}
    assert names == {
        r["alert"]
        for g in yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())["groups"]
        for r in g["rules"]
    }
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
    # the service is healthy and up: the instance-down rule is quiet (a wrong job matcher would not be)
    down = next(r for r in rules if r["name"] == "KvbmCodecInstanceDown")
    assert down["state"] == "inactive"


def _check_labels_bounded(prom: Prom, metrics_port: int, done: Done) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        page = r.read().decode()
    assert "kvbm_codec_blocks_put_total" in page
    assert TENANT not in page
    leaked = [h for h in done.hashes if str(h) in page or f"{h:x}" in page or f"{h:#x}" in page]
    assert not leaked, f"sequence hashes on the metrics page: {leaked[:3]}"
    # and in what Prometheus stored: every kvbm_codec series name is one the service declares
    names = {n for n in prom.api("label/__name__/values") if n.startswith("kvbm_codec_")}  # type: ignore[union-attr]
    assert names <= set(promql.exposed_series()), names - set(promql.exposed_series())
    for label in ("tenant", "sequence_hash", "hash", "key"):
        assert prom.api(f"label/{label}/values") == []


# ---- the same, against the real `kvbm-codec serve` process over gRPC ---------------------------------

CLI = Path(sys.executable).with_name("kvbm-codec")


@contextlib.contextmanager
def _kvbm_codec_serve(tmp: Path, cal, frame_estimate: int) -> Iterator[tuple[str, int]]:  # type: ignore[no-untyped-def]
    """`kvbm-codec serve --config` on 127.0.0.1, calibration from a registry (no model load in it)."""
    from kvbm_codec.calibration.registry import Registry
    from kvbm_codec.frontends.grpc.client import CodecClient

    Registry.from_url(tmp / "registry").publish(cal, promote=True)
    grpc_port, metrics_port = _free_port(), _free_port()
    cfg = {
        "host": "127.0.0.1",
        "grpc_port": grpc_port,
        "metrics_port": metrics_port,
        "workers": 4,
        "max_blocks_per_request": 17,
        "memory_capacity_bytes": 12 * frame_estimate,
        "memory_quota_bytes_per_tenant": 12 * frame_estimate,
        "nixl": {"enabled": False},
        "auth": {"mode": "none", "tenant": TENANT},
        "logging": {"format": "json", "level": "INFO"},
        "models": [{"name": MODEL, "fingerprint": cal.model_fingerprint, "registry": str(tmp / "registry")}],
    }
    (tmp / "config.yaml").write_text(yaml.safe_dump(cfg))
    log = (tmp / "serve.log").open("wb")
    env = {**os.environ, "KVBM_CODEC_CACHE_DIR": str(tmp / "cache")}
    proc = subprocess.Popen(
        [str(CLI), "serve", "--config", str(tmp / "config.yaml")],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    target = f"127.0.0.1:{grpc_port}"
    try:
        deadline = time.monotonic() + 180
        with CodecClient(target, max_attempts=1, timeout_s=5) as c:
            while True:
                if proc.poll() is not None:
                    tail = (tmp / "serve.log").read_text()[-2000:]
                    raise RuntimeError(f"kvbm-codec serve exited {proc.returncode}: {tail}")
                with contextlib.suppress(Exception):
                    if c.health() == "SERVING":
                        break
                if time.monotonic() > deadline:
                    raise TimeoutError("kvbm-codec serve did not report SERVING in 180 s")
                time.sleep(0.5)
        yield target, metrics_port
    finally:
        proc.terminate()  # SIGTERM: drain, then exit
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


def _grpc_workload(target: str, blocks: list[bytes], rounds: int, pause_s: float) -> Done:
    from kvbm_codec.api.errors import UnknownModelError
    from kvbm_codec.frontends.grpc.client import CodecClient

    done = Done()
    rng = random.Random(11)
    prev: list[int] = []
    # no client retries: every refusal the workload sees is exactly one on the server
    with CodecClient(target, model=MODEL, max_attempts=1, batch_blocks=17) as c:
        for r in range(rounds):
            hashes = [rng.getrandbits(62) | 1 << 62 for _ in blocks]
            done.hashes |= set(hashes)
            res = c.put_blocks(
                [
                    PutItem(h, b, first_position=32 * i)
                    for i, (h, b) in enumerate(zip(hashes, blocks, strict=True))
                ]
            )
            for p in res:
                done.put_ratios.append(p.ratio)
                done.raw_in += p.raw_bytes
                done.stored += p.stored_bytes
            want = hashes + prev[:4] + [hashes[0] ^ 1]
            done.hashes.add(hashes[0] ^ 1)
            done.lookups.update(g.status for g in c.get_blocks(want))
            prev = hashes
            if r == 1:
                done.deleted += c.delete(hashes[:2])
                prev = hashes[2:]
            if r == 2:
                frame = c.get_blocks([hashes[3]], as_frames=True)[0]
                assert (frame.status, frame.sequence_hash) == ("hit", hashes[3])
                done.lookups[frame.status] += 1
                damaged = bytearray(frame.data)
                damaged[len(damaged) // 2] ^= 0x40
                with pytest.raises(CorruptBlockError):
                    c.put_blocks([PutItem(1, bytes(damaged), is_frame=True)])
                done.checksum_failures += 1
                done.refused[CorruptBlockError.code] += 1
                with pytest.raises(RequestTooLargeError):
                    c.contains(list(range(18)))
                done.refused[RequestTooLargeError.code] += 1
                with (
                    CodecClient(target, model="no-such-model", max_attempts=1) as other,
                    pytest.raises(UnknownModelError),
                ):
                    other.contains([1])
                done.refused[UnknownModelError.code] += 1
            time.sleep(pause_s)
    return done


@pytest.mark.slow
@pytest.mark.skipif(
    PROMETHEUS is None, reason="prometheus not installed (scripts/test.sh installs it as root)"
)
@pytest.mark.skipif(not CLI.exists(), reason="kvbm-codec console script not installed (pip install -e .)")
def test_prometheus_scrapes_kvbm_codec_serve(blocks, small_calibration, tmp_path: Path) -> None:
    """The deployment path: `kvbm-codec serve` exposes metrics_port, Prometheus scrapes it while a gRPC
    client works; every dashboard query (transfer bytes included) returns data."""
    spec, raw = blocks
    with _kvbm_codec_serve(tmp_path, small_calibration, spec.nbytes // 12) as (target, metrics_port):
        prom = Prom(tmp_path, f"127.0.0.1:{metrics_port}")
        try:
            prom.wait_ready()
            _wait_for(prom, f'up{{job="{JOB}"}}', 1.0)
            t0 = time.monotonic()
            done = _grpc_workload(target, raw, rounds=4, pause_s=1.0)
            workload_s = time.monotonic() - t0
            _wait_for(prom, "sum(kvbm_codec_blocks_put_total)", float(len(done.put_ratios)))
            time.sleep(2.5)
            n_put = len(done.put_ratios)
            lookups = prom.by("sum by (result) (kvbm_codec_block_lookups_total)", "result")
            assert lookups == {k: float(v) for k, v in done.lookups.items()}, (lookups, done.lookups)
            mean = prom.scalar(
                "sum(kvbm_codec_compression_ratio_sum) / sum(kvbm_codec_compression_ratio_count)"
            )
            assert math.isclose(mean, statistics.fmean(done.put_ratios), rel_tol=1e-9)
            overall = prom.scalar(
                'sum(kvbm_codec_raw_bytes_total{direction="in"}) / sum(kvbm_codec_stored_bytes_total)'
            )
            assert math.isclose(overall, done.raw_in / done.stored, rel_tol=1e-9)
            assert prom.scalar("sum(kvbm_codec_encode_seconds_count)") == n_put
            # bytes on the gRPC path: every raw block sent in, every raw block returned
            grpc_in = prom.scalar('sum(kvbm_codec_transfer_bytes_total{path="grpc", direction="in"})')
            assert grpc_in >= done.raw_in
            assert prom.scalar("sum(kvbm_codec_blocks_deleted_total)") == done.deleted == 2
            assert prom.by("sum by (source) (kvbm_codec_checksum_failures_total)", "source") == {
                "request": 1.0
            }
            assert prom.by("sum by (reason) (kvbm_codec_requests_refused_total)", "reason") == {
                k: float(v) for k, v in done.refused.items()
            }
            used = prom.scalar("sum(kvbm_codec_tier_used_bytes)")
            cap = prom.scalar("sum(kvbm_codec_tier_capacity_bytes)")
            assert 0 < used <= cap == 12 * (spec.nbytes // 12)
            assert (
                prom.scalar("sum(kvbm_codec_tier_evictions_total)")
                == prom.scalar("kvbm_codec_blocks_dropped_total")
                > 0
            )
            build = prom.query("kvbm_codec_build_info")[0]["metric"]
            assert build["version"] and build["fp32_matmul"] in ("onednn-bf16", "ieee", "bf16-rounded")
            _check_dashboard_queries(prom, workload_s, exempt=set())
            _check_rules_loaded(prom)
            _check_labels_bounded(prom, metrics_port, done)
        finally:
            prom.close()


# ---- /metrics behind a bearer token -------------------------------------------------------------------


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus is not installed (scripts/test.sh)")
def test_metrics_token_scrape_with_and_without_the_token(tmp_path: Path) -> None:
    """A real Prometheus with the token (a credentials file, as a ServiceMonitor's Secret) scrapes;
    the same target without it is refused (up 0) and every refusal is counted, with no tenant name."""
    from kvbm_codec.core.metrics import ServiceMetrics
    from kvbm_codec.service.metrics_http import read_token, start_metrics_server

    token_file = tmp_path / "token"
    token_file.write_text("s3cr3t-metrics-token-2f9\n")
    m = ServiceMetrics()
    refused = m.auth_failures.labels(frontend="metrics", reason="unauthenticated", tenant_class="unknown")
    httpd = start_metrics_server(
        "127.0.0.1", 0, m.registry, token=read_token(token_file), on_refused=refused.inc
    )
    target = f"127.0.0.1:{httpd.server_port}"
    url = f"http://{target}/metrics"
    prom = Prom(
        tmp_path,
        target,
        jobs=[
            {
                "job_name": "with-token",
                "authorization": {"type": "Bearer", "credentials_file": str(token_file)},
                "static_configs": [{"targets": [target]}],
            },
            {"job_name": "without-token", "static_configs": [{"targets": [target]}]},
        ],
    )
    try:
        for bad in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer \u00e9"}):
            req = urllib.request.Request(url, headers=bad)
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(req, timeout=5)
            assert e.value.code == 401 and "Bearer" in e.value.headers["WWW-Authenticate"]
        ok = urllib.request.Request(url, headers={"Authorization": "Bearer s3cr3t-metrics-token-2f9"})
        with urllib.request.urlopen(ok, timeout=5) as r:
            assert r.status == 200 and b"kvbm_codec_auth_failures_total" in r.read()
        prom.wait_ready()
        _wait_for(prom, 'up{job="with-token"}', 1.0)
        _wait_for(prom, 'up{job="without-token"}', 0.0)
        _wait_for(
            prom, 'count(kvbm_codec_auth_failures_total{job="with-token", frontend="metrics"} >= 4)', 1.0
        )
    finally:
        prom.close()
        httpd.shutdown()
        httpd.server_close()
