"""Faults: a client vanishing mid-step, a client that never reads, a model call that raises,
idle and over-long sessions. Each fault is contained to the session(s) it belongs to; the
slot table returns to idle and the metrics record what happened.

Faults are injected on real in-thread servers: the model handle's ``compute`` on the
running engine is replaced by ``Intercept`` (hold a batch, or make it raise).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import numpy as np
import pytest
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from lookback.engine.served import ServedModel
from lookback.settings import Settings
from tests.api.ws_util import (
    SILERO_Q,
    ErrorLog,
    Intercept,
    StuckClient,
    Transcript,
    abort,
    metric,
    metrics_text,
    read_all,
    server_side_transport,
    small_rcvbuf_socket,
    stream_clip,
    wait_until,
    ws_connect,
)
from tests.conftest import Server, read_clip, running_server
from tests.conftest import test_settings as make_settings

CLIP = read_clip("silero_ref_speech.wav")[: 4 * 16000]
PCM = CLIP.tobytes()
HOP = 1024  # one Silero step of pcm_s16le
KEY = "silero-vad/6.2.3"
END = '{"type":"end"}'


def silero_settings(**kw: object) -> Settings:
    return make_settings(default_model="silero-vad", models=["silero-vad"], **kw)


@pytest.fixture(scope="module")
def reference(silero_model: str) -> Transcript:
    """The healthy session's transcript, streamed alone on a fresh server."""
    with running_server(silero_settings()) as srv:
        ref = asyncio.run(stream_clip(srv.ws, PCM))
    assert ref.close_code == 1000 and ref.summary["steps"] == 125
    return ref


@pytest.fixture(scope="module")
def srv(silero_model: str) -> Iterator[Server]:
    # one hop per model call: the fault tests count the batches a burst makes
    with running_server(silero_settings(send_queue_messages=8, max_steps_per_call=1)) as server:
        yield server


@pytest.fixture(scope="module", autouse=True)
def server_log() -> Iterator[ErrorLog]:
    """WARNING+ records of every server of this module (checked by the last test)."""
    with ErrorLog() as log:
        yield log


def state(server: Server) -> tuple[Any, ServedModel]:
    svc = server.app.state  # type: ignore[attr-defined]
    return svc, svc.engine.models[KEY]


async def test_disconnect_with_step_in_flight(srv: Server, reference: Transcript) -> None:
    """A client drops its TCP connection while its step is inside a running batch: the
    other steps of that batch get their results, its slot is freed and reset once the
    batch returns, and nothing leaks."""
    svc, handle = state(srv)
    base_used = handle.table.used
    ended_before = metric(metrics_text(srv.url), "lookback_sessions_ended_total", reason="client_gone")
    transcripts = {name: Transcript() for name in "ABC"}
    async with (
        ws_connect(f"{srv.ws}/v1/stream?{SILERO_Q}") as a,
        ws_connect(f"{srv.ws}/v1/stream?{SILERO_Q}") as b,
        ws_connect(f"{srv.ws}/v1/stream?{SILERO_Q}") as c,
    ):
        socks = {"A": a, "B": b, "C": c}
        readers = {n: asyncio.create_task(read_all(ws, transcripts[n])) for n, ws in socks.items()}
        await wait_until(lambda: all(t.messages for t in transcripts.values()), what="ready x3")
        with Intercept(handle) as icpt:
            icpt.hold = True
            await c.send(PCM[:HOP])
            assert len(await icpt.next_batch()) == 1  # [C] is running, held
            await a.send(PCM[:HOP])
            await b.send(PCM[:HOP])
            await wait_until(lambda: handle.batcher.backlog == 2, what="A and B queued")
            icpt.release()  # [C] completes; [A, B] is taken as the next batch and held
            slots = await icpt.next_batch()
            assert len(slots) == 2
            slot_a = slots[0]
            abort(a)  # A vanishes: no close frame, its step still in the model call
            await wait_until(lambda: len(svc.connections) == 2, what="server saw A go")
            assert handle.table.used == base_used + 3  # A's slot waits for its step
            icpt.release()
            await wait_until(lambda: handle.table.used == base_used + 2, what="A's slot freed")
            for slab in handle.table.slabs.values():
                assert not np.any(slab[slot_a]), "freed slot was not reset"
        # B and C carry on; B's whole stream must equal the reference run alone
        for ws in (b, c):
            for i in range(HOP, len(PCM), 3 * 256):
                await ws.send(PCM[i : i + 3 * 256])
            await ws.send(END)
        await asyncio.wait_for(asyncio.gather(readers["B"], readers["C"]), 30)
    assert transcripts["B"].messages == transcripts["C"].messages == reference.messages
    await wait_until(lambda: handle.table.used == base_used, what="table idle")
    text = metrics_text(srv.url)
    assert metric(text, "lookback_sessions_ended_total", reason="client_gone") - ended_before == 1
    assert metric(text, "lookback_state_slots", kind="used") == base_used == 0


