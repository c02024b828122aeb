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


def test_wire_forms() -> None:
    """Another encoding or rate: 20 ms messages, the query names the form, bad forms refused."""
    from lookback.engine.pcm import SAMPLE_RATES
    from lookback.loadtest.config import RATES, message_samples, message_seconds, query_string

    assert RATES == SAMPLE_RATES  # the load generator's copy (no numpy at CLI start) is the server's
    default = LoadConfig(model="m")
    assert query_string(default) == "model=m&encoding=pcm_s16le&results=all"  # as before
    assert message_samples(LoadConfig(frames_per_message=3)) == 384
    tel = LoadConfig(model="m", encoding="mulaw", sample_rate=8000)
    assert query_string(tel) == "model=m&encoding=mulaw&results=all&sample_rate=8000"
    assert message_samples(tel) == 160 and message_seconds(tel) == 0.02
    assert message_samples(LoadConfig(encoding="pcm_f32le", sample_rate=44100)) == 882
    assert message_samples(LoadConfig(encoding="alaw")) == 320  # G.711 at 16 kHz: 20 ms too
    assert proc_count(LoadConfig(sessions=400, encoding="mulaw", sample_rate=8000)) == 2  # 2.5 frames
    check_urls(tel)
    for bad in (
        LoadConfig(encoding="opus"),
        LoadConfig(sample_rate=11025),
        LoadConfig(sample_rate=44100, message_ms=1),  # 44.1 samples
    ):
        with pytest.raises(LoadtestError):
            check_urls(bad)
