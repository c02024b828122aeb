"""One WebSocket session (``Connection``) and the registry of open ones (``Connections``).

Under ``lookback serve`` the connection takes the protocol's direct path
(``lookback.websocket``): each message arrives as a call (``on_binary``/``on_text``) on the
loop turn that read it, and each result is written at once from the batcher's callback.
A client that stops reading gets at most ``send_queue_messages`` messages past the
transport's buffer before its session is closed with 4429; one that sends faster than its
audio is scored is not read (``hold``) until its session has room.

Under any other ASGI server (TestClient included) the same session runs over ASGI: a
reader (the route's handler) and a writer task that owns the sending side, with the same
bound as a queue between them; a result that finds the writer parked is sent at once
from the batcher's callback (``direct_send``).

The registry keeps the open connections, accounts their frames in bulk, runs the one
reaper task that enforces idle and duration limits (once a second, instead of a timer
per frame on the hot path), and drains every session on shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from enum import Enum, auto
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
from fastapi import WebSocket

from lookback.api import direct_send
from lookback.engine.engine import Engine
from lookback.engine.events import Event
from lookback.engine.pcm import float_problem
from lookback.engine.session import StreamSession
from lookback.errors import BackpressureError, LookbackError
from lookback.metrics import Metrics
from lookback.protocol import (
    MAX_BINARY_ROWS,
    Close,
    error_message,
    event_message,
    ready_message,
    result_bytes,
    results_binary,
    results_bytes,
    summary_message,
)
from lookback.settings import Settings
from lookback.websocket import DIRECT, DirectWebSocketProtocol, binary_frame, text_frame

if TYPE_CHECKING:
    from lookback.api.resume import Recent, Resumer, ResumeState
    from lookback.engine.served import ServedModel

log = logging.getLogger("lookback.ws")

_CLOSE = object()  # queue sentinel: (code, reason) follows


def _f32(data: bytes) -> np.ndarray:
    return np.frombuffer(data, "<f4")


def _asgi_send(item: str | bytes) -> dict[str, Any]:
    """A queued message as an ASGI send: text, or a binary results message."""
    if isinstance(item, bytes):
        return {"type": "websocket.send", "bytes": item}
    return {"type": "websocket.send", "text": item}


class Phase(Enum):
    """Where a connection is in its life (one value, as Starlette's ``WebSocketState``)."""

    OPEN = auto()  # streaming
    ENDING = auto()  # `end` or drain: buffered audio is scored, a summary follows
    CLOSING = auto()  # the close is queued behind every message already queued
    ABORTING = auto()  # a forced close (timeout, slow consumer) ahead of queued results
    BROKEN = auto()  # a send failed: the socket is gone


class Connection:
    """One WebSocket session: the engine's ResultSink and the socket's only writer.

    With ``results=batch`` it is a ``GroupedSink``: the steps of one model call are
    gathered by ``on_result`` and go out as one ``results`` message at the group's end,
    because a WebSocket send costs more than the model work of a step.
    """

    # results=batch: gather a model call's steps; direct path: write its messages at once
    on_group_end: Callable[[], None] | None = None
    on_group_begin: Callable[[], None] | None = None  # direct path: gather a step's results

    def __init__(
        self,
        ws: WebSocket,
        settings: Settings,
        metrics: Metrics,
        handle: ServedModel,
        results: str,
        session_id: str,
        *,
        worker: int = 0,
    ) -> None:
        self.ws = ws
        self.worker = worker  # this process's index under --workers N
        self.settings = settings
        self.metrics = metrics
        self.handle = handle
        self.id = session_id
        self.results = results  # all | batch | events
        self.want_results = results == "all"
        self.batch = results == "batch"
        # the step group being gathered (results=batch): first step, times, rows, events
        self._first = 0
        self._times: list[float] = []
        self._rows: list[list[float]] = []
        self._group_events: list[Event] = []
        if self.batch:
            self.on_group_end = self._end_group
        self.labels = handle.spec.labels
        self._hop, self._rate = handle.spec.hop_samples, handle.spec.sample_rate
        self.single = self.labels[0] if len(self.labels) == 1 else None
        # result_format=binary: results as binary messages (protocol.BINARY_RESULTS)
        self.binary = ws.query_params.get("result_format") == "binary"
        self.out: deque[Any] = deque()
        self.limit = settings.send_queue_messages
        self._idle: asyncio.Future[None] | None = None  # set while the writer waits
        self.session: StreamSession | None = None
        self.opened = time.monotonic()
        self.last_seen = self.opened
        self.phase = Phase.OPEN
        self.disconnected = False  # the transport reported the socket gone
        self.closing_since = 0.0  # loop time the close was decided (CLOSING / ABORTING)
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.frames_reported = 0
        self.writer: asyncio.Task[None] | None = None
        self.finisher: asyncio.Task[None] | None = None
        self.reader: asyncio.Task[Any] | None = None  # the handler task, blocked in receive()
        self.sending = False  # the writer is inside send(): a full transport may block it
        self._send = ws.send
        self._parked: tuple[Any, Any] | None = None  # a direct send that had to suspend
        self.resume: ResumeState | None = None  # resumable identity (lookback.api.resume)
        # the last results, as on_result got them: a resume re-sends what a client missed
        self.recent: deque[Recent] | None = None
        self.ready_extra: dict[str, Any] = {}  # resume fields of the ready message
        # the protocol's direct path (lookback serve), None under other ASGI servers
        self.direct: DirectWebSocketProtocol | None = ws.scope.get("extensions", {}).get(DIRECT)
        self._unread = 0  # messages written while the client's transport was full
        self._done: asyncio.Future[str] | None = None  # direct path: set when the session ends
        self._room_task: asyncio.Task[None] | None = None  # direct path: waiting for room
        # direct path: the frames of one model call's results (10 hops of a 10-frame message
        # are 10 messages), written in one transport write, one send(), at the group's end
        self._pending: list[bytes] = []
        self._grouping = False
        self._coalesce = self.direct is not None and not self.batch
        if self._coalesce:
            self.on_group_begin = self._begin_group
            self.on_group_end = self._flush

    @property
    def ended(self) -> bool:
        """The client may send nothing more (it sent `end`, or the session is closing)."""
        return self.phase is not Phase.OPEN

    @property
    def end_reason(self) -> str | None:
        """Why the session is closing (the close frame's reason), None while it is not."""
        return self.close_reason

    @property
    def unread(self) -> int:
        """Messages waiting for a client that stopped reading, past the transport's buffer."""
        if self.direct is not None:
            return self._unread if self.direct.write_paused else 0
        return len(self.out) if self.sending else 0

    @property
    def closed(self) -> asyncio.Future[Any] | None:
        """Done once the close is written (ASGI path: the writer ended) or the client is
        gone (direct path); what a drain waits for."""
        return self._done if self.direct is not None else self.writer

    def _accepts_output(self) -> bool:
        return self.phase is Phase.OPEN or self.phase is Phase.ENDING

    # -- ResultSink ----------------------------------------------------------------------
    def on_result(self, index: int, time: float, scores: list[float], events: list[Event] | None) -> None:
        if self.recent is not None:  # kept for a resume to re-send (lookback.api.resume)
            # a tuple of floats, not the list: the entry holds no mutable container, so the
            # collector stops tracking it instead of promoting thousands a second to gen 2
            self.recent.append((index, time, tuple(scores), events))
        if self.binary and self.want_results:
            self._write_binary(results_binary(index, (scores,), len(self.labels)))
        elif self.want_results:
            single = self.single
            body = {single: scores[0]} if single is not None else dict(zip(self.labels, scores, strict=True))
            self._put_json(result_bytes(index, time, body))
        elif self.batch:
            if self._rows and index != self._first + len(self._rows):
                self._end_group()  # a gap (failed steps in a re-sent tail): steps stay contiguous
            if not self._rows:
                self._first = index
            self._times.append(time)
            self._rows.append(scores)
            if events:
                self._group_events.extend(events)
            return
        if events:
            for ev in events:
                self._put(event_message(ev.as_dict()))

    def on_rows(self, first: int, rows: np.ndarray) -> None:
        """Consecutive results with no event (a step of several hops), in one pass: with
        ``results=batch`` one message straight from the array, no Python row per hop."""
        if self.recent is not None or self.want_results:  # a message (or a resume entry) per step
            hop, rate = self._hop, self._rate
            for i, row in enumerate(rows.tolist()):
                k = first + i
                self.on_result(k, (k + 1) * hop / rate, row, None)
            return
        if not self.batch:  # results=events: nothing to send
            return
        if self._rows:
            self._end_group()
        hop, rate = self._hop, self._rate
        times = [(k + 1) * hop / rate for k in range(first, first + len(rows))]  # as the session's
        self._send_results(first, times, rows)

    def _end_group(self) -> None:
        """Send the gathered steps as one ``results`` message, then their events."""
        rows = self._rows
        if not rows:
            return
        times, events = self._times, self._group_events
        self._rows, self._times, self._group_events = [], [], []
        self._send_results(self._first, times, rows)
        for ev in events:
            self._put(event_message(ev.as_dict()))

    def _send_results(self, first: int, times: list[float], rows: list[list[float]] | np.ndarray) -> None:
        """Steps ``first, first + 1, ...`` as one ``results`` message (binary: 65535 a message)."""
        if self.binary:
            for i in range(0, len(rows), MAX_BINARY_ROWS):
                part = rows[i : i + MAX_BINARY_ROWS]
                self._write_binary(results_binary(first + i, part, len(self.labels)))
            return
        if isinstance(rows, np.ndarray):  # one column per label, straight from the array
            columns = rows.T.tolist()
        else:
            columns = [[r[i] for r in rows] for i in range(len(self.labels))]
        self._put_json(results_bytes(first, times, dict(zip(self.labels, columns, strict=True))))

    def on_error(self, index: int, error: LookbackError) -> None:
        if self._rows:
            self._end_group()
        self.metrics.error(error.code)
        self._put(error_message(error.code, error.message, step=index))

    # -- writer side ---------------------------------------------------------------------
    def send_ready(self) -> None:
        spec = self.handle.spec
        self._put(
            ready_message(
                session_id=self.id,
                model=spec.name,
                version=spec.version,
                sample_rate=spec.sample_rate,
                frame_samples=spec.frame_samples,
                hop_samples=spec.hop_samples,
                labels=spec.labels,
                encoding=self.session.encoding if self.session else None,
                threshold=spec.events.threshold,
                worker=self.worker,
                **self.ready_extra,
            )
        )
        if self.resume is not None:  # a resume re-sends the results the client may have missed
            self._grouping = self._coalesce
            for index, t, scores, events in self.resume.resend:
                self.on_result(index, t, scores, events)
            self._end_group()  # results=batch: the re-sent tail is one message
            self._flush()
            self.resume.resend.clear()

    def _put(self, text: str) -> None:
        if self.direct is not None:
            self._write(text.encode())
            return
        if not self._accepts_output():
            return
        if self._idle is not None:  # the writer parks only with nothing queued
            self._send_now(text)
            return
        if len(self.out) >= self.limit:
            self.metrics.error("slow_consumer")
            self.close_now(Close.SLOW_CONSUMER, "slow_consumer", "send queue full: read results faster")
            return
        self.out.append(text)
        if self._idle is not None:
            self._wake()

    def _put_json(self, data: bytes) -> None:
        """A message orjson encoded: written as is on the direct path, as text over ASGI."""
        if self.direct is not None:
            self._write(data)
        else:
            self._put(data.decode())

    def _write_binary(self, data: bytes) -> None:
        if self.direct is not None:
            self._write(data, binary=True)
        else:
            self._put(data)  # type: ignore[arg-type]  # the writer sends bytes as binary

    def _write(self, data: bytes, binary: bool = False) -> None:
        """Direct path: write now; past the transport's buffer bound, count what the client
        leaves unread and close a session that leaves ``send_queue_messages`` of it."""
        phase = self.phase
        if phase is not Phase.OPEN and phase is not Phase.ENDING:  # _accepts_output, inline
            return
        direct = self.direct
        assert direct is not None
        if direct.write_paused:
            self._unread += 1
            if self._unread > self.limit:
                self.metrics.error("slow_consumer")
                self.close_now(Close.SLOW_CONSUMER, "slow_consumer", "send queue full: read results faster")
                return
        elif self._unread:
            self._unread = 0
        self.bytes_out += len(data)
        frame = binary_frame(data) if binary else text_frame(data)
        if self._grouping:
            self._pending.append(frame)
        else:
            direct.write_frames(frame)

    def _begin_group(self) -> None:
        """A step of several hops: its results' frames wait for ``_flush``, one write."""
        self._grouping = True

    def _flush(self) -> None:
        """The end of a model call's group: its messages in one write."""
        self._grouping = False
        pending = self._pending
        if pending and self.direct is not None:
            self._pending = []
            self.direct.write_frames(pending[0] if len(pending) == 1 else b"".join(pending))

    def _send_now(self, text: str) -> None:
        """Send without a task switch; if the send must wait, the writer takes it over."""
        self.bytes_out += len(text)
        coro = self._send(_asgi_send(text))
        try:
            finished, yielded = direct_send.start(coro)
        except Exception:  # socket gone under us: the reader sees the disconnect
            self.phase = Phase.BROKEN
            self._wake()
            return
        if finished:
            return
        self._parked = (coro, yielded)
        self.sending = True  # blocked in send(), as far as close_now is concerned
        self._wake()

    def send_message(self, text: str) -> None:
        """Queue a server message built in protocol.py (checkpoints: lookback.api.resume)."""
        self._put(text)

    def send_error(self, code: str, message: str) -> None:
        self.metrics.error(code)
        self._put(error_message(code, message))

    def close_after_queue(self, code: int, reason: str) -> None:
        """Close once every queued message is sent (normal end, drain)."""
        if self._accepts_output():
            self.phase = Phase.CLOSING
            self.closing_since = asyncio.get_running_loop().time()
            self.close_code, self.close_reason = code, reason
            if self.direct is not None:  # everything before it is written already
                self._flush()
                self.direct.close(code, reason)
                return
            self.out.append(_CLOSE)
            self.out.append((code, reason))
            self._wake()

    def close_now(self, code: int, reason: str, message: str) -> None:
        """Close ahead of queued results (slow consumer, timeouts): they would not be read."""
        if self.close_reason is not None or self.phase is Phase.BROKEN:
            return
        self.out.clear()
        self.phase = Phase.ABORTING
        self.closing_since = asyncio.get_running_loop().time()
        self.close_code, self.close_reason = code, reason
        if self.direct is not None:
            self._pending, self._grouping = [], False  # not to be read: dropped
            self.direct.write_text(error_message(reason, message).encode())
            self.direct.close(code, reason)
            return
        self.out.extend([error_message(reason, message), _CLOSE, (code, reason)])
        self._wake()
        if self.writer is not None and self.sending:
            # The writer is blocked in send() on a full transport: give up on it.
            self.writer.cancel()

    def _wake(self) -> None:
        """Wake the writer (a bare future: cheaper per result than an asyncio.Event)."""
        idle, self._idle = self._idle, None
        if idle is not None and not idle.done():
            idle.set_result(None)

    async def run_writer(self) -> None:
        send = self.ws.send
        out = self.out
        try:
            while True:
                if self._parked is not None:
                    coro, yielded = self._parked
                    self._parked = None
                    await direct_send.finish_coroutine(coro, yielded)
                    self.sending = False
                    continue
                if self.phase is Phase.BROKEN:
                    return
                if not out:
                    self._idle = asyncio.get_running_loop().create_future()
                    await self._idle
                    continue
                item = out.popleft()
                if item is _CLOSE:
                    code, reason = out.popleft()
                    await self.ws.close(code=code, reason=reason)
                    return
                self.bytes_out += len(item)
                self.sending = True
                await send(_asgi_send(item))
                self.sending = False
        except asyncio.CancelledError:
            if self._parked is not None:  # cancelled before it took over a blocked send
                self._parked[0].close()
                self._parked = None
            if self.phase is Phase.ABORTING:  # cancelled by close_now, not by the server
                await self._abort(self.close_code or Close.INTERNAL_ERROR, self.close_reason or "")
            raise
        except Exception:  # socket gone under us: the reader sees the disconnect
            return

    async def _abort(self, code: int, reason: str) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(code=code, reason=reason), 1.0)
            return
        # Not even the close frame goes out to a client that reads nothing, and the reader
        # would wait forever on one that sends nothing either: stop it to free the session.
        self.stop_reader()

    def stop_reader(self) -> None:
        """End the handler's wait in receive(): the session is released as if closed."""
        if self._done is not None:
            if not self._done.done():
                self._done.set_result(self.close_reason or "error")
        elif self.reader is not None and not self.reader.done():
            self.reader.cancel()

    # -- reader side ---------------------------------------------------------------------
    def _bind(self) -> None:
        """What every binary message needs, looked up once."""
        s = self.settings
        session = self.session
        assert session is not None
        self._max_bytes = s.max_message_bytes
        self._max_frames_bytes = session.wire_bytes(s.max_frames_per_message)
        self._check_float = session.encoding == "pcm_f32le"
        # int16 messages up to this size need no check before push (push checks frames)
        self._fast_max = -1 if self._check_float else min(self._max_bytes, self._max_frames_bytes)
        self._loop = asyncio.get_running_loop()

    def _audio(self, data: bytes) -> bool:
        """One binary message; False when the session is full (the caller waits for room)."""
        session = self.session
        assert session is not None
        n = len(data)
        self.bytes_in += n
        # int16 within the limits, session open (the common case): push checks the frames
        if n > self._fast_max or self.phase is not Phase.OPEN:
            refusal = self._refusal(data, n)
            if refusal is not None:
                self.send_error(*refusal)
                return True
        try:
            session.push(data, time.perf_counter())
        except BackpressureError:
            return False
        except LookbackError as exc:
            self.send_error(exc.code, exc.message)
        return True

    def _refusal(self, data: bytes, n: int) -> tuple[str, str] | None:
        """Why a message is refused before it reaches the session (code, message), if it is."""
        assert self.session is not None
        frame_bytes = self.session.frame_bytes
        if self.ended:
            return "audio_after_end", "audio received after end; ignored"
        if n > self._max_bytes:
            return "message_too_large", f"message of {n} bytes exceeds max_message_bytes={self._max_bytes}"
        if n > self._max_frames_bytes:
            return (
                "too_many_frames",
                f"message holds {n // frame_bytes} frames; "
                f"max_frames_per_message={self.settings.max_frames_per_message}",
            )
        if self._check_float and n % frame_bytes == 0:  # a broken frame is bad_frame_size first
            return float_problem(_f32(data), self.settings.max_float_amplitude)
        return None

    async def _push_when_room(self, data: bytes) -> None:
        """Stop reading until the session has room for ``data``: TCP slows the client."""
        session = self.session
        assert session is not None
        try:
            await session.wait_for_room(len(data))
            session.push(data, time.perf_counter())
        except LookbackError as exc:
            self.send_error(exc.code, exc.message)

    async def run(self) -> str:
        """The ASGI path: receive until the client is gone."""
        self._bind()
        receive = self.ws.receive
        loop = self._loop
        while True:
            msg = await receive()
            mtype = msg["type"]
            if mtype == "websocket.disconnect":
                self.disconnected = True
                return self.close_reason or "client_gone"
            self.last_seen = loop.time()
            data = msg.get("bytes")
            if data is not None:
                if not self._audio(data):
                    await self._push_when_room(data)
            else:
                self._control(msg.get("text") or "")

    async def run_direct(self) -> str:
        """The direct path: the protocol calls ``on_binary``/``on_text``/``on_disconnect``."""
        assert self.direct is not None
        self._bind()
        self._done = self._loop.create_future()
        self.direct.attach(self)
        try:
            return await self._done
        finally:
            if self._room_task is not None:
                self._room_task.cancel()

    # -- FrameSink (the direct path) -------------------------------------------------------
    def on_binary(self, data: bytes) -> None:
        self.last_seen = self._loop.time()
        if not self._audio(data):
            assert self.direct is not None
            self.direct.hold()
            self._room_task = asyncio.create_task(self._room_then_release(data))

    async def _room_then_release(self, data: bytes) -> None:
        try:
            await self._push_when_room(data)
        finally:
            self._room_task = None
            if self.direct is not None:
                self.direct.release()

    def on_text(self, text: str) -> None:
        self.last_seen = self._loop.time()
        self._control(text)

    def on_disconnect(self, code: int) -> None:
        self.disconnected = True
        if self._done is not None and not self._done.done():
            self._done.set_result(self.close_reason or "client_gone")

    def _control(self, text: str) -> None:
        try:
            body = orjson.loads(text)
        except orjson.JSONDecodeError:
            self.send_error("bad_json", "text messages must be JSON objects")
            return
        kind = body.get("type") if isinstance(body, dict) else None
        if not isinstance(kind, str):
            self.send_error("missing_type", 'a JSON message needs a string "type"')
        elif kind == "flush":
            if self.ended:
                self.send_error("audio_after_end", "flush after end; ignored")
            elif self.session is not None:
                self.session.flush()
        elif kind == "end":
            if not self.ended:
                self.start_finish(Close.NORMAL, "normal")
        else:
            self.send_error("unknown_type", f'unknown message type {kind[:40]!r}; expected "flush" or "end"')

    def start_finish(self, code: int, reason: str) -> asyncio.Task[None]:
        """Begin the end of the session (client `end`, or drain); idempotent."""
        if self.finisher is None:
            if self.phase is Phase.OPEN:
                self.phase = Phase.ENDING
            self.finisher = asyncio.create_task(self.finish(code, reason))
        return self.finisher

    async def finish(self, code: int, reason: str) -> None:
        """Score what is buffered, send the summary, then close with ``code``."""
        session = self.session
        assert session is not None
        if self.phase is Phase.OPEN:
            self.phase = Phase.ENDING
        session.flush()
        await session.wait_idle()
        for ev in session.finish():
            self._put(event_message(ev.as_dict()))
        spec = self.handle.spec
        self._put(
            summary_message(
                session_id=self.id,
                frames=session.frames,
                steps=session.steps_done,
                failed_steps=session.steps_failed,
                padded_samples=session.padded_samples,
                duration=session.frames * spec.frame_samples / spec.sample_rate,
                events=[e.as_dict() for e in session.events],
                events_truncated=session.events.truncated,
            )
        )
        self.close_after_queue(code, reason)

    # -- the whole life ------------------------------------------------------------------
    async def serve(self, registry: Connections) -> None:
        """Run the session to its end on the calling (handler) task, then release it."""
        key = self.handle.spec.key
        m = self.metrics
        m.sessions_started.labels(key).inc()
        m.sessions_active.labels(key).inc()
        registry.add(self)
        if self.direct is None:
            self.writer = asyncio.create_task(self.run_writer())
        self.send_ready()
        reason = "error"
        try:
            self.reader = asyncio.current_task()
            reason = await (self.run() if self.direct is None else self.run_direct())
        except asyncio.CancelledError:  # from stop_reader once closing; anything else propagates
            task = asyncio.current_task()
            if self.close_reason is None or task is None or task.uncancel() > 0:
                raise
            reason = self.close_reason or "error"
        except Exception:
            log.exception("session %s failed", self.id)
            m.error("internal_error")
        finally:
            registry.discard(self)
            if self.finisher is not None and not self.finisher.done():
                self.finisher.cancel()
            if self.session is not None:
                registry.account_frames(self)
                if registry.resumer is not None:
                    await registry.resumer.on_close(self, reason)
                self.session.close()
            if self.writer is not None and not self.writer.done():
                if self.disconnected:  # nothing queued can be delivered any more
                    self.writer.cancel()
                else:  # let it send what is queued; a writer cancelled meanwhile is no error
                    _, pending = await asyncio.wait({self.writer}, timeout=2.0)
                    if pending:
                        self.writer.cancel()
            m.sessions_active.labels(key).dec()
            m.sessions_ended.labels(key, reason).inc()
            m.bytes_in.labels("ws").inc(self.bytes_in)
            m.bytes_out.labels("ws").inc(self.bytes_out)


