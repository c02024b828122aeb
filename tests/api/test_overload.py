"""Overload: shed load before the upgrade (HTTP 503 + Retry-After), never by hurting the
sessions already admitted. Session cap, REST scoring queue, batcher backlog."""

from __future__ import annotations

import asyncio
import io

import httpx
import numpy as np
import orjson
import soundfile as sf

from lookback.settings import Settings
from tests.api.ws_util import (
    SILERO_Q,
    Intercept,
    Transcript,
    metric,
    metrics_text,
    read_all,
    refused,
    stream_clip,
    wait_until,
    ws_connect,
)
from tests.conftest import read_clip, running_server
from tests.conftest import test_settings as make_settings

CLIP = read_clip("silero_ref_speech.wav")[: 4 * 16000]
PCM = CLIP.tobytes()
HOP = 1024
END = '{"type":"end"}'
URL = "/v1/stream?" + SILERO_Q


def silero_settings(**kw: object) -> Settings:
    return make_settings(default_model="silero-vad", models=["silero-vad"], **kw)


def assert_busy(status: int, headers: dict[str, str], body: bytes, code: str = "server_busy") -> None:
    assert status == 503
    assert int(headers["retry-after"]) >= 1
    assert orjson.loads(body)["error"]["code"] == code


async def test_session_cap_refuses_before_upgrade(silero_model: str) -> None:
    """max_sessions=3: with three open, a fourth WebSocket gets HTTP 503 + Retry-After
    before the upgrade, while a session already streaming is byte-for-byte unaffected."""
    with running_server(silero_settings(max_sessions=3)) as srv:
        svc = srv.app.state  # type: ignore[attr-defined]
        reference = await stream_clip(srv.ws, PCM)
        refusals: list[tuple[int, dict[str, str], bytes]] = []

        async def at_cap() -> None:
            async with ws_connect(srv.ws + URL) as a, ws_connect(srv.ws + URL) as b:
                await a.recv()
                await b.recv()
                assert len(svc.connections) == 3  # a, b and the healthy session
                refusals.append(await refused(srv.ws + URL))
                refusals.append(await refused(srv.ws + URL))
                for ws in (a, b):  # the admitted ones still work
                    await ws.send(PCM[:HOP])
                    assert orjson.loads(await ws.recv())["type"] == "result"

        healthy = await stream_clip(srv.ws, PCM, midway=at_cap)
        assert healthy.messages == reference.messages
        for r in refusals:
            assert_busy(*r)
        assert metric(metrics_text(srv.url), "lookback_sessions_refused_total", reason="capacity") == 2
        await wait_until(lambda: svc.admission.reserved == 0, what="sessions closed")
        again = await stream_clip(srv.ws, PCM)  # below the cap again: admitted
        assert again.messages == reference.messages


def _wav(samples: np.ndarray) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, 16000, format="WAV", subtype="PCM_16")
    return buf.getvalue()


async def test_rest_queue_full_is_503(silero_model: str) -> None:
    """max_concurrent_scores=1, max_queued_scores=0: while one upload trickles in (a slow
    chunked body), the next request gets 503 + Retry-After; afterwards both kinds work."""
    with running_server(silero_settings(max_concurrent_scores=1, max_queued_scores=0)) as srv:
        svc = srv.app.state  # type: ignore[attr-defined]
        body = _wav(CLIP[:16000])
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        writer.write(
            b"POST /v1/score HTTP/1.1\r\nHost: t\r\nContent-Type: audio/wav\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )

        def chunk(data: bytes) -> bytes:
            return f"{len(data):x}\r\n".encode() + data + b"\r\n"

        writer.write(chunk(body[:1000]))
        await writer.drain()
        await wait_until(lambda: svc.admission.scores_running == 1, what="slow upload admitted")
        async with httpx.AsyncClient(base_url=srv.url, timeout=30) as client:
            r = await client.post("/v1/score", content=body, headers={"Content-Type": "audio/wav"})
            assert_busy(r.status_code, dict(r.headers), r.content)
            for i in range(1000, len(body), 4000):  # the slow one finishes and is scored
                writer.write(chunk(body[i : i + 4000]))
                await writer.drain()
                await asyncio.sleep(0.001)  # pacing a deliberately slow uploader
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            assert head.startswith(b"HTTP/1.1 200"), head
            writer.close()
            await wait_until(lambda: svc.admission.scores_running == 0, what="lease released")
            r = await client.post("/v1/score", content=body, headers={"Content-Type": "audio/wav"})
            assert r.status_code == 200 and r.json()["steps"] == 32
        assert metric(metrics_text(srv.url), "lookback_errors_total", code="server_busy") == 1


async def test_backlog_sheds_new_sessions(silero_model: str) -> None:
    """shed_backlog_steps=4: with the model call blocked and 4 steps waiting for the
    batcher, a new session is refused 503 (reason backlog); once the batcher catches up
    every admitted session gets all its results and new sessions are admitted again."""
    with running_server(silero_settings(shed_backlog_steps=4)) as srv:
        svc = srv.app.state  # type: ignore[attr-defined]
        (handle,) = svc.engine.models.values()
        ts = [Transcript() for _ in range(5)]
        async with (
            ws_connect(srv.ws + URL) as s0,
            ws_connect(srv.ws + URL) as s1,
            ws_connect(srv.ws + URL) as s2,
            ws_connect(srv.ws + URL) as s3,
            ws_connect(srv.ws + URL) as s4,
        ):
            socks = [s0, s1, s2, s3, s4]
            readers = [asyncio.create_task(read_all(ws, t)) for ws, t in zip(socks, ts, strict=True)]
            await wait_until(lambda: all(t.messages for t in ts), what="5 x ready")
            with Intercept(handle) as icpt:
                icpt.hold = True
                await s0.send(PCM[: 2 * HOP])
                assert len(await icpt.next_batch()) == 1  # s0's first step, held
                for ws in socks[1:]:
                    await ws.send(PCM[: 2 * HOP])
                await wait_until(lambda: handle.batcher.backlog == 4, what="backlog of 4")
                status, headers, body = await refused(srv.ws + URL)
                assert_busy(status, headers, body)
                icpt.hold = False
                icpt.release(10)
            for ws in socks:
                await ws.send(END)
            await asyncio.wait_for(asyncio.gather(*readers), 30)
        for t in ts:  # nothing admitted was dropped
            assert t.close_code == 1000 and t.error_codes() == []
            assert len(t.of_type("result")) == t.summary["steps"] == 2
        assert metric(metrics_text(srv.url), "lookback_sessions_refused_total", reason="backlog") == 1
        again = await stream_clip(srv.ws, PCM[: 8 * HOP])
        assert again.close_code == 1000 and again.summary["steps"] == 8
