"""WebSocket and REST helpers of the API tests: real clients, transcripts, metric reads.

Two ways to drive a session. ``run_session`` sends a list of messages while a reader
collects every server message as parsed JSON until the close (a long stream never stalls
on an unread socket: the server's own send queue is bounded). ``stream_clip`` keeps a
*transcript*: every text message in order, with the random ``session_id`` cut out, plus
how the socket closed. Two runs of the same audio give byte-identical transcripts
whatever else the server is doing (batched results equal results run alone), which is
how the bad-input and fault tests prove that a misbehaving client did not disturb a
healthy one. Raw-socket clients (a stuck reader, a slow writer) and fault injection in
the model call are here too.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import queue
import re
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import numpy as np
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from lookback.app import create_app
from lookback.metrics import Metrics
from lookback.server import uvicorn_config
from lookback.settings import Settings
from tests.conftest import DEFAULT_MODEL, SILERO, STORE, Server, free_port, uvicorn_in_thread

FRAME = 128
RATE = 16000
SESSION_TIMEOUT = 30.0
SILERO_Q = "model=silero-vad"

#: Expected hop of each model under test (the brief's contract).
HOPS = {SILERO: 512, DEFAULT_MODEL: 128}


def require_model(name: str) -> str:
    """Fail (never skip) when a model the tests need is not in the store."""
    versions = sorted(p.parent.name for p in (STORE / name).glob("*/model.json"))
    if not versions:
        pytest.fail(
            f"model {name!r} is not in {STORE}: its protocol tests cannot run "
            "(the default model is trained by model_store/recipes; Silero is imported "
            "by `make silero`)",
            pytrace=False,
        )
    return name


def manifest(name: str) -> dict[str, Any]:
    paths = sorted((STORE / name).glob("*/model.json"))
    assert paths, f"no {name} in {STORE}"
    data: dict[str, Any] = json.loads(Path(paths[-1]).read_text())
    return data


def stream_url(base_ws: str, **query: object) -> str:
    q = {k: v for k, v in query.items() if v is not None}
    return f"{base_ws}/v1/stream" + (f"?{urlencode(q)}" if q else "")


def frames(samples: np.ndarray, per_message: int = 1) -> list[bytes]:
    """Whole 128-sample frames (the tail zero-padded), ``per_message`` frames a message."""
    pad = (-len(samples)) % FRAME
    if pad:
        samples = np.concatenate([samples, np.zeros(pad, samples.dtype)])
    step = FRAME * per_message
    return [samples[i : i + step].tobytes() for i in range(0, len(samples), step)]


END = json.dumps({"type": "end"})
FLUSH = json.dumps({"type": "flush"})


@dataclass
class Session:
    messages: list[dict[str, Any]]
    close_code: int | None
    close_reason: str

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.messages if m.get("type") == kind]

    @property
    def ready(self) -> dict[str, Any]:
        assert self.messages and self.messages[0]["type"] == "ready", self.messages[:3]
        return self.messages[0]

    @property
    def results(self) -> list[dict[str, Any]]:
        return self.of("result")

    @property
    def events(self) -> list[dict[str, Any]]:
        return self.of("event")

    @property
    def errors(self) -> list[dict[str, Any]]:
        return self.of("error")

    @property
    def summary(self) -> dict[str, Any]:
        found = self.of("summary")
        assert len(found) == 1, f"expected one summary, got {found} (close {self.close_code})"
        return found[0]

    def scores(self, label: str) -> list[float]:
        return [r["scores"][label] for r in self.results]


async def collect_json(ws: ClientConnection, into: list[dict[str, Any]]) -> None:
    """Collect JSON messages until the server closes the connection."""
    with contextlib.suppress(ConnectionClosed):
        while True:
            raw = await ws.recv()
            assert isinstance(raw, str), "the server sends text messages only"
            into.append(json.loads(raw))


async def _send_all(ws: ClientConnection, messages: Iterable[bytes | str]) -> None:
    with contextlib.suppress(ConnectionClosed):
        for m in messages:
            await ws.send(m)


async def run_session(
    base_ws: str,
    messages: Sequence[Any] = (),  # bytes and str
    /,
    *,
    headers: Any = None,
    **query: Any,
) -> Session:
    """Open a session, send ``messages`` while reading, and collect up to the close."""

    async def go() -> Session:
        got: list[dict[str, Any]] = []
        async with connect(
            stream_url(base_ws, **query), compression=None, max_size=2**24, additional_headers=headers
        ) as ws:
            sender = asyncio.create_task(_send_all(ws, messages))
            await collect_json(ws, got)
            await sender
            return Session(got, ws.close_code, ws.close_reason or "")

    return await asyncio.wait_for(go(), SESSION_TIMEOUT)


async def recv_json(ws: ClientConnection, wait: float = 10.0) -> dict[str, Any]:
    raw = await asyncio.wait_for(ws.recv(), wait)
    assert isinstance(raw, str)
    msg: dict[str, Any] = json.loads(raw)
    return msg


async def recv_until(ws: ClientConnection, kind: str, wait: float = 10.0) -> list[dict[str, Any]]:
    """Messages up to and including the first of type ``kind``."""
    out: list[dict[str, Any]] = []
    while not out or out[-1].get("type") != kind:
        out.append(await recv_json(ws, wait))
    return out


async def expect_refusal(base_ws: str, **query: Any) -> Session:
    """A query-level refusal: the upgrade succeeds, then one error and a 44xx close."""
    s = await run_session(base_ws, **query)
    assert len(s.messages) == 1 and s.messages[0]["type"] == "error", s.messages
    return s


# -- REST -------------------------------------------------------------------------------------


def score(
    url: str,
    body: bytes | Iterable[bytes],
    content_type: str = "audio/wav",
    /,
    headers: Any = None,
    **params: Any,
) -> httpx.Response:
    q = {k: v for k, v in params.items() if v is not None}
    return httpx.post(
        f"{url}/v1/score",
        params=q,
        content=body,
        timeout=60,
        headers={"content-type": content_type, **(headers or {})},
    )


def error_code(r: httpx.Response) -> str:
    body = r.json()
    assert set(body) == {"error"}, body
    code: str = body["error"]["code"]
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return code


# -- metrics ----------------------------------------------------------------------------------

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str, headers: dict[str, str] | None = None) -> Samples:
    """``/metrics`` as {(sample name, sorted labels): value}."""
    r = httpx.get(f"{url}/metrics", headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    out: Samples = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def poll(check: Any, timeout: float = 10.0, interval: float = 0.02) -> Any:
    """Poll ``check()`` until it returns a truthy value (server-side bookkeeping after a close)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: last value {value!r}")
        time.sleep(interval)  # a bounded poll of the server's state, not a fixed wait


