"""Graceful drain: SIGTERM to a real ``lookback serve`` process with open sessions.

While it drains, ``/readyz`` answers 503 and new sessions are refused with 503; every
open session has its buffered audio scored (a partial hop is zero-padded) and gets a
final summary whose steps account for every frame it sent, then close 1001; then the
process exits 0 within the grace period.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import orjson
import pytest

from tests.api.ws_util import SILERO_Q, Transcript, read_all, refused, wait_until, ws_connect
from tests.conftest import spawn_server
from tests.support import read_clip

GRACE_S = 15.0
CLIP = read_clip("silero_ref_speech.wav")
FRAME_BYTES = 256


def frames_of(n: int) -> bytes:
    """``n`` frames of real speech (the clip repeated as needed)."""
    need = n * FRAME_BYTES
    pcm = CLIP.tobytes()
    return (pcm * (need // len(pcm) + 1))[:need]


@pytest.mark.slow
async def test_sigterm_drains_open_sessions(tmp_path: Path, silero_model: str) -> None:
    # frames per session: three end mid-hop (Silero's hop is 4 frames); the last one has
    # ~2000 steps still queued when SIGTERM lands, which keeps the drain open long enough
    # to watch it from outside
    plan = [41, 42, 43, 44, 8002]
    env = {
        "LOOKBACK_MODELS": "silero-vad",
        "LOOKBACK_DEFAULT_MODEL": "silero-vad",
        "LOOKBACK_DRAIN_GRACE_S": str(GRACE_S),
        "LOOKBACK_MAX_PENDING_STEPS": "4096",
    }
    with spawn_server(tmp_path, **env) as srv:
        url = f"{srv.ws}/v1/stream?{SILERO_Q}"
        ts = [Transcript() for _ in plan]
        async with (
            ws_connect(url) as w0,
            ws_connect(url) as w1,
            ws_connect(url) as w2,
            ws_connect(url) as w3,
            ws_connect(url) as w4,
        ):
            socks = [w0, w1, w2, w3, w4]
            readers = [asyncio.create_task(read_all(ws, t)) for ws, t in zip(socks, ts, strict=True)]
            for ws, n in zip(socks, plan, strict=True):
                pcm = frames_of(n)
                per = 3 if n < 100 else 64
                for i in range(0, len(pcm), per * FRAME_BYTES):
                    await ws.send(pcm[i : i + per * FRAME_BYTES])
                # a barrier: its error reply proves the server has read every frame before
                await ws.send('{"type":"barrier"}')
            await wait_until(
                lambda: all(t.error_codes() == ["unknown_type"] for t in ts),
                what="every frame read by the server",
            )
            heavy = ts[-1]
            assert heavy.results < 1000, "too few steps pending to watch the drain"

            t_term = time.monotonic()
            srv.terminate()
            async with httpx.AsyncClient(base_url=srv.url, timeout=5) as client:
                while True:  # readiness poll: the first non-200 must be the drain's 503
                    r = await client.get("/readyz")
                    if r.status_code != 200:
                        break
                assert r.status_code == 503 and r.json()["draining"] is True
                status, headers, body = await refused(url)
                assert status == 503 and orjson.loads(body)["error"]["code"] == "draining"
                assert int(headers["retry-after"]) >= 1
            assert not heavy.of_type("summary"), "drain already over: nothing was observed"
            await asyncio.wait_for(asyncio.gather(*readers), GRACE_S)

        for t, n in zip(ts, plan, strict=True):
            assert (t.close_code, t.close_reason) == (1001, "draining"), t.close_code
            s = t.summary
            steps = -(-n // 4)
            assert s["frames"] == n and s["steps"] == steps and s["failed_steps"] == 0
            assert s["padded_samples"] == (-n % 4) * 128
            results = t.of_type("result")
            assert [r["step"] for r in results] == list(range(steps)), "a step without result"
            assert t.parsed()[-1]["type"] == "summary"
        code = await asyncio.to_thread(srv.proc.wait, GRACE_S)
        took = time.monotonic() - t_term
        assert code == 0, srv.log.read_text()
        assert took < GRACE_S
        log = srv.log.read_text()
        assert "draining 5 open sessions" in log and "drain complete" in log
        assert "Traceback" not in log and "cut short" not in log
        print(
            f"drain: 5 sessions ({sum(plan)} frames) scored, summarised, closed 1001; "
            f"exit 0 after {took:.2f}s"
        )
