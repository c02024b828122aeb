"""WebSocket ``/v1/media-stream``: a phone call's media stream, scored as it arrives.

Telephony platforms stream a call as JSON events over a WebSocket (Twilio Media Streams
and the many platforms that copy its format): ``connected``, then ``start`` with the call's
ids and ``mediaFormat`` (``audio/x-mulaw``, 8000 Hz, 1 channel), then one ``media`` event per
20 ms carrying base64 G.711 (160 bytes), ``mark``/``dtmf`` events, and ``stop``. This route
reads ``start`` itself, opens a session in the format it names (G.711 at 8 kHz, resampled
to the model's rate by the session's decoder), and hands the socket to the same
``Connection`` as ``/v1/stream`` through ``MediaEvents``, which turns each ``media``
payload into a binary audio message and ``stop`` into ``end``. What comes back is the
``/v1/stream`` protocol's JSON (``ready``, ``result``, ``event``, ``summary``, ``error``),
each message carrying the call's ``streamSid``. Mapping and codes: docs/telephony.md.
"""

from __future__ import annotations

import asyncio
import binascii
import uuid
from collections.abc import Mapping
from typing import Any

import orjson
from fastapi import APIRouter, WebSocket

from lookback.api.connection import Connection, Connections
from lookback.api.query import check_unique_query
from lookback.api.ws import admit
from lookback.engine.pcm import SAMPLE_RATES
from lookback.errors import LookbackError
from lookback.protocol import RESULT_FORMATS, Close, error_message, spec_for
from lookback.websocket import DIRECT

router = APIRouter()

# mediaFormat.encoding -> Lookback encoding
MEDIA_ENCODINGS = {"audio/x-mulaw": "mulaw", "audio/x-alaw": "alaw"}
IGNORED = frozenset({"connected", "mark", "dtmf"})
MAX_BEFORE_START = 16  # events a platform may send before `start` (it sends one: connected)
_END = {"type": "websocket.receive", "text": '{"type":"end"}'}


def _event(raw: Mapping[str, Any]) -> tuple[str | None, dict[str, Any] | None]:
    """(event name, body) of one text message, (None, None) when it is not a JSON object."""
    text = raw.get("text")
    if text is None:
        return None, None
    try:
        body = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None, None
    if not isinstance(body, dict) or not isinstance(body.get("event"), str):
        return None, None
    return body["event"], body


def media_format(start: dict[str, Any]) -> tuple[str, int, str, str]:
    """(encoding, sample rate, streamSid, callSid) of a ``start`` event, or a refusal."""
    info = start.get("start")
    if not isinstance(info, dict):
        raise LookbackError("start event without a `start` object", code="bad_media_event")
    fmt = info.get("mediaFormat")
    if not isinstance(fmt, dict):
        raise LookbackError("start event without `mediaFormat`", code="bad_media_event")
    encoding = MEDIA_ENCODINGS.get(str(fmt.get("encoding")))
    if encoding is None:
        raise LookbackError(
            f"mediaFormat.encoding {str(fmt.get('encoding'))[:40]!r} not supported; "
            f"use {' or '.join(MEDIA_ENCODINGS)}",
            code="bad_encoding",
        )
    rate = fmt.get("sampleRate")
    if not isinstance(rate, int) or isinstance(rate, bool) or rate not in SAMPLE_RATES:
        raise LookbackError(
            f"mediaFormat.sampleRate {str(rate)[:20]!r} not supported", code="bad_sample_rate"
        )
    if fmt.get("channels", 1) != 1:
        raise LookbackError("mediaFormat.channels must be 1 (send one track)", code="bad_media_event")
    sid = start.get("streamSid", info.get("streamSid"))
    call = info.get("callSid", "")
    if not isinstance(sid, str) or not isinstance(call, str) or len(sid) > 128 or len(call) > 128:
        raise LookbackError(
            "streamSid and callSid must be strings of at most 128 characters", code="bad_media_event"
        )
    return encoding, rate, sid, call


