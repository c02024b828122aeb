"""Hardening (issue 21): what a hostile or broken client could still do to a default server.

Every test runs a real server under the production uvicorn configuration
(``guarded_server``: ``lookback.server.uvicorn_config`` with ``lookback.transport``'s
protocols) or a real ``lookback serve`` process, and talks to it over raw sockets where
a well-behaved client library would not misbehave on purpose. Waits are bounded polls;
the only sleeps pace a deliberately slow client.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import logging
import signal
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
import soundfile as sf
from pydantic import ValidationError

from lookback.app import create_app
from lookback.engine.multistep import scores_out
from lookback.metrics import Metrics
from lookback.protocol import split_results
from lookback.server import DrainingServer, uvicorn_config
from lookback.settings import Settings
from tests.api.ws_util import (
    SILERO_Q,
    ErrorLog,
    StuckClient,
    Transcript,
    guarded_server,
    metric,
    metrics_text,
    read_all,
    server_side_protocol,
    small_rcvbuf_socket,
    wait_until,
    ws_connect,
)
from tests.conftest import Server, free_port, read_clip, spawn_server
from tests.conftest import test_settings as make_settings

CLIP = read_clip("silero_ref_speech.wav")
PCM = CLIP[: 4 * 16000].tobytes()
HOP = 1024  # one Silero step of pcm_s16le
KEY = "silero-vad/6.2.3"
WS_HEAD = (
    "Host: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
)


def silero(**kw: object) -> Settings:
    return make_settings(default_model="silero-vad", models=["silero-vad"], **kw)


@pytest.fixture(scope="module")
def srv(silero_model: str) -> Iterator[Server]:
    """One guarded server for the tests that do not need their own limits: every model,
    the default one (lookback-vad, scored offline through its sequence graph) included."""
    with guarded_server(make_settings(header_timeout_s=2.0)) as server:
        yield server


# -- raw HTTP ----------------------------------------------------------------------------


async def raw_open(port: int, data: bytes = b"") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    if data:
        writer.write(data)
        await writer.drain()
    return reader, writer


async def response(reader: asyncio.StreamReader, within: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """Read one answer: (status, headers, body)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), within)
    lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
    assert lines[0].startswith("HTTP/1.1 "), head[:200]
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), within)
    return int(lines[0].split()[1]), headers, body


async def closed_by_server(reader: asyncio.StreamReader, within: float = 10.0) -> bool:
    """True once the server has closed its side (EOF after the answer)."""
    return await asyncio.wait_for(reader.read(), within) == b""


def code_of(body: bytes) -> str:
    doc = orjson.loads(body)
    assert set(doc) == {"error"} and doc["error"]["message"], doc
    return str(doc["error"]["code"])


# -- 1: idle and slow connections ---------------------------------------------------------


async def test_idle_and_slow_connections_do_not_lock_out_health(silero_model: str) -> None:
    """More idle and slow-loris sockets than the connection limit: they take no place in it
    (issue 26), so every request still answers 200. Past the limit of connections with a
    whole head (here WebSocket sessions), health, readiness and metrics still answer 200,
    other requests get 503 with Retry-After and the JSON body. Every idle socket gets 408
    header_timeout and is closed."""
    with guarded_server(silero(header_timeout_s=1.0, max_connections=12)) as server:
        await _idle_and_slow(server)


async def _idle_and_slow(srv: Server) -> None:
    idle = [await raw_open(srv.port) for _ in range(10)]
    slow = [await raw_open(srv.port, b"GET /v1/stream?model=silero-vad HTTP/1.1\r\nHo") for _ in range(4)]
    async with httpx.AsyncClient(base_url=srv.url, timeout=10) as client:
        for path in ("/healthz", "/readyz", "/metrics", "/v1/models"):
            assert (await client.get(path)).status_code == 200, path
        async with contextlib.AsyncExitStack() as sessions:
            for _ in range(12):
                await sessions.enter_async_context(ws_connect(f"{srv.ws}/v1/stream?{SILERO_Q}"))
            for path in ("/healthz", "/readyz", "/metrics"):
                assert (await client.get(path)).status_code == 200, path
            busy = await client.get("/v1/models")
            assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
            assert busy.json()["error"]["code"] == "server_busy"
        for reader, writer in idle + slow:
            status, headers, body = await response(reader)
            assert (status, code_of(body), headers["connection"]) == (408, "header_timeout", "close")
            assert await closed_by_server(reader)
            writer.close()
        deadline = time.monotonic() + 10
        while (await client.get("/v1/models")).status_code != 200:  # the server saw them go
            assert time.monotonic() < deadline, "still refused after the sessions closed"
    assert metric(metrics_text(srv.url), "lookback_errors_total", code="header_timeout") >= 14


