"""Prometheus metrics of the service: the one list of names the dashboard and alerts are built on.

Names follow Prometheus conventions (``_total`` counters, base units in names). Labels are bounded:
model (a handful of configured models), tier, direction, path, reason, method, code, tenant_class
(configured classes, never tenant names). The standard
``process_*`` metrics (RSS, CPU, fds) come from prometheus_client's ProcessCollector. Never a sequence
hash, tenant secret or block content. Each service instance owns its own CollectorRegistry so several
can run in one process (tests) without clashing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from kvbm_codec.core.fairness import UNKNOWN_CLASS
from kvbm_codec.store.base import TierStats

PREFIX = "kvbm_codec"
RATIO_BUCKETS = (1, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 28, 32, 48, 64, 128)
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

# Every metric family the service exposes (without _bucket/_sum/_count/_total suffix expansion).
# The dashboard and alert-rule tests check their queries against this list.
METRIC_NAMES = (
    f"{PREFIX}_compression_ratio",
    f"{PREFIX}_encode_seconds",
    f"{PREFIX}_restore_seconds",
    f"{PREFIX}_request_seconds",
    f"{PREFIX}_requests_total",
    f"{PREFIX}_requests_refused_total",
    f"{PREFIX}_auth_failures_total",
    f"{PREFIX}_inflight_requests",
    f"{PREFIX}_raw_bytes_total",
    f"{PREFIX}_stored_bytes_total",
    f"{PREFIX}_transfer_bytes_total",
    f"{PREFIX}_blocks_put_total",
    f"{PREFIX}_block_lookups_total",
    f"{PREFIX}_blocks_deleted_total",
    f"{PREFIX}_checksum_failures_total",
    f"{PREFIX}_tier_used_bytes",
    f"{PREFIX}_tier_capacity_bytes",
    f"{PREFIX}_tier_blocks",
    f"{PREFIX}_tier_evictions_total",
    f"{PREFIX}_tier_quota_bytes",
    f"{PREFIX}_tier_tenant_used_bytes",
    f"{PREFIX}_tier_tenant_max_used_bytes",
    f"{PREFIX}_codec_split_threads",
    f"{PREFIX}_codec_batches_total",
    f"{PREFIX}_codec_batches_split_total",
    f"{PREFIX}_codec_batch_parts_total",
    f"{PREFIX}_codec_processes",
    f"{PREFIX}_codec_process_restarts_total",
    f"{PREFIX}_blocks_dropped_total",
    f"{PREFIX}_calibration_info",
    f"{PREFIX}_build_info",
    f"{PREFIX}_data_path_active",
    # prometheus_client's ProcessCollector (Linux): memory, CPU, file descriptors of the service process
    "process_virtual_memory_bytes",
    "process_resident_memory_bytes",
    "process_start_time_seconds",
    "process_cpu_seconds_total",
    "process_open_fds",
    "process_max_fds",
)


class _TierCollector(Collector):
    """Reads tier occupancy at scrape time, so the gauges can never drift from the store."""

    def __init__(self, source: Callable[[], Iterable[TierStats]]) -> None:
        self._source = source

    def collect(self):  # type: ignore[no-untyped-def]
        used = GaugeMetricFamily(
            f"{PREFIX}_tier_used_bytes", "Bytes of frames held by the tier", labels=["tier"]
        )
        cap = GaugeMetricFamily(f"{PREFIX}_tier_capacity_bytes", "Configured tier capacity", labels=["tier"])
        blocks = GaugeMetricFamily(f"{PREFIX}_tier_blocks", "Blocks held by the tier", labels=["tier"])
        for s in self._source():
            used.add_metric([s.name], s.used_bytes)
            cap.add_metric([s.name], s.capacity_bytes)
            blocks.add_metric([s.name], s.blocks)
        yield from (used, cap, blocks)
        # a counter: tier evictions only grow while the process lives
        evc = CounterMetricFamily(
            f"{PREFIX}_tier_evictions", "Blocks evicted out of the tier since start", labels=["tier"]
        )
        for s in self._source():
            evc.add_metric([s.name], s.evictions)
        yield evc


QuotaSource = Callable[[], Iterable[tuple[str, int, dict[str, int]]]]


class _QuotaCollector(Collector):
    """Per-tenant quota use at scrape time, summed per tenant class (a tenant's name never becomes a
    label): the sum, and the largest single tenant, which is what nears the per-tenant quota."""

    def __init__(self, source: QuotaSource, class_of: Callable[[str], str]) -> None:
        self._source, self._class_of = source, class_of

    def collect(self):  # type: ignore[no-untyped-def]
        quota = GaugeMetricFamily(
            f"{PREFIX}_tier_quota_bytes", "Per-tenant byte quota of the tier", labels=["tier"]
        )
        used = GaugeMetricFamily(
            f"{PREFIX}_tier_tenant_used_bytes",
            "Bytes the tenants of a class hold in a tier with a quota",
            labels=["tier", "tenant_class"],
        )
        top = GaugeMetricFamily(
            f"{PREFIX}_tier_tenant_max_used_bytes",
            "Bytes held by the largest tenant of a class in a tier with a quota (compare with the quota)",
            labels=["tier", "tenant_class"],
        )
        for tier, limit, usage in self._source():
            quota.add_metric([tier], limit)
            total: dict[str, int] = {}
            most: dict[str, int] = {}
            for tenant, n in usage.items():
                c = self._class_of(tenant)
                total[c] = total.get(c, 0) + n
                most[c] = max(most.get(c, 0), n)
            for c in sorted(total):
                used.add_metric([tier, c], total[c])
                top.add_metric([tier, c], most[c])
        yield from (quota, used, top)


class _SplitCollector(Collector):
    """How the service splits a request's batch across cores (``core/parallel.py``), read at scrape
    time: whether one client's restore gets every core it may, or every batch runs whole."""

    def __init__(self, threads: int, counts: Callable[[], tuple[int, int, int]]) -> None:
        self._threads, self._counts = threads, counts

    def collect(self):  # type: ignore[no-untyped-def]
        yield GaugeMetricFamily(
            f"{PREFIX}_codec_split_threads",
            "Threads one batch may be split across (batch_threads, or the cores of the mask capped by the "
            "cgroup CPU quota)",
            value=self._threads,
        )
        batches, split, parts = self._counts()
        yield CounterMetricFamily(f"{PREFIX}_codec_batches", "Codec batch calls since start", value=batches)
        yield CounterMetricFamily(
            f"{PREFIX}_codec_batches_split", "Codec batch calls run as more than one part", value=split
        )
        yield CounterMetricFamily(
            f"{PREFIX}_codec_batch_parts", "Codec parts run (a batch run whole counts one)", value=parts
        )


