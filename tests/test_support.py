"""``tests/support.py``: ``metric`` reads scraped samples, exposition text and a live registry
the same way, so every folder's tests can share it."""

from __future__ import annotations

from prometheus_client import generate_latest

from lookback.metrics import Metrics
from tests.support import free_port, metric, parse_metrics, read_clip


def test_metric_reads_every_source_alike() -> None:
    m = Metrics()
    m.sessions_ended.labels("a/1", "normal").inc(2)
    m.sessions_ended.labels("a/1", "idle_timeout").inc()
    m.sessions_ended.labels("b/1", "normal").inc(4)
    text = generate_latest(m.registry).decode()
    for source in (m.registry, text, parse_metrics(text)):
        assert metric(source, "lookback_sessions_ended_total") == 7
        assert metric(source, "lookback_sessions_ended_total", model="a/1") == 3
        assert metric(source, "lookback_sessions_ended_total", reason="normal") == 6
        assert metric(source, "lookback_sessions_ended_total", model="c/1") == 0


def test_read_clip_and_free_port() -> None:
    clip = read_clip("silero_ref_speech.wav")
    assert clip.dtype.name == "int16" and clip.ndim == 1 and len(clip) > 16000
    assert 0 < free_port() < 65536
