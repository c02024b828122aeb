"""``/metrics`` after real traffic: names, labels and values that match what was sent.

The server here has its own registry, so counts are exact. Per-session counters are
published when the session ends (and by the reaper), so values are read after the
server has recorded the end, which the test polls for.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lookback.protocol import Close
from tests.api.ws_util import (
    END,
    FRAME,
    HOPS,
    RATE,
    frames,
    manifest,
    metric,
    poll,
    run_session,
    score,
    scrape,
)
from tests.conftest import SILERO, Server, running_server
from tests.conftest import test_settings as make_settings


@pytest.fixture(scope="module")
def metrics_server(silero_model: str) -> Iterator[Server]:
    with running_server(make_settings(models=[SILERO], default_model=SILERO)) as srv:
        yield srv


def _key() -> str:
    return f"{SILERO}/{manifest(SILERO)['version']}"


async def test_metrics_after_a_stream_and_a_score(
    metrics_server: Server, speech_clip: np.ndarray, speech_wav: bytes
) -> None:
    srv = metrics_server
    key = _key()
    before = scrape(srv.url)
    assert metric(before, "lookback_sessions_started_total", model=key) == 0
    assert metric(before, "lookback_ready") == 1

    clip = speech_clip[: 3 * RATE]
    audio = frames(clip, 5)
    bad = [b"\x00" * 100, "not json"]
    s = await run_session(srv.ws, [bad[0], *audio, bad[1], END], model=SILERO)
    assert s.close_code == Close.NORMAL
    n_frames = math.ceil(len(clip) / FRAME)
    steps = math.ceil(n_frames * FRAME / HOPS[SILERO])
    assert s.summary["steps"] == steps

    def ended() -> dict | None:
        x = scrape(srv.url)
        return x if metric(x, "lookback_sessions_ended_total", model=key, reason="normal") else None

    m = poll(ended)

    assert metric(m, "lookback_sessions_started_total", model=key) == 1
    assert metric(m, "lookback_sessions_active", model=key) == 0
    assert metric(m, "lookback_frames_received_total", model=key) == n_frames
    assert metric(m, "lookback_steps_total", model=key) == steps
    batches = metric(m, "lookback_batches_total", model=key)
    assert 1 <= batches <= steps
    # histograms: one observation per batch (size, run time), one per step (wait, latency)
    assert metric(m, "lookback_batch_size_count", model=key) == batches
    assert metric(m, "lookback_batch_size_sum", model=key) == steps
    assert metric(m, "lookback_batch_size_bucket", model=key, le="+Inf") == batches
    assert metric(m, "lookback_model_run_seconds_count", model=key) == batches
    assert metric(m, "lookback_model_run_seconds_sum", model=key) > 0
    assert metric(m, "lookback_queue_wait_seconds_bucket", model=key, le="+Inf") == steps
    assert metric(m, "lookback_queue_wait_seconds_count", model=key) == steps
    assert metric(m, "lookback_frame_to_result_seconds_bucket", model=key, le="+Inf") == steps
    assert metric(m, "lookback_frame_to_result_seconds_count", model=key) == steps
    assert 0 < metric(m, "lookback_frame_to_result_seconds_sum", model=key) < steps * 2.5
    # buckets are cumulative
    les = sorted(
        (float(dict(lab)["le"]), v)
        for (n, lab), v in m.items()
        if n == "lookback_frame_to_result_seconds_bucket"
    )
    assert [v for _, v in les] == sorted(v for _, v in les)
    # errors by code, bytes
    assert metric(m, "lookback_errors_total", code="bad_frame_size") == 1
    assert metric(m, "lookback_errors_total", code="bad_json") == 1
    binary = sum(len(x) for x in [bad[0], *audio])
    assert metric(m, "lookback_bytes_received_total", transport="ws") == binary
    # every text message the client read, in the server's compact JSON
    sent = sum(len(json.dumps(x, separators=(",", ":"))) for x in s.messages)
    assert metric(m, "lookback_bytes_sent_total", transport="ws") == sent
    assert metric(m, "lookback_offline_clips_total", model=key) == 0

    r = score(srv.url, speech_wav, model=SILERO)
    assert r.status_code == 200
    after = scrape(srv.url)
    assert metric(after, "lookback_offline_clips_total", model=key) == 1
    assert metric(after, "lookback_offline_audio_seconds_total", model=key) == pytest.approx(
        len(speech_clip) / RATE
    )

    # a refused connect and an unknown model are counted too
    await run_session(srv.ws, model="no-such-model")
    final = scrape(srv.url)
    assert metric(final, "lookback_errors_total", code="unknown_model") == 1
    assert metric(final, "lookback_sessions_refused_total", reason="bad_request") == 1
    assert metric(final, "lookback_sessions_started_total", model=key) == 1


def test_model_info_and_exposition(server: Server, model: str) -> None:
    """Every loaded model exports its version and provider; the text format parses."""
    r = httpx.get(f"{server.url}/metrics", timeout=30)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    key = f"{model}/{manifest(model)['version']}"  # the model label is name/version everywhere
    info = [s for s in families["lookback_model_info"].samples if s.labels["model"] == key]
    assert len(info) == 1
    assert info[0].labels["version"] == manifest(model)["version"]
    assert info[0].labels["provider"] == "CPUExecutionProvider"
    assert info[0].value == 1
    for name, kind in [
        ("lookback_sessions_started", "counter"),
        ("lookback_frames_received", "counter"),
        ("lookback_batch_size", "histogram"),
        ("lookback_queue_wait_seconds", "histogram"),
        ("lookback_frame_to_result_seconds", "histogram"),
        ("lookback_state_slots", "gauge"),
        ("lookback_ready", "gauge"),
    ]:
        assert families[name].type == kind, name
    slots = scrape(server.url)
    assert metric(slots, "lookback_state_slots", model=key, kind="capacity") >= 1
