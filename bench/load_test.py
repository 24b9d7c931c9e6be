"""Bounded load test: many concurrent clients against one `kvbm-codec serve` process, at and beyond capacity.

The server runs as a subprocess (its RSS is sampled alone, every 0.2 s, with psutil) with small limits
and a memory tier small enough that blocks are evicted. At each concurrency level, client threads (one
gRPC channel each, retries disabled so every refusal is seen) put and get real SmolLM2-135M KV blocks
for a fixed duration. Every request is accounted: ok, refused RESOURCE_EXHAUSTED with a retry hint,
refused RESOURCE_EXHAUSTED without one (gRPC's own concurrency cap), any other error, or lost (issued
but never answered). Every get hit is compared byte for byte with what the codec itself restores, and
after the overload the server must still be SERVING and return a known block exactly. The server's own
Prometheus counters are read before and after each level and compared with what the clients saw.

    nice -n 10 .venv/bin/python bench/load_test.py --json bench/results/load_test.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psutil
import torch
from prometheus_client.parser import text_string_to_metric_families

from kvbm_codec.adapters.kv_blocks import KVBlock
from kvbm_codec.api.blocks import BlockSpec
from kvbm_codec.api.errors import ServiceError
from kvbm_codec.api.types import PutItem
from kvbm_codec.core.service import ServedModel
from kvbm_codec.frontends.grpc.client import CodecClient

MODEL = "smollm2-135m"
SAMPLE_S = 0.2
DEFAULT_BACKOFF_S = 0.05  # after a refusal that carries no hint (gRPC's own concurrency cap)


def pct(xs: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (None for no samples)."""
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def expected_restore(served: ServedModel, b: KVBlock) -> bytes:
    """What the codec itself restores for ``b``: a get hit must return exactly these bytes."""
    spec = served.spec
    frame, _ = served.encoder.encode(
        spec.from_bytes(b.data), torch.arange(b.first_position, b.first_position + spec.page_size)
    )
    restored, _ = served.encoder.decode(frame)
    return spec.to_bytes(restored)


# ---- the server subprocess -----------------------------------------------------------------------


@dataclass
class ServerLimits:
    workers: int = 4
    max_inflight_requests: int = 8
    memory_capacity_bytes: int = 2 << 20
    retry_after_s: float = 0.05


