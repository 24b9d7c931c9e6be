"""Generates what the Helm chart must not hand-maintain: values.schema.json and its copies of deploy/ files.

* ``helm/kvbm-codec/values.schema.json``: the ``config:`` section is ``ServiceConfig``'s own JSON schema
  (pydantic), so the chart can never accept a key the service refuses, or the reverse; the rest of the
  values is described here. Every object of ours is ``additionalProperties: false``: ``replicas:`` for
  ``replicaCount:`` or ``serviceMonitr:`` fail ``helm template``/``helm install`` naming the key.
  Kubernetes pass-through objects (resources, affinity, securityContext, ...) are only type-checked; the
  API server validates them.
* ``helm/kvbm-codec/files/alerts.yml`` and ``files/kvbm-codec.json``: copies of
  ``deploy/prometheus/alerts.yml`` and ``deploy/grafana/kvbm-codec.json`` (a chart cannot read files
  outside its directory), rendered as the PrometheusRule and the dashboard ConfigMap.

Run ``.venv/bin/python deploy/chart_sync.py`` after changing the config model, the values layout, the
alerts or the dashboard; ``--check`` exits 1 when a committed file differs (tests/test_deploy_helm.py
runs the same comparison).
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "kvbm-codec"
SCHEMA = CHART / "values.schema.json"
COPIES = {
    CHART / "files" / "alerts.yml": ROOT / "deploy" / "prometheus" / "alerts.yml",
    CHART / "files" / "kvbm-codec.json": ROOT / "deploy" / "grafana" / "kvbm-codec.json",
}

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kvbm_codec.service.sizes import PATTERN  # noqa: E402

STR = {"type": "string"}
BOOL = {"type": "boolean"}
INT = {"type": "integer"}
OBJ = {"type": "object"}  # a Kubernetes object passed through as is
ARR = {"type": "array"}
STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
QUANTITY = {"anyOf": [{"type": "integer", "minimum": 0}, {"type": "string", "pattern": PATTERN}]}


def strict(props: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"type": "object", "additionalProperties": False, "properties": props, **extra}


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    """Resolve pydantic's ``$defs`` references (Helm reports errors by path; flat schemas read better)."""
    if isinstance(node, dict):
        if "$ref" in node:
            target = copy.deepcopy(defs[node["$ref"].rsplit("/", 1)[-1]])
            rest = {k: v for k, v in node.items() if k != "$ref"}
            return _inline({**target, **rest}, defs)
        return {k: _inline(v, defs) for k, v in node.items() if k not in ("title", "$defs")}
    if isinstance(node, list):
        return [_inline(v, defs) for v in node]
    return node


