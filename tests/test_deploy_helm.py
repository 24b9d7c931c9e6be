"""The Helm chart lints, renders with Helm's own engine (helm-python-sdk, no helm binary) for the default,
GPU and multi-replica values, every rendered manifest passes the Kubernetes schemas of the oldest and
newest supported versions (kubernetes-validate, offline), and the config it ships is one the service
accepts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from pydantic import BaseModel

from kvbm_codec.service.config import ServiceConfig

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "kvbm-codec"
VALUE_FILES = sorted((CHART / "ci").glob("*-values.yaml"))
KUBE_VERSIONS = ("1.27.0", kubernetes_validate.utils.latest_version())
CRD_GROUPS = ("monitoring.coreos.com/",)  # no schema ships for CRDs; checked by hand below


def _render(values: dict[str, Any]) -> list[dict[str, Any]]:
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values, name="kvbm-codec", namespace="dynamo", is_install=True)
    docs = []
    for path, text in manifests.items():
        if path.endswith("NOTES.txt"):
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def _values(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text()) or {}


def _kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


@pytest.fixture(scope="module", params=[p.name for p in VALUE_FILES])
def rendered(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
    values = _values(CHART / "ci" / request.param)
    return request.param, values, _render(values)


def test_value_files_present() -> None:
    assert {p.name for p in VALUE_FILES} == {
        "default-values.yaml",
        "gpu-values.yaml",
        "multi-replica-values.yaml",
    }


@pytest.mark.parametrize("values_file", [p.name for p in VALUE_FILES])
def test_lint_strict(values_file: str) -> None:
    report = helm.lint(CHART, _values(CHART / "ci" / values_file), strict=True, kube_version="v1.27.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not report["errors"] and not problems, report


def test_every_manifest_is_valid_kubernetes(rendered) -> None:  # type: ignore[no-untyped-def]
    name, _, docs = rendered
    kinds = sorted(d["kind"] for d in docs)
    for want in ("ConfigMap", "PodDisruptionBudget", "Service", "ServiceAccount", "StatefulSet"):
        assert want in kinds, (name, kinds)
    for d in docs:
        if d["apiVersion"].startswith(CRD_GROUPS):
            continue
        for v in KUBE_VERSIONS:
            kubernetes_validate.validate(d, v, strict=True)


def test_validator_rejects_a_broken_manifest() -> None:
    """The schema check is not vacuous: a typo'd field and a wrong type are both caught."""
    sts = _kind(_render({}), "StatefulSet")[0]
    typo = yaml.safe_load(yaml.safe_dump(sts))
    typo["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"grpc": {"port": 1}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, KUBE_VERSIONS[-1], strict=True)
    wrong = yaml.safe_load(yaml.safe_dump(sts))
    wrong["spec"]["replicas"] = "four"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong, KUBE_VERSIONS[-1], strict=True)


def _pod(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return _kind(docs, "StatefulSet")[0]["spec"]["template"]["spec"]


def _config(docs: list[dict[str, Any]], tmp_path: Path) -> ServiceConfig:
    text = _kind(docs, "ConfigMap")[0]["data"]["config.yaml"]
    p = tmp_path / "config.yaml"
    p.write_text(text)
    return ServiceConfig.load(p)  # the service's own loader: unknown keys or bad values raise


def test_config_is_accepted_by_the_service(rendered, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, values, docs = rendered
    cfg = _config(docs, tmp_path)
    assert cfg.host == "0.0.0.0"
    c = _pod(docs)["containers"][0]
    assert c["args"] == ["serve", "--config", "/etc/kvbm-codec/config.yaml"]
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert mounts["/etc/kvbm-codec/config.yaml"] == "config"
    # the disk tier lives on the per-replica PVC
    sts = _kind(docs, "StatefulSet")[0]
    assert [t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]] == ["data"]
    assert cfg.disk_path is not None and str(cfg.disk_path).startswith("/var/lib/kvbm-codec/")
    assert mounts["/var/lib/kvbm-codec"] == "data"
    assert cfg.disk_capacity_bytes < _bytes(
        sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]
    )
    # ports: container, Service and config agree
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["grpc"] == cfg.grpc_port and ports["metrics"] == cfg.metrics_port
    svc = next(s for s in _kind(docs, "Service") if s["spec"].get("clusterIP") != "None")
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == ports
    if cfg.s3.enabled:
        assert ports["s3"] == cfg.s3.port
    else:
        assert "s3" not in ports
    if values.get("tls", {}).get("secretName"):
        assert cfg.tls.enabled and str(cfg.tls.cert_file).startswith("/etc/kvbm-codec/tls/")
        assert mounts["/etc/kvbm-codec/tls"] == "tls"
    if values.get("auth", {}).get("tokenSecret", {}).get("name"):
        assert cfg.auth.mode == "token" and str(cfg.auth.tokens_file) == "/etc/kvbm-codec/auth/tokens"
        assert mounts["/etc/kvbm-codec/auth"] == "auth"


