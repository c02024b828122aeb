"""``lookback.loadtest.fanout`` and ``idle``: short end-to-end runs against the echo server and
Lookback itself, over several client processes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn

from lookback.loadtest.config import LoadConfig
from lookback.loadtest.fanout import run_load
from lookback.loadtest.idle import IdleSessions
from tests.bench.echo_server import create_echo_app
from tests.conftest import DEFAULT_MODEL, STORE, running_server, uvicorn_in_thread
from tests.conftest import test_settings as make_settings
from tests.support import free_port

# Client processes against real servers: seconds each.
pytestmark = pytest.mark.slow


@contextlib.contextmanager
def _echo(hop: int) -> Iterator[str]:
    port = free_port()
    config = uvicorn.Config(
        create_echo_app(hop),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        ws="websockets-sansio",
        ws_per_message_deflate=False,
        lifespan="on",
    )
    with uvicorn_in_thread(config):
        yield f"ws://127.0.0.1:{port}"


@pytest.mark.parametrize("results", ["all", "batch"])
@pytest.mark.parametrize("client", ["raw", "websockets"])
def test_short_run_against_echo_counts_every_result(client: str, results: str) -> None:
    """results=batch: the echo answers each message with one results message; every step
    in it is counted (and timed) as a result."""
    with _echo(hop=512) as url:
        r = run_load(
            LoadConfig(
                urls=[url],
                sessions=4,
                duration=0.8,
                warmup=0.2,
                frames_per_message=3,
                client=client,
                quiet=True,
                procs=2,
                results=results,
            )
        )
    assert r["connected"] == 4 and not r["process_failures"]
    assert r["close_codes"] == {"1000": 4}
    assert r["lost_results"] == 0 and r["no_summary"] == 0 and not r["errors"]
    # hop 4 frames, 3 frames per message: every frame sent is scored (the last hop padded)
    assert r["results_total"] >= r["frames_sent"] / 4
    assert r["results_measured"] > 0 and r["latency_ms"]["p50"] is not None


def _run_on_lookback(**kw: Any) -> dict[str, Any]:
    """A short run (3 sessions, 1 s) against a real server of the default model."""
    if not (STORE / DEFAULT_MODEL).is_dir():
        pytest.skip("no lookback-vad in model_store")
    with running_server(make_settings(models=[DEFAULT_MODEL], default_model=DEFAULT_MODEL)) as srv:
        short = {"urls": [srv.ws], "sessions": 3, "duration": 0.8, "warmup": 0.2, "quiet": True}
        return run_load(LoadConfig(**{**short, **kw}))


@pytest.mark.parametrize("results", ["all", "batch"])
def test_short_run_against_lookback(results: str) -> None:
    models = [p.parent.parent.name for p in STORE.glob("*/*/model.json")]
    if not models:
        pytest.skip("no model in model_store")
    model = "lookback-vad" if "lookback-vad" in models else models[0]
    with running_server(make_settings(models=[model], default_model=model)) as srv:
        cfg = LoadConfig(
            urls=[srv.ws],
            sessions=3,
            duration=0.8,
            warmup=0.2,
            model=model,
            quiet=True,
            frames_per_message=10,
            results=results,
        )
        r = run_load(cfg)
        assert r["connected"] == 3 and r["lost_results"] == 0 and not r["errors"]
        assert r["close_codes"] == {"1000": 3}
        assert r["results_total"] >= r["frames_sent"] // 10 and r["results_measured"] > 0


@pytest.mark.parametrize(
    ("encoding", "rate", "client"),
    [("mulaw", 8000, "raw"), ("pcm_f32le", 48000, "raw"), ("alaw", 8000, "websockets")],
)
def test_short_run_in_another_wire_form(encoding: str, rate: int, client: str) -> None:
    """Telephony (8 kHz G.711) and browser (48 kHz float) load: the server decodes and
    resamples; every step is received and timed against the message that completed it."""
    r = _run_on_lookback(model=DEFAULT_MODEL, encoding=encoding, sample_rate=rate, client=client)
    assert r["connected"] == 3 and r["lost_results"] == 0 and not r["errors"], r
    assert r["close_codes"] == {"1000": 3}
    # 20 ms messages for 1 s: about 125 frames (of 8 ms) per session, one step per frame
    assert 3 * 100 <= r["frames_sent"] <= 3 * 140
    assert r["results_total"] >= r["frames_sent"] - 3 and r["results_measured"] > 0
    # a step waits for at most one message (20 ms) plus the resampler's look-ahead: the
    # latencies are the server's, not a misattributed message period
    assert r["latency_ms"]["p50"] < 20


def test_idle_sessions_open_and_close() -> None:
    async def run(url: str) -> int:
        async with IdleSessions(url, 5) as idle:
            return idle.ready

    with _echo(hop=128) as url:
        assert asyncio.run(run(url)) == 5


@pytest.mark.parametrize(
    ("client", "results", "result_format", "encoding", "rate"),
    [
        ("raw", "all", "json", "pcm_s16le", None),
        ("raw", "batch", "binary", "pcm_s16le", None),
        ("websockets", "batch", "json", "pcm_s16le", None),
        ("raw", "all", "json", "mulaw", 8000),
    ],
)
def test_scores_under_load_match_rest(
    client: str, results: str, result_format: str, encoding: str, rate: int | None
) -> None:
    """``verify``: the first sessions' every score, however it came (one message per
    step, one per model call, binary rows; resampled G.711), equals what /v1/score gives
    for the exact audio each sent, within the bound, and the run passes on it."""
    r = _run_on_lookback(
        sessions=4,
        frames_per_message=3,
        client=client,
        results=results,
        result_format=result_format,
        encoding=encoding,
        sample_rate=rate,
        procs=2,
        verify=2,
    )
    v = r["verify"]
    assert v is not None and v["sessions"] == 2 and not v["failures"], v
    assert v["max_abs_diff"] <= v["tolerance"] == 1e-5
    assert r["passed"], r


def test_a_score_off_by_more_than_the_bound_fails_the_run() -> None:
    """``loadtest.verify.check`` against the real REST endpoint, with one kept score moved
    by 1e-4 and another session one result short: both are caught, and the report fails."""
    if not (STORE / DEFAULT_MODEL).is_dir():
        pytest.skip("no lookback-vad in model_store")
    from lookback.loadtest.audio import build_messages, load_audio
    from lookback.loadtest.rawclient import Proc, SessionBase
    from lookback.loadtest.report import merge
    from lookback.loadtest.verify import check, reference

    with running_server(make_settings(models=[DEFAULT_MODEL], default_model=DEFAULT_MODEL)) as srv:
        cfg = LoadConfig(urls=[srv.ws], quiet=True, frames_per_message=4, verify=2)
        raw = build_messages(load_audio(None, 0), 4, 0, framed=False)
        audio = b"".join(raw[3:20])
        ref = reference(cfg, srv.ws, audio, ["speech"])

        async def session(shift: float, drop: int) -> SessionBase:
            s = SessionBase(Proc(cfg), raw, 3)
            s.ready, s.labels = True, ["speech"]
            s.send_times.extend([0.0] * 17)  # messages 3..19 went out
            s.keep_scores()
            rows = [list(row) for row in ref[: len(ref) - drop]]
            rows[5][0] += shift
            s._keep(0, rows)
            return s

        off, short = asyncio.run(session(1e-4, 0)), asyncio.run(session(0.0, 1))
        got = check(cfg, [(srv.ws, off), (srv.ws, short)], raw)
    assert got["sessions"] == 2 and 0.9e-4 < got["max_abs_diff"] < 1.1e-4
    assert got["failures"] == [f"session 1: {len(ref) - 1} results streamed, REST scored {len(ref)} steps"]
    out = {"latencies": b"", "cpu": 0.0, "slip_p99_ms": 0.0, "messages": 0, "cpu_s": 0.0, "verify": got}
    zero = ("connected", "connect_s", "lost_results", "no_summary", "send_skipped", "frames_sent")
    out.update({k: 0 for k in (*zero, "results", "events", "window_s", "end_wait_s")})
    out.update({k: {} for k in ("errors", "close_codes", "connect_failures")})
    out.update(slip_p50_ms=0.0, slip_max_ms=0.0)
    report = merge(cfg, [out], [])
    assert report["verify"]["passed"] is False and report["passed"] is False