class ServerProcess:
    """`kvbm-codec serve` in its own (niced) process, configured to load its calibration from a registry
    (no model load), with an RSS sampler thread running for its whole life."""

    def __init__(
        self,
        workdir: Path,
        *,
        registry: Path,
        fingerprint: str,
        calibration_id: str,
        limits: ServerLimits,
        env: dict[str, str] | None = None,
        start_timeout_s: float = 180.0,
    ) -> None:
        self.limits = limits
        cfg = workdir / "serve.yaml"
        cfg.write_text(
            json.dumps(  # JSON is YAML
                {
                    "host": "127.0.0.1",
                    "grpc_port": 0,
                    "metrics_port": 0,
                    "workers": limits.workers,
                    "max_inflight_requests": limits.max_inflight_requests,
                    "memory_capacity_bytes": limits.memory_capacity_bytes,
                    "retry_after_s": limits.retry_after_s,
                    "when_full": "evict",
                    "drain_timeout_s": 20.0,
                    "models": [
                        {
                            "name": MODEL,
                            "registry": str(registry),
                            "fingerprint": fingerprint,
                            "calibration": calibration_id,
                        }
                    ],
                    "nixl": {"enabled": False},
                    "logging": {"format": "json", "level": "INFO"},
                }
            )
        )
        self.log_path = workdir / "serve.log"
        exe = Path(sys.executable).with_name("kvbm-codec")
        with open(self.log_path, "wb") as out:  # a file, not a pipe: refusals are logged and must not block
            self.proc = subprocess.Popen(
                ["nice", "-n", "10", str(exe), "serve", "--config", str(cfg)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                start_new_session=True,
            )
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._ps = psutil.Process(self.proc.pid)  # nice execs the server: same pid
        self._sampler = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)
        self._sampler.start()
        self.port, self.metrics_port = self._wait_serving(start_timeout_s)
        self.target = f"127.0.0.1:{self.port}"

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((time.monotonic(), self._ps.memory_info().rss))
            except psutil.Error:
                return
            self._stop.wait(SAMPLE_S)

    def _wait_serving(self, timeout_s: float) -> tuple[int, int]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}:\n{self.log_tail()}")
            for line in self.log_path.read_text(errors="replace").splitlines():
                if line.startswith("{") and '"serving"' in line:
                    rec = json.loads(line)
                    return int(rec["grpc_port"]), int(rec["metrics_port"])
            time.sleep(0.2)
        raise TimeoutError(f"server not serving after {timeout_s} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]

    def rss_between(self, t0: float, t1: float) -> list[int]:
        return [r for t, r in list(self.samples) if t0 <= t <= t1]

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        body = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read()
        out = {}
        for fam in text_string_to_metric_families(body.decode()):
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM (graceful drain) and the exit status; killed if it does not exit in time."""
        try:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
        finally:
            self._stop.set()
            self._sampler.join(5)
        return int(self.proc.returncode)


def metric(m: dict, name: str, **labels: str) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


# ---- clients ------------------------------------------------------------------------------------


@dataclass
class Tally:
    """One client's outcomes; issued == sum of outcomes unless a request was lost."""

    issued: Counter[str] = field(default_factory=Counter)
    ok: Counter[str] = field(default_factory=Counter)
    refused_hinted: Counter[str] = field(default_factory=Counter)
    refused_unhinted: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    error_samples: list[str] = field(default_factory=list)
    latency: dict[str, list[float]] = field(default_factory=lambda: {"put": [], "get": [], "refused": []})
    retry_hints: list[float] = field(default_factory=list)
    blocks_put: int = 0
    hits: int = 0
    misses: int = 0
    wrong_data: int = 0

    def accounted(self, op: str) -> int:
        return self.ok[op] + self.refused_hinted[op] + self.refused_unhinted[op] + self.errors[op]


def _client_loop(
    idx: int,
    target: str,
    pool: list[KVBlock],
    expected: list[bytes],
    *,
    salt: int,
    stop_at: list[float],
    put_fraction: float,
    blocks_per_request: int,
    timeout_s: float,
    honour_hints: bool,
    tally: Tally,
    start: threading.Barrier,
) -> None:
    rng = random.Random(salt * 1_000_003 + idx)
    recent: deque[tuple[int, int]] = deque(maxlen=64)  # (sequence hash, pool index) this client stored
    counter = 0
    with CodecClient(
        target, model=MODEL, timeout_s=timeout_s, max_attempts=1, batch_blocks=blocks_per_request
    ) as c:
        start.wait(120)
        end = stop_at[0]
        while time.monotonic() < end:
            op = "put" if not recent or rng.random() < put_fraction else "get"
            if op == "put":
                picks = []
                for _ in range(blocks_per_request):
                    counter += 1
                    h = (salt << 52) | ((idx + 1) << 32) | counter  # unique per level, client and put
                    picks.append((h, rng.randrange(len(pool))))
            else:
                picks = rng.sample(list(recent), min(blocks_per_request, len(recent)))
            tally.issued[op] += 1
            t0 = time.perf_counter()
            try:
                if op == "put":
                    c.put_blocks(
                        [PutItem(h, pool[k].data, first_position=pool[k].first_position) for h, k in picks]
                    )
                    got = None
                else:
                    got = c.get_blocks([h for h, _ in picks])
            except ServiceError as e:
                dt = time.perf_counter() - t0
                status = getattr(e, "status", None)
                if status == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    if e.retry_after_s is not None and e.retry_after_s > 0:
                        tally.refused_hinted[op] += 1
                        tally.retry_hints.append(e.retry_after_s)
                    else:
                        tally.refused_unhinted[op] += 1
                    tally.latency["refused"].append(dt)
                    if honour_hints:  # a well-behaved client waits before its next request
                        time.sleep(e.retry_after_s or DEFAULT_BACKOFF_S)
                else:
                    tally.errors[op] += 1
                    if len(tally.error_samples) < 5:
                        tally.error_samples.append(f"{op}: {type(e).__name__} {status}: {e.message[:160]}")
                continue
            except Exception as e:  # not a service answer at all: an error, never silently dropped
                tally.errors[op] += 1
                if len(tally.error_samples) < 5:
                    tally.error_samples.append(f"{op}: {type(e).__name__}: {str(e)[:160]}")
                continue
            dt = time.perf_counter() - t0
            tally.ok[op] += 1
            tally.latency[op].append(dt)
            if got is None:
                tally.blocks_put += len(picks)
                recent.extend(picks)
                continue
            for (h, k), g in zip(picks, got, strict=True):
                if g.sequence_hash != h:
                    tally.wrong_data += 1
                elif g.status == "hit":
                    first = pool[k].first_position
                    right = g.data == expected[k] and g.positions == tuple(range(first, first + 32))
                    tally.hits += 1
                    tally.wrong_data += not right
                else:
                    tally.misses += 1  # evicted (the memory tier is deliberately small)


def run_level(
    server: ServerProcess,
    pool: list[KVBlock],
    expected: list[bytes],
    *,
    n_clients: int,
    duration_s: float,
    salt: int,
    put_fraction: float = 0.5,
    blocks_per_request: int = 2,
    timeout_s: float = 30.0,
    honour_hints: bool = True,
) -> dict[str, Any]:
    """``n_clients`` threads for ``duration_s``; every request accounted, server counters cross-checked."""
    before = server.metrics()
    tallies = [Tally() for _ in range(n_clients)]
    stop_at: list[float] = []  # set by the barrier once every client is ready, read after it
    start = threading.Barrier(n_clients + 1, action=lambda: stop_at.append(time.monotonic() + duration_s))
    threads = [
        threading.Thread(
            target=_guarded,
            args=(tallies[i],),
            kwargs=dict(
                idx=i,
                target=server.target,
                pool=pool,
                expected=expected,
                salt=salt,
                stop_at=stop_at,
                put_fraction=put_fraction,
                blocks_per_request=blocks_per_request,
                timeout_s=timeout_s,
                honour_hints=honour_hints,
                start=start,
            ),
            daemon=True,
        )
        for i in range(n_clients)
    ]
    for t in threads:
        t.start()
    start.wait(120)
    t0 = stop_at[0] - duration_s
    join_deadline = stop_at[0] + timeout_s + 30
    for t in threads:
        t.join(max(0.0, join_deadline - time.monotonic()))
    t1 = time.monotonic()
    stuck = sum(t.is_alive() for t in threads)
    after = server.metrics()
    return summarize(server, tallies, n_clients, t0, t1, duration_s, stuck, before, after)


def _guarded(tally: Tally, **kw: Any) -> None:
    """Run one client; a failure of the harness itself is recorded as an error, never swallowed."""
    try:
        _client_loop(tally=tally, **kw)
    except Exception as e:
        tally.errors["harness"] += 1
        tally.error_samples.append(f"harness: {type(e).__name__}: {e}")


def _ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000, 2)


