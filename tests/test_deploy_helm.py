"""The Helm chart lints, renders with Helm's own engine (helm-python-sdk, no helm binary) for the default,
dev, GPU and multi-replica values, every rendered manifest passes the Kubernetes schemas of the oldest
supported and the two newest versions kubernetes-validate knows (offline), the config it ships is one
the service accepts, its values schema is the service's config model, and every misconfiguration that
would crash-loop after the model loads is refused at render time with a message naming the value."""

from __future__ import annotations

import json
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
_MINORS = sorted({tuple(map(int, v.split(".")[:2])) for v in kubernetes_validate.utils.all_versions()})
KUBE_VERSIONS = ("1.27.0", *(f"{a}.{b}.0" for a, b in _MINORS[-2:]))  # oldest supported + two newest
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
        "dev-values.yaml",
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
    for want in ("ConfigMap", "PodDisruptionBudget", "Service", "ServiceAccount", "StatefulSet", "Pod"):
        assert want in kinds, (name, kinds)
    for d in docs:
        if d["apiVersion"].startswith(CRD_GROUPS):
            continue
        for v in KUBE_VERSIONS:
            kubernetes_validate.validate(d, v, strict=True)


def test_validator_rejects_a_broken_manifest() -> None:
    """The schema check is not vacuous: a typo'd field and a wrong type are both caught."""
    sts = _kind(_render(_values(CHART / "ci" / "default-values.yaml")), "StatefulSet")[0]
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
    if values.get("persistence", {}).get("enabled", True):
        assert [t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]] == ["data"]
        assert cfg.disk_path is not None and str(cfg.disk_path).startswith("/var/lib/kvbm-codec/")
        assert mounts["/var/lib/kvbm-codec"] == "data"
        assert cfg.disk_capacity_bytes is not None and cfg.disk_capacity_bytes < _bytes(
            sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]
        )
    else:
        assert "volumeClaimTemplates" not in sts["spec"] and cfg.disk_path is None
    # ports: container, Service and config agree
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["grpc"] == cfg.grpc_port and ports["metrics"] == cfg.metrics_port
    svc = next(s for s in _kind(docs, "Service") if s["spec"].get("clusterIP") != "None")
    ports.pop("probes")  # kubelet reaches it on the pod; the Service carries only client-facing ports
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