@contextlib.asynccontextmanager
async def flooding_non_reader(srv: Server) -> AsyncIterator[tuple[ClientConnection, int]]:
    """A client that reads `ready` and nothing else while it sends audio, until the server
    gives up on it (slow_consumer). The kernel buffers of both ends are shrunk so that
    hundreds of results fill them, not tens of thousands. Yields (socket, messages sent)."""
    svc, _ = state(srv)
    sock = small_rcvbuf_socket(srv.port)
    async with ws_connect(f"{srv.ws}/v1/stream?{SILERO_Q}", sock=sock, max_queue=1) as ws:
        server_tr = server_side_transport(sock.getsockname()[1])
        server_tr.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        server_tr.set_write_buffer_limits(high=4096)
        assert '"type":"ready"' in await ws.recv()  # the only message it reads on its own
        (conn,) = [c for c in svc.connections if c.ws.client.port == sock.getsockname()[1]]
        burst = PCM[: 16 * HOP]  # 64 frames: 16 results per message
        sent = 0
        while conn.end_reason is None and sent < 2000:
            await asyncio.wait_for(ws.send(burst), 10)
            sent += 1
        assert conn.end_reason == "slow_consumer", f"not closed after {sent} messages"
        yield ws, sent


async def test_slow_reader_is_closed_alone_with_4429(srv: Server, reference: Transcript) -> None:
    """A client that sends audio but never reads: its bounded send queue (8 messages here)
    overflows and only its session is closed, with 4429; a concurrent session is untouched."""
    svc, handle = state(srv)
    ended0 = metric(metrics_text(srv.url), "lookback_sessions_ended_total", reason="slow_consumer")
    got = Transcript()

    async def slow_client() -> None:
        async with flooding_non_reader(srv) as (ws, sent):
            print(f"slow reader cut off after {sent} messages of 16 steps")
            await read_all(ws, got)  # now read what is left: the close frame comes last

    healthy = await stream_clip(srv.ws, PCM, midway=slow_client)
    assert healthy.messages == reference.messages
    # 1006 only if this client took over a second to start reading (then the server drops
    # the connection instead, see the next test)
    assert (got.close_code, got.close_reason) in ((4429, "slow_consumer"), (1006, ""))
    await wait_until(lambda: handle.table.used == 0 and not svc.connections, what="idle")
    text = metrics_text(srv.url)
    assert metric(text, "lookback_sessions_ended_total", reason="slow_consumer") - ended0 == 1
    assert metric(text, "lookback_state_slots", kind="used") == 0


async def test_stuck_client_is_freed(silero_model: str) -> None:
    """A client that sends audio and never reads (so not even the close frame can be
    written to it), then sends nothing either: the server gives up on the socket and
    frees the session instead of holding it until TCP dies. The send queue bound is 256
    here so that it overflows only once both kernel buffers are really full."""
    with running_server(silero_settings(send_queue_messages=256)) as server:
        svc, handle = state(server)
        client = await asyncio.to_thread(StuckClient, server.port, f"/v1/stream?{SILERO_Q}")
        try:
            server_tr = server_side_transport(client.port)
            server_tr.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            server_tr.set_write_buffer_limits(high=4096)
            await wait_until(lambda: len(svc.connections) == 1, what="session open")
            (conn,) = svc.connections
            sent = 0
            while conn.end_reason is None and sent < 2000:
                await asyncio.to_thread(client.send, PCM[: 16 * HOP])
                sent += 1
            assert conn.end_reason == "slow_consumer"
            assert server_tr.get_write_buffer_size() > 0  # the transport is really stuck
            await wait_until(
                lambda: handle.table.used == 0 and not svc.connections, within=15, what="stuck session freed"
            )
        finally:
            client.close()
        text = metrics_text(server.url)
        assert metric(text, "lookback_sessions_ended_total", reason="slow_consumer") == 1


