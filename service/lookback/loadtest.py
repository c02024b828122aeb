"""``lookback loadtest``: how many real-time streams does this server hold at a latency bound?

N concurrent WebSocket sessions each stream a WAV file (looped) at real-time pace: ``k``
frames of 128 samples per message, one message every ``k * 8`` ms, each session with a
random phase. For every result the client measures the time from sending the frame that
completed the step (step ``i`` completes at frame ``(i + 1) * hop / 128 - 1``) to
receiving the result, and reports p50/p90/p99/p99.9, results/s, frames late (above the
bound), results lost (none by the end: each session sends ``end`` and compares the
summary's step count), errors and close codes. ``--ramp`` searches the largest N whose p99
stays under the bound with nothing lost.

The client must never be the bottleneck, so it is cheap and spread over processes:

- a minimal asyncio WebSocket client (``_RawSession``): the HTTP upgrade is written by
  hand without extensions (no permessage-deflate); every audio message is pre-built once,
  header and masked payload, and shared by all sessions of a process, so sending one is a
  single ``transport.write``; server frames are parsed minimally (unmasked, 7/16/64-bit
  lengths) and results by a fixed-prefix fast path (orjson otherwise);
- one scheduler per process wakes once per 1 ms phase slot and sends for every session in
  it, instead of a timer per session;
- sessions are spread over ``--procs`` processes (default: <= 150 sessions each); each
  reports its CPU use and how late its sends ran against their schedule, and the report
  says so when the client itself was the limit.

``--client websockets`` runs the same schedule over the ``websockets`` library instead
(a cross-check of the raw client; it costs about twice as much per message).

Loopback only unless ``--allow-remote``; every phase is bounded in time.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import ipaddress
import math
import multiprocessing as mp
import os
import random
import resource
import socket
import struct
import sys
import time
from array import array
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlencode, urlsplit

import orjson

if TYPE_CHECKING:
    import numpy as np

FRAME = 128
SAMPLE_RATE = 16000
FRAME_SECONDS = FRAME / SAMPLE_RATE  # 8 ms
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
SESSIONS_PER_PROC = 150  # at 1 frame/message: ~19k sends + ~19k results per second
CLIENT_CPU_LIMIT = 0.85  # a client process above this share of a core may be the bottleneck
SLIP_LIMIT_S = 0.002  # p99 send lateness above this: the schedule is slipping
MAX_AUDIO_SECONDS = 60.0  # the looped clip is cut to this (pre-built messages stay small)
WRITE_BUFFER_LIMIT = 256 * 1024  # a session whose socket the server stopped reading skips sends
MAX_SESSIONS = 20000  # bounded in count ...
MAX_SECONDS = 3600.0  # ... and in time
_RESULT_PREFIX = b'{"type":"result","step":'


class LoadtestError(Exception):
    """Bad arguments or a run that could not start."""


@dataclass
class LoadConfig:
    urls: list[str] = field(default_factory=lambda: ["ws://127.0.0.1:8000"])
    sessions: int = 100
    duration: float = 10.0  # measured seconds, after the warm-up
    warmup: float = 2.0  # seconds sent but not measured
    wav: str | None = None  # None: synthetic noise
    model: str | None = None
    version: str | None = None
    frames_per_message: int = 1
    procs: int = 0  # 0: see proc_count
    p99_ms: float = 20.0  # latency bound: frames later than this are late; ramp's p99 bound
    api_key: str | None = None
    client: str = "raw"  # raw | websockets
    connect_timeout: float = 15.0
    connect_concurrency: int = 32  # handshakes in flight per process
    end_timeout: float = 10.0  # after the last send: wait this long for every summary
    fail_fast: bool = False  # a process whose p99 is over the bound already waits <= 1 s
    allow_remote: bool = False
    cpus: list[int] | None = None  # pin the client processes to these CPUs
    results: str = "all"
    resumable: bool = False  # ?resumable=1: the server checkpoints every session (docs/sessions.md)
    seed: int = 0
    quiet: bool = False


# ------------------------------------------------------------------------------------------
# URLs and audio


def _split_url(url: str) -> tuple[str, int, str]:
    u = urlsplit(url if "://" in url else f"ws://{url}")
    if u.scheme not in ("ws", "http"):
        raise LoadtestError(f"{url}: only ws:// (or http://) URLs are supported")
    host = u.hostname or "127.0.0.1"
    port = u.port or 80
    path = u.path.rstrip("/")
    if not path.endswith("/v1/stream"):
        path += "/v1/stream"
    return host, port, path


def http_base(url: str) -> str:
    host, port, _ = _split_url(url)
    h = f"[{host}]" if ":" in host else host
    return f"http://{h}:{port}"


def is_loopback(host: str) -> bool:
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def check_urls(cfg: LoadConfig) -> None:
    if not cfg.urls:
        raise LoadtestError("no URL")
    for url in cfg.urls:
        host, _, _ = _split_url(url)
        if not cfg.allow_remote and not is_loopback(host):
            raise LoadtestError(
                f"{host} is not a loopback address; a load test is for your own "
                "machine (pass --allow-remote to load another host)"
            )
    if cfg.frames_per_message < 1:
        raise LoadtestError("frames_per_message must be >= 1")
    if not 1 <= cfg.sessions <= MAX_SESSIONS:
        raise LoadtestError(f"sessions must be between 1 and {MAX_SESSIONS}")
    if not (0 < cfg.duration <= MAX_SECONDS and 0 <= cfg.warmup <= MAX_SECONDS):
        raise LoadtestError(f"duration must be in (0, {MAX_SECONDS:g}] s, warmup in [0, {MAX_SECONDS:g}] s")
    if cfg.client not in ("raw", "websockets"):
        raise LoadtestError("client must be raw or websockets")


def load_audio(path: str | None, seed: int = 0) -> np.ndarray:
    """int16 mono samples at 16 kHz, at most MAX_AUDIO_SECONDS (synthetic when no path)."""
    import numpy as np

    limit = int(MAX_AUDIO_SECONDS * SAMPLE_RATE)
    if path is None:
        rng = np.random.default_rng(seed)
        n = 10 * SAMPLE_RATE
        t = np.arange(n) / SAMPLE_RATE
        gate = (np.sin(2 * np.pi * 0.25 * t) > 0).astype(np.float64)  # 2 s on, 2 s off
        tone = np.sin(2 * np.pi * 220 * t) * 0.3 * gate
        x = tone + rng.standard_normal(n) * 0.02
        return (np.clip(x, -1, 1) * 32767).astype(np.int16)
    import soundfile as sf

    data, rate = sf.read(path, dtype="int16", always_2d=True, frames=limit)
    if rate != SAMPLE_RATE:
        raise LoadtestError(f"{path}: {rate} Hz; the load test streams {SAMPLE_RATE} Hz audio")
    if data.shape[1] != 1:
        raise LoadtestError(f"{path}: {data.shape[1]} channels; need mono")
    samples = data[:, 0].copy()
    if len(samples) < FRAME:
        raise LoadtestError(f"{path}: shorter than one frame")
    return samples


def ws_frame(opcode: int, payload: bytes, mask: bytes) -> bytes:
    """One masked client frame (FIN set): header, mask key, masked payload."""
    import numpy as np

    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    if n:
        p = np.frombuffer(payload, np.uint8)
        m = np.resize(np.frombuffer(mask, np.uint8), n)
        body = (p ^ m).tobytes()
    else:
        body = b""
    return head + mask + body


def build_messages(
    samples: np.ndarray, frames_per_message: int, seed: int, framed: bool = True
) -> list[bytes]:
    """The clip cut into messages of k whole frames (looping); masked frames when framed."""
    import numpy as np

    k = frames_per_message
    n_frames = len(samples) // FRAME
    reps = max(1, math.ceil(k / max(n_frames, 1)))
    x = np.tile(samples[: n_frames * FRAME], reps)
    n_msgs = max(1, (len(x) // FRAME) // k)
    raw = [x[i * k * FRAME : (i + 1) * k * FRAME].astype("<i2").tobytes() for i in range(n_msgs)]
    if not framed:
        return raw
    rng = random.Random(seed)
    return [ws_frame(0x2, m, rng.randbytes(4)) for m in raw]


# ------------------------------------------------------------------------------------------
# One process's sessions


class _Proc:
    """What all sessions of one client process share: clock window and the latency sink."""

    def __init__(self, cfg: LoadConfig) -> None:
        self.cfg = cfg
        self.k = cfg.frames_per_message
        self.meas_start = math.inf
        self.meas_end = math.inf
        self.latencies = array("d")
        self.end_frame = ws_frame(0x1, b'{"type":"end"}', b"\x11\x22\x33\x44")


class _Base:
    """Counters and result handling common to both client implementations."""

    def __init__(self, proc: _Proc, msgs: list[bytes], start_msg: int) -> None:
        self.proc = proc
        self.msgs = msgs
        self.pos = start_msg % len(msgs)
        self.send_times = array("d")
        self.frames_sent = 0
        self.skipped = 0
        self.results = 0
        self.events = 0
        self.errors: Counter[str] = Counter()
        self.hop_frames = 1
        self.ready = False
        self.failure: str | None = None
        self.close_code: int | None = None
        self.summary: dict[str, Any] | None = None
        self.closed = False
        self.aborted = False  # still open when the client gave up waiting at the end
        loop = asyncio.get_running_loop()
        self.ready_fut: asyncio.Future[None] = loop.create_future()
        self.done_fut: asyncio.Future[None] = loop.create_future()

    def on_text(self, payload: bytes, now: float) -> None:
        if payload.startswith(_RESULT_PREFIX):
            end = payload.find(b",", 24)
            try:
                step = int(payload[24:end])
            except ValueError:
                step = -1
            if step >= 0:
                self.on_result(step, now)
                return
        try:
            msg = orjson.loads(payload)
        except orjson.JSONDecodeError:
            self.errors["bad_server_json"] += 1
            return
        kind = msg.get("type") if isinstance(msg, dict) else None
        if kind == "result":
            self.on_result(int(msg.get("step", -1)), now)
        elif kind == "event":
            self.events += 1
        elif kind == "ready":
            hop = int(msg.get("hop_samples") or FRAME)
            self.hop_frames = max(1, hop // FRAME)
            self.ready = True
            if not self.ready_fut.done():
                self.ready_fut.set_result(None)
        elif kind == "summary":
            self.summary = msg
        elif kind == "checkpoint":
            pass  # a resumable session's durable point; the load test never resumes
        elif kind == "error":
            code = str(msg.get("code", "error"))
            if not self.ready:  # refused after the upgrade (bad model, capacity): a failure
                self.failure = self.failure or f"error:{code}"
            else:
                self.errors[code] += 1
        else:
            self.errors["unexpected_message"] += 1

    def on_result(self, step: int, now: float) -> None:
        self.results += 1
        m = ((step + 1) * self.hop_frames - 1) // self.proc.k
        st = self.send_times
        if 0 <= m < len(st):
            ts = st[m]
            if self.proc.meas_start <= ts < self.proc.meas_end:
                self.proc.latencies.append(now - ts)

    def finish(self, failure: str | None = None) -> None:
        self.closed = True
        if failure and self.failure is None and not self.ready:
            self.failure = failure
        if not self.ready_fut.done():
            self.ready_fut.set_result(None)
        if not self.done_fut.done():
            self.done_fut.set_result(None)

    def send_next(self) -> None:
        raise NotImplementedError

    def send_end(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def overdue(self, now: float, bound: float) -> tuple[int, int]:
        """(late, all) results not received yet whose frame was sent in the window."""
        st, k, hf = self.send_times, self.proc.k, self.hop_frames
        late = total = 0
        step = self.results  # results come in step order
        while True:
            m = ((step + 1) * hf - 1) // k
            if m >= len(st):
                return late, total
            ts = st[m]
            if self.proc.meas_start <= ts < self.proc.meas_end:
                total += 1
                late += now - ts > bound
            step += 1

    def expected_steps(self) -> int:
        if self.summary is not None and isinstance(self.summary.get("steps"), int):
            return int(self.summary["steps"])
        return math.ceil(self.frames_sent / self.hop_frames)


class _RawSession(_Base, asyncio.Protocol):
    """A minimal WebSocket client on an asyncio Protocol (see the module docstring)."""

    def __init__(
        self,
        proc: _Proc,
        msgs: list[bytes],
        start_msg: int,
        host: str,
        port: int,
        target: str,
        headers: dict[str, str],
    ) -> None:
        _Base.__init__(self, proc, msgs, start_msg)
        self.host, self.port, self.target, self.headers = host, port, target, headers
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.upgraded = False
        self.frag_op = 0
        self.frag = b""
        self.close_sent = False
        self.accept = ""

    # -- asyncio.Protocol ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        key = base64.b64encode(os.urandom(16)).decode()
        self.accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        host = f"[{self.host}]" if ":" in self.host else self.host
        lines = [
            f"GET {self.target} HTTP/1.1",
            f"Host: {host}:{self.port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
        ]
        lines += [f"{k}: {v}" for k, v in self.headers.items()]
        self.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode())

    def connection_lost(self, exc: Exception | None) -> None:
        if self.close_code is None:
            self.close_code = 1006
        self.finish("connection_lost")

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        buf = self.buf + data if self.buf else data
        if not self.upgraded:
            head_end = buf.find(b"\r\n\r\n")
            if head_end < 0:
                self.buf = buf
                return
            if not self._handshake(buf[:head_end].decode("latin-1"), buf[head_end + 4 :]):
                return
            buf = buf[head_end + 4 :]
        pos = 0
        n = len(buf)
        while n - pos >= 2:
            b0 = buf[pos]
            ln = buf[pos + 1] & 0x7F
            hl = 2
            if ln == 126:
                if n - pos < 4:
                    break
                ln = (buf[pos + 2] << 8) | buf[pos + 3]
                hl = 4
            elif ln == 127:
                if n - pos < 10:
                    break
                ln = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                hl = 10
            end = pos + hl + ln
            if end > n:
                break
            payload = buf[pos + hl : end]
            pos = end
            op = b0 & 0x0F
            if not b0 & 0x80:  # fragment: keep until FIN
                if op:
                    self.frag_op = op
                self.frag += payload
                continue
            if op == 0:
                op, payload, self.frag = self.frag_op, self.frag + payload, b""
            if op == 1:
                self.on_text(payload, now)
            elif op == 8:
                self._on_close(payload)
            elif op == 9:
                self._write(ws_frame(0xA, payload[:125], os.urandom(4)))
            elif op == 2:
                self.errors["unexpected_binary"] += 1
        self.buf = buf[pos:] if pos < n else b""

    # -- internals -----------------------------------------------------------------------
    def _handshake(self, head: str, rest: bytes) -> bool:
        lines = head.split("\r\n")
        parts = lines[0].split(" ", 2)
        status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        hdrs = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            hdrs[k.strip().lower()] = v.strip()
        if status != 101:
            code = f"http_{status}"
            with contextlib.suppress(Exception):
                code += ":" + str(orjson.loads(rest)["error"]["code"])
            self.failure = code
            self._abort()
            return False
        if hdrs.get("sec-websocket-accept") != self.accept:
            self.failure = "bad_accept"
            self._abort()
            return False
        if hdrs.get("sec-websocket-extensions"):
            self.failure = "unrequested_extension"
            self._abort()
            return False
        self.upgraded = True
        return True

    def _on_close(self, payload: bytes) -> None:
        self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
        if not self.close_sent:
            self.close_sent = True
            self._write(ws_frame(0x8, payload[:2], os.urandom(4)))
        if self.transport is not None:
            self.transport.close()
        self.finish("closed")

    def _write(self, data: bytes) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            t.write(data)

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self.finish(self.failure)

    # -- driven by the scheduler ---------------------------------------------------------
    def send_next(self) -> None:
        t = self.transport
        if self.closed or t is None or t.is_closing():
            return
        if t.get_write_buffer_size() > WRITE_BUFFER_LIMIT:
            self.skipped += 1
            return
        t.write(self.msgs[self.pos])
        self.send_times.append(time.monotonic())
        self.pos += 1
        if self.pos == len(self.msgs):
            self.pos = 0
        self.frames_sent += self.proc.k

    def send_end(self) -> None:
        if not self.closed:
            self._write(self.proc.end_frame)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()
        self.finish()

    @classmethod
    async def open(
        cls,
        proc: _Proc,
        msgs: list[bytes],
        start_msg: int,
        url: str,
        query: str,
        headers: dict[str, str],
        wait_s: float,
    ) -> _RawSession:
        host, port, path = _split_url(url)
        s = cls(proc, msgs, start_msg, host, port, f"{path}?{query}", headers)
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.create_connection(lambda: s, host, port), wait_s)
            await asyncio.wait_for(asyncio.shield(s.ready_fut), wait_s)
        except (TimeoutError, OSError) as exc:
            s.failure = s.failure or type(exc).__name__
            s.close()
        if not s.ready and s.failure is None:
            s.failure = f"closed_{s.close_code}" if s.close_code else "no_ready"
        return s


class _LibSession(_Base):
    """The same session over the ``websockets`` library (cross-check; costs more)."""

    def __init__(self, proc: _Proc, msgs: list[bytes], start_msg: int) -> None:
        super().__init__(proc, msgs, start_msg)
        self.ws: Any = None
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.tasks: list[asyncio.Task[None]] = []

    async def _reader(self) -> None:
        import websockets

        try:
            async for raw in self.ws:
                now = time.monotonic()
                self.on_text(raw.encode() if isinstance(raw, str) else raw, now)
        except websockets.ConnectionClosed:
            pass
        finally:
            rcvd = getattr(self.ws, "close_code", None)
            self.close_code = rcvd if rcvd is not None else 1006
            self.finish("closed")

    async def _writer(self) -> None:
        with contextlib.suppress(Exception):
            while True:
                item = await self.queue.get()
                if item is None:
                    await self.ws.send('{"type":"end"}')
                    continue
                await self.ws.send(item)
                self.send_times.append(time.monotonic())
                self.frames_sent += self.proc.k

    def send_next(self) -> None:
        if self.closed:
            return
        if self.queue.qsize() > 64:
            self.skipped += 1
            return
        self.queue.put_nowait(self.msgs[self.pos])
        self.pos = (self.pos + 1) % len(self.msgs)

    def send_end(self) -> None:
        if not self.closed:
            self.queue.put_nowait(None)

    def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        self.finish()

    @classmethod
    async def open(
        cls,
        proc: _Proc,
        msgs: list[bytes],
        start_msg: int,
        url: str,
        query: str,
        headers: dict[str, str],
        wait_s: float,
    ) -> _LibSession:
        import websockets

        host, port, path = _split_url(url)
        s = cls(proc, msgs, start_msg)
        h = f"[{host}]" if ":" in host else host
        try:
            s.ws = await websockets.connect(
                f"ws://{h}:{port}{path}?{query}",
                additional_headers=headers or None,
                compression=None,
                max_size=2**24,
                open_timeout=wait_s,
                ping_interval=None,
            )
            s.tasks = [asyncio.create_task(s._reader()), asyncio.create_task(s._writer())]
            await asyncio.wait_for(asyncio.shield(s.ready_fut), wait_s)
        except Exception as exc:
            status = getattr(getattr(exc, "response", None), "status_code", None)
            s.failure = f"http_{status}" if status else type(exc).__name__
            s.close()
        if not s.ready and s.failure is None:
            s.failure = f"closed_{s.close_code}" if s.close_code else "no_ready"
        return s


def _query(cfg: LoadConfig) -> str:
    q = {"model": cfg.model, "version": cfg.version, "encoding": "pcm_s16le", "results": cfg.results}
    if cfg.resumable:
        q["resumable"] = "1"
    return urlencode({k: v for k, v in q.items() if v is not None})


def _headers(cfg: LoadConfig) -> dict[str, str]:
    return {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}


def raise_fd_limit(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = need + 256
    if soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(hard, max(want, soft))
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def _proc_run(
    cfg: LoadConfig,
    n: int,
    offset: int,
    seed: int,
    recv_start: Callable[[], float],
    report: Callable[[Any], None],
) -> dict[str, Any]:
    """One process: open ``n`` sessions, wait for the common start, stream, end, count."""
    import numpy as np

    rng = random.Random(seed)
    samples = load_audio(cfg.wav, cfg.seed)
    proc = _Proc(cfg)
    msgs = build_messages(samples, cfg.frames_per_message, seed, framed=cfg.client == "raw")
    query, headers = _query(cfg), _headers(cfg)
    cls: Any = _RawSession if cfg.client == "raw" else _LibSession
    sem = asyncio.Semaphore(cfg.connect_concurrency)

    async def open_one(i: int) -> _Base:
        url = cfg.urls[(offset + i) % len(cfg.urls)]
        async with sem:
            s: _Base = await cls.open(
                proc, msgs, rng.randrange(len(msgs)), url, query, headers, cfg.connect_timeout
            )
            return s

    t_c = time.monotonic()
    sessions = list(await asyncio.gather(*(open_one(i) for i in range(n))))
    connect_s = time.monotonic() - t_c
    live = [s for s in sessions if s.ready and not s.closed]
    report(("connected", len(live)))
    t0 = await asyncio.get_running_loop().run_in_executor(None, recv_start)

    # Phase slots: each session gets a random phase in the message period, quantized to 1 ms.
    period = cfg.frames_per_message * FRAME_SECONDS
    gran = 0.001
    n_slots = max(1, round(period / gran))
    slots: list[list[_Base]] = [[] for _ in range(n_slots)]
    for s in live:
        slots[rng.randrange(n_slots)].append(s)
    plan = [(i * period / n_slots, g) for i, g in enumerate(slots) if g]
    proc.meas_start = t0 + cfg.warmup
    proc.meas_end = proc.meas_start + cfg.duration
    t_end = proc.meas_end
    slips = array("d")
    cpu0 = wall0 = None
    sends_in_window = 0
    mono = time.monotonic
    cycle = 0
    while plan:
        base = t0 + cycle * period
        if base >= t_end:
            break
        for off, group in plan:
            target = base + off
            if target >= t_end:
                break
            delay = target - mono()
            # Behind schedule: still yield once, so results are read while catching up.
            await asyncio.sleep(delay if delay > 0 else 0)
            now = mono()
            if now >= proc.meas_start:
                if cpu0 is None:
                    cpu0, wall0 = _cpu_seconds(), now
                slips.append(now - target)
                sends_in_window += len(group)
            for s in group:
                s.send_next()
        cycle += 1
    wall1 = mono()
    cpu1 = _cpu_seconds()
    for s in live:
        s.send_end()
    end_timeout = cfg.end_timeout
    early = False
    if cfg.fail_fast:
        # Has this trial failed already? Results still missing whose frame went out more
        # than the bound ago are late too; past 1% late, p99 is over the bound: do not wait
        # out a backlog the server cannot clear in time.
        now = mono()
        bound = cfg.p99_ms / 1e3
        lat = np.array(proc.latencies, np.float64)  # a copy: the array keeps growing
        late, total = int((lat > bound).sum()), len(lat)
        for s in live:
            d_late, d_total = s.overdue(now, bound)
            late += d_late
            total += d_total
        if total and late > 0.01 * total:
            early, end_timeout = True, min(end_timeout, 1.0)
    pending = [s.done_fut for s in live if not s.done_fut.done()]
    if pending:
        await asyncio.wait(pending, timeout=end_timeout)
    end_wait = mono() - wall1
    for s in live:
        if not s.done_fut.done():
            s.aborted = True
    for s in sessions:
        s.close()
    await asyncio.sleep(0)

    failures: Counter[str] = Counter(s.failure for s in sessions if s.failure and not s.ready)
    errors: Counter[str] = Counter()
    closes: Counter[str] = Counter()
    lost = no_summary = skipped = frames = results = events = 0
    for s in live:
        errors.update(s.errors)
        closes["aborted_by_client" if s.aborted else str(s.close_code)] += 1
        if s.summary is None:
            no_summary += 1
        lost += max(0, s.expected_steps() - s.results)
        skipped += s.skipped
        frames += s.frames_sent
        results += s.results
        events += s.events
    window = (wall1 - wall0) if wall0 is not None else 0.0
    cpu = (cpu1 - cpu0) / window if cpu0 is not None and window > 0 else 0.0
    sl = np.frombuffer(slips, np.float64) if len(slips) else np.zeros(1)
    n_msgs = sends_in_window + len(proc.latencies)  # messages each way in the window
    cpu_s = (cpu1 - cpu0) if cpu0 is not None else 0.0
    return {
        "sessions": n,
        "connected": len(live),
        "connect_s": connect_s,
        "connect_failures": dict(failures),
        "errors": dict(errors),
        "close_codes": dict(closes),
        "lost_results": lost,
        "no_summary": no_summary,
        "send_skipped": skipped,
        "frames_sent": frames,
        "results": results,
        "events": events,
        "latencies": proc.latencies.tobytes(),
        "cpu": cpu,
        "window_s": window,
        "cpu_s": cpu_s,
        "messages": n_msgs,
        "end_wait_s": end_wait,
        "ended_early": early,
        "slip_p50_ms": float(np.percentile(sl, 50) * 1e3),
        "slip_p99_ms": float(np.percentile(sl, 99) * 1e3),
        "slip_max_ms": float(sl.max() * 1e3),
        "pid": os.getpid(),
    }


def _proc_entry(cfg_dict: dict[str, Any], n: int, offset: int, seed: int, conn: Any) -> None:
    """Client process entry point (spawned)."""
    cfg = LoadConfig(**cfg_dict)
    if cfg.cpus and hasattr(os, "sched_setaffinity"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, set(cfg.cpus))
    raise_fd_limit(n)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvicorn[standard] brings it
        pass

    def recv_start() -> float:
        msg = conn.recv()
        return float(msg[1])

    try:
        out = asyncio.run(_proc_run(cfg, n, offset, seed, recv_start, conn.send))
        conn.send(("done", out))
    except Exception as exc:  # report, never hang the parent
        with contextlib.suppress(Exception):
            conn.send(("failed", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


# ------------------------------------------------------------------------------------------
# One run: spread sessions over processes, merge


def _log(cfg: LoadConfig, text: str) -> None:
    if not cfg.quiet:
        print(text, file=sys.stderr, flush=True)


def sessions_per_proc(frames_per_message: int) -> int:
    """SESSIONS_PER_PROC at 1 frame/message; more with bigger messages at the same message load
    (a session sends 125/k messages and gets up to 125 results per second)."""
    k = max(1, frames_per_message)
    return int(SESSIONS_PER_PROC * 2 / (1 + 1 / k))


def proc_count(cfg: LoadConfig) -> int:
    per = sessions_per_proc(cfg.frames_per_message)
    return max(1, min(cfg.sessions, cfg.procs or math.ceil(cfg.sessions / per)))


def run_load(cfg: LoadConfig) -> dict[str, Any]:
    """N sessions for warm-up + duration seconds; the merged report (see ``format_report``)."""
    check_urls(cfg)
    nprocs = proc_count(cfg)
    ctx = mp.get_context("spawn")
    shares = [cfg.sessions // nprocs + (i < cfg.sessions % nprocs) for i in range(nprocs)]
    cfg_dict = asdict(cfg)
    procs = []
    conns = []
    offset = 0
    for i, share in enumerate(shares):
        parent, child = ctx.Pipe()
        p = ctx.Process(
            target=_proc_entry,
            name=f"loadtest-{i}",
            daemon=True,
            args=(cfg_dict, share, offset, cfg.seed * 1000 + i, child),
        )
        p.start()
        child.close()
        procs.append(p)
        conns.append(parent)
        offset += share
    outs: list[dict[str, Any]] = []
    failures: list[str] = []
    try:
        # Connect phase: bounded by the handshakes each process has to do.
        deadline = time.monotonic() + 30 + cfg.connect_timeout * (1 + max(shares) / cfg.connect_concurrency)
        connected = 0
        for c in conns:
            msg = _recv(c, deadline)
            if msg is None or msg[0] != "connected":
                failures.append(f"client process did not connect: {msg!r}"[:300])
                continue
            connected += msg[1]
        t0 = time.monotonic() + 0.2
        for c in conns:
            with contextlib.suppress(OSError):
                c.send(("start", t0))
        _log(
            cfg,
            f"loadtest: {connected}/{cfg.sessions} sessions connected over {nprocs} "
            f"process(es); streaming {cfg.warmup:g} s warm-up + {cfg.duration:g} s",
        )
        deadline = t0 + cfg.warmup + cfg.duration + cfg.end_timeout + 30
        for c in conns:
            msg = _recv(c, deadline)
            if msg is not None and msg[0] == "done":
                outs.append(msg[1])
            else:
                failures.append(f"client process failed: {msg!r}"[:300])
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    return merge(cfg, outs, failures)


def _recv(conn: Any, deadline: float) -> Any:
    try:
        if conn.poll(max(0.0, deadline - time.monotonic())):
            return conn.recv()
    except (EOFError, OSError):
        return None
    return None


def merge(cfg: LoadConfig, outs: list[dict[str, Any]], failures: list[str]) -> dict[str, Any]:
    import numpy as np

    lat = np.concatenate([np.frombuffer(o["latencies"], np.float64) for o in outs]) if outs else np.zeros(0)
    lat_ms = lat * 1e3

    def pct(q: float) -> float | None:
        return float(np.percentile(lat_ms, q)) if lat_ms.size else None

    def add(key: str) -> int:
        return int(sum(o[key] for o in outs))

    def counts(key: str) -> dict[str, int]:
        c: Counter[str] = Counter()
        for o in outs:
            c.update(o[key])
        return dict(c)

    cpus = [o["cpu"] for o in outs]
    try:
        ncpu = len(cfg.cpus) if cfg.cpus else len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        ncpu = os.cpu_count() or 1
    total_cpu = sum(cpus)
    slip_p99 = max((o["slip_p99_ms"] for o in outs), default=0.0)
    reasons = []
    if cpus and max(cpus) > CLIENT_CPU_LIMIT:
        reasons.append(f"a client process used {max(cpus) * 100:.0f}% of a core")
    if total_cpu > CLIENT_CPU_LIMIT * ncpu:
        reasons.append(f"client processes used {total_cpu * 100:.0f}% of their {ncpu} CPU(s)")
    if slip_p99 > SLIP_LIMIT_S * 1e3:
        why = (
            ""
            if max(cpus, default=0) > 0.5
            else f"; the client itself used at most {max(cpus, default=0) * 100:.0f}% of a core, so "
            "other work on its CPU(s) delays it"
        )
        reasons.append(f"sends ran late against their schedule (p99 {slip_p99:.1f} ms){why}")
    msgs = sum(o["messages"] for o in outs)
    us_per_msg = sum(o["cpu_s"] for o in outs) / msgs * 1e6 if msgs else None
    late = int((lat_ms > cfg.p99_ms).sum())
    errors = counts("errors")
    conn_fail = counts("connect_failures")
    connected = add("connected")
    lost = add("lost_results")
    p99 = pct(99)
    window = max((o["window_s"] for o in outs), default=0.0) or cfg.duration
    ok = (
        not failures
        and connected == cfg.sessions
        and lost == 0
        and not errors
        and p99 is not None
        and p99 <= cfg.p99_ms
    )
    return {
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("api_key", "quiet")},
        "sessions": cfg.sessions,
        "procs": len(outs) or proc_count(cfg),
        "frames_per_message": cfg.frames_per_message,
        "connected": connected,
        "connect_s": max((o["connect_s"] for o in outs), default=0.0),
        "connect_failures": conn_fail,
        "measured_s": window,
        "results_measured": int(lat_ms.size),
        "results_per_s": lat_ms.size / window if window else 0.0,
        "results_total": add("results"),
        "frames_sent": add("frames_sent"),
        "frames_per_s": add("frames_sent") / (cfg.warmup + cfg.duration),
        "latency_ms": {
            "p50": pct(50),
            "p90": pct(90),
            "p99": p99,
            "p99.9": pct(99.9),
            "max": float(lat_ms.max()) if lat_ms.size else None,
            "mean": float(lat_ms.mean()) if lat_ms.size else None,
        },
        "bound_ms": cfg.p99_ms,
        "late": late,
        "late_fraction": late / lat_ms.size if lat_ms.size else 0.0,
        "lost_results": lost,
        "no_summary": add("no_summary"),
        "send_skipped": add("send_skipped"),
        "errors": errors,
        "close_codes": counts("close_codes"),
        "events": add("events"),
        "end_wait_s": max((o["end_wait_s"] for o in outs), default=0.0),
        "ended_early": any(o.get("ended_early") for o in outs),
        "client": {
            "cpu_per_proc": cpus,
            "cpu_total": total_cpu,
            "cpus_available": ncpu,
            "cpu_us_per_message": us_per_msg,
            "slip_p50_ms": max((o["slip_p50_ms"] for o in outs), default=0.0),
            "slip_p99_ms": slip_p99,
            "slip_max_ms": max((o["slip_max_ms"] for o in outs), default=0.0),
            "bottleneck": bool(reasons),
            "reasons": reasons,
        },
        "process_failures": failures,
        "passed": ok,
    }


def _f(v: float | None, fmt: str = ".2f") -> str:
    return "-" if v is None else format(v, fmt)


def format_report(r: dict[str, Any]) -> str:
    c = r["config"]
    lat = r["latency_ms"]
    cl = r["client"]
    lines = [
        f"{r['sessions']} sessions x {r['frames_per_message']} frame(s)/message, "
        f"model {c.get('model') or '(server default)'}, {r['measured_s']:.1f} s measured after "
        f"{c['warmup']:.1f} s warm-up, {r['procs']} client process(es), {c['client']} client",
        f"  connected {r['connected']}/{r['sessions']} in {r['connect_s']:.1f} s"
        + (f"; refused/failed: {r['connect_failures']}" if r["connect_failures"] else ""),
        f"  results {r['results_measured']} measured ({r['results_per_s']:.0f}/s); "
        f"frames sent {r['frames_sent']} ({r['frames_per_s']:.0f}/s)",
        f"  latency ms: p50 {_f(lat['p50'])}  p90 {_f(lat['p90'])}  p99 {_f(lat['p99'])}  "
        f"p99.9 {_f(lat['p99.9'])}  max {_f(lat['max'])}   (bound {r['bound_ms']:g} ms)",
        f"  late (> {r['bound_ms']:g} ms): {r['late']} ({r['late_fraction'] * 100:.3f}%)   "
        f"lost results: {r['lost_results']}   no summary: {r['no_summary']}   "
        f"sends skipped (server not reading): {r['send_skipped']}",
        f"  errors: {r['errors'] or 'none'}   close codes: {r['close_codes'] or '-'}",
        f"  client: CPU {cl['cpu_total'] * 100:.0f}% of {cl['cpus_available']} CPU(s) "
        f"(per process max {max(cl['cpu_per_proc'], default=0) * 100:.0f}%; "
        f"{_f(cl['cpu_us_per_message'], '.1f')} us per message sent or received), send lateness "
        f"p50 {cl['slip_p50_ms']:.2f} p99 {cl['slip_p99_ms']:.2f} max {cl['slip_max_ms']:.1f} ms",
    ]
    if r.get("ended_early"):
        lines.append(
            "  (p99 was over the bound when sending ended: waited <= 1 s for the rest, so "
            "results still in flight count as lost)"
        )
    if cl["bottleneck"]:
        lines.append("  WARNING: the client may be the bottleneck: " + "; ".join(cl["reasons"]))
    for f in r["process_failures"]:
        lines.append(f"  FAILURE: {f}")
    lines.append(
        f"  {'PASS' if r['passed'] else 'FAIL'} (p99 <= {r['bound_ms']:g} ms, nothing lost, no errors)"
    )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# Ramp: the largest N that passes


def wait_server_idle(url: str, timeout: float = 15.0) -> None:
    """Between trials: until the server reports no open sessions (if it says so at all)."""
    import httpx

    deadline = time.monotonic() + timeout
    base = http_base(url)
    while time.monotonic() < deadline:
        try:
            body = httpx.get(f"{base}/readyz", timeout=2.0).json()
        except Exception:
            return
        if not isinstance(body, dict) or not body.get("sessions"):
            return
        time.sleep(0.2)


def ramp(
    cfg: LoadConfig,
    *,
    start: int = 32,
    max_sessions: int = 4096,
    max_trials: int = 10,
    precision: float = 0.05,
    max_time: float = 300.0,
    retry_noisy: bool = True,
    on_trial: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Exponential search up from ``start`` (down when it fails), then bisection.

    A trial passes when every session connected, p99 <= the bound, nothing was lost and no
    error came back. Stops when the gap between the largest pass and the smallest fail is
    within ``precision`` (or 2 sessions), after ``max_trials`` trials, or past ``max_time``.
    With ``retry_noisy``, a trial that fails while the client could not keep its own send
    schedule (a busy machine, not necessarily the server) is run once more at the same N.
    """
    check_urls(cfg)
    max_sessions = max(1, min(max_sessions, MAX_SESSIONS))
    t_start = time.monotonic()
    trials: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    lo, hi = 0, max_sessions + 1
    n = max(1, min(start, max_sessions))
    stop = "max_trials"
    retried: set[int] = set()
    while len(trials) < max_trials:
        for url in cfg.urls:
            wait_server_idle(url)
        r = run_load(replace(cfg, sessions=n, fail_fast=True))
        trials.append(r)
        _log(
            cfg,
            f"ramp trial {len(trials)}: N={n}  p99 {_f(r['latency_ms']['p99'])} ms  "
            f"lost {r['lost_results']}  errors {sum(r['errors'].values())}  "
            f"client cpu {r['client']['cpu_total'] * 100:.0f}%  "
            f"{'PASS' if r['passed'] else 'FAIL'}"
            + ("  (client schedule slipped)" if r["client"]["bottleneck"] else ""),
        )
        if on_trial is not None:
            on_trial(r)
        if (
            retry_noisy
            and not r["passed"]
            and r["client"]["bottleneck"]
            and n not in retried
            and len(trials) < max_trials
            and time.monotonic() - t_start + cfg.warmup + cfg.duration + 5 <= max_time
        ):
            retried.add(n)
            r["retried"] = True
            _log(cfg, f"ramp: the client slipped while N={n} failed; running it once more")
            continue
        if r["passed"]:
            lo = n
            best = r
        else:
            hi = n
        if lo >= max_sessions:
            stop = "max_sessions"
            break
        if hi <= 1:
            stop = "nothing_passes"
            break
        if hi > max_sessions:
            n = min(max_sessions, lo * 2)
        elif lo == 0:
            n = max(1, hi // 2)
        else:
            if hi - lo <= max(2, math.ceil(precision * lo)):
                stop = "converged"
                break
            n = (lo + hi) // 2
        # A trial takes about connect + warm-up + duration + end: do not start one past the budget.
        if time.monotonic() - t_start + cfg.warmup + cfg.duration + 5 > max_time:
            stop = "max_time"
            break
    return {
        "max_sessions": lo,
        "first_fail": hi if hi <= max_sessions else None,
        "stop": stop,
        "bound_ms": cfg.p99_ms,
        "frames_per_message": cfg.frames_per_message,
        "best": best,
        "trials": [_trial_row(t) for t in trials],
        "client_bottleneck": bool(best and best["client"]["bottleneck"]),
        "elapsed_s": time.monotonic() - t_start,
    }


def _trial_row(r: dict[str, Any]) -> dict[str, Any]:
    return {
        "sessions": r["sessions"],
        "passed": r["passed"],
        "retried": bool(r.get("retried")),
        "p50_ms": r["latency_ms"]["p50"],
        "p99_ms": r["latency_ms"]["p99"],
        "p999_ms": r["latency_ms"]["p99.9"],
        "results_per_s": r["results_per_s"],
        "lost": r["lost_results"],
        "errors": sum(r["errors"].values()),
        "connected": r["connected"],
        "client_cpu": r["client"]["cpu_total"],
        "client_bottleneck": r["client"]["bottleneck"],
        "slip_p99_ms": r["client"]["slip_p99_ms"],
    }


def format_ramp(res: dict[str, Any]) -> str:
    lines = [
        f"ramp (p99 <= {res['bound_ms']:g} ms, nothing lost, "
        f"{res['frames_per_message']} frame(s)/message): trials"
    ]
    lines.append("  sessions  pass   p50 ms   p99 ms  p99.9 ms  results/s  lost  errors  client cpu")
    for t in res["trials"]:
        verdict = "yes" if t["passed"] else ("no*" if t.get("retried") else "no ")
        lines.append(
            f"  {t['sessions']:8d}  {verdict:4s} "
            f"{_f(t['p50_ms']):>7s}  {_f(t['p99_ms']):>7s}  {_f(t['p999_ms']):>8s}  "
            f"{t['results_per_s']:9.0f}  {t['lost']:4d}  {t['errors']:6d}  "
            f"{t['client_cpu'] * 100:6.0f}%"
            f"{' (client slipped)' if t['client_bottleneck'] else ''}"
        )
    if any(t.get("retried") for t in res["trials"]):
        lines.append("  (no* = failed while the client's own schedule slipped; run once more)")
    lines.append(
        f"  => {res['max_sessions']} real-time sessions "
        f"(first failure at {res['first_fail'] or '-'}; stop: {res['stop']}; "
        f"{res['elapsed_s']:.0f} s)"
    )
    if res["client_bottleneck"]:
        lines.append(
            "  WARNING: the client was near its limit (or could not keep its schedule) "
            "in the best trial; the server may hold more"
        )
    if res["best"] is not None:
        lines.append("best trial:")
        lines.append(format_report(res["best"]))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# Idle sessions (memory per session)


class IdleSessions:
    """Open ``n`` sessions and keep them idle: ``async with IdleSessions(...) as s``."""

    def __init__(
        self,
        url: str,
        n: int,
        *,
        model: str | None = None,
        api_key: str | None = None,
        concurrency: int = 32,
        timeout: float = 15.0,
    ) -> None:
        self.cfg = LoadConfig(
            urls=[url],
            sessions=n,
            model=model,
            api_key=api_key,
            connect_concurrency=concurrency,
            connect_timeout=timeout,
        )
        self.sessions: list[_RawSession] = []

    @property
    def ready(self) -> int:
        return sum(1 for s in self.sessions if s.ready and not s.closed)

    @property
    def failures(self) -> dict[str, int]:
        return dict(Counter(s.failure for s in self.sessions if s.failure and not s.ready))

    async def __aenter__(self) -> IdleSessions:
        cfg = self.cfg
        check_urls(cfg)
        raise_fd_limit(cfg.sessions)
        proc = _Proc(cfg)
        sem = asyncio.Semaphore(cfg.connect_concurrency)
        msgs = [b""]

        async def one() -> _RawSession:
            async with sem:
                return await _RawSession.open(
                    proc, msgs, 0, cfg.urls[0], _query(cfg), _headers(cfg), cfg.connect_timeout
                )

        self.sessions = list(await asyncio.gather(*(one() for _ in range(cfg.sessions))))
        return self

    async def __aexit__(self, *exc: object) -> None:
        for s in self.sessions:
            s.send_end()
        pending = [s.done_fut for s in self.sessions if not s.done_fut.done()]
        if pending:
            await asyncio.wait(pending, timeout=10)
        for s in self.sessions:
            s.close()


# ------------------------------------------------------------------------------------------
# CLI glue (service/lookback/cli.py adds the subparser and calls ``main_args``)


def add_arguments(p: Any) -> None:
    p.add_argument(
        "--url",
        action="append",
        default=None,
        help="server WebSocket URL (ws://127.0.0.1:8000); repeat to split sessions over several servers",
    )
    p.add_argument("--sessions", type=int, default=100, help="concurrent sessions (ramp: start)")
    p.add_argument(
        "--ramp", action="store_true", help="search the largest N with p99 <= --p99-ms and nothing lost"
    )
    p.add_argument("--p99-ms", type=float, default=20.0, help="latency bound (ms)")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per run/trial")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds streamed before measuring")
    p.add_argument("--wav", help="16 kHz mono clip to loop (default: synthetic tone + noise)")
    p.add_argument("--model")
    p.add_argument("--version")
    p.add_argument("--frames-per-message", type=int, default=1)
    p.add_argument(
        "--procs",
        type=int,
        default=0,
        help=f"client processes (default: <= {SESSIONS_PER_PROC} sessions each at 1 "
        "frame/message, up to twice that with bigger messages)",
    )
    p.add_argument("--cpus", help="pin client processes to these CPUs, e.g. 1 or 2-3")
    p.add_argument(
        "--client",
        choices=["raw", "websockets"],
        default="raw",
        help="raw: the minimal built-in client; websockets: the library (cross-check)",
    )
    p.add_argument("--max-sessions", type=int, default=4096, help="ramp: upper limit")
    p.add_argument("--max-trials", type=int, default=10, help="ramp: trials at most")
    p.add_argument("--max-time", type=float, default=300.0, help="ramp: seconds at most")
    p.add_argument("--api-key")
    p.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow a non-loopback host (you are loading someone's server)",
    )
    p.add_argument("--json", help="write the full report here")


