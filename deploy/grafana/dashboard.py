"""Generates deploy/grafana/kvbm-codec.json, the service's Grafana dashboard, as code.

Run ``.venv/bin/python deploy/grafana/dashboard.py`` after changing a panel and commit the JSON;
tests/test_metrics_scrape.py checks the committed file equals this script's output, that every query
reads only metrics the service exports, and that each query returns data from a real Prometheus
scraping a real service. Queries filter on the ``$namespace``, ``$job``, ``$pod`` and ``$instance``
variables (and ``$model`` where the metric has a model label); ``DATASOURCE``
is a datasource variable, so the dashboard imports into any Grafana with a Prometheus datasource.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import prometheus, stat, table, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models.dashboard import DashboardCursorSync, DataSourceRef

OUT = Path(__file__).with_name("kvbm-codec.json")
UID = "kvbm-codec"
DS = DataSourceRef(type_val="prometheus", uid="${datasource}")
SEL = 'namespace=~"$namespace", job=~"$job", pod=~"$pod", instance=~"$instance"'
SELM = SEL + ', model=~"$model"'
RI = "$__rate_interval"


@dataclass(frozen=True)
class Q:
    expr: str
    legend: str


def _q(x: str, sel: str = SEL) -> str:
    """Inject the dashboard's selector into each ``{}``-marked vector selector of a query."""
    return x.replace("{}", "{" + sel + "}").replace("{,", "{" + sel + ",")


def _qm(x: str) -> str:
    """``_q`` for metrics with a ``model`` label: the ``$model`` variable filters them too."""
    return _q(x, SELM)


def hq(metric: str, q: float, by: str = "model") -> str:
    sel = SELM if "model" in by else SEL
    return _q(f"histogram_quantile({q}, sum by ({by}, le) (rate({metric}_bucket{{}}[{RI}])))", sel)