async def test_model_call_raises(srv: Server, reference: Transcript) -> None:
    """The model call raises for three batches in a row: every session in those batches
    gets an `inference_failed` error for that step (and nothing else is lost), the batcher
    keeps serving, and lookback_batch_failures_total counts three."""
    svc, handle = state(srv)
    failures0 = metric(metrics_text(srv.url), "lookback_batch_failures_total", model=KEY)
    ts = {n: Transcript() for n in "ABC"}

    async def fault() -> None:
        async with (
            ws_connect(f"{srv.ws}/v1/stream?{SILERO_Q}") as a,
            ws_connect(f"{srv.ws}/v1/stream?{SILERO_Q}") as b,
            ws_connect(f"{srv.ws}/v1/stream?{SILERO_Q}") as c,
        ):
            readers = [
                asyncio.create_task(read_all(ws, ts[n])) for n, ws in zip("ABC", (a, b, c), strict=True)
            ]
            await wait_until(lambda: all(t.messages for t in ts.values()), what="ready x3")
            with Intercept(handle) as icpt:
                icpt.hold = True
                await c.send(PCM[:HOP])
                assert len(await icpt.next_batch()) == 1  # [C] held while A, B queue up
                await a.send(PCM[: 3 * HOP])
                await b.send(PCM[: 3 * HOP])
                await wait_until(lambda: handle.batcher.backlog == 2, what="A, B queued")
                icpt.fail_next = 3  # [C] (already running) passes; the next 3 batches fail
                icpt.hold = False
                icpt.release()
                for _ in range(3):
                    assert len(await icpt.next_batch()) == 2  # [A, B] x 3 steps, all failing
            for ws in (a, b, c):
                await ws.send(PCM[3 * HOP : 4 * HOP])  # and the batcher still serves
                await ws.send(END)
            await asyncio.wait_for(asyncio.gather(*readers), 30)

    healthy = await stream_clip(srv.ws, PCM, midway=fault)  # idle while the batches fail
    assert healthy.messages == reference.messages
    for n in "AB":
        errors = ts[n].of_type("error")
        assert [(e["code"], e["step"]) for e in errors] == [("inference_failed", i) for i in range(3)]
        assert [r["step"] for r in ts[n].of_type("result")] == [3]
        s = ts[n].summary
        assert (s["frames"], s["steps"], s["failed_steps"]) == (16, 1, 3)
        assert ts[n].close_code == 1000
    assert ts["C"].error_codes() == [] and ts["C"].summary["steps"] == 2
    text = metrics_text(srv.url)
    assert metric(text, "lookback_batch_failures_total", model=KEY) - failures0 == 3
    assert metric(text, "lookback_errors_total", code="inference_failed") >= 6
    await wait_until(lambda: handle.table.used == 0 and not svc.connections, what="idle")


async def test_idle_timeout_and_max_duration(silero_model: str, reference: Transcript) -> None:
    """idle_timeout_s=0.6 closes a silent session with 4408; max_session_s=1.5 closes a
    busy one with 4409; a session that keeps sending outlives the idle timeout; a short
    healthy session alongside is untouched. Both reasons land in sessions_ended_total."""
    settings = silero_settings(idle_timeout_s=0.6, max_session_s=1.5)
    with running_server(settings) as server, ErrorLog() as log:
        svc, handle = state(server)
        url = f"{server.ws}/v1/stream?{SILERO_Q}"

        async def silent() -> tuple[Transcript, float]:
            t = Transcript()
            t0 = time.monotonic()
            async with ws_connect(url) as ws:
                await read_all(ws, t)
            return t, time.monotonic() - t0

        async def pacing(stop_after: float | None) -> tuple[Transcript, float]:
            """One frame every 0.1 s (a deliberately slow client); `end` after stop_after."""
            t = Transcript()
            t0 = time.monotonic()
            async with ws_connect(url) as ws:
                reader = asyncio.create_task(read_all(ws, t))
                try:
                    while stop_after is None or time.monotonic() - t0 < stop_after:
                        await ws.send(PCM[:256])
                        await asyncio.sleep(0.1)  # pacing a slow client, not waiting on state
                    await ws.send(END)
                except ConnectionClosed:
                    pass
                await asyncio.wait_for(reader, 10)
            return t, time.monotonic() - t0

        (idle, t_idle), (busy, _), (longer, t_long), healthy = await asyncio.gather(
            silent(), pacing(1.0), pacing(None), stream_clip(server.ws, PCM)
        )
        assert healthy.messages == reference.messages
        assert (idle.close_code, idle.close_reason) == (4408, "idle_timeout")
        assert idle.error_codes() == ["idle_timeout"] and 0.6 <= t_idle < 5
        assert busy.close_code == 1000 and busy.summary["frames"] >= 8  # outlived 0.6 s idle
        assert (longer.close_code, longer.close_reason) == (4409, "max_duration")
        assert longer.error_codes() == ["max_duration"] and 1.5 <= t_long < 6
        await wait_until(lambda: handle.table.used == 0 and not svc.connections, what="idle")
        text = metrics_text(server.url)
        assert metric(text, "lookback_sessions_ended_total", reason="idle_timeout") == 1
        assert metric(text, "lookback_sessions_ended_total", reason="max_duration") == 1
        assert metric(text, "lookback_sessions_ended_total", reason="normal") == 2
        assert log.problems() == []


def test_faults_left_no_unexpected_log_lines(server_log: ErrorLog) -> None:
    """Only the injected failures are logged (as batch failures): no traceback from a
    cancelled reader, a vanished client or a stuck socket."""
    assert server_log.problems("injected model failure") == []
    assert sum("injected model failure" in r.getMessage() for r in server_log.records) == 3