def _bytes(q: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}
    return int(q[:-2]) * units[q[-2:]] if q[-2:] in units else int(q)


def test_pod_is_locked_down(rendered) -> None:  # type: ignore[no-untyped-def]
    _, _, docs = rendered
    pod = _pod(docs)
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] != 0
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    c = pod["containers"][0]
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    tmp = next(m for m in c["volumeMounts"] if m["mountPath"] == "/tmp")
    assert "emptyDir" in volumes[tmp["name"]]
    env = {e["name"]: e.get("value") for e in c["env"]}
    cache = env["KVBM_CODEC_CACHE_DIR"]
    assert any(cache.startswith(m["mountPath"]) for m in c["volumeMounts"] if m["name"] != "config")
    assert c["resources"]["requests"]["memory"] and c["resources"]["limits"]["memory"]


def test_probes_use_grpc_health_unless_tls(rendered, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, _, docs = rendered
    cfg = _config(docs, tmp_path)
    c = _pod(docs)["containers"][0]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        p = c[probe]
        if cfg.tls.enabled:  # kubelet's gRPC probe cannot do TLS
            assert p["tcpSocket"] == {"port": "grpc"}
        else:
            assert p["grpc"] == {"port": cfg.grpc_port}
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 600


def test_gpu_variant() -> None:
    docs = _render(_values(CHART / "ci" / "gpu-values.yaml"))
    pod = _pod(docs)
    c = pod["containers"][0]
    assert c["image"].endswith("-cuda")
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["runtimeClassName"] == "nvidia"
    cpu = _pod(_render({}))
    assert cpu["containers"][0]["image"].endswith("-cpu")
    assert "nvidia.com/gpu" not in cpu["containers"][0]["resources"].get("limits", {})
    assert "nodeSelector" not in cpu and "tolerations" not in cpu


def test_multi_replica_shards_and_monitoring() -> None:
    docs = _render(_values(CHART / "ci" / "multi-replica-values.yaml"))
    sts = _kind(docs, "StatefulSet")[0]
    assert sts["spec"]["replicas"] == 4
    headless = next(s for s in _kind(docs, "Service") if s["spec"].get("clusterIP") == "None")
    assert sts["spec"]["serviceName"] == headless["metadata"]["name"]
    pdb = _kind(docs, "PodDisruptionBudget")[0]
    assert pdb["spec"]["selector"]["matchLabels"] == sts["spec"]["selector"]["matchLabels"]
    (sm,) = _kind(docs, "ServiceMonitor")
    svc = next(s for s in _kind(docs, "Service") if s["spec"].get("clusterIP") != "None")
    # the job label the alerts select on (job=~"kvbm-codec.*") comes from this Service label
    assert svc["metadata"]["labels"][sm["spec"]["jobLabel"]] == "kvbm-codec"
    assert sm["spec"]["endpoints"][0]["port"] in {p["name"] for p in svc["spec"]["ports"]}
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert not _kind(_render({}), "ServiceMonitor")


def _fields(model: type[BaseModel]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, f in model.model_fields.items():
        ann = f.annotation
        sub = getattr(ann, "__args__", (ann,))[0] if getattr(ann, "__origin__", None) is list else ann
        out[name] = _fields(sub) if isinstance(sub, type) and issubclass(sub, BaseModel) else None
    return out


def _keys(values: Any) -> Any:
    if isinstance(values, list) and values and isinstance(values[0], dict):
        return _keys(values[0])
    if isinstance(values, dict):
        return {k: _keys(v) for k, v in values.items()}
    return None


def test_values_cover_every_service_config_field() -> None:
    """values.yaml's `config:` names each ServiceConfig field (nested sections too), no more, no less."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert _keys(values["config"]) == _fields(ServiceConfig)


def _env_names(model: type[BaseModel], prefix: str) -> list[str]:
    out = []
    for name, sub in _fields(model).items():
        env = f"{prefix}{name.upper()}"
        ann = model.model_fields[name].annotation
        if sub is None or getattr(ann, "__origin__", None) is list:  # a list is one JSON variable
            out.append(env)
        else:
            out += _env_names(ann, env + "__")  # type: ignore[arg-type]
    return out


def test_operations_doc_lists_every_knob() -> None:
    """docs/operations.md documents each config field with its environment name."""
    from kvbm_codec.service.config import ENV_PREFIX, ModelConfig

    doc = (ROOT / "docs" / "operations.md").read_text()
    missing = [e for e in _env_names(ServiceConfig, ENV_PREFIX) if f"`{e}`" not in doc]
    missing += [f"models[].{n}" for n in ModelConfig.model_fields if f"`models[].{n}`" not in doc]
    assert not missing, missing
