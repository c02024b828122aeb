"""Grafana: the dashboard parses, its PromQL parses, and every metric it names is exposed by a
live ``/metrics`` of the app (or, for a labelled family without samples yet, by the
``Metrics`` registry); provisioning points at the dashboard."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.conftest import (
    DASHBOARD,
    GRAFANA_PROVISIONING,
    MODEL_STORE,
    alert_rules,
    bind_mounts,
    compose,
    dashboard,
    dashboard_exprs,
    dashboard_panels,
    load_yaml,
    metric_names,
    require_tool,
    run_tool,
)


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
    mounts = bind_mounts(compose()["services"]["grafana"])
    assert mounts[provider["options"]["path"]] == DASHBOARD.parent
    assert mounts["/etc/grafana/provisioning/datasources"] == GRAFANA_PROVISIONING / "datasources"
    assert mounts["/etc/grafana/provisioning/dashboards"] == GRAFANA_PROVISIONING / "dashboards"