class MediaEvents:
    """The platform's socket as ``Connection`` reads it: ``media`` payloads as binary audio,
    ``stop`` as ``end``; every message sent back gets the call's ``streamSid``.

    Hides the protocol's direct path (``Connection`` then runs over ASGI receive/send, as
    under any ASGI server). A malformed event is answered with ``bad_media_event`` and
    dropped; the session goes on.
    """

    def __init__(self, ws: WebSocket, stream_sid: str, track: str) -> None:
        self._ws = ws
        self.query_params = ws.query_params
        ext = {k: v for k, v in (ws.scope.get("extensions") or {}).items() if k != DIRECT}
        self.scope = {**ws.scope, "extensions": ext}
        self.track = track
        self.conn: Connection | None = None
        self._sid_suffix = b',"streamSid":' + orjson.dumps(stream_sid) + b"}"
        self._last_seq = -1
        self.ignored = 0

    async def send(self, message: dict[str, Any]) -> None:
        text = message.get("text")
        if text is not None and text.endswith("}"):  # every server message is a JSON object
            message = {**message, "text": (text[:-1].encode() + self._sid_suffix).decode()}
        await self._ws.send(message)

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        await self._ws.close(code=code, reason=reason)

    def _refuse(self, message: str) -> None:
        if self.conn is not None:
            self.conn.send_error("bad_media_event", message)

    async def receive(self) -> Mapping[str, Any]:
        while True:
            raw = await self._ws.receive()
            if raw["type"] != "websocket.receive":
                return raw
            if raw.get("bytes") is not None:
                self._refuse("binary message on a media stream; send JSON media events")
                continue
            kind, body = _event(raw)
            if body is None:
                self._refuse("text message is not a JSON object with a string `event`")
                continue
            if kind == "media":
                audio = self._media(body)
                if audio is not None:
                    return {"type": "websocket.receive", "bytes": audio}
            elif kind == "stop":
                return _END
            elif kind in IGNORED:
                self.ignored += 1
            elif kind == "start":
                self._refuse("a second start event on one stream; ignored")
            else:
                self._refuse(f"unknown event {str(kind)[:40]!r}")

    def _media(self, body: dict[str, Any]) -> bytes | None:
        media = body.get("media")
        if not isinstance(media, dict) or not isinstance(media.get("payload"), str):
            self._refuse("media event without a string `media.payload`")
            return None
        if media.get("track", self.track) != self.track:
            self.ignored += 1  # the other leg of a two-track stream
            return None
        seq = body.get("sequenceNumber")
        n = self._last_seq + 1
        if seq is not None:
            n = int(seq[:20]) if isinstance(seq, str) and seq.isascii() and seq.isdigit() else seq
            if not isinstance(n, int) or isinstance(n, bool) or n <= self._last_seq:
                self._refuse(f"sequenceNumber {str(seq)[:24]!r} is not above the last ({self._last_seq})")
                return None
        try:
            audio = binascii.a2b_base64(media["payload"], strict_mode=True)
        except (binascii.Error, ValueError):
            self._refuse("media.payload is not valid base64")
            return None
        if not audio:
            self._refuse("media.payload is empty")
            return None
        self._last_seq = n  # only an accepted event moves the sequence on
        return audio


async def _start_event(ws: WebSocket, idle_s: float) -> dict[str, Any]:
    """Events up to ``start`` (``connected`` and the like are skipped)."""
    for _ in range(MAX_BEFORE_START):
        raw = await asyncio.wait_for(ws.receive(), idle_s)
        if raw["type"] != "websocket.receive":
            raise ConnectionError("client gone before start")
        kind, body = _event(raw)
        if kind == "start" and body is not None:
            return body
        if kind not in IGNORED:
            raise LookbackError(f"expected a start event, got {str(kind)[:40]!r}", code="bad_media_event")
    raise LookbackError(f"no start event in the first {MAX_BEFORE_START} messages", code="bad_media_event")


@router.websocket("/v1/media-stream")
async def media_stream(ws: WebSocket) -> None:
    state = ws.app.state
    s = state.settings
    metrics = state.metrics
    admission = state.admission
    if not await admit(ws):
        return
    admission.reserved += 1
    try:
        await ws.accept()
        try:
            q = ws.query_params
            check_unique_query(q.multi_items())
            if q.get("result_format", "json") not in RESULT_FORMATS:
                raise LookbackError("result_format must be json or binary", code="bad_query")
            results = q.get("results", "all")
            if results not in ("all", "batch", "events"):
                raise LookbackError(
                    f"results must be all, batch or events, not {results[:20]!r}", code="bad_query"
                )
            track = q.get("track", "inbound")
            handle = state.engine.resolve(q.get("model") or None, q.get("version") or None)
            encoding, rate, sid, call = media_format(await _start_event(ws, s.idle_timeout_s))
        except ConnectionError:
            return
        except TimeoutError:
            metrics.error("idle_timeout")
            msg = f"no start event within idle_timeout_s={s.idle_timeout_s:g}"
            await ws.send_text(error_message("idle_timeout", msg))
            await ws.close(code=Close.IDLE_TIMEOUT, reason="idle_timeout")
            return
        except LookbackError as exc:
            metrics.sessions_refused.labels("bad_request").inc()
            metrics.error(exc.code)
            await ws.send_text(error_message(exc.code, exc.message))
            await ws.close(code=spec_for(exc.code).close or Close.BAD_REQUEST, reason=exc.code)
            return
        events = MediaEvents(ws, sid, track)
        conn = Connection(
            events,  # type: ignore[arg-type]  # the WebSocket surface Connection uses
            s,
            metrics,
            handle,
            results,
            uuid.uuid4().hex[:16],
            worker=admission.worker,
        )
        events.conn = conn
        try:
            conn.session = state.engine.open_session(handle, conn, encoding=encoding, sample_rate=rate)
        except LookbackError as exc:
            metrics.sessions_refused.labels("capacity").inc()
            await ws.send_text(error_message(exc.code, exc.message))
            await ws.close(code=Close.TRY_AGAIN_LATER, reason=exc.code)
            return
        conn.ready_extra.update(call_sid=call, input_sample_rate=rate)  # streamSid: on every message
        registry: Connections = state.connections
        await conn.serve(registry)
    finally:
        admission.reserved -= 1
