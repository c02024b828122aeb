"""Hardening round two (issue 26, item 6): idle sockets must not lock new work out.

Sockets that have not sent a complete request head (no key is needed to open them) live in
their own bounded budget (``max_pending_connections``): they never count against the
connection limit that admitted work gets, and past the budget the oldest of the address
holding the most are closed. Every test runs a real ``lookback serve`` and opens its
sockets raw; waits are bounded polls.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import resource
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import orjson
import soundfile as sf

from lookback.api.admission import HeadBudget
from lookback.settings import Settings
from tests.api.ws_util import metric, metrics_text, stream_clip, wait_until
from tests.conftest import read_clip, spawn_server

CLIP = read_clip("silero_ref_speech.wav")
PCM = CLIP[: 2 * 16000].tobytes()
SILERO = {"LOOKBACK_MODELS": "silero-vad", "LOOKBACK_DEFAULT_MODEL": "silero-vad"}
# no timeout closes an idle socket during a test: only the budget does
PATIENT = {"LOOKBACK_HEADER_TIMEOUT_S": "60", "LOOKBACK_KEEP_ALIVE_TIMEOUT_S": "60"}


def wav(samples: object) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, 16000, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def raise_nofile(need: int) -> None:
    """Room for ``need`` sockets here and in the server, which inherits the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        assert hard == resource.RLIM_INFINITY or hard >= need, f"RLIMIT_NOFILE hard limit {hard} < {need}"
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


class Idle:
    """A raw socket that sends nothing (or one request, then nothing) and records what the
    server sends until it closes its side."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.received = asyncio.ensure_future(reader.read())  # everything until EOF

    @property
    def closed(self) -> bool:
        return self.received.done()

    def answer(self) -> tuple[int, str]:
        """The server's last answer on it: (status, error code)."""
        data = self.received.result()
        head, _, body = data.rpartition(b"HTTP/1.1 ")[2].partition(b"\r\n\r\n")
        return int(head.split(b" ", 1)[0]), str(orjson.loads(body)["error"]["code"])


@contextlib.asynccontextmanager
async def idle_sockets(port: int, n: int, first: bytes = b"") -> AsyncIterator[list[Idle]]:
    """``n`` sockets opened one after the other (oldest first), each sending ``first``."""
    sockets: list[Idle] = []
    try:
        for _ in range(n):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            if first:
                writer.write(first)
            sockets.append(Idle(reader, writer))
        yield sockets
    finally:
        for s in sockets:
            s.received.cancel()
            s.writer.close()


async def test_idle_sockets_leave_new_work_served(tmp_path: Path, silero_model: str) -> None:
    """Default settings: 1,100 sockets that sent nothing, and 100 more idle on keep-alive
    after one health check, held open past the connection limit (1,074). A legitimate
    client is still served a whole WebSocket session and a ``/v1/score`` clip (not 503
    server_busy), and the idle sockets beyond the pre-head budget are closed with 408
    header_timeout, not left to the head timeout."""
    fresh, kept = 1100, 100
    raise_nofile(2 * (fresh + kept) + 512)
    budget = Settings(_env_file=None).max_pending_connections
    assert budget < Settings(_env_file=None).connection_limit < fresh
    with spawn_server(tmp_path, **SILERO, **PATIENT) as srv:
        port = int(srv.url.rsplit(":", 1)[1])
        async with (
            idle_sockets(port, fresh) as idle,
            idle_sockets(port, kept, first=b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n") as keepalive,
            httpx.AsyncClient(base_url=srv.url, timeout=30) as client,
        ):
            # answered once the server has taken every socket above (it accepts in order)
            assert (await client.get("/healthz")).status_code == 200
            out = await stream_clip(srv.ws, PCM)
            assert out.close_code == 1000 and out.results > 0, out.messages[-3:]
            assert out.of_type("summary"), out.messages[-3:]
            clip = wav(CLIP[:16000])
            r = await client.post("/v1/score", content=clip, headers={"content-type": "audio/wav"})
            assert r.status_code == 200, r.text
            assert r.json()["steps"] > 0
            # the budget is a bound: the surplus is closed now, not at header_timeout_s (10 s)
            everyone = idle + keepalive
            await wait_until(lambda: sum(s.closed for s in everyone) >= len(everyone) - budget, within=5)
            assert {s.answer() for s in idle if s.closed} == {(408, "header_timeout")}
            assert (await client.get("/healthz")).status_code == 200
        text = metrics_text(srv.url)
    assert metric(text, "lookback_errors_total", code="server_busy") == 0
    assert metric(text, "lookback_errors_total", code="header_timeout") >= fresh - budget


async def test_the_pre_head_budget_is_bounded_per_address(tmp_path: Path, silero_model: str) -> None:
    """``max_pending_connections=32`` and a 60 s head timeout: a slow client on 127.0.0.2
    starts its head, then 200 idle sockets arrive from 127.0.0.1. Within seconds (the
    budget's one-second grace, not the head timeout) exactly the oldest 169 idle ones are
    answered 408 header_timeout and closed, the newest 31 stay, and the slow client,
    although the oldest of all, is not touched: it finishes its head and is served."""
    env = {**SILERO, **PATIENT, "LOOKBACK_MAX_PENDING_CONNECTIONS": "32"}
    raise_nofile(1024)
    with spawn_server(tmp_path, **env) as srv:
        port = int(srv.url.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.2", 0))
        writer.write(b"GET /v1/models HTTP/1.1\r\nHo")
        await writer.drain()
        async with idle_sockets(port, 200) as idle:
            surplus = len(idle) + 1 - 32
            await wait_until(lambda: sum(s.closed for s in idle) >= surplus, within=5)
            assert [s.closed for s in idle] == [True] * surplus + [False] * (len(idle) - surplus)
            assert {s.answer() for s in idle[:surplus]} == {(408, "header_timeout")}
            writer.write(b"st: t\r\n\r\n")
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 200 "), head
            assert not any(s.closed for s in idle[surplus:])
        writer.close()
        # (the scrape's own connection may push out one more of those just closed)
        assert metric(metrics_text(srv.url), "lookback_errors_total", code="header_timeout") >= surplus


class Conn:
    """What the budget needs of a connection: something it can close."""

    def __init__(self, evicted: list[Conn]) -> None:
        self.evicted = evicted

    def evict(self) -> None:
        self.evicted.append(self)


async def test_a_burst_is_spared_for_the_grace_then_swept_to_the_budget() -> None:
    """A burst over the budget accepted at once (heads on their way) is not evicted at
    once; after the grace the surplus goes, oldest first, from the busiest address only;
    a connection that leaves for its head is never evicted."""
    budget = HeadBudget(4, asyncio.get_running_loop(), grace_s=0.2)
    evicted: list[Conn] = []
    other, served = Conn(evicted), Conn(evicted)
    budget.add(other, "10.0.0.2")
    budget.add(served, "10.0.0.1")
    burst = [Conn(evicted) for _ in range(8)]
    for conn in burst:
        budget.add(conn, "10.0.0.1")
    assert not evicted and len(budget) == 10
    budget.discard(served)  # its head arrived: admitted, out of the budget
    await wait_until(lambda: len(budget) == 4, within=5)
    assert evicted == burst[:5]
    budget.add(Conn(evicted), "10.0.0.3")  # the budget is full: the oldest of 10.0.0.1 goes
    await wait_until(lambda: len(evicted) == 6, within=5)
    assert evicted[-1] is burst[5] and other not in evicted