def config_schema() -> dict[str, Any]:
    from kvbm_codec.service.config import ServiceConfig

    raw = ServiceConfig.model_json_schema()
    out = _inline(raw, raw.get("$defs", {}))

    def forbid(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node:
                node["additionalProperties"] = False
            for v in node.values():
                forbid(v)
        elif isinstance(node, list):
            for v in node:
                forbid(v)

    forbid(out)
    out.pop("required", None)  # every field has a default; values.yaml may set a subset
    out["description"] = "The service's ServiceConfig (kvbm_codec/service/config.py), verbatim."
    return out


def _kubelet_probe() -> dict[str, Any]:
    return strict(
        {
            "periodSeconds": {"type": "integer", "minimum": 1},
            "timeoutSeconds": {"type": "integer", "minimum": 1},
            "failureThreshold": {"type": "integer", "minimum": 1},
        }
    )


def _monitor() -> dict[str, Any]:
    return strict({"enabled": BOOL, "interval": STR, "scrapeTimeout": STR, "labels": STR_MAP})


def values_schema() -> dict[str, Any]:
    props = {
        "image": strict(
            {
                "repository": STR,
                "tag": STR,
                "pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
            }
        ),
        "imagePullSecrets": ARR,
        "nameOverride": STR,
        "fullnameOverride": STR,
        "replicaCount": {"type": "integer", "minimum": 0},
        "serviceAccount": strict(
            {"create": BOOL, "name": STR, "annotations": STR_MAP, "automountToken": BOOL}
        ),
        "podAnnotations": STR_MAP,
        "podLabels": STR_MAP,
        "config": config_schema(),
        "extraEnv": ARR,
        "extraEnvFrom": ARR,
        "extraVolumes": ARR,
        "extraVolumeMounts": ARR,
        "sidecars": ARR,
        "initContainers": ARR,
        "service": strict(
            {"type": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]}, "annotations": STR_MAP}
        ),
        "persistence": strict(
            {
                "enabled": BOOL,
                "size": QUANTITY,
                "storageClassName": STR,
                "accessModes": {"type": "array", "items": STR},
                "mountPath": STR,
                "annotations": STR_MAP,
                "retention": strict(
                    {
                        "whenDeleted": {"enum": ["Retain", "Delete"]},
                        "whenScaled": {"enum": ["Retain", "Delete"]},
                    }
                ),
            }
        ),
        "scratch": strict({"tmpSizeLimit": QUANTITY, "cacheSizeLimit": QUANTITY}),
        "tls": strict({"secretName": STR, "requireClientCert": BOOL}),
        "auth": strict({"tokenSecret": strict({"name": STR, "key": STR}), "allowUnauthenticated": BOOL}),
        "metricsAuth": strict({"tokenSecret": strict({"name": STR, "key": STR})}),
        "s3": strict({"credentialsSecret": strict({"name": STR, "accessKeyKey": STR, "secretKeyKey": STR})}),
        "probes": strict(
            {"startup": _kubelet_probe(), "liveness": _kubelet_probe(), "readiness": _kubelet_probe()}
        ),
        "lifecycle": strict({"preStopDelaySeconds": {"type": "integer", "minimum": 0}}),
        "resources": OBJ,
        "memoryOverhead": QUANTITY,
        "gpu": strict(
            {
                "enabled": BOOL,
                "count": {"type": "integer", "minimum": 1},
                "resourceName": STR,
                "runtimeClassName": STR,
                "nodeSelector": STR_MAP,
                "tolerations": ARR,
            }
        ),
        "nodeSelector": STR_MAP,
        "tolerations": ARR,
        "affinity": OBJ,
        "topologySpreadConstraints": ARR,
        "topologySpread": strict(
            {
                "enabled": BOOL,
                "topologyKey": STR,
                "maxSkew": {"type": "integer", "minimum": 1},
                "whenUnsatisfiable": {"enum": ["DoNotSchedule", "ScheduleAnyway"]},
            }
        ),
        "priorityClassName": STR,
        "terminationGracePeriodSeconds": {"type": "integer", "minimum": 1},
        "podSecurityContext": OBJ,
        "securityContext": OBJ,
        "podDisruptionBudget": strict({"enabled": BOOL, "maxUnavailable": {"type": ["integer", "string"]}}),
        "networkPolicy": strict({"enabled": BOOL, "clients": ARR, "metrics": ARR, "extraIngress": ARR}),
        "dynamoLabels": strict({"enabled": BOOL}),
        "serviceMonitor": _monitor(),
        "podMonitor": _monitor(),
        "prometheusRule": strict(
            {
                "enabled": BOOL,
                "labels": STR_MAP,
                "runbookBaseUrl": {"type": "string", "pattern": "^https?://"},
            }
        ),
        "dashboard": strict({"enabled": BOOL, "labels": STR_MAP, "annotations": STR_MAP}),
        "helmTest": strict({"enabled": BOOL}),
        "global": OBJ,  # Helm passes `global` to every chart (and to subcharts of a parent chart)
    }
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "kvbm-codec chart values",
        "description": "Generated by deploy/chart_sync.py from ServiceConfig and the chart's layout.",
        **strict(props),
    }


def render() -> dict[Path, str]:
    out = {SCHEMA: json.dumps(values_schema(), indent=2, sort_keys=True) + "\n"}
    for dst, src in COPIES.items():
        out[dst] = src.read_text()
    return out


def main(argv: list[str]) -> int:
    files = render()
    if argv == ["--check"]:
        stale = [
            str(p.relative_to(ROOT)) for p, text in files.items() if not p.exists() or p.read_text() != text
        ]
        if stale:
            print("stale (run deploy/chart_sync.py):", ", ".join(stale), file=sys.stderr)
        return 1 if stale else 0
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