# -- 7, 8: request line and headers ---------------------------------------------------------


@pytest.mark.parametrize(
    ("request_head", "status", "code"),
    [
        (f"GET /v1/stream?token={'k' * 9000} HTTP/1.1\r\n{WS_HEAD}\r\n", 414, "request_line_too_long"),
        (f"GET /v1/stream?model={'m' * 10000} HTTP/1.1\r\n{WS_HEAD}\r\n", 414, "request_line_too_long"),
        (f"GET /v1/stream HTTP/1.1\r\n{WS_HEAD}X-Long: {'v' * 9000}\r\n\r\n", 431, "headers_too_large"),
        (
            "GET /v1/stream HTTP/1.1\r\n" + WS_HEAD + "".join(f"X-H{i}: v\r\n" for i in range(130)) + "\r\n",
            431,
            "headers_too_large",
        ),
        (  # 8: many lines each within bounds, too many bytes in all
            "GET /healthz HTTP/1.1\r\nHost: x\r\n"
            + "".join(f"X-H{i}: {'v' * 1000}\r\n" for i in range(40))
            + "\r\n",
            431,
            "headers_too_large",
        ),
    ],
    ids=["long-token", "long-model", "long-header-line", "130-headers", "64kb-of-headers"],
)
async def test_oversized_request_heads_are_answered_and_closed(
    srv: Server, request_head: str, status: int, code: str
) -> None:
    reader, writer = await raw_open(srv.port, request_head.encode())
    got, headers, body = await response(reader)
    assert (got, code_of(body), headers["connection"]) == (status, code, "close")
    assert await closed_by_server(reader)
    writer.close()


