"""``lookback.loadtest.ramp``: the search brackets, bisects and retries a slipped failure once."""

from __future__ import annotations

from typing import Any

import pytest

from lookback.loadtest import ramp as ramp_module
from lookback.loadtest.config import LoadConfig
from lookback.loadtest.ramp import ramp


def test_ramp_brackets_and_bisects(monkeypatch: pytest.MonkeyPatch) -> None:
    capacity = 300
    seen: list[int] = []

    def fake_run(cfg: LoadConfig) -> dict[str, Any]:
        seen.append(cfg.sessions)
        ok = cfg.sessions <= capacity
        return {
            "sessions": cfg.sessions,
            "passed": ok,
            "lost_results": 0,
            "errors": {},
            "latency_ms": {"p50": 1.0, "p99": 5.0 if ok else 50.0, "p99.9": 9.0},
            "results_per_s": 1.0,
            "connected": cfg.sessions,
            "client": {"cpu_total": 0.1, "bottleneck": False, "slip_p99_ms": 0.1},
        }

    monkeypatch.setattr(ramp_module, "run_load", fake_run)
    monkeypatch.setattr(ramp_module, "wait_server_idle", lambda url, timeout=0: None)
    cfg = LoadConfig(quiet=True, warmup=0, duration=0.01)
    res = ramp(cfg, start=32, max_trials=20)
    assert seen[:5] == [32, 64, 128, 256, 512]
    assert res["stop"] == "converged" and res["max_sessions"] <= capacity < res["first_fail"]
    assert res["first_fail"] - res["max_sessions"] <= max(2, 0.05 * capacity + 1)
    seen.clear()
    res = ramp(cfg, start=1000, max_trials=20)  # start above capacity: halve first
    assert seen[:3] == [1000, 500, 250] and res["max_sessions"] <= capacity


def test_ramp_retries_a_failure_once_when_the_client_slipped(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def fake_run(cfg: LoadConfig) -> dict[str, Any]:
        calls.append(cfg.sessions)
        noisy = calls.count(cfg.sessions) == 1 and cfg.sessions == 64  # first try at 64: noise
        ok = cfg.sessions <= 100 and not noisy
        return {
            "sessions": cfg.sessions,
            "passed": ok,
            "lost_results": 0,
            "errors": {},
            "latency_ms": {"p50": 1.0, "p99": 5.0 if ok else 50.0, "p99.9": 9.0},
            "results_per_s": 1.0,
            "connected": cfg.sessions,
            "client": {"cpu_total": 0.1, "bottleneck": noisy or cfg.sessions == 128, "slip_p99_ms": 5.0},
        }

    monkeypatch.setattr(ramp_module, "run_load", fake_run)
    monkeypatch.setattr(ramp_module, "wait_server_idle", lambda url, timeout=0: None)
    res = ramp(LoadConfig(quiet=True, warmup=0, duration=0.01), start=32, max_trials=20)
    assert calls[:5] == [32, 64, 64, 128, 128]  # each slipped failure runs once more
    assert 96 <= res["max_sessions"] <= 100
    assert [t["retried"] for t in res["trials"][:5]] == [False, True, False, True, False]
