"""Helpers for the reliability tests: real WebSocket clients, transcripts, metric reads.

A *transcript* is every text message a session received, in order, with the random
``session_id`` cut out, plus how the socket closed. Two runs of the same audio give
byte-identical transcripts whatever else the server is doing (batched results equal
results run alone), which is how the bad-input and fault tests prove that a misbehaving
client did not disturb a healthy one.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import queue
import re
import socket
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

SILERO_Q = "model=silero-vad"
FRAME = 128
_SID = re.compile(r'"session_id":"[0-9a-f]+",?')


def strip_sid(text: str) -> str:
    return _SID.sub("", text)


def ws_connect(url: str, **kw: Any) -> connect:
    """A plain client: no compression, no proxy, no keep-alive pings to muddy timings."""
    kw.setdefault("compression", None)
    kw.setdefault("proxy", None)
    kw.setdefault("ping_interval", None)
    kw.setdefault("open_timeout", 20)
    kw.setdefault("max_size", 2**24)
    return connect(url, **kw)


@dataclass
class Transcript:
    messages: list[str] = field(default_factory=list)
    close_code: int | None = None
    close_reason: str = ""
    results: int = 0  # result messages so far (read_all keeps count)

    def parsed(self) -> list[dict[str, Any]]:
        return [orjson.loads(m) for m in self.messages]

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.parsed() if m.get("type") == kind]

    @property
    def summary(self) -> dict[str, Any]:
        (s,) = self.of_type("summary")
        return s

    def error_codes(self) -> list[str]:
        return [m["code"] for m in self.of_type("error")]


async def read_all(ws: ClientConnection, into: Transcript) -> Transcript:
    """Collect every text message until the server closes the socket."""
    try:
        async for msg in ws:
            if isinstance(msg, str):
                into.messages.append(strip_sid(msg))
                if msg.startswith('{"type":"result"'):
                    into.results += 1
    except ConnectionClosed:
        pass
    into.close_code = ws.close_code
    into.close_reason = ws.close_reason or ""
    return into


async def stream_clip(
    base_ws: str,
    pcm: bytes,
    *,
    query: str = SILERO_Q,
    bytes_per_sample: int = 2,
    frames_per_msg: int = 3,
    midway: Callable[[], Awaitable[None]] | None = None,
    keepalive: float = 0.2,
    headers: dict[str, str] | None = None,
) -> Transcript:
    """Stream ``pcm`` as whole frames (``frames_per_msg`` per message, so hops straddle
    messages), then ``end``; return the full transcript.

    ``midway`` runs once the first half is sent and every result of it has arrived: the
    session is then provably live, and quiet (no step of it in any batch) while
    ``midway`` runs. The half ends on a hop boundary, so meanwhile the session sends
    ``flush`` every ``keepalive`` seconds: with nothing buffered a flush makes no step
    and no message (the transcript is unchanged) but keeps the session clear of the
    server's idle timeout."""
    frame_bytes = FRAME * bytes_per_sample
    usable = len(pcm) - len(pcm) % frame_bytes
    step = frame_bytes * frames_per_msg
    align = step * 4  # a whole number of messages and of hops (1 or 4 frames)
    half = (usable // 2) - (usable // 2) % align
    out = Transcript()
    async with ws_connect(f"{base_ws}/v1/stream?{query}", additional_headers=headers) as ws:
        reader = asyncio.create_task(read_all(ws, out))
        for i in range(0, half, step):
            await ws.send(pcm[i : i + step])
        if midway is not None:
            await wait_until(lambda: bool(out.messages) or reader.done(), what="ready")
            hop = orjson.loads(out.messages[0])["hop_samples"] * bytes_per_sample
            await wait_until(
                lambda: out.results >= half // hop or reader.done(), what="results of the first half"
            )
            task = asyncio.ensure_future(midway())
            while not task.done():
                await asyncio.wait({task}, timeout=keepalive)
                if not task.done():
                    await ws.send('{"type":"flush"}')
            task.result()
        for i in range(half, usable, step):
            await ws.send(pcm[i : min(i + step, usable)])
        await ws.send('{"type":"end"}')
        await asyncio.wait_for(reader, 60)
    return out


async def refused(url: str, **kw: Any) -> tuple[int, dict[str, str], bytes]:
    """Open a WebSocket that must be refused before the upgrade: (status, headers, body)."""
    try:
        async with ws_connect(url, **kw):
            pass
    except InvalidStatus as exc:
        r = exc.response
        return r.status_code, {k.lower(): v for k, v in r.headers.raw_items()}, r.body or b""
    raise AssertionError(f"{url} was upgraded; expected an HTTP refusal")


async def wait_until(pred: Callable[[], bool], within: float = 20.0, what: str = "") -> None:
    """Poll a condition on the event loop (no fixed sleep): fail loudly after ``within`` s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not pred():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what or pred}")
        await asyncio.sleep(0.005)


class ErrorLog(logging.Handler):
    """Collects WARNING+ records of the server loggers of this process (in-thread servers)."""

    LOGGERS = ("uvicorn", "lookback")
    # uvicorn's websockets-sansio logs this after every denial response (Kludex/uvicorn#3138);
    # `lookback serve` demotes it (lookback.server.LogHygiene); in-thread servers do not.
    BENIGN = ("ASGI callable returned without completing handshake",)

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> ErrorLog:
        for name in self.LOGGERS:
            logging.getLogger(name).addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        for name in self.LOGGERS:
            logging.getLogger(name).removeHandler(self)

    def problems(self, *allowed: str) -> list[str]:
        """Formatted records that are neither benign nor contain an ``allowed`` text."""
        out = []
        for r in self.records:
            text = r.getMessage() + (logging.Formatter().formatException(r.exc_info) if r.exc_info else "")
            if any(b in text for b in (*self.BENIGN, *allowed)):
                continue
            out.append(f"{r.levelname} {r.name}: {text}")
        return out


# -- metrics ---------------------------------------------------------------------------


def metrics_text(base_url: str, headers: dict[str, str] | None = None) -> str:
    r = httpx.get(base_url + "/metrics", timeout=30, headers=headers)
    r.raise_for_status()
    return r.text


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels`` (0 if none)."""
    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


# -- raw sockets -----------------------------------------------------------------------


def small_rcvbuf_socket(port: int, rcvbuf: int = 4096) -> socket.socket:
    """A connected TCP socket with a tiny receive buffer (a client that barely reads)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


def abort(ws: ClientConnection) -> None:
    """Drop the TCP connection without a close frame (a client that vanished)."""
    with contextlib.suppress(Exception):
        ws.transport.abort()


# -- fault injection -------------------------------------------------------------------


class Intercept:
    """Stands in for ``handle.compute`` on a running server's engine (executor thread).

    Each batch reports its slots on ``calls``; while ``hold`` is set it waits for a
    ``release()``; while ``fail_next`` is positive (counted when
    a batch arrives) it raises instead of running the model.
    ``restore()`` puts the real method back and lets every held batch through.
    """

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.orig = handle.compute
        self.calls: queue.Queue[list[int]] = queue.Queue()
        self.hold = False
        self.fail_next = 0
        self.failed = 0
        self._go = threading.Semaphore(0)
        self._lock = threading.Lock()
        handle.compute = self

    def __call__(self, batch: Any) -> Any:
        with self._lock:  # decided on entry: a batch held before fail_next was set passes
            fail = self.fail_next > 0
            if fail:
                self.fail_next -= 1
                self.failed += 1
        self.calls.put([s.slot for s in batch])
        if self.hold and not self._go.acquire(timeout=60):
            raise RuntimeError("a held batch was never released")
        if fail:
            raise RuntimeError("injected model failure")
        return self.orig(batch)

    def release(self, n: int = 1) -> None:
        self._go.release(n)

    async def next_batch(self, within: float = 20.0) -> list[int]:
        """Slots of the next batch that reaches the model call."""
        return await asyncio.to_thread(self.calls.get, timeout=within)

    def restore(self) -> None:
        self.handle.compute = self.orig
        self.hold = False
        self._go.release(10_000)

    def __enter__(self) -> Intercept:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


def server_side_transport(client_port: int) -> Any:
    """The server's transport of the in-thread connection whose client port is given."""
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

    for obj in gc.get_objects():
        if type(obj) is WebSocketsSansIOProtocol and obj.client and obj.client[1] == client_port:
            return obj.transport
    raise AssertionError(f"no server connection from port {client_port}")


class StuckClient:
    """A WebSocket client on a raw socket that, after the handshake, never reads again
    (tiny receive buffer, nothing drains it) while it sends audio: a client that is stuck
    or gone silent without closing TCP. Blocking calls: run them in a thread."""

    def __init__(self, port: int, path: str) -> None:
        from websockets.client import ClientProtocol
        from websockets.http11 import Response
        from websockets.uri import parse_uri

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
        self.sock.settimeout(10)
        self.sock.connect(("127.0.0.1", port))
        self.port = self.sock.getsockname()[1]
        self.proto = ClientProtocol(parse_uri(f"ws://127.0.0.1:{port}{path}"))
        self.proto.send_request(self.proto.connect())
        self._flush()
        while not any(isinstance(e, Response) for e in self.proto.events_received()):
            self.proto.receive_data(self.sock.recv(512))  # the handshake, then never again

    def _flush(self) -> None:
        self.sock.sendall(b"".join(self.proto.data_to_send()))

    def send(self, data: bytes) -> None:
        self.proto.send_binary(data)
        self._flush()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
