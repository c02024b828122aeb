"""Prometheus: ``promtool check config|rules`` and ``promtool test rules`` (alerts fire on
synthetic series and stay quiet on healthy ones); alert thresholds match the configured limits."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.conftest import (
    ALERTS,
    K8S,
    PROM_CONFIG,
    PROM_DIR,
    alert_rules,
    compose,
    compose_env,
    container_env,
    deployment,
    load_yaml,
    require_tool,
    run_tool,
)


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


ALERT_UNIT_TESTS.append(
    {  # a consumer falls behind on partition 0 (lag growing); partition 1 is large but draining.
        "interval": "1m",
        "input_series": [
            {
                "series": f'lookback_source_lag_messages{{job="lookback",instance="{A}",'
                f'source="kafka:audio",partition="0"}}',
                "values": "500+100x30",
            },
            {
                "series": f'lookback_source_lag_messages{{job="lookback",instance="{A}",'
                f'source="kafka:audio",partition="1"}}',
                "values": "5000-100x30",
            },
            {
                "series": f'lookback_source_messages_total{{job="lookback",instance="{A}",'
                f'source="kafka:audio",outcome="rejected",reason="bad_frame_size"}}',
                "values": "0+300x30",
            },
        ],
        "alert_rule_test": [
            {
                "eval_time": "25m",
                "alertname": "LookbackSourceLagGrowing",
                "exp_alerts": [
                    {
                        "exp_labels": _labels(
                            instance=A, source="kafka:audio", partition="0", severity="warning"
                        ),
                        "exp_annotations": _summary(
                            "kafka:audio partition 0 is 3000 messages behind on a:8000"
                        ),
                    }
                ],
            },
            {
                "eval_time": "20m",
                "alertname": "LookbackSourceRejections",
                "exp_alerts": [
                    {
                        "exp_labels": _labels(
                            instance=A, source="kafka:audio", reason="bad_frame_size", severity="info"
                        ),
                        "exp_annotations": _summary(
                            "kafka:audio rejects messages (bad_frame_size) on a:8000"
                        ),
                    }
                ],
            },
        ],
    }
)


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