class _ProcessesCollector(Collector):
    """The codec worker processes (``core/codec_processes.py``), read at scrape time: a restart
    count that moves means workers die (out of memory, a crash) and requests were failed for it."""

    def __init__(self, processes: int, restarts: Callable[[], int]) -> None:
        self._processes, self._restarts = processes, restarts

    def collect(self):  # type: ignore[no-untyped-def]
        yield GaugeMetricFamily(
            f"{PREFIX}_codec_processes",
            "Codec worker processes (0: the codec runs on the service's threads)",
            value=self._processes,
        )
        yield CounterMetricFamily(
            f"{PREFIX}_codec_process_restarts",
            "Times the codec workers were started afresh after one died (its calls in flight failed)",
            value=self._restarts(),
        )


class ServiceMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        p = PREFIX
        self.compression_ratio = Histogram(
            f"{p}_compression_ratio",
            "fp16 bytes / stored frame bytes, per block put",
            ["model"],
            buckets=RATIO_BUCKETS,
            registry=r,
        )
        self.encode_seconds = Histogram(
            f"{p}_encode_seconds",
            "KVTC encode time per block",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.restore_seconds = Histogram(
            f"{p}_restore_seconds",
            "KVTC decode (restore) time per block",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.request_seconds = Histogram(
            f"{p}_request_seconds",
            "Whole-request latency by method",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            f"{p}_requests", "Requests by method and result code", ["method", "code"], registry=r
        )
        self.refused = Counter(
            f"{p}_requests_refused",
            "Requests refused, by reason and tenant class (configured tenant_classes; never a tenant name)",
            ["reason", "tenant_class"],
            registry=r,
        )
        self.auth_failures = Counter(
            f"{p}_auth_failures",
            "Refused authentications, by front end and stable error code (no tenant or peer names; "
            "tenant_class is `unknown`: no tenant is established yet)",
            ["frontend", "reason", "tenant_class"],
            registry=r,
        )
        # Zero series from the start, so a dashboard rate or an alert sees 0 rather than "no data".
        for reason in ("unauthenticated", "permission_denied"):
            self.auth_failures.labels(frontend="grpc", reason=reason, tenant_class=UNKNOWN_CLASS)
        self.inflight = Gauge(f"{p}_inflight_requests", "Requests being served now", registry=r)
        self.raw_bytes = Counter(
            f"{p}_raw_bytes",
            "Uncompressed block bytes received (in) and returned (out)",
            ["model", "direction"],
            registry=r,
        )
        self.stored_bytes = Counter(
            f"{p}_stored_bytes", "Frame bytes written to the store", ["model"], registry=r
        )
        self.transfer_bytes = Counter(
            f"{p}_transfer_bytes",
            "Bytes moved by each data path",
            ["path", "direction"],
            registry=r,
        )
        self.blocks_put = Counter(f"{p}_blocks_put", "Blocks stored", ["model"], registry=r)
        self.block_lookups = Counter(
            f"{p}_block_lookups", "Block gets by result (hit/miss)", ["model", "result"], registry=r
        )
        self.blocks_deleted = Counter(
            f"{p}_blocks_deleted", "Blocks deleted on request", ["model"], registry=r
        )
        self.checksum_failures = Counter(
            f"{p}_checksum_failures",
            "Frames refused for failed checksums, by where they came from",
            ["source"],
            registry=r,
        )
        self.blocks_dropped = Counter(
            f"{p}_blocks_dropped",
            "Blocks evicted out of the last tier (lost from the cache)",
            registry=r,
        )
        self.calibration_info = Info(
            f"{p}_calibration", "Calibration in use per model", ["model"], registry=r
        )
        self.build_info = Info(
            f"{p}_build", "kvbm-codec version and float32 matmul path (fp32_matmul)", registry=r
        )
        self.data_path_active = Gauge(
            f"{p}_data_path_active",
            "1 when a configured data path serves; 0 for NIXL means it fell back to gRPC",
            ["path"],
            registry=r,
        )
        ProcessCollector(registry=r)  # RSS, CPU seconds, open fds: OOM and fd-leak early warnings

    def watch_tiers(self, source: Callable[[], Iterable[TierStats]]) -> None:
        self.registry.register(_TierCollector(source))

    def watch_quotas(self, source: QuotaSource, class_of: Callable[[str], str]) -> None:
        self.registry.register(_QuotaCollector(source, class_of))

    def watch_split(self, threads: int, counts: Callable[[], tuple[int, int, int]]) -> None:
        self.registry.register(_SplitCollector(threads, counts))

    def watch_processes(self, processes: int, restarts: Callable[[], int]) -> None:
        self.registry.register(_ProcessesCollector(processes, restarts))
