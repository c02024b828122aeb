"""WebSocket ``/v1/stream``: parse, hand frames to the engine, write results back.

Each connection has a reader (this handler) and a writer task that owns the sending
side; results go through a bounded queue between them so a slow reader costs at most
``send_queue_messages`` strings before its session is closed with 4429. A result that
finds the writer parked (so nothing is queued) is sent at once from the batcher's
callback instead, saving a task switch per result: the send completes without
suspending unless the transport is paused, and then the writer finishes it before
anything else. Refusals that need no session (auth, origin, capacity, drain) are HTTP
responses before the upgrade; bad query values are reported after the upgrade as an
``error`` plus a 44xx close, since browsers cannot read a refused handshake's body.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import APIRouter, WebSocket
from starlette.responses import JSONResponse

from lookback.api import auth
from lookback.engine.events import Event
from lookback.engine.session import BYTES_PER_SAMPLE, StreamSession
from lookback.errors import BackpressureError, LookbackError
from lookback.protocol import Close, error_message, spec_for

if TYPE_CHECKING:
    from lookback.api.resume import ResumeState
    from lookback.api.state import ServiceState
    from lookback.engine.model import ModelHandle

log = logging.getLogger("lookback.ws")
router = APIRouter()

_CLOSE = object()  # queue sentinel: (code, reason) follows


def _refuse(status: int, code: str, message: str, retry_after: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after else None
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


async def finish_coroutine(coro: Any, yielded: Any) -> Any:
    """Run to completion, in the calling task, a coroutine first stepped by hand.

    ``coro.send(None)`` returned ``yielded``: the future it waits on (or None for a bare
    yield). Do what a Task would: wait for it, then resume the coroutine, passing in a
    failure or a cancellation of ours.
    """
    while True:
        try:
            if yielded is None:
                await asyncio.sleep(0)
            else:
                # A Task clears this flag on the future its coroutine yielded before
                # waiting on it; awaiting it again with the flag set is refused.
                yielded._asyncio_future_blocking = False
                await yielded
        except BaseException as exc:  # the coroutine decides what a failure means
            try:
                yielded = coro.throw(exc)
            except StopIteration as stop:
                return stop.value
            continue
        try:
            yielded = coro.send(None)
        except StopIteration as stop:
            return stop.value


class Connection:
    """One WebSocket session: the engine's ResultSink and the socket's only writer."""

    def __init__(
        self, ws: WebSocket, svc: ServiceState, handle: ModelHandle, results: str, session_id: str
    ) -> None:
        self.ws = ws
        self.svc = svc
        self.handle = handle
        self.id = session_id
        self.want_results = results == "all"
        self.labels = handle.spec.labels
        self.single = self.labels[0] if len(self.labels) == 1 else None
        self.out: deque[Any] = deque()
        self.limit = svc.settings.send_queue_messages
        self._idle: asyncio.Future[None] | None = None  # set while the writer waits
        self.session: StreamSession | None = None
        self.opened = time.monotonic()
        self.last_seen = self.opened
        self.ended = False
        self.end_reason: str | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.frames_reported = 0
        self.writer: asyncio.Task[None] | None = None
        self.finisher: asyncio.Task[None] | None = None
        self.reader: asyncio.Task[Any] | None = None  # the handler task, blocked in receive()
        self.sending = False  # the writer is inside send(): a full transport may block it
        self._send = ws.send
        self._parked: tuple[Any, Any] | None = None  # a direct send that had to suspend
        self._broken = False  # a direct send raised: the socket is gone
        self.end_code: int | None = None  # set by close_now (forced closes only)
        self.resume: ResumeState | None = None  # resumable identity (lookback.api.resume)
        # the last results, as on_result got them: a resume re-sends what a client missed
        self.recent: deque[tuple[int, float, list[float], list[Event] | None]] | None = None

    # -- ResultSink ----------------------------------------------------------------------
    def on_result(self, index: int, time: float, scores: list[float], events: list[Event] | None) -> None:
        if self.recent is not None:  # kept for a resume to re-send (lookback.api.resume)
            self.recent.append((index, time, scores, events))
        if self.want_results:
            # orjson on a small dict is about twice as fast as an f-string with float reprs
            single = self.single
            self._put(
                orjson.dumps(
                    {
                        "type": "result",
                        "step": index,
                        "time": time,
                        "scores": {single: scores[0]}
                        if single is not None
                        else dict(zip(self.labels, scores, strict=True)),
                    }
                ).decode()
            )
        if events:
            for ev in events:
                self._put(orjson.dumps({"type": "event", **ev.as_dict()}).decode())

    def on_error(self, index: int, error: LookbackError) -> None:
        self.svc.metrics.error(error.code)
        self._put(error_message(error.code, error.message, step=index))

    # -- writer side ---------------------------------------------------------------------
    def _put(self, text: str) -> None:
        if self.end_reason is not None or self._broken:
            return
        if self._idle is not None:  # the writer parks only with nothing queued
            self._send_now(text)
            return
        if len(self.out) >= self.limit:
            self.svc.metrics.error("slow_consumer")
            self.close_now(Close.SLOW_CONSUMER, "slow_consumer", "send queue full: read results faster")
            return
        self.out.append(text)
        if self._idle is not None:
            self._wake()

    def _send_now(self, text: str) -> None:
        """Send without a task switch; if the send must wait, the writer takes it over."""
        self.bytes_out += len(text)
        coro = self._send({"type": "websocket.send", "text": text})
        try:
            yielded = coro.send(None)
        except StopIteration:
            return
        except Exception:  # socket gone under us: the reader sees the disconnect
            self._broken = True
            self._wake()
            return
        self._parked = (coro, yielded)
        self.sending = True  # blocked in send(), as far as close_now is concerned
        self._wake()

    def send_error(self, code: str, message: str) -> None:
        self.svc.metrics.error(code)
        self._put(error_message(code, message))

    def close_after_queue(self, code: int, reason: str) -> None:
        """Close once every queued message is sent (normal end, drain)."""
        if self.end_reason is None:
            self.end_reason = reason
            self.out.append(_CLOSE)
            self.out.append((code, reason))
            self._wake()

    def close_now(self, code: int, reason: str, message: str) -> None:
        """Close ahead of queued results (slow consumer, timeouts): they would not be read."""
        if self.end_reason is not None:
            return
        self.out.clear()
        self.end_reason = reason
        self.out.extend([error_message(reason, message), _CLOSE, (code, reason)])
        self.end_code = code
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
                    await finish_coroutine(coro, yielded)
                    self.sending = False
                    continue
                if self._broken:
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
                await send({"type": "websocket.send", "text": item})
                self.sending = False
        except asyncio.CancelledError:
            if self._parked is not None:  # cancelled before it took over a blocked send
                self._parked[0].close()
                self._parked = None
            if self.end_code is not None:  # cancelled by close_now, not by the server
                await self._abort(self.end_code, self.end_reason or "")
            raise
        except Exception:  # socket gone under us: the reader sees the disconnect
            return

    async def _abort(self, code: int, reason: str) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(code=code, reason=reason), 1.0)
            return
        # Not even the close frame goes out to a client that reads nothing, and the reader
        # would wait forever on one that sends nothing either: stop it to free the session.
        if self.reader is not None and not self.reader.done():
            self.reader.cancel()

    # -- reader side ---------------------------------------------------------------------
    async def run(self) -> str:
        svc = self.svc
        s = svc.settings
        session = self.session
        assert session is not None
        receive = self.ws.receive
        max_bytes = s.max_message_bytes
        max_frames_bytes = s.max_frames_per_message * session.frame_bytes
        loop = asyncio.get_running_loop()
        perf = time.perf_counter
        while True:
            msg = await receive()
            mtype = msg["type"]
            if mtype == "websocket.disconnect":
                return self.end_reason or "client_gone"
            self.last_seen = loop.time()
            data = msg.get("bytes")
            if data is not None:
                n = len(data)
                self.bytes_in += n
                if self.ended:
                    self.send_error("audio_after_end", "audio received after end; ignored")
                elif n > max_bytes:
                    self.send_error(
                        "message_too_large", f"message of {n} bytes exceeds max_message_bytes={max_bytes}"
                    )
                elif n > max_frames_bytes:
                    self.send_error(
                        "too_many_frames",
                        f"message holds {n // session.frame_bytes} frames; "
                        f"max_frames_per_message={s.max_frames_per_message}",
                    )
                else:
                    try:
                        session.push(data, perf())
                    except BackpressureError:
                        try:  # stop reading until the session has room: TCP slows the client
                            await session.wait_for_room(n)
                            session.push(data, perf())
                        except LookbackError as exc:
                            self.send_error(exc.code, exc.message)
                    except LookbackError as exc:
                        self.send_error(exc.code, exc.message)
            else:
                self._control(msg.get("text") or "")

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
                self.ended = True
                self.finisher = asyncio.create_task(self.finish(Close.NORMAL, "normal"))
        else:
            self.send_error("unknown_type", f'unknown message type {kind[:40]!r}; expected "flush" or "end"')

    async def finish(self, code: int, reason: str) -> None:
        """Score what is buffered, send the summary, then close with ``code``."""
        session = self.session
        assert session is not None
        self.ended = True
        session.flush()
        await session.wait_idle()
        tail = session.finish()
        for ev in tail:
            self._put(orjson.dumps({"type": "event", **ev.as_dict()}).decode())
        self._put(
            orjson.dumps(
                {
                    "type": "summary",
                    "session_id": self.id,
                    "frames": session.frames,
                    "steps": session.steps_done,
                    "failed_steps": session.steps_failed,
                    "padded_samples": session.padded_samples,
                    "duration": session.frames
                    * self.handle.spec.frame_samples
                    / self.handle.spec.sample_rate,
                    "events": [e.as_dict() for e in session.events],
                }
            ).decode()
        )
        self.close_after_queue(code, reason)


def _parse_query(ws: WebSocket, svc: ServiceState) -> tuple[ModelHandle, str, str]:
    q = ws.query_params
    handle = svc.engine.resolve(q.get("model") or None, q.get("version") or None)
    encoding = q.get("encoding", "pcm_s16le")
    if encoding not in BYTES_PER_SAMPLE:
        raise LookbackError(
            f"encoding {encoding[:40]!r} not supported; use pcm_s16le or pcm_f32le", code="bad_encoding"
        )
    rate = q.get("sample_rate")
    if rate is not None:
        try:
            ok = int(rate) == handle.spec.sample_rate
        except ValueError:
            ok = False
        if not ok:
            raise LookbackError(
                f"sample_rate {rate[:20]!r} does not match the model's "
                f"{handle.spec.sample_rate}; resample on the client",
                code="bad_sample_rate",
            )
    results = q.get("results", "all")
    if results not in ("all", "events"):
        raise LookbackError(f"results must be all or events, not {results[:20]!r}", code="bad_query")
    return handle, encoding, results


@router.websocket("/v1/stream")
async def stream(ws: WebSocket) -> None:
    svc: ServiceState = ws.app.state.lookback
    s = svc.settings
    # Refusals that need no session: HTTP answers before the upgrade.
    if not auth.origin_ok(s, ws):
        svc.metrics.sessions_refused.labels("origin").inc()
        await ws.send_denial_response(_refuse(403, "origin_not_allowed", "Origin not allowed"))
        return
    if not auth.key_ok(s, auth.ws_key(ws)):
        svc.metrics.sessions_refused.labels("unauthorized").inc()
        await ws.send_denial_response(_refuse(401, "unauthorized", "missing or wrong API key"))
        return
    busy = svc.refusal()
    if busy is not None:
        code, message = busy
        svc.metrics.sessions_refused.labels(code).inc()
        await ws.send_denial_response(
            _refuse(503, "draining" if code == "draining" else "server_busy", message, retry_after=1)
        )
        return
    svc.reserved += 1
    try:
        await ws.accept()
        token = ws.query_params.get("resume")
        if token is not None:
            if svc.resumer is None:
                svc.metrics.resumes.labels("unavailable").inc()
                await ws.send_text(error_message("resume_unavailable", "resume is disabled on this server"))
                await ws.close(code=Close.RESUME_UNAVAILABLE, reason="resume_unavailable")
                return
            resumed = await svc.resumer.open_resumed(ws, svc, token, auth.ws_key(ws))
            if resumed is not None:
                await _serve(resumed[0], svc, resumed[0].handle, resumed[1])
            return
        try:
            handle, encoding, results = _parse_query(ws, svc)
        except LookbackError as exc:
            svc.metrics.sessions_refused.labels("bad_request").inc()
            svc.metrics.error(exc.code)
            await ws.send_text(error_message(exc.code, exc.message))
            close = spec_for(exc.code).close or Close.BAD_REQUEST
            await ws.close(code=close, reason=exc.code)
            return
        conn = Connection(ws, svc, handle, results, uuid.uuid4().hex[:16])
        try:
            conn.session = svc.engine.open_session(handle, conn, encoding=encoding)  # type: ignore[arg-type]
        except LookbackError as exc:
            svc.metrics.sessions_refused.labels("capacity").inc()
            await ws.send_text(error_message(exc.code, exc.message))
            await ws.close(code=Close.TRY_AGAIN_LATER, reason=exc.code)
            return
        extra: dict[str, object] = {}
        if svc.resumer is not None and ws.query_params.get("resumable") in ("1", "true"):
            # opt-in: only clients that can resume pay for checkpoints and see the new messages
            conn.resume = await svc.resumer.new_state(auth.ws_key(ws))
            conn.resume.token_sent = conn.resume.token is not None
            conn.recent = deque(maxlen=s.resume_tail_messages)
            extra["resume_token"] = conn.resume.token
        await _serve(conn, svc, handle, extra)
    finally:
        svc.reserved -= 1


async def _serve(
    conn: Connection, svc: ServiceState, handle: ModelHandle, extra: dict[str, object] | None = None
) -> None:
    spec = handle.spec
    key = spec.key
    m = svc.metrics
    m.sessions_started.labels(key).inc()
    m.sessions_active.labels(key).inc()
    svc.connections.add(conn)
    conn.writer = asyncio.create_task(conn.run_writer())
    conn._put(
        orjson.dumps(
            {
                "type": "ready",
                "session_id": conn.id,
                "model": spec.name,
                "version": spec.version,
                "sample_rate": spec.sample_rate,
                "frame_samples": spec.frame_samples,
                "hop_samples": spec.hop_samples,
                "labels": spec.labels,
                "encoding": conn.session.encoding if conn.session else None,
                "threshold": spec.events.threshold,
                **(extra or {}),
            }
        ).decode()
    )
    if conn.resume is not None:  # a resume re-sends the results the client may have missed
        for index, t, scores, events in conn.resume.resend:
            conn.on_result(index, t, scores, events)
        conn.resume.resend.clear()
    reason = "error"
    try:
        conn.reader = asyncio.current_task()
        reason = await conn.run()
    except asyncio.CancelledError:  # from Connection._abort only; anything else propagates
        task = asyncio.current_task()
        if conn.end_code is None or task is None or task.uncancel() > 0:
            raise
        reason = conn.end_reason or "error"
    except Exception:
        log.exception("session %s failed", conn.id)
        m.error("internal_error")
    finally:
        svc.connections.discard(conn)
        if conn.finisher is not None and not conn.finisher.done():
            conn.finisher.cancel()
        if conn.session is not None:
            svc.account_frames(conn)
            if svc.resumer is not None:
                await svc.resumer.on_close(conn, reason)
            conn.session.close()
        if conn.writer is not None and not conn.writer.done():
            if reason == "client_gone":
                conn.writer.cancel()
            else:
                try:
                    await asyncio.wait_for(asyncio.shield(conn.writer), 2.0)
                except Exception:
                    conn.writer.cancel()
        m.sessions_active.labels(key).dec()
        m.sessions_ended.labels(key, reason).inc()
        m.bytes_in.labels("ws").inc(conn.bytes_in)
        m.bytes_out.labels("ws").inc(conn.bytes_out)