# (row, title, unit, description, queries, kind): kept as data so the tests can evaluate every query.
PANELS: list[tuple[str, str, str, str, list[Q], str]] = [
    (
        "Codec",
        "Compression ratio",
        "suffix:x",
        "fp16 bytes / stored frame bytes per block put: median, p10 and mean per model. "
        "The alert KvbmCodecCompressionRatioCollapse fires on a median below 10x.",
        [
            Q(hq("kvbm_codec_compression_ratio", 0.5), "p50 {{model}}"),
            Q(hq("kvbm_codec_compression_ratio", 0.1), "p10 {{model}}"),
            Q(
                _qm(
                    f"sum by (model) (rate(kvbm_codec_compression_ratio_sum{{}}[{RI}])) / "
                    f"sum by (model) (rate(kvbm_codec_compression_ratio_count{{}}[{RI}]))"
                ),
                "mean {{model}}",
            ),
        ],
        "timeseries",
    ),
    (
        "Codec",
        "Restore latency (per block)",
        "s",
        "KVTC decode time of one block. The alert KvbmCodecRestoreLatencyHigh fires on p99 > 100 ms.",
        [
            Q(hq("kvbm_codec_restore_seconds", 0.5), "p50 {{model}}"),
            Q(hq("kvbm_codec_restore_seconds", 0.99), "p99 {{model}}"),
        ],
        "timeseries",
    ),
    (
        "Codec",
        "Encode latency (per block)",
        "s",
        "KVTC encode time of one block (puts of raw blocks; client-compressed frames skip it).",
        [
            Q(hq("kvbm_codec_encode_seconds", 0.5), "p50 {{model}}"),
            Q(hq("kvbm_codec_encode_seconds", 0.99), "p99 {{model}}"),
        ],
        "timeseries",
    ),
    (
        "Codec",
        "Request latency p99 by method",
        "s",
        "Whole-request latency as the service sees it (admission to reply), per RPC method.",
        [Q(hq("kvbm_codec_request_seconds", 0.99, by="method"), "p99 {{method}}")],
        "timeseries",
    ),
    (
        "Codec",
        "Batches split across cores",
        "short",
        "Share of codec batch calls run as more than one part (batch_threads), parts per batch, and "
        "the most parts a batch may run as. "
        "Near 0 under load by design (a core is kept for every other request in flight); 0 with idle "
        "cores and slow single restores means the split is off or the CPU limit is one core.",
        [
            Q(
                _q(
                    f"sum(rate(kvbm_codec_codec_batches_split_total{{}}[{RI}])) / "
                    f"sum(rate(kvbm_codec_codec_batches_total{{}}[{RI}]))"
                ),
                "split share (0-1)",
            ),
            Q(
                _q(
                    f"sum(rate(kvbm_codec_codec_batch_parts_total{{}}[{RI}])) / "
                    f"sum(rate(kvbm_codec_codec_batches_total{{}}[{RI}]))"
                ),
                "parts per batch",
            ),
            Q(_q("max(kvbm_codec_codec_split_threads{})"), "most parts a batch may run as"),
        ],
        "timeseries",
    ),
    (
        "Codec",
        "Codec worker processes",
        "short",
        "Codec worker processes per pod (codec_processes; 0: the codec runs on the service's threads) and "
        "how often they were restarted after one died. Any restart failed the requests in flight on it "
        "(UNAVAILABLE / 503): check the pod's memory limit and OOM kills.",
        [
            Q(_q("max(kvbm_codec_codec_processes{})"), "workers per pod"),
            Q(_q(f"sum(increase(kvbm_codec_codec_process_restarts_total{{}}[{RI}]))"), "restarts"),
        ],
        "timeseries",
    ),
    (
        "Traffic",
        "Throughput (blocks/s)",
        "ops",
        "Blocks stored and block lookups by result.",
        [
            Q(_qm(f"sum by (model) (rate(kvbm_codec_blocks_put_total{{}}[{RI}]))"), "put {{model}}"),
            Q(_qm(f"sum by (result) (rate(kvbm_codec_block_lookups_total{{}}[{RI}]))"), "get {{result}}"),
        ],
        "timeseries",
    ),
    (
        "Traffic",
        "Throughput (bytes/s)",
        "Bps",
        "Uncompressed block bytes in/out, frame bytes written, and bytes moved by each data path "
        "(grpc, nixl, s3).",
        [
            Q(
                _qm(f"sum by (direction) (rate(kvbm_codec_raw_bytes_total{{}}[{RI}]))"),
                "raw {{direction}}",
            ),
            Q(_qm(f"sum(rate(kvbm_codec_stored_bytes_total{{}}[{RI}]))"), "frames stored"),
            Q(
                _q(f"sum by (path, direction) (rate(kvbm_codec_transfer_bytes_total{{}}[{RI}]))"),
                "{{path}} {{direction}}",
            ),
        ],
        "timeseries",
    ),
    (
        "Traffic",
        "Requests/s by method and code",
        "reqps",
        "Every admitted request, by RPC method and result code (ok or the error code).",
        [
            Q(
                _q(f"sum by (method, code) (rate(kvbm_codec_requests_total{{}}[{RI}]))"),
                "{{method}} {{code}}",
            )
        ],
        "timeseries",
    ),
    (
        "Traffic",
        "Hit ratio",
        "percentunit",
        "Share of block lookups served from the store (misses include blocks lost to eviction and "
        "corrupt frames that were dropped).",
        [
            Q(
                _q(
                    f'sum(rate(kvbm_codec_block_lookups_total{{, result="hit"}}[{RI}])) / '
                    f"sum(rate(kvbm_codec_block_lookups_total{{}}[{RI}]))"
                ),
                "hit ratio",
            )
        ],
        "timeseries",
    ),
    (
        "Store",
        "Tier occupancy vs capacity",
        "bytes",
        "Frame bytes held by each tier against its configured capacity.",
        [
            Q(_q("sum by (tier) (kvbm_codec_tier_used_bytes{})"), "used {{tier}}"),
            Q(_q("sum by (tier) (kvbm_codec_tier_capacity_bytes{})"), "capacity {{tier}}"),
        ],
        "timeseries",
    ),
    (
        "Store",
        "Tier fill",
        "percentunit",
        "used / capacity per tier and instance. KvbmCodecStoreFull fires when every tier is above 95% "
        "and blocks fall out of the last one.",
        [
            Q(
                _q("kvbm_codec_tier_used_bytes{} / kvbm_codec_tier_capacity_bytes{}"),
                "{{instance}} {{tier}}",
            ),
        ],
        "timeseries",
    ),
    (
        "Store",
        "Tenant quota use",
        "bytes",
        "With per-tenant quotas (memory_quota_bytes_per_tenant, disk_quota_bytes_per_tenant): bytes held "
        "per tier by each tenant class, by its largest tenant, and the per-tenant quota. A tenant at its "
        "quota evicts only its own oldest blocks. No tenant names: classes from tenant_classes.",
        [
            Q(
                _q("sum by (tier, tenant_class) (kvbm_codec_tier_tenant_used_bytes{})"),
                "{{tier}} {{tenant_class}} (all)",
            ),
            Q(
                _q("max by (tier, tenant_class) (kvbm_codec_tier_tenant_max_used_bytes{})"),
                "{{tier}} {{tenant_class}} (largest tenant)",
            ),
            Q(_q("max by (tier) (kvbm_codec_tier_quota_bytes{})"), "quota per tenant {{tier}}"),
        ],
        "timeseries",
    ),
    (
        "Store",
        "Blocks held per tier",
        "short",
        "Blocks (frames) each tier holds.",
        [Q(_q("sum by (tier) (kvbm_codec_tier_blocks{})"), "{{tier}}")],
        "timeseries",
    ),
    (
        "Store",
        "Evictions and drops",
        "ops",
        "Blocks evicted out of each tier (spilled to the next) and dropped out of the last tier "
        "(lost from the cache).",
        [
            Q(_q(f"sum by (tier) (rate(kvbm_codec_tier_evictions_total{{}}[{RI}]))"), "evicted {{tier}}"),
            Q(_q(f"sum(rate(kvbm_codec_blocks_dropped_total{{}}[{RI}]))"), "dropped (lost)"),
            Q(_qm(f"sum(rate(kvbm_codec_blocks_deleted_total{{}}[{RI}]))"), "deleted on request"),
        ],
        "timeseries",
    ),
    (
        "Health",
        "Checksum failures",
        "short",
        "Frames refused for failed checksums, by source (store: stored data was damaged; request: a "
        "client sent a damaged frame). Never decoded into KV. KvbmCodecChecksumFailures fires on any.",
        [
            Q(
                _q(f"sum by (source) (increase(kvbm_codec_checksum_failures_total{{}}[{RI}]))"),
                "{{source}}",
            )
        ],
        "timeseries",
    ),
    (
        "Health",
        "Refusals by reason",
        "reqps",
        "Requests refused: overloaded (admission control), tenant_overloaded / tenant_bytes (one "
        "tenant's own in-flight bound), shutting_down (drain), store_full, and every request error code; "
        "by tenant class (configured tenant_classes, never tenant names).",
        [
            Q(
                _q(f"sum by (reason, tenant_class) (rate(kvbm_codec_requests_refused_total{{}}[{RI}]))"),
                "{{reason}} ({{tenant_class}})",
            )
        ],
        "timeseries",
    ),
    (
        "Health",
        "Authentication failures",
        "reqps",
        "Refused authentications by front end and code (unauthenticated: no or unknown token/certificate; "
        "permission_denied: a tenant not allowed). A rise is a misconfigured client or a probe of the "
        "service; no tenant or peer names are recorded.",
        [
            Q(
                _q(f"sum by (frontend, reason) (rate(kvbm_codec_auth_failures_total{{}}[{RI}]))"),
                "{{frontend}} {{reason}}",
            )
        ],
        "timeseries",
    ),
    (
        "Health",
        "Requests in flight",
        "short",
        "Requests being served now, per instance; admission control refuses beyond the configured limit.",
        [Q(_q("kvbm_codec_inflight_requests{}"), "{{instance}}")],
        "timeseries",
    ),
    (
        "Health",
        "Instances up",
        "short",
        "Targets Prometheus scrapes successfully. KvbmCodecInstanceDown fires on a target down for 2m.",
        [Q(_q("sum(up{})"), "up")],
        "stat",
    ),
    (
        "Health",
        "Calibration in use",
        "short",
        "Calibration and bit allocation each instance encodes with (frames from older calibrations "
        "still decode).",
        [
            Q(
                _qm("max by (instance, model, calibration_id, allocation_id, target_cr) "
                    "(kvbm_codec_calibration_info{})"),
                "{{instance}} {{model}} {{calibration_id}}",
            )
        ],
        "table",
    ),
    (
        "Health",
        "Data path",
        "short",
        "1 per pod for each data path that serves; NIXL at 0 means it is configured but fell back to "
        "gRPC (KvbmCodecNixlFallback).",
        [Q(_q("max by (pod, instance, path) (kvbm_codec_data_path_active{})"), "{{pod}} {{path}}")],
        "timeseries",
    ),
    (
        "Process",
        "Memory (RSS and virtual)",
        "bytes",
        "Resident and virtual memory of the service process; compare RSS with the pod's memory limit "
        "(the memory tier, NIXL staging and the process must fit under it).",
        [
            Q(_q("process_resident_memory_bytes{}"), "rss {{pod}}"),
            Q(_q("process_virtual_memory_bytes{}"), "virtual {{pod}}"),
        ],
        "timeseries",
    ),
    (
        "Process",
        "CPU (cores)",
        "short",
        "CPU seconds per second used by the service process.",
        [Q(_q(f"rate(process_cpu_seconds_total{{}}[{RI}])"), "{{pod}}")],
        "timeseries",
    ),
    (
        "Process",
        "Open file descriptors",
        "percentunit",
        "Open fds as a share of the process limit; a steady climb is a leak (sockets, disk-tier files).",
        [Q(_q("process_open_fds{} / process_max_fds{}"), "{{pod}}")],
        "timeseries",
    ),
    (
        "Process",
        "Uptime",
        "s",
        "Seconds since each process started; a reset is a restart (and an empty memory tier).",
        [Q(_q("time() - process_start_time_seconds{}"), "{{pod}}")],
        "timeseries",
    ),
]  # fmt: skip


