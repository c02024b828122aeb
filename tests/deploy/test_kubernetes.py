"""Kubernetes: every manifest validates offline and strictly against the schemas shipped by
``kubernetes-validate``; the PodMonitor CRD is checked structurally; the resources agree
with each other (selectors, ports, probes, grace periods, HPA target)."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.conftest import (
    K8S,
    K8S_MANIFESTS,
    K8S_OLDEST,
    container_env,
    deployment,
    dockerfile_uid,
    load_yaml,
    load_yaml_docs,
    run_tool,
    seconds,
)


def k8s_versions() -> list[str]:
    import kubernetes_validate.utils as kv

    latest = kv.major_minor(kv.latest_version())
    assert K8S_OLDEST in {kv.major_minor(v) for v in kv.all_versions()}
    return [K8S_OLDEST, latest]


def check_podmonitor(doc: dict[str, Any]) -> None:
    """Structural check of the monitoring.coreos.com/v1 PodMonitor (no CRD schema offline)."""
    assert set(doc) <= {"apiVersion", "kind", "metadata", "spec"}
    assert doc["metadata"]["name"]
    spec = doc["spec"]
    assert set(spec) <= {
        "selector",
        "podMetricsEndpoints",
        "namespaceSelector",
        "jobLabel",
        "podTargetLabels",
        "sampleLimit",
        "targetLimit",
    }
    assert spec["selector"]["matchLabels"]
    allowed = {
        "port",
        "path",
        "interval",
        "scrapeTimeout",
        "scheme",
        "honorLabels",
        "authorization",
        "relabelings",
        "metricRelabelings",
        "tlsConfig",
    }
    for ep in spec["podMetricsEndpoints"]:
        assert set(ep) <= allowed, set(ep) - allowed
        assert isinstance(ep["port"], str) and ep["path"].startswith("/")
        assert seconds(ep["scrapeTimeout"]) < seconds(ep["interval"])


@pytest.mark.parametrize("path", K8S_MANIFESTS, ids=lambda p: p.name)
def test_k8s_manifest_validates(path: Path) -> None:
    import kubernetes_validate

    docs = load_yaml_docs(path)
    assert docs, f"{path} is empty"
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            assert (doc["apiVersion"], doc["kind"]) == ("monitoring.coreos.com/v1", "PodMonitor")
            check_podmonitor(doc)
            continue
        for version in k8s_versions():
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                where = ".".join(str(p) for p in exc.path)
                pytest.fail(f"{path.name} {doc['kind']} @ {version}: {where}: {exc.message}", pytrace=False)


def test_k8s_validation_is_strict() -> None:
    """Control: the validator really rejects a misspelt field and a wrong type."""
    import kubernetes_validate

    typo = copy.deepcopy(deployment())
    probe = typo["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    probe["periodSecond"] = probe.pop("periodSeconds")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, K8S_OLDEST, strict=True)
    wrong_type = copy.deepcopy(deployment())
    wrong_type["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong_type, K8S_OLDEST, strict=True)


def test_kustomization_lists_every_manifest() -> None:
    kust = load_yaml(K8S / "kustomization.yaml")
    assert sorted(kust["resources"]) == sorted(p.name for p in K8S_MANIFESTS)
    assert [i["name"] for i in kust["images"]] == ["lookback"]


def test_kustomize_build() -> None:
    """kubectl's built-in kustomize renders the kustomization; the output validates too."""
    import kubernetes_validate

    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip(
            "kubectl not installed: kustomize rendering not checked "
            "(test_kustomization_lists_every_manifest still checks the resource list)"
        )
    res = run_tool(kubectl, "kustomize", str(K8S))
    assert res.returncode == 0, res.stderr
    docs = [d for d in yaml.safe_load_all(res.stdout) if d]
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(d["kind"] for p in K8S_MANIFESTS for d in load_yaml_docs(p))
    for doc in docs:
        if not doc["apiVersion"].startswith("monitoring.coreos.com/"):
            kubernetes_validate.validate(doc, K8S_OLDEST, strict=True)


def test_k8s_resources_agree() -> None:
    dep = deployment()
    pod = dep["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000}
    assert container_env(dep)["LOOKBACK_PORT"] == "8000"

    (svc,) = load_yaml_docs(K8S / "service.yaml")
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    (svc_port,) = svc["spec"]["ports"]
    assert svc_port["targetPort"] in ports

    (pdb,) = load_yaml_docs(K8S / "pdb.yaml")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (pm,) = load_yaml_docs(K8S / "podmonitor.yaml")
    assert pm["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert [e["port"] for e in pm["spec"]["podMetricsEndpoints"]] == ["http"]
    assert pm["spec"]["podMetricsEndpoints"][0]["path"] == "/metrics"

    (ing,) = load_yaml_docs(K8S / "ingress.yaml")
    backend = ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == svc["metadata"]["name"]
    assert backend["port"]["name"] == svc_port["name"]
    notes = ing["metadata"]["annotations"]
    for key in ("proxy-read-timeout", "proxy-send-timeout"):
        assert int(notes[f"nginx.ingress.kubernetes.io/{key}"]) >= 3600
    assert ing["spec"]["ingressClassName"] == "nginx"

    (hpa,) = load_yaml_docs(K8S / "hpa.yaml")
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", dep["metadata"]["name"])
    kinds = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert kinds["Pods"]["pods"]["metric"]["name"] == "lookback_sessions_active"
    assert kinds["Pods"]["pods"]["target"]["type"] == "AverageValue"
    assert kinds["Resource"]["resource"]["name"] == "cpu"
    assert "cpu" in container["resources"]["requests"], "CPU utilization needs a CPU request"
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300
    assert hpa["spec"]["minReplicas"] >= 2

    adapter = load_yaml(K8S / "prometheus-adapter-values.yaml")
    (rule,) = adapter["rules"]["custom"]
    assert rule["seriesQuery"].startswith("lookback_sessions_active{")
    assert rule["name"]["as"] == "lookback_sessions_active"
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    assert "<<.Series>>" in rule["metricsQuery"] and "<<.GroupBy>>" in rule["metricsQuery"]


def test_k8s_deployment_drains_and_is_hardened() -> None:
    dep = deployment()
    spec = dep["spec"]
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert int(spec["strategy"]["rollingUpdate"]["maxSurge"]) >= 1
    pod = spec["template"]["spec"]
    (c,) = pod["containers"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1

    cmd = c["lifecycle"]["preStop"]["exec"]["command"]
    assert cmd[0] == "sleep"
    pre_stop = float(cmd[1])
    assert pre_stop >= 5
    from lookback.settings import Settings

    drain = float(
        container_env(dep).get("LOOKBACK_DRAIN_GRACE_S", Settings.model_fields["drain_grace_s"].default)
    )
    # SIGTERM -> drain sessions (<= drain) -> uvicorn's graceful HTTP shutdown (<= drain).
    assert pod["terminationGracePeriodSeconds"] > pre_stop + 2 * drain

    sec = pod["securityContext"]
    assert sec["runAsNonRoot"] is True and sec["runAsUser"] != 0
    assert sec["runAsUser"] == dockerfile_uid()
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