class Connections:
    """The open connections of one server: frame accounting, the reaper, the drain."""

    def __init__(self, settings: Settings, metrics: Metrics, engine: Engine) -> None:
        self.settings = settings
        self.metrics = metrics
        self.engine = engine
        self._open: set[Connection] = set()
        self._reaper: asyncio.Task[None] | None = None
        self.resumer: Resumer | None = None  # resume on: checkpoints, final snapshots, migration

    def add(self, conn: Connection) -> None:
        self._open.add(conn)

    def discard(self, conn: Connection) -> None:
        self._open.discard(conn)

    def __iter__(self) -> Iterator[Connection]:
        return iter(list(self._open))

    def __len__(self) -> int:
        return len(self._open)

    def account_frames(self, conn: Connection) -> None:
        session = conn.session
        if session is not None and session.frames > conn.frames_reported:
            self.metrics.frames.labels(conn.handle.spec.key).inc(session.frames - conn.frames_reported)
            conn.frames_reported = session.frames

    def tick_metrics(self) -> None:
        for conn in self:
            self.account_frames(conn)
        for key, occ in self.engine.occupancy().items():
            self.metrics.slots.labels(key, "used").set(occ.used)
            self.metrics.slots.labels(key, "capacity").set(occ.capacity)
            self.metrics.backlog.labels(key).set(occ.backlog)

    # -- reaper ----------------------------------------------------------------------------
    def start(self) -> None:
        self._reaper = asyncio.create_task(self._reap(), name="reaper")

    async def stop(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper

    async def _reap(self) -> None:
        s = self.settings
        interval = min(1.0, s.idle_timeout_s / 4, s.max_session_s / 4)
        while True:
            await asyncio.sleep(interval)  # a periodic timer, not a wait for a condition
            self.tick(time.monotonic())

    def tick(self, now: float) -> None:
        s = self.settings
        loop_now = asyncio.get_running_loop().time()
        for conn in self:
            if conn.close_reason is not None:
                # A client that reads nothing never completes the close: stop waiting for
                # it (the transport drops such a socket too; this frees the session here).
                if loop_now - conn.closing_since > s.ws_send_timeout_s + 1.0:
                    conn.stop_reader()
                continue
            if conn.phase is Phase.BROKEN:
                continue
            if now - conn.opened > s.max_session_s:
                conn.close_now(
                    Close.MAX_DURATION, "max_duration", f"session reached max_session_s={s.max_session_s:g}"
                )
                self.metrics.error("max_duration")
            elif loop_now - conn.last_seen > s.idle_timeout_s and not conn.ended:
                conn.close_now(
                    Close.IDLE_TIMEOUT, "idle_timeout", f"no message for idle_timeout_s={s.idle_timeout_s:g}"
                )
                self.metrics.error("idle_timeout")
        self.tick_metrics()

    # -- graceful drain --------------------------------------------------------------------
    async def drain(self, grace: float) -> None:
        """Finish every open session with a summary and 1001, within ``grace``.

        With a shared state store, resumable sessions are instead snapshotted and closed
        with 4100 so that their clients resume them on another replica.
        """
        conns = [c for c in self if c.close_reason is None and c.phase is not Phase.BROKEN]
        log.info("draining %d open sessions (grace %.1fs)", len(conns), grace)
        migrated: list[Connection] = []
        if self.resumer is not None and self.resumer.can_migrate:
            left = await self.resumer.migrate(conns, grace)
            migrated = [c for c in conns if c not in set(left)]
            conns = left
            log.info("%d sessions snapshotted for resume elsewhere", len(migrated))
        tasks = [c.start_finish(Close.GOING_AWAY, "draining") for c in conns]
        writers = [c.closed for c in (*conns, *migrated) if c.closed is not None]
        if tasks or writers:
            _, pending = await asyncio.wait([*tasks, *writers], timeout=grace)
            if pending:
                log.warning("drain grace %.1fs over; %d sessions cut short", grace, len(pending))
        log.info("drain complete")