def _variable(name: str, query: str) -> db.QueryVariable:
    return (
        db.QueryVariable(name)
        .label(name)
        .datasource(DS)
        .query(query)
        .multi(True)
        .include_all(True)
        .all_value(".*")
        .refresh(1)  # on dashboard load
    )


def _panel(kind: str):  # type: ignore[no-untyped-def]
    """A panel with its options set (Grafana fills nothing in for a null ``options``)."""
    if kind == "timeseries":
        legend = (
            cb.VizLegendOptions().display_mode(cm.LegendDisplayMode.LIST).placement(cm.LegendPlacement.BOTTOM)
        )
        tooltip = cb.VizTooltipOptions().mode(cm.TooltipDisplayMode.MULTI).sort(cm.SortOrder.DESCENDING)
        return timeseries.Panel().legend(legend.show_legend(True)).tooltip(tooltip)
    if kind == "stat":
        reduce = cb.ReduceDataOptions().calcs(["lastNotNull"])
        return stat.Panel().graph_mode(cm.BigValueGraphMode.AREA).reduce_options(reduce)
    return table.Panel().show_header(True)


def build() -> dict:
    d = (
        db.Dashboard("kvbm-codec")
        .uid(UID)
        .description("KVTC KV-cache compression tier: codec, traffic, store and health (docs/operations.md)")
        .tags(["kvbm-codec", "dynamo"])
        .refresh("30s")
        .time("now-1h", "now")
        .timezone("browser")
        .tooltip(DashboardCursorSync.CROSSHAIR)
        .with_variable(db.DatasourceVariable("datasource").label("Prometheus").type("prometheus"))
        .with_variable(_variable("namespace", "label_values(kvbm_codec_build_info, namespace)"))
        .with_variable(_variable("job", 'label_values(kvbm_codec_build_info{namespace=~"$namespace"}, job)'))
        .with_variable(
            _variable("pod", 'label_values(kvbm_codec_build_info{namespace=~"$namespace", job=~"$job"}, pod)')
        )
        .with_variable(
            _variable(
                "instance",
                'label_values(kvbm_codec_build_info{namespace=~"$namespace", job=~"$job", pod=~"$pod"}, '
                "instance)",
            )
        )
        .with_variable(_variable("model", 'label_values(kvbm_codec_calibration_info{job=~"$job"}, model)'))
    )
    row = None
    ids = iter(range(1, 1000))
    for row_title, title, unit, desc, queries, kind in PANELS:
        if row_title != row:
            d = d.with_row(db.Row(row_title).id(next(ids)))
            row = row_title
        p = (
            _panel(kind)
            .id(next(ids))
            .title(title)
            .description(desc)
            .unit(unit)
            .datasource(DS)
            .height(8)
            .span(8)
        )
        for i, q in enumerate(queries):
            target = prometheus.Dataquery().expr(q.expr).legend_format(q.legend).ref_id(chr(ord("A") + i))
            if kind == "table":
                target = target.instant().format("table")
            p = p.with_target(target)
        d = d.with_panel(p)
    return json.loads(JSONEncoder(sort_keys=True).encode(d.build()))


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target, in dashboard order."""
    return [(title, q.expr) for _, title, _, _, qs, _ in PANELS for q in qs]


def expand(expr: str, *, job: str = ".*", instance: str = ".*", rate_interval: str = "1m") -> str:
    """Substitute the dashboard variables as Grafana would, to run a panel query directly."""
    out = expr.replace("$__rate_interval", rate_interval).replace("$job", job).replace("$instance", instance)
    return out.replace("$namespace", ".*").replace("$pod", ".*").replace("$model", ".*")


if __name__ == "__main__":
    text = render()
    if sys.argv[1:] == ["--check"]:
        sys.exit(0 if OUT.exists() and OUT.read_text() == text else 1)
    OUT.write_text(text)
    print(f"wrote {OUT} ({len(PANELS)} panels)")