# -- transcripts, raw sockets, fault injection -------------------------------------------

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
        return r.status_code, {k.lower(): v for k, v in r.headers.raw_items()}, bytes(r.body or b"")
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


def metric(source: str | Samples, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels`` (0 if none).

    ``source`` is a ``/metrics`` text or what ``scrape`` returned."""
    if isinstance(source, str):
        total = 0.0
        for fam in text_string_to_metric_families(source):
            for s in fam.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    total += s.value
        return total
    want = set(labels.items())
    return sum(v for (n, lab), v in source.items() if n == name and want <= set(lab))


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


def server_side_protocol(client_port: int) -> Any:
    """The server's protocol object (HTTP or WebSocket) of the in-thread connection whose
    client port is given."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

    kinds = (HttpToolsProtocol, WebSocketsSansIOProtocol)
    found = []
    for obj in gc.get_objects():
        with contextlib.suppress(ReferenceError):  # dead weak proxies among gc's objects
            if isinstance(obj, kinds) and obj.client and obj.client[1] == client_port:
                found.append(obj)
    live = [p for p in found if isinstance(p, WebSocketsSansIOProtocol)] or found  # upgraded: the WS one
    if not live:
        raise AssertionError(f"no server connection from port {client_port}")
    return live[0]


def server_side_transport(client_port: int) -> Any:
    """The server's transport of the in-thread connection whose client port is given."""
    return server_side_protocol(client_port).transport


@contextlib.contextmanager
def guarded_server(settings: Settings, *, engine: Any = None) -> Iterator[Server]:
    """A real server in a thread under the production uvicorn configuration
    (``lookback.server.uvicorn_config``: the transport guards of ``lookback.transport``)."""
    metrics = engine.metrics if engine is not None else Metrics()
    app = create_app(settings, metrics=metrics, engine=engine)
    port = free_port()
    config = uvicorn_config(
        app, settings.model_copy(update={"host": "127.0.0.1"}), port=port, metrics=metrics
    )
    with uvicorn_in_thread(config):
        yield Server(f"http://127.0.0.1:{port}", port, app, settings, metrics)


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

    def send_text(self, text: str) -> None:
        self.proto.send_text(text.encode())
        self._flush()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
