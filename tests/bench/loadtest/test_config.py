"""``lookback.loadtest.config``: a load test is for your own machine unless allowed."""

from __future__ import annotations

import pytest

from lookback.loadtest.config import LoadConfig, LoadtestError, check_urls, proc_count


def test_only_loopback_unless_allowed() -> None:
    check_urls(LoadConfig(urls=["ws://127.0.0.1:1"]))
    check_urls(LoadConfig(urls=["ws://localhost:1"]))
    with pytest.raises(LoadtestError, match="loopback"):
        check_urls(LoadConfig(urls=["ws://192.0.2.1:8000"]))
    check_urls(LoadConfig(urls=["ws://192.0.2.1:8000"], allow_remote=True))
    with pytest.raises(LoadtestError):
        check_urls(LoadConfig(sessions=0))
    check_urls(LoadConfig(results="batch"))
    with pytest.raises(LoadtestError, match="results"):
        check_urls(LoadConfig(results="some"))


def test_sessions_are_spread_over_processes() -> None:
    assert proc_count(LoadConfig(sessions=1)) == 1
    assert proc_count(LoadConfig(sessions=151)) == 2  # 150 per process at 1 frame/message
    assert proc_count(LoadConfig(sessions=400, frames_per_message=4)) == 2  # bigger messages: more each
    assert proc_count(LoadConfig(sessions=10, procs=3)) == 3