def summarize(
    server: ServerProcess,
    tallies: list[Tally],
    n_clients: int,
    t0: float,
    t1: float,
    duration_s: float,
    stuck: int,
    before: dict,
    after: dict,
) -> dict[str, Any]:
    tot = Tally()
    for t in tallies:
        for name in ("issued", "ok", "refused_hinted", "refused_unhinted", "errors"):
            getattr(tot, name).update(getattr(t, name))
        for k, v in t.latency.items():
            tot.latency[k] += v
        tot.retry_hints += t.retry_hints
        tot.error_samples += t.error_samples
        tot.blocks_put += t.blocks_put
        tot.hits += t.hits
        tot.misses += t.misses
        tot.wrong_data += t.wrong_data
    issued = sum(tot.issued.values())
    accounted = sum(tot.accounted(op) for op in ("put", "get"))  # a harness failure mid-request: lost
    refused = sum(tot.refused_hinted.values()) + sum(tot.refused_unhinted.values())
    rss = server.rss_between(t0, t1)
    half = t0 + duration_s / 2
    first, second = server.rss_between(t0, half), server.rss_between(half, t1)

    def delta(name: str, **labels: str) -> int:
        return int(metric(after, name, **labels) - metric(before, name, **labels))

    return {
        "clients": n_clients,
        "duration_s": round(t1 - t0, 2),
        "issued": issued,
        "ok": dict(tot.ok),
        "refused_with_retry_hint": dict(tot.refused_hinted),
        "refused_without_retry_hint": dict(tot.refused_unhinted),
        "other_errors": dict(tot.errors),
        "error_samples": tot.error_samples[:5],
        "lost": issued - accounted,
        "stuck_clients": stuck,
        "refusal_rate": round(refused / max(1, issued), 4),
        "retry_hint_s": sorted(set(tot.retry_hints)),
        "ok_requests_per_s": round(sum(tot.ok.values()) / duration_s, 1),
        "offered_requests_per_s": round(issued / duration_s, 1),
        "put_blocks_per_s": round(tot.blocks_put / duration_s, 1),
        "get_hit_blocks_per_s": round(tot.hits / duration_s, 1),
        "put_p50_ms": _ms(pct(tot.latency["put"], 0.5)),
        "put_p99_ms": _ms(pct(tot.latency["put"], 0.99)),
        "get_p50_ms": _ms(pct(tot.latency["get"], 0.5)),
        "get_p99_ms": _ms(pct(tot.latency["get"], 0.99)),
        "refusal_p50_ms": _ms(pct(tot.latency["refused"], 0.5)),
        "refusal_p99_ms": _ms(pct(tot.latency["refused"], 0.99)),
        "get_hits": tot.hits,
        "get_misses_evicted": tot.misses,
        "wrong_data": tot.wrong_data,
        "rss_peak_mb": round(max(rss, default=0) / 2**20, 1),
        "rss_peak_first_half_mb": round(max(first, default=0) / 2**20, 1),
        "rss_peak_second_half_mb": round(max(second, default=0) / 2**20, 1),
        "rss_samples": len(rss),
        "server_counted": {
            "put_ok": delta("kvbm_codec_requests_total", method="put", code="ok"),
            "get_ok": delta("kvbm_codec_requests_total", method="get", code="ok"),
            "refused_overloaded": delta(
                "kvbm_codec_requests_refused_total", reason="overloaded", tenant_class="default"
            ),
            "evictions": delta("kvbm_codec_tier_evictions_total", tier="memory"),
        },
    }