async def test_a_huge_header_block_is_refused_before_it_is_read(srv: Server) -> None:
    """8: a header block of many megabytes is refused once max_header_bytes have arrived;
    the server does not read (or buffer) the rest."""
    reader, writer = await raw_open(srv.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    line = b"X-Pad: " + b"p" * 4000 + b"\r\n"
    sent = 0
    with contextlib.suppress(ConnectionError):
        while sent < 96 * 2**20 and not reader.at_eof():
            writer.write(line * 16)
            sent += len(line) * 16
            await asyncio.wait_for(writer.drain(), 10)
            if len(reader._buffer) or reader.at_eof():  # type: ignore[attr-defined]
                break
    got, _, body = await response(reader)
    writer.close()
    assert (got, code_of(body)) == (431, "headers_too_large")
    assert sent < 4 * 2**20, f"{sent} bytes sent before the refusal"


# -- 2: WAV fmt chunk ---------------------------------------------------------------------


async def test_wav_with_a_huge_fmt_chunk_is_refused_early(srv: Server) -> None:
    """A fmt chunk declaring 2 GB is refused (415 bad_audio) from the first bytes, not
    after the whole body was buffered."""
    total = 64 * 2**20
    head = b"RIFF" + struct.pack("<I", total - 8) + b"WAVE" + b"fmt " + struct.pack("<I", 0x7FFFFFF0)
    request = (
        f"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: audio/wav\r\nContent-Length: {total}\r\n\r\n"
    ).encode()
    reader, writer = await raw_open(srv.port, request + head)
    sent, chunk = len(head), b"\0" * 65536
    with contextlib.suppress(ConnectionError):
        while sent < total and not reader.at_eof() and not len(reader._buffer):  # type: ignore[attr-defined]
            writer.write(chunk)
            sent += len(chunk)
            await asyncio.wait_for(writer.drain(), 10)
    got, _, body = await response(reader)
    writer.close()
    assert (got, code_of(body)) == (415, "bad_audio")
    assert sent < 8 * 2**20, f"{sent} bytes sent before the refusal"


# -- 3: uploads and answers that hold the scoring places ------------------------------------


async def test_a_trickling_upload_gets_408_upload_too_slow(silero_model: str) -> None:
    settings = silero(min_upload_rate_bps=2000, upload_rate_grace_s=0.5)
    with guarded_server(settings) as server:
        svc = server.app.state  # type: ignore[attr-defined]
        request = (
            b"POST /v1/score?sample_rate=16000 HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/octet-stream\r\nContent-Length: 100000\r\n\r\n"
        )
        reader, writer = await raw_open(server.port, request)
        deadline = time.monotonic() + 15
        while not reader.at_eof() and not len(reader._buffer):  # type: ignore[attr-defined]
            assert time.monotonic() < deadline, "a 200 B/s upload was never cut"
            with contextlib.suppress(ConnectionError):
                writer.write(b"\0" * 10)
                await writer.drain()
            await asyncio.sleep(0.05)  # the client's pace: 10 bytes per 50 ms
        got, _, body = await response(reader)
        writer.close()
        assert (got, code_of(body)) == (408, "upload_too_slow")
        await wait_until(lambda: svc.admission.scores_running == 0, what="queue place freed")


async def test_an_ndjson_answer_nobody_reads_frees_its_place(silero_model: str) -> None:
    """A client posts a long clip with format=ndjson and never reads the answer: once the
    answer stalls for response_send_timeout_s the connection is dropped and the scoring
    place freed, so the next upload (only one place here) is scored."""
    settings = silero(
        max_concurrent_scores=1, max_queued_scores=0, response_send_timeout_s=1.0, offline_chunk_steps=8
    )
    with guarded_server(settings) as server:
        svc = server.app.state  # type: ignore[attr-defined]
        body = np.tile(CLIP, 12).tobytes()  # two minutes: ~150 KB of ndjson
        sock = small_rcvbuf_socket(server.port, 2048)
        sock.setblocking(True)
        sock.sendall(
            (
                "POST /v1/score?sample_rate=16000&format=ndjson HTTP/1.1\r\nHost: x\r\n"
                f"Content-Type: application/octet-stream\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode()
        )
        port = sock.getsockname()[1]
        await wait_until(lambda: _has_protocol(port), what="server saw the request")
        transport = server_side_protocol(port).transport
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        transport.set_write_buffer_limits(high=4096)
        await asyncio.to_thread(sock.sendall, body)
        await wait_until(lambda: svc.admission.scores_running == 1, what="upload admitted")
        await wait_until(lambda: svc.admission.scores_running == 0, within=30, what="place freed")
        sock.close()
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            r = await client.post(
                "/v1/score",
                params={"sample_rate": 16000},
                content=CLIP[:16000].tobytes(),
                headers={"content-type": "application/octet-stream"},
            )
        assert r.status_code == 200 and r.json()["steps"] == 32
        assert metric(metrics_text(server.url), "lookback_errors_total", code="send_timeout") == 1


def _has_protocol(port: int) -> bool:
    try:
        server_side_protocol(port)
    except AssertionError:
        return False
    return True


# -- 4, 5: WebSocket clients that stop reading ------------------------------------------------


async def test_a_session_that_ends_and_stops_reading_is_freed(silero_model: str) -> None:
    """4: the client sends audio and `end`, then never reads again (nor closes TCP): the
    session is released and the server's socket closed within ws_send_timeout_s."""
    settings = silero(ws_send_timeout_s=1.0, send_queue_messages=100_000)
    with guarded_server(settings) as server:
        svc = server.app.state  # type: ignore[attr-defined]
        handle = svc.engine.models[KEY]
        client = await asyncio.to_thread(StuckClient, server.port, f"/v1/stream?{SILERO_Q}")
        try:
            proto = server_side_protocol(client.port)
            proto.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            proto.transport.set_write_buffer_limits(high=4096)
            pcm = np.tile(CLIP, 2).tobytes()
            for i in range(0, len(pcm) - 16 * HOP, 16 * HOP):
                await asyncio.to_thread(client.send, pcm[i : i + 16 * HOP])
            await asyncio.to_thread(client.send_text, '{"type":"end"}')
            await wait_until(lambda: len(svc.connections) == 1, what="session open")
            await wait_until(
                lambda: not svc.connections and handle.table.used == 0 and proto.disconnected,
                within=20,
                what="session and socket freed",
            )
        finally:
            client.close()


async def test_a_slow_consumer_sees_4429_and_a_stuck_one_is_dropped(silero_model: str) -> None:
    """5: a client that floods audio and reads nothing overflows its send queue: whenever
    it reads again it finds the 4429 close (the close frame is written past the buffer
    bound); a client that never reads is dropped, its server socket closed, within
    ws_send_timeout_s."""
    settings = silero(send_queue_messages=8, ws_send_timeout_s=1.0)
    with guarded_server(settings) as server:
        svc = server.app.state  # type: ignore[attr-defined]
        for reads_later in (True, False):
            sock = small_rcvbuf_socket(server.port)
            async with ws_connect(f"{server.ws}/v1/stream?{SILERO_Q}", sock=sock, max_queue=1) as ws:
                port = sock.getsockname()[1]
                proto = server_side_protocol(port)
                proto.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
                proto.transport.set_write_buffer_limits(high=4096)
                assert '"type":"ready"' in await ws.recv()
                (conn,) = [c for c in svc.connections if c.ws.client.port == port]
                sent = 0
                while conn.end_reason is None and sent < 2000:
                    await asyncio.wait_for(ws.send(PCM[: 16 * HOP]), 10)
                    sent += 1
                assert conn.end_reason == "slow_consumer"
                if reads_later:
                    got = await asyncio.wait_for(read_all(ws, Transcript()), 20)
                    assert (got.close_code, got.close_reason) == (4429, "slow_consumer")
                else:
                    await until_dropped(proto)
            await wait_until(lambda: not svc.connections, what="session freed")
        text = metrics_text(server.url)
        assert metric(text, "lookback_sessions_ended_total", reason="slow_consumer") == 2


async def until_dropped(proto: Any) -> None:
    """Until the server's side of a connection is gone (its file descriptor closed)."""
    await wait_until(lambda: bool(proto.disconnected), within=20, what="stuck socket dropped")


# -- 6: float input range and the state guard --------------------------------------------------


async def test_huge_finite_float_audio_is_refused_and_never_poisons_state(srv: Server) -> None:
    """A pcm_f32le message of 1e20 (or float32 max) is refused whole with
    audio_out_of_range; the session's scores stay finite and equal a run without it;
    4x full scale (the documented headroom) is accepted."""
    speech = (CLIP[: 2 * 16000].astype(np.float32) / 32768).astype("<f4")
    msgs = [speech[i : i + 512].tobytes() for i in range(0, len(speech), 512)]
    half = len(msgs) // 2

    async def run(extra: list[bytes]) -> Transcript:
        out = Transcript()
        async with ws_connect(f"{srv.ws}/v1/stream?{SILERO_Q}&encoding=pcm_f32le") as ws:
            reader = asyncio.create_task(read_all(ws, out))
            for m in msgs[:half] + extra + msgs[half:]:
                await ws.send(m)
            await ws.send('{"type":"end"}')
            await asyncio.wait_for(reader, 30)
        return out

    clean = await run([])
    bad = await run(
        [np.full(512, 1e20, "<f4").tobytes(), np.full(512, np.finfo(np.float32).max, "<f4").tobytes()]
    )
    assert bad.error_codes() == ["audio_out_of_range"] * 2
    assert bad.of_type("result") == clean.of_type("result")
    assert all(r["scores"]["speech"] is not None for r in bad.of_type("result"))
    loud = await run([np.full(512, 4.0, "<f4").tobytes()])
    assert loud.error_codes() == [] and len(loud.of_type("result")) == len(clean.of_type("result")) + 1


@pytest.mark.parametrize("mode", ["all", "batch"])
async def test_a_step_that_yields_nan_resets_the_session_state(silero_model: str, mode: str) -> None:
    """The guard in the compute path: a model call that returns NaN state for one session
    leaves no NaN in the slab (that row is reset to initial), the step is reported as
    non_finite_state, and the session goes on with finite scores (with results=batch too:
    the error goes out in step order, never inside a results message)."""
    with guarded_server(silero()) as server:
        handle = server.app.state.engine.models[KEY]  # type: ignore[attr-defined]
        # the first model call of this session, one hop or several (multi-step graph)
        poisoned = {"left": 1}
        graphs = [g for g in (handle.step, handle.multistep) if g is not None]
        scores = {o.name for o in handle.spec.outputs} | {scores_out(o.name) for o in handle.spec.outputs}

        def poisoning(graph: Any) -> Any:
            real_run = graph.run

            def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
                outs = list(real_run(feeds))
                if poisoned["left"]:
                    poisoned["left"] -= 1
                    for i, name in enumerate(graph.output_names):
                        if name not in scores:
                            outs[i] = np.full_like(outs[i], np.nan)
                return outs

            return run

        out = Transcript()
        async with ws_connect(f"{server.ws}/v1/stream?{SILERO_Q}&results={mode}") as ws:
            reader = asyncio.create_task(read_all(ws, out))
            await wait_until(lambda: bool(out.messages), what="ready")
            for graph in graphs:
                graph.run = poisoning(graph)
            try:
                for i in range(0, 8 * HOP, HOP):
                    await ws.send(PCM[i : i + HOP])
                await ws.send('{"type":"end"}')
                await asyncio.wait_for(reader, 30)
            finally:
                for graph in graphs:
                    vars(graph).pop("run", None)
        errors = out.of_type("error")
        # the poisoned call's hops (step 0, and any that joined it) are reported, no others
        bad = [e["step"] for e in errors]
        assert {e["code"] for e in errors} == {"non_finite_state"} and bad == list(range(len(bad)))
        if mode == "batch":
            assert not out.of_type("result")
        results = [r for m in out.parsed() for r in (split_results(m) if m["type"] == "results" else [m])]
        steps = [r["step"] for r in results if r["type"] in ("result", "error")]
        assert steps == list(range(8))  # errors and results interleaved in step order
        results = [r for r in results if r["type"] == "result"]
        assert [r["step"] for r in results] == list(range(len(bad), 8))
        assert all(np.isfinite(r["scores"]["speech"]) for r in results)
        for slab in handle.table.slabs.values():
            assert np.isfinite(slab).all()


# -- 9: drain with a client that stopped reading ------------------------------------------------


async def test_sigterm_exits_within_the_grace_whatever_the_clients(silero_model: str) -> None:
    """A session whose client stopped reading (its results fill every buffer) when
    SIGTERM lands: the drain gives up on it and the server has stopped within
    drain_grace_s, with no ERROR line (uvicorn's own shutdown would wait a second grace)."""
    grace = 3.0
    settings = silero(drain_grace_s=grace, send_queue_messages=1_000_000, max_pending_steps=4096)
    metrics = Metrics()
    app = create_app(settings, metrics=metrics)
    port = free_port()
    config = uvicorn_config(
        app, settings.model_copy(update={"host": "127.0.0.1"}), port=port, metrics=metrics
    )
    server = DrainingServer(config, settings)
    server.install_signal_handlers = lambda: None  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.run, daemon=True)
    with ErrorLog() as log:
        thread.start()
        await wait_until(lambda: server.started, within=60, what="server started")
        client = await asyncio.to_thread(StuckClient, port, f"/v1/stream?{SILERO_Q}")
        try:
            transport = server_side_protocol(client.port).transport
            transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            transport.set_write_buffer_limits(high=4096)
            pcm = np.tile(CLIP, 2).tobytes()
            for i in range(0, len(pcm) - 16 * HOP, 16 * HOP):
                await asyncio.to_thread(client.send, pcm[i : i + 16 * HOP])
            (conn,) = app.state.connections
            await wait_until(lambda: conn.unread > 100, what="the writer is stuck")
            t_term = time.monotonic()
            server.handle_exit(signal.SIGTERM, None)
            await asyncio.to_thread(thread.join, 3 * grace)
            took = time.monotonic() - t_term
        finally:
            client.close()
    assert not thread.is_alive(), "the server did not stop"
    assert took < grace, f"stopped after {took:.2f}s with drain_grace_s={grace}"
    assert any("cut short" in r.getMessage() for r in log.records), "the client was not stuck"
    assert not [r.getMessage() for r in log.records if r.levelno >= logging.ERROR]


# -- 10: credentials in logs ------------------------------------------------------------------


async def test_no_scheme_logs_a_key_at_debug_level(tmp_path: Path, silero_model: str) -> None:
    key = "secret-key-Z9q4"
    b64 = base64.b64encode(f"user:{key}".encode()).decode()
    env = {
        "LOOKBACK_MODELS": "silero-vad",
        "LOOKBACK_DEFAULT_MODEL": "silero-vad",
        "LOOKBACK_API_KEYS": key,
        "LOOKBACK_LOG_LEVEL": "debug",
    }
    schemes = [f"Basic {b64}", f"Token {key}", key, f"Bearer {key}", f"bearer  {key}"]
    with spawn_server(tmp_path, **env) as srv:
        async with httpx.AsyncClient(base_url=srv.url, timeout=10) as client:
            for value in schemes:
                await client.get("/v1/models", headers={"Authorization": value})
                await client.get("/metrics", headers={"Proxy-Authorization": value})
        for value in schemes:
            with contextlib.suppress(Exception):
                async with ws_connect(
                    f"{srv.ws}/v1/stream?{SILERO_Q}", additional_headers={"Authorization": value}
                ) as ws:
                    await ws.send('{"type":"end"}')
                    await ws.recv()
        srv.terminate()
        assert srv.proc.wait(30) == 0
    log = srv.log.read_text()
    assert "***" in log  # the lines are there, redacted
    assert key not in log and b64 not in log


# -- 11, 12: ndjson errors counted; float WAV with NaN ----------------------------------------


async def test_ndjson_errors_are_counted(srv: Server) -> None:
    audio = (CLIP[: 4 * 16000].astype(np.float32) / 32768).astype("<f4")
    audio[3 * 16000] = np.nan
    before = metric(metrics_text(srv.url), "lookback_errors_total", code="non_finite_audio")
    async with httpx.AsyncClient(base_url=srv.url, timeout=30) as client:
        r = await client.post(
            "/v1/score",
            params={"sample_rate": 16000, "encoding": "pcm_f32le", "format": "ndjson"},
            content=audio.tobytes(),
            headers={"content-type": "application/octet-stream"},
        )
    lines = [orjson.loads(x) for x in r.text.splitlines()]
    assert r.status_code == 200 and lines[-1]["type"] == "error" and lines[-1]["code"] == "non_finite_audio"
    after = metric(metrics_text(srv.url), "lookback_errors_total", code="non_finite_audio")
    assert after - before == 1


@pytest.mark.parametrize(("value", "code"), [(np.nan, "non_finite_audio"), (1e20, "audio_out_of_range")])
async def test_float_wav_follows_the_raw_float_rule(srv: Server, value: float, code: str) -> None:
    audio = CLIP[:16000].astype(np.float32) / 32768
    audio[8000] = value
    buf = io.BytesIO()
    sf.write(buf, audio, 16000, format="WAV", subtype="FLOAT")
    async with httpx.AsyncClient(base_url=srv.url, timeout=30) as client:
        r = await client.post("/v1/score", content=buf.getvalue(), headers={"content-type": "audio/wav"})
        assert (r.status_code, r.json()["error"]["code"]) == (400, code)
        raw = await client.post(
            "/v1/score",
            params={"sample_rate": 16000, "encoding": "pcm_f32le"},
            content=audio.astype("<f4").tobytes(),
            headers={"content-type": "application/octet-stream"},
        )
        assert (raw.status_code, raw.json()["error"]["code"]) == (400, code)


# -- also noticed: blank key lists, duplicate query parameters -----------------------------------


@pytest.mark.parametrize("value", [",", " , ,", ", "])
def test_a_key_list_without_keys_is_refused(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("LOOKBACK_API_KEYS", value)
    with pytest.raises(ValidationError, match="holds no key"):
        Settings(_env_file=None)
    monkeypatch.setenv("LOOKBACK_API_KEYS", "")
    assert not Settings(_env_file=None).auth_enabled


async def test_duplicate_query_parameters_are_refused(srv: Server) -> None:
    async with httpx.AsyncClient(base_url=srv.url, timeout=30) as client:
        r = await client.post(
            "/v1/score?format=json&format=ndjson", content=b"RIFF", headers={"content-type": "audio/wav"}
        )
        assert (r.status_code, r.json()["error"]["code"]) == (400, "duplicate_query")
        r = await client.get("/v1/models?x=1&x=2")
        assert (r.status_code, r.json()["error"]["code"]) == (400, "duplicate_query")
    out = Transcript()
    async with ws_connect(f"{srv.ws}/v1/stream?model=silero-vad&model=lookback-vad") as ws:
        await read_all(ws, out)
    assert out.error_codes() == ["duplicate_query"] and out.close_code == 4400
