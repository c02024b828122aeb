"""``lookback.loadtest.fanout`` and ``idle``: short end-to-end runs against the echo server and
Lookback itself, over several client processes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

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
    model = DEFAULT_MODEL if (STORE / DEFAULT_MODEL).is_dir() else None
    if model is None:
        pytest.skip("no lookback-vad in model_store")
    with running_server(make_settings(models=[model], default_model=model)) as srv:
        cfg = LoadConfig(
            urls=[srv.ws],
            sessions=3,
            duration=0.8,
            warmup=0.2,
            model=model,
            quiet=True,
            encoding=encoding,
            sample_rate=rate,
            client=client,
        )
        r = run_load(cfg)
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