def check_after(server: ServerProcess, block: KVBlock, expected: bytes, spec: BlockSpec) -> dict[str, Any]:
    """After the overload: still SERVING, a fresh put of a known block restores exactly, tier bounded."""
    with CodecClient(server.target, model=MODEL, timeout_s=30, max_attempts=1, batch_blocks=1) as c:
        health = c.health()
        h = (1 << 63) | 0xC0FFEE
        c.put_blocks([PutItem(h, block.data, first_position=block.first_position)])
        got = c.get_blocks([h])[0]
        tiers = {t.name: (t.used_bytes, t.capacity_bytes, t.evictions) for t in c.stats().tiers}
    return {
        "health": health,
        "known_block_restored_exactly": got.status == "hit" and got.data == expected,
        "tier_used_bytes": {k: v[0] for k, v in tiers.items()},
        "tier_capacity_bytes": {k: v[1] for k, v in tiers.items()},
        "tier_evictions": {k: v[2] for k, v in tiers.items()},
        "block_bytes": spec.nbytes,
    }


def baseline_rss(server: ServerProcess, settle_s: float = 1.0) -> int:
    t0 = time.monotonic()
    time.sleep(settle_s)
    return int(statistics.median(server.rss_between(t0, time.monotonic()) or [0]))


# ---- main ---------------------------------------------------------------------------------------


