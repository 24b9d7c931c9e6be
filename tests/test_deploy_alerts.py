"""The alert rules are valid Prometheus rules, are unit-tested by promtool, read only metrics the
service exports, and point their runbooks at sections that exist in docs/operations.md."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
OPERATIONS = ROOT / "docs" / "operations.md"
sys.path.insert(0, str(ROOT / "deploy"))
import promql  # noqa: E402

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (scripts/test.sh installs it as root)"
)
RUNBOOK_BASE = "https://github.com/kvbm-codec/kvbm-codec/blob/main/docs/operations.md"
# kube-state-metrics series the replica-readiness alert reads (the service cannot see its own Pending pods)
KUBE_STATE_METRICS = {"kube_statefulset_replicas", "kube_statefulset_status_replicas_ready"}
EXPECTED_ALERTS = {
    "KvbmCodecAbsent",
    "KvbmCodecReplicasNotReady",
    "KvbmCodecNixlFallback",
    "KvbmCodecClientCorruptFrames",
    "KvbmCodecInstanceDown",
    "KvbmCodecRestoreLatencyHigh",
    "KvbmCodecChecksumFailures",
    "KvbmCodecStoreFull",
    "KvbmCodecCompressionRatioCollapse",
    "KvbmCodecOverloaded",
}


def _rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


@needs_promtool
def test_promtool_check_rules() -> None:
    r = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in r.stdout


@needs_promtool
def test_promtool_unit_tests_pass() -> None:
    r = subprocess.run(
        [PROMTOOL, "test", "rules", RULE_TESTS.name],
        cwd=RULE_TESTS.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


@needs_promtool
def test_promtool_unit_tests_can_fail(tmp_path: Path) -> None:
    """The unit tests are not vacuous: a rule with a threshold nobody crosses makes them fail."""
    broken = RULES.read_text().replace(") > 0.1\n", ") > 1000\n")
    assert broken != RULES.read_text()
    (tmp_path / "alerts.yml").write_text(broken)
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    r = subprocess.run(
        [PROMTOOL, "test", "rules", RULE_TESTS.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0
    assert "KvbmCodecRestoreLatencyHigh" in r.stdout + r.stderr


def test_every_alert_is_unit_tested_firing_and_silent() -> None:
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fired: set[str] = set()
    silent: set[str] = set()
    for t in tests:
        for a in t.get("alert_rule_test", []):
            (fired if a.get("exp_alerts") else silent).add(a["alertname"])
    names = {r["alert"] for r in _rules()}
    assert names == EXPECTED_ALERTS
    assert fired == names, f"never shown firing: {names - fired}"
    assert silent == names, f"never shown silent: {names - silent}"


def test_rules_read_only_exported_metrics() -> None:
    exposed = set(promql.exposed_series()) | {"up"} | KUBE_STATE_METRICS
    for r in _rules():
        used = promql.metric_names(r["expr"])
        assert used, r["alert"]
        assert used <= exposed, f"{r['alert']} reads unknown metrics {used - exposed}"


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading slugs: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    for line in markdown.splitlines():
        m = re.match(r"#{1,6}\s+(.*)", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            out.add(slug)
    return out


def test_annotations_and_runbook_anchors() -> None:
    anchors = _anchors(OPERATIONS.read_text())
    for r in _rules():
        ann = r["annotations"]
        assert ann.get("summary") and ann.get("description"), r["alert"]
        assert r["labels"]["severity"] in {"warning", "critical"}
        doc, _, anchor = ann["runbook_url"].partition("#")
        assert doc == RUNBOOK_BASE, r["alert"]  # absolute: an alert is read far from this repository
        assert anchor == r["alert"].lower(), r["alert"]
        assert anchor in anchors, f"docs/operations.md has no section #{anchor}"


def test_metric_name_lexer() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, model) (rate(a_bucket{job=~"x.*", le!="1"}[5m]))) '
        "/ on (job) group_left (model) b_total offset 5m and up unless c"
    )
    assert promql.metric_names(expr) == {"a_bucket", "b_total", "up", "c"}


def test_aggregations_keep_namespace_and_pod() -> None:
    """Every `by (...)` of an alert keeps namespace and pod, so the page names the pod to look at."""
    for r in _rules():
        for m in re.finditer(r"\bby \(([^)]*)\)", r["expr"]):
            labels = {x.strip() for x in m.group(1).split(",")}
            assert {"namespace", "pod"} <= labels, (r["alert"], m.group(0))


def test_severities_match_the_runbook() -> None:
    """Critical pages only when the whole tier is gone; a bad client frame never pages."""
    severity = {r["alert"]: r["labels"]["severity"] for r in _rules()}
    assert {a for a, s in severity.items() if s == "critical"} == {"KvbmCodecAbsent"}
    doc = OPERATIONS.read_text()
    for alert, sev in severity.items():
        section = doc.split(f"### {alert}\n", 1)[1].split("\n### ", 1)[0]
        assert f"**Severity:** {sev}" in section, alert
