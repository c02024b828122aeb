"""The minimal asyncio WebSocket client (``RawSession``) and what its sessions share.

The upgrade is written by hand without extensions; audio messages are pre-built (header and
masked payload) so a send is one ``transport.write``; server frames are parsed minimally
and results by a fixed-prefix fast path. ``SessionBase`` holds the counters and result
handling that ``libclient.LibSession`` shares.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import math
import os
import struct
import time
from array import array
from collections import Counter
from typing import Any, cast

import orjson

from lookback.loadtest.config import (
    FRAME,
    SAMPLE_RATE,
    WRITE_BUFFER_LIMIT,
    LoadConfig,
    message_samples,
    split_url,
    whole_frames,
    wire_rate,
)
from lookback.protocol import BINARY_RESULTS, BINARY_RESULTS_KIND

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_RESULT_PREFIX = b'{"type":"result","step":'


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


class WireTiming:
    """Which message completes a step when messages are not whole frames at the model's rate.

    The server resamples (engine/resample.py): model sample ``j`` needs wire samples up to
    ``j * down / up`` plus the filter's look-ahead of ``half`` samples, so step ``i`` (model
    samples up to ``(i + 1) * hop``) completes in the message holding wire sample
    ``half + floor(((i + 1) * hop - 1) * down / up)``.
    """

    def __init__(self, rate: int, samples_per_message: int, model_rate: int = SAMPLE_RATE) -> None:
        if rate == model_rate:
            self.up = self.down = 1
            self.half = 0
        else:
            from lookback.engine.resample import Resampler

            r = Resampler(rate, model_rate)
            self.up, self.down, self.half = r.up, r.down, r.half
        self.per = samples_per_message
        self.model_per = samples_per_message * model_rate / rate  # model samples a message

    def message_of(self, step: int, hop: int) -> int:
        """Index of the message (from the session's first) that completes ``step``."""
        return (self.half + ((step + 1) * hop - 1) * self.down // self.up) // self.per


class Proc:
    """What all sessions of one client process share: clock window and the latency sink."""

    def __init__(self, cfg: LoadConfig) -> None:
        self.cfg = cfg
        # whole frames: k frames a message; another wire form counts messages (k = 1) and
        # times steps through ``timing``
        self.timing = None if whole_frames(cfg) else WireTiming(wire_rate(cfg), message_samples(cfg))
        self.k = cfg.frames_per_message if self.timing is None else 1
        self.meas_start = math.inf
        self.meas_end = math.inf
        self.latencies = array("d")
        self.end_frame = ws_frame(0x1, b'{"type":"end"}', b"\x11\x22\x33\x44")


class SessionBase:
    """Counters and result handling common to both client implementations."""

    def __init__(self, proc: Proc, msgs: list[bytes], start_msg: int) -> None:
        self.proc = proc
        self.msgs = msgs
        self.pos = start_msg % len(msgs)
        self.first_msg = self.pos  # message i went out as msgs[(first_msg + i) % len(msgs)]
        self.labels: list[str] = []
        # a verified session's scores, row by row in label order (see keep_scores)
        self.kept: array[float] | None = None
        self.kept_rows = 0
        self.kept_disorder = 0
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

    def keep_scores(self) -> None:
        """Keep every score this session receives, for ``loadtest.verify``."""
        self.kept = array("d")

    def _keep(self, first: int, rows: list[list[float]]) -> None:
        assert self.kept is not None
        if first != self.kept_rows:  # a step missed or repeated: the rows no longer line up
            self.kept_disorder += 1
        for row in rows:
            self.kept.extend(row)
        self.kept_rows = first + len(rows)

    def _keep_text(self, msg: Any) -> None:
        if not isinstance(msg, dict) or not self.labels:
            return
        scores = msg.get("scores")
        if msg.get("type") == "result" and isinstance(scores, dict):
            self._keep(int(msg.get("step", -1)), [[float(scores[lab]) for lab in self.labels]])
        elif msg.get("type") == "results" and isinstance(scores, dict):
            cols = [scores[lab] for lab in self.labels]
            self._keep(int(msg.get("step", -1)), [list(r) for r in zip(*cols, strict=True)])

    def on_text(self, payload: bytes, now: float) -> None:
        if self.kept is not None:
            with contextlib.suppress(orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                self._keep_text(orjson.loads(payload))
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
        elif kind == "results":  # results=batch: one message per model call, its steps in order
            first = int(msg.get("step", -1))
            times = msg.get("times")
            for i in range(len(times) if isinstance(times, list) else 0):
                self.on_result(first + i, now)
        elif kind == "event":
            self.events += 1
        elif kind == "ready":
            hop = int(msg.get("hop_samples") or FRAME)
            self.hop_frames = max(1, hop // FRAME)
            self.labels = [str(lab) for lab in msg.get("labels") or []]
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

    def on_binary(self, payload: bytes, now: float) -> None:
        """A binary results message (result_format=binary): its rows are steps in order."""
        if len(payload) < BINARY_RESULTS.size or payload[0] != BINARY_RESULTS_KIND:
            self.errors["unexpected_binary"] += 1
            return
        _, n_labels, rows, first = BINARY_RESULTS.unpack_from(payload)
        if self.kept is not None and len(payload) == BINARY_RESULTS.size + 4 * rows * n_labels:
            values = struct.unpack_from(f"<{rows * n_labels}f", payload, BINARY_RESULTS.size)
            self._keep(first, [list(values[i * n_labels : (i + 1) * n_labels]) for i in range(rows)])
        for i in range(rows):
            self.on_result(first + i, now)

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


class WireTimed(SessionBase):
    """Result timing for messages of another wire form (``Proc.timing``), so the default
    path's arithmetic stays as it is. Sessions of such runs are ``RawWireSession`` or
    ``libclient.LibWireSession``; ``frames_sent`` counts their messages."""

    def on_result(self, step: int, now: float) -> None:
        self.results += 1
        timing = self.proc.timing
        assert timing is not None
        m = timing.message_of(step, self.hop_frames * FRAME)
        st = self.send_times
        if 0 <= m < len(st):
            ts = st[m]
            if self.proc.meas_start <= ts < self.proc.meas_end:
                self.proc.latencies.append(now - ts)

    def overdue(self, now: float, bound: float) -> tuple[int, int]:
        timing = self.proc.timing
        assert timing is not None
        st, hop = self.send_times, self.hop_frames * FRAME
        late = total = 0
        step = self.results
        while True:
            m = timing.message_of(step, hop)
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
        timing = self.proc.timing
        assert timing is not None
        return math.ceil(self.frames_sent * timing.model_per / (self.hop_frames * FRAME))


class RawSession(SessionBase, asyncio.Protocol):
    """A minimal WebSocket client on an asyncio Protocol (see the module docstring)."""

    def __init__(
        self,
        proc: Proc,
        msgs: list[bytes],
        start_msg: int,
        host: str,
        port: int,
        target: str,
        headers: dict[str, str],
    ) -> None:
        SessionBase.__init__(self, proc, msgs, start_msg)
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
                self.on_binary(payload, now)
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
        proc: Proc,
        msgs: list[bytes],
        start_msg: int,
        url: str,
        query: str,
        headers: dict[str, str],
        wait_s: float,
    ) -> RawSession:
        host, port, path = split_url(url)
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


class RawWireSession(WireTimed, RawSession):
    """``RawSession`` sending another wire form (G.711, another rate)."""