def _load_pool(n_blocks: int) -> tuple[list[KVBlock], ServedModel, Any]:
    from kvbm_codec.adapters.kv_blocks import kv_blocks
    from kvbm_codec.calibration.cache import load_or_calibrate
    from kvbm_codec.models.hf import CausalLM
    from kvbm_codec.service.config import ModelConfig
    from kvbm_codec.texts import demo_document

    lm = CausalLM.load()
    cal, _, _ = load_or_calibrate(lm, progress=False)  # what `kvbm-codec serve` encodes with by default
    mc = ModelConfig()
    spec = mc.block_spec(cal.shape)
    pool = kv_blocks(lm, demo_document(), spec, max_tokens=n_blocks * spec.page_size)
    return pool, ServedModel(MODEL, cal, spec, mc.target_cr), cal


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", default="4,16,64", help="comma-separated concurrency levels")
    ap.add_argument("--duration", type=float, default=15.0, help="seconds per level")
    ap.add_argument(
        "--servers",
        default="4:8,8:4",
        help="server configs, workers:max_inflight_requests, comma-separated",
    )
    ap.add_argument(
        "--malloc-arena-max",
        default="0,2",
        help="MALLOC_ARENA_MAX values for the server (0: glibc's default), comma-separated; each is "
        "run with every server config",
    )
    ap.add_argument("--memory-mb", type=float, default=2.0, help="memory tier capacity (frames)")
    ap.add_argument("--pool-blocks", type=int, default=32, help="distinct real KV blocks clients draw from")
    ap.add_argument("--blocks-per-request", type=int, default=2)
    ap.add_argument("--put-fraction", type=float, default=0.5)
    ap.add_argument(
        "--no-honour-hints",
        action="store_true",
        help="retry at once after a refusal instead of waiting the server's hint (a hostile client)",
    )
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from kvbm_codec.calibration.registry import default_root

    pool, served, cal = _load_pool(args.pool_blocks)
    expected = [expected_restore(served, b) for b in pool]
    runs = []
    combos = [(p, int(a)) for a in args.malloc_arena_max.split(",") for p in args.servers.split(",")]
    for pair, arenas in combos:
        workers, inflight = (int(x) for x in pair.split(":"))
        limits = ServerLimits(workers, inflight, int(args.memory_mb * 2**20))
        with tempfile.TemporaryDirectory(prefix="kvbm-load-") as tmp:
            server = ServerProcess(
                Path(tmp),
                registry=default_root(),
                fingerprint=cal.model_fingerprint,
                calibration_id=cal.calibration_id,
                limits=limits,
                env={"MALLOC_ARENA_MAX": str(arenas)} if arenas else None,
            )
            try:
                # one request of each kind first, so the baseline includes what a served request loads
                check_after(server, pool[0], expected[0], served.spec)
                base = baseline_rss(server)
                levels = []
                for salt, n in enumerate(int(x) for x in args.clients.split(",")):
                    row = run_level(
                        server,
                        pool,
                        expected,
                        n_clients=n,
                        duration_s=args.duration,
                        salt=salt + 1,
                        put_fraction=args.put_fraction,
                        blocks_per_request=args.blocks_per_request,
                        honour_hints=not args.no_honour_hints,
                    )
                    levels.append(row)
                    head = {"workers": workers, "max_inflight": inflight, "malloc_arena_max": arenas}
                    print(json.dumps({**head, **row}), flush=True)
                after = check_after(server, pool[1], expected[1], served.spec)
            finally:
                code = server.stop()
            runs.append(
                {
                    "server": {
                        "workers": workers,
                        "max_inflight_requests": inflight,
                        "grpc_maximum_concurrent_rpcs": max(workers, inflight),
                        "memory_capacity_bytes": limits.memory_capacity_bytes,
                        "retry_after_s": limits.retry_after_s,
                        "malloc_arena_max": arenas or "glibc default",
                    },
                    "baseline_rss_mb": round(base / 2**20, 1),
                    "peak_rss_mb": round(max(r for _, r in server.samples) / 2**20, 1),
                    "levels": levels,
                    "after_overload": after,
                    "sigterm_exit_code": code,
                }
            )
    result = {
        "command": "nice -n 10 .venv/bin/python " + " ".join(sys.argv),
        "calibration_id": cal.calibration_id,
        "block_bytes": served.spec.nbytes,
        "pool_blocks": len(pool),
        "blocks_per_request": args.blocks_per_request,
        "put_fraction": args.put_fraction,
        "clients_honour_retry_hints": not args.no_honour_hints,
        "duration_s": args.duration,
        "rss_sample_s": SAMPLE_S,
        "cpus": os.cpu_count(),
        "runs": runs,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))


def table(result: dict[str, Any]) -> str:
    lines = [
        "| workers / max_inflight | MALLOC_ARENA_MAX | clients | ok req/s | put p50 / p99 ms | "
        "get p50 / p99 ms | refused | "
        "with hint | without hint | other errors | lost | wrong data | RSS base / peak MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in result["runs"]:
        s = run["server"]
        for r in run["levels"]:
            lines.append(
                f"| {s['workers']} / {s['max_inflight_requests']} | {s['malloc_arena_max']} | "
                f"{r['clients']} | "
                f"{r['ok_requests_per_s']} | "
                f"{r['put_p50_ms']} / {r['put_p99_ms']} | {r['get_p50_ms']} / {r['get_p99_ms']} | "
                f"{r['refusal_rate']:.1%} | {sum(r['refused_with_retry_hint'].values())} | "
                f"{sum(r['refused_without_retry_hint'].values())} | {sum(r['other_errors'].values())} | "
                f"{r['lost']} | {r['wrong_data']} | {run['baseline_rss_mb']} / {r['rss_peak_mb']} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