def test_probes_go_through_the_probe_port_and_prestop_flips_readiness(rendered, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """TLS or not, kubelet probes HTTP on the plaintext probe port (which asks the gRPC server itself)."""
    _, _, docs = rendered
    cfg = _config(docs, tmp_path)
    c = _pod(docs)["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["probes"] == cfg.probes.port
    assert c["startupProbe"]["httpGet"] == {"path": "/readyz", "port": "probes"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "probes"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "probes"}
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 600
    cmd = c["lifecycle"]["preStop"]["exec"]["command"]
    assert cmd[:4] == ["python", "-m", "kvbm_codec.service.probes", "prestop"]
    assert cmd[cmd.index("--port") + 1] == str(cfg.probes.port)
    delay = float(cmd[cmd.index("--delay") + 1])
    assert delay + cfg.drain_timeout_s < _pod(docs)["terminationGracePeriodSeconds"]
    from kvbm_codec.service import probes

    with pytest.raises(SystemExit):  # the hook's arguments parse with the module's own parser
        probes.main([*cmd[4:], "--help"])


def test_gpu_variant() -> None:
    docs = _render(_values(CHART / "ci" / "gpu-values.yaml"))
    pod = _pod(docs)
    c = pod["containers"][0]
    assert c["image"].endswith("-cuda")
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert _kind(docs, "ConfigMap")[0]["data"]["config.yaml"].count("mode: mtls") == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["runtimeClassName"] == "nvidia"
    cpu = _pod(_render(_values(CHART / "ci" / "default-values.yaml")))
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
    assert not _kind(_render(_values(CHART / "ci" / "default-values.yaml")), "ServiceMonitor")


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


# ---- values schema and guards ---------------------------------------------------------------------------

SECURE = {"tls": {"secretName": "t"}, "auth": {"tokenSecret": {"name": "tok"}}}


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _refusal(values: dict[str, Any]) -> str:
    with pytest.raises(helm.HelmError) as info:
        _render(values)
    return str(info.value)


def test_values_schema_and_chart_files_are_generated() -> None:
    """values.schema.json is ServiceConfig's schema (plus the chart's layout); files/ copies deploy/."""
    import runpy

    sync = runpy.run_path(str(ROOT / "deploy" / "chart_sync.py"))
    for path, text in sync["render"]().items():
        assert path.read_text() == text, f"{path.name} is stale: run .venv/bin/python deploy/chart_sync.py"
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["additionalProperties"] is False
    assert set(schema["properties"]["config"]["properties"]) == set(ServiceConfig.model_fields)
    assert set(schema["properties"]) - {"global"} == set(yaml.safe_load((CHART / "values.yaml").read_text()))


@pytest.mark.parametrize(
    ("values", "names"),
    [
        ({"replicas": 3}, "'replicas'"),
        ({"serviceMonitr": {"enabled": True}}, "'serviceMonitr'"),
        ({"config": {"memory_capacity": "8GiB"}}, "'memory_capacity'"),
        ({"config": {"nixl": {"stagingbytes": 1}}}, "'stagingbytes'"),
        ({"config": {"memory_capacity_bytes": "8 gigs"}}, "memory_capacity_bytes"),
        ({"config": {"when_full": "drop"}}, "when_full"),
        ({"persistence": {"size": "lots"}}, "size"),
    ],
)
def test_schema_refuses_typos_and_bad_values(values: dict[str, Any], names: str) -> None:
    msg = _refusal(_merge(SECURE, values))
    assert names in msg, msg


GUARDS = [
    # (case, values on top of a secure install, words the message must contain)
    ("disk tier above volume", {"persistence": {"size": "50Gi"}, "config": {"disk_capacity_bytes": "90GiB"}},
     ["config.disk_capacity_bytes", "persistence.size"]),
    ("drain beyond grace", {"config": {"drain_timeout_s": 60}}, ["terminationGracePeriodSeconds",
     "config.drain_timeout_s"]),
    ("memory limit below tier", {"resources": {"limits": {"memory": "6Gi"}}},
     ["resources.limits.memory", "config.memory_capacity_bytes"]),
    ("no memory limit", {"resources": {"limits": None}}, ["resources.limits.memory"]),
    ("s3 without credentials", {"config": {"s3": {"enabled": True, "port": 9000}}},
     ["s3.credentialsSecret.name"]),
    ("s3 without port", {"config": {"s3": {"enabled": True}}, "s3": {"credentialsSecret": {"name": "k"}}},
     ["config.s3.port"]),
    ("durable without disk", {"config": {"memory_capacity_bytes": 0}, "persistence": {"enabled": False}},
     ["config.memory_capacity_bytes", "persistence.enabled"]),
    ("disk path without volume", {"config": {"disk_path": "/data"}, "persistence": {"enabled": False}},
     ["config.disk_path", "persistence.enabled"]),
    ("no auth", {"tls": {"secretName": ""}, "auth": {"tokenSecret": {"name": ""}}},
     ["auth.tokenSecret.name", "auth.allowUnauthenticated"]),
    ("tokens in plaintext", {"tls": {"secretName": ""}}, ["auth.tokenSecret.name", "tls.secretName"]),
    ("client certs without secret", {"tls": {"secretName": "", "requireClientCert": True}},
     ["tls.requireClientCert", "tls.secretName"]),
    ("tls by hand", {"config": {"tls": {"enabled": True}}, "tls": {"secretName": ""},
     "auth": {"allowUnauthenticated": True, "tokenSecret": {"name": ""}}},
     ["config.tls.enabled", "tls.secretName"]),
    ("auth mode by hand", {"config": {"auth": {"mode": "mtls"}}}, ["config.auth.mode"]),
    ("literal secret env", {"extraEnv": [{"name": "KVBM_CODEC_S3_SECRET_KEY", "value": "x"}]},
     ["KVBM_CODEC_S3_SECRET_KEY", "secretKeyRef"]),
    ("probes off", {"config": {"probes": {"port": None}}}, ["config.probes.port"]),
    ("liveness below deadline", {"config": {"request_timeout_s": 90}},
     ["config.probes.stuck_after_s", "config.request_timeout_s"]),
]  # fmt: skip


@pytest.mark.parametrize(("case", "values", "words"), GUARDS, ids=[g[0] for g in GUARDS])
def test_guard_refuses_misconfiguration(case: str, values: dict[str, Any], words: list[str]) -> None:
    msg = _refusal(_merge(SECURE, values))
    for w in words:
        assert w in msg, (case, msg)


def test_an_empty_values_file_is_refused_for_lack_of_auth() -> None:
    assert "no authentication configured" in _refusal({})


def test_guards_pass_at_the_edge() -> None:
    """The guards are not over-eager: quantities in either grammar, exactly-fitting sizes render."""
    docs = _render(
        _merge(
            SECURE,
            {
                "persistence": {"size": "100Gi"},
                "config": {"disk_capacity_bytes": "95GiB", "memory_capacity_bytes": "12Gi"},
                "resources": {"limits": {"memory": "14080Mi"}},  # 12Gi + 256Mi + 1536Mi
                "terminationGracePeriodSeconds": 30,  # 20 s drain + 5 s preStop + 5
            },
        )
    )
    text = _kind(docs, "ConfigMap")[0]["data"]["config.yaml"]
    assert "disk_capacity_bytes: 95GiB" in text


def test_disk_capacity_follows_the_volume(tmp_path: Path) -> None:
    docs = _render(_merge(SECURE, {"persistence": {"size": "500Gi"}}))
    cfg = _config(docs, tmp_path)
    assert cfg.disk_capacity_bytes == int(500 * (1 << 30) * 0.9)
    assert cfg.memory_capacity_bytes == 8 << 30  # "8GiB" in values.yaml, bytes in the service


def test_secure_by_default_and_secrets_never_in_configmaps(tmp_path: Path) -> None:
    docs = _render(_values(CHART / "ci" / "multi-replica-values.yaml"))
    cfg = _config(docs, tmp_path)
    assert cfg.auth.mode == "token" and cfg.tls.enabled
    cm = _kind(docs, "ConfigMap")[0]["data"]["config.yaml"]
    env = {e["name"]: e for e in _pod(docs)["containers"][0]["env"]}
    for name in ("KVBM_CODEC_S3_ACCESS_KEY", "KVBM_CODEC_S3_SECRET_KEY"):
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "kvbm-codec-s3" and "value" not in env[name]
    assert "kvbm-codec-s3" not in cm and "kvbm-codec-tokens" not in cm  # only mount paths reach it
    mtls = _config(_render({"tls": {"secretName": "t", "requireClientCert": True}}), tmp_path)
    assert mtls.auth.mode == "mtls" and mtls.tls.require_client_cert
    assert _config(_render(_values(CHART / "ci" / "dev-values.yaml")), tmp_path).auth.mode == "none"


def test_network_policy() -> None:
    docs = _render(_values(CHART / "ci" / "multi-replica-values.yaml"))
    (np,) = _kind(docs, "NetworkPolicy")
    sts = _kind(docs, "StatefulSet")[0]
    assert np["spec"]["podSelector"]["matchLabels"] == sts["spec"]["selector"]["matchLabels"]
    rules = {tuple(p["port"] for p in r["ports"]): r.get("from") for r in np["spec"]["ingress"]}
    assert rules[("grpc", "s3")] == [{"podSelector": {}}]  # KV only from the release's namespace
    assert rules[("metrics",)] == [{"namespaceSelector": {}}]
    assert rules[("probes",)] is None  # health status only, from anywhere (kubelet, helm test)
    assert not _kind(_render(_values(CHART / "ci" / "dev-values.yaml")), "NetworkPolicy")


def test_prometheus_rule_and_dashboard_come_from_deploy() -> None:
    docs = _render(_merge(SECURE, {"prometheusRule": {"enabled": True}, "dashboard": {"enabled": True}}))
    (rule,) = _kind(docs, "PrometheusRule")
    assert rule["spec"] == yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    dash = next(c for c in _kind(docs, "ConfigMap") if c["metadata"]["name"].endswith("-dashboard"))
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dash["data"]["kvbm-codec.json"]) == json.loads(
        (ROOT / "deploy" / "grafana" / "kvbm-codec.json").read_text()
    )
    custom = _render(_values(CHART / "ci" / "multi-replica-values.yaml"))
    urls = {
        r["annotations"]["runbook_url"]
        for g in _kind(custom, "PrometheusRule")[0]["spec"]["groups"]
        for r in g["rules"]
    }
    assert urls and all(u.startswith("https://runbooks.example.com/kvbm-codec/operations.md#") for u in urls)
    assert not _kind(_render(SECURE), "PrometheusRule")


def test_dynamo_conventions_and_hooks() -> None:
    extra = {
        "podMonitor": {"enabled": True},
        "extraVolumes": [{"name": "ca", "configMap": {"name": "ca"}}],
        "extraVolumeMounts": [{"name": "ca", "mountPath": "/etc/ca"}],
        "sidecars": [{"name": "shipper", "image": "busybox"}],
        "initContainers": [{"name": "wait", "image": "busybox"}],
        "extraEnv": [{"name": "ETCD_ENDPOINTS", "value": "http://etcd:2379"}],
    }
    docs = _render(_merge(SECURE, extra))
    sts = _kind(docs, "StatefulSet")[0]
    pod = sts["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert (
        labels["nvidia.com/metrics-enabled"] == "true" and labels["nvidia.com/dynamo-namespace"] == "dynamo"
    )
    spec = pod["spec"]
    c = spec["containers"][0]
    env = {e["name"]: e for e in c["env"]}
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert env["ETCD_ENDPOINTS"]["value"] == "http://etcd:2379"
    assert [x["name"] for x in spec["containers"]] == ["kvbm-codec", "shipper"]
    assert spec["initContainers"][0]["name"] == "wait"
    assert {"name": "ca", "mountPath": "/etc/ca"} in c["volumeMounts"]
    assert any(v["name"] == "ca" for v in spec["volumes"])
    assert sts["spec"]["persistentVolumeClaimRetentionPolicy"] == {
        "whenDeleted": "Retain",
        "whenScaled": "Retain",
    }
    (tsc,) = spec["topologySpreadConstraints"]  # spread over nodes by default
    assert tsc["topologyKey"] == "kubernetes.io/hostname"
    assert tsc["labelSelector"]["matchLabels"] == sts["spec"]["selector"]["matchLabels"]
    (pm,) = _kind(docs, "PodMonitor")
    assert pm["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    assert pm["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_helm_test_hook_checks_every_replica() -> None:
    docs = _render(_values(CHART / "ci" / "multi-replica-values.yaml"))
    (pod,) = _kind(docs, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    cmd = pod["spec"]["containers"][0]["command"]
    assert cmd[:4] == ["python", "-m", "kvbm_codec.service.probes", "check"]
    urls = cmd[4:]
    assert len(urls) == 4 and all(u.endswith(":9465/readyz") for u in urls)
    assert urls[3].startswith("http://kvbm-codec-3.kvbm-codec-headless.dynamo.svc")
    assert pod["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True


def test_metrics_token_secret_reaches_the_pod_and_both_monitors(tmp_path: Path) -> None:
    """metricsAuth.tokenSecret: the token is mounted as a file the config names (never in the
    ConfigMap), and the ServiceMonitor and PodMonitor scrape with the same Secret."""
    values = _merge(
        SECURE,
        {
            "metricsAuth": {"tokenSecret": {"name": "kvbm-metrics", "key": "tok"}},
            "serviceMonitor": {"enabled": True},
            "podMonitor": {"enabled": True},
        },
    )
    docs = _render(values)
    cfg = _config(docs, tmp_path)
    assert cfg.metrics_token_file == Path("/etc/kvbm-codec/metrics-auth/token")
    pod = _pod(docs)
    vol = next(v for v in pod["volumes"] if v["name"] == "metrics-auth")
    assert vol["secret"]["secretName"] == "kvbm-metrics"
    assert vol["secret"]["items"] == [{"key": "tok", "path": "token"}]
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["metrics-auth"] == "/etc/kvbm-codec/metrics-auth"
    (sm,) = _kind(docs, "ServiceMonitor")
    (pm,) = _kind(docs, "PodMonitor")
    for ep in (sm["spec"]["endpoints"][0], pm["spec"]["podMetricsEndpoints"][0]):
        want = {"type": "Bearer", "credentials": {"name": "kvbm-metrics", "key": "tok"}}
        assert ep["authorization"] == want
    assert "kvbm-metrics" not in _kind(docs, "ConfigMap")[0]["data"]["config.yaml"]
    plain = _render(_merge(SECURE, {"serviceMonitor": {"enabled": True}}))
    assert "authorization" not in _kind(plain, "ServiceMonitor")[0]["spec"]["endpoints"][0]
    assert _config(plain, tmp_path).metrics_token_file is None