def parse_cpus(text: str | None) -> list[int] | None:
    if not text:
        return None
    out: list[int] = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        out.extend(range(int(a), int(b or a) + 1))
    return out


def main_args(args: Any) -> int:
    cfg = LoadConfig(
        urls=args.url or ["ws://127.0.0.1:8000"],
        sessions=args.sessions,
        duration=args.duration,
        warmup=args.warmup,
        wav=args.wav,
        model=args.model,
        version=args.version,
        frames_per_message=args.frames_per_message,
        procs=args.procs,
        p99_ms=args.p99_ms,
        api_key=args.api_key,
        client=args.client,
        allow_remote=args.allow_remote,
        cpus=parse_cpus(args.cpus),
    )
    try:
        if args.ramp:
            res = ramp(
                cfg,
                start=args.sessions,
                max_sessions=args.max_sessions,
                max_trials=args.max_trials,
                max_time=args.max_time,
            )
            text = format_ramp(res)
            passed = res["max_sessions"] > 0
        else:
            res = run_load(cfg)
            text = format_report(res)
            passed = bool(res["passed"])
    except LoadtestError as exc:
        print(f"loadtest: {exc}", file=sys.stderr)
        return 2
    print(text)
    if args.json:
        with open(args.json, "wb") as f:
            f.write(orjson.dumps(res, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    return 0 if passed else 1
