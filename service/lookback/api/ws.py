"""WebSocket ``/v1/stream``: admit, parse the query, open a session, hand it to ``Connection``.

Refusals that need no session (auth, origin, capacity, drain) are HTTP responses before
the upgrade; bad query values are reported after the upgrade as an ``error`` plus a 44xx
close, since browsers cannot read a refused handshake's body.
"""

from __future__ import annotations

import uuid
from collections import deque
from collections.abc import Mapping
from typing import TYPE_CHECKING

from fastapi import APIRouter, WebSocket

from lookback.api import auth
from lookback.api.admission import Admission
from lookback.api.connection import Connection, Connections
from lookback.api.query import check_unique_query
from lookback.api.responses import error_response
from lookback.engine.engine import Engine
from lookback.engine.pcm import BYTES_PER_SAMPLE, ENCODINGS_TEXT, RATES_TEXT, SAMPLE_RATES
from lookback.errors import LookbackError
from lookback.metrics import Metrics
from lookback.protocol import RESULT_FORMATS, Close, error_message, spec_for
from lookback.settings import Settings

if TYPE_CHECKING:
    from lookback.api.resume import Resumer
    from lookback.engine.served import ServedModel

router = APIRouter()


def parse_audio_query(q: Mapping[str, str], model_rate: int) -> tuple[str, int | None]:
    """(encoding, sample_rate): the wire form the client declares (no rate: the model's)."""
    encoding = q.get("encoding", "pcm_s16le")
    if encoding not in BYTES_PER_SAMPLE:
        raise LookbackError(
            f"encoding {encoding[:40]!r} not supported; use {ENCODINGS_TEXT}", code="bad_encoding"
        )
    rate = q.get("sample_rate")
    if rate is None:
        return encoding, None
    if not (rate.isascii() and rate.isdigit() and int(rate) in (*SAMPLE_RATES, model_rate)):
        raise LookbackError(
            f"sample_rate {rate[:20]!r} not supported; use one of {RATES_TEXT} (the model's is {model_rate})",
            code="bad_sample_rate",
        )
    return encoding, int(rate)


def _parse_query(ws: WebSocket, engine: Engine) -> tuple[ServedModel, str, int | None, str]:
    q = ws.query_params
    handle = engine.resolve(q.get("model") or None, q.get("version") or None)
    encoding, rate = parse_audio_query(q, handle.spec.sample_rate)
    results = q.get("results", "all")
    if results not in ("all", "batch", "events"):
        raise LookbackError(f"results must be all, batch or events, not {results[:20]!r}", code="bad_query")
    return handle, encoding, rate, results


async def admit(ws: WebSocket) -> bool:
    """Refusals that need no session, as HTTP answers before the upgrade; True: go on.

    Shared by every WebSocket route (``/v1/stream``, the telephony media stream)."""
    s: Settings = ws.app.state.settings
    metrics: Metrics = ws.app.state.metrics
    admission: Admission = ws.app.state.admission
    if not auth.origin_ok(s, ws):
        metrics.sessions_refused.labels("origin").inc()
        await ws.send_denial_response(error_response("origin_not_allowed", "Origin not allowed"))
        return False
    if not auth.key_ok(s, auth.ws_key(ws)):
        metrics.sessions_refused.labels("unauthorized").inc()
        await ws.send_denial_response(error_response("unauthorized", "missing or wrong API key"))
        return False
    busy = admission.refusal()
    if busy is not None:
        code, message = busy
        metrics.sessions_refused.labels(code).inc()
        await ws.send_denial_response(
            error_response("draining" if code == "draining" else "server_busy", message)
        )
        return False
    return True


@router.websocket("/v1/stream")
async def stream(ws: WebSocket) -> None:
    state = ws.app.state
    s: Settings = state.settings
    metrics: Metrics = state.metrics
    admission: Admission = state.admission
    if not await admit(ws):
        return
    admission.reserved += 1
    registry: Connections = state.connections
    resumer: Resumer | None = state.resumer
    try:
        await ws.accept()
        try:
            check_unique_query(ws.query_params.multi_items())  # one value each, resume too
            fmt = ws.query_params.get("result_format", "json")
            if fmt not in RESULT_FORMATS:  # per connection: a resume states it again
                raise LookbackError(
                    f"result_format must be json or binary, not {fmt[:20]!r}", code="bad_query"
                )
            token = ws.query_params.get("resume")
            if token is None:
                handle, encoding, rate, results = _parse_query(ws, state.engine)
        except LookbackError as exc:
            metrics.sessions_refused.labels("bad_request").inc()
            metrics.error(exc.code)
            await ws.send_text(error_message(exc.code, exc.message))
            close = spec_for(exc.code).close or Close.BAD_REQUEST
            await ws.close(code=close, reason=exc.code)
            return
        if token is not None:
            if resumer is None:
                metrics.resumes.labels("unavailable").inc()
                await ws.send_text(error_message("resume_unavailable", "resume is disabled on this server"))
                await ws.close(code=Close.RESUME_UNAVAILABLE, reason="resume_unavailable")
                return
            resumed = await resumer.open_resumed(
                ws,
                state.engine,
                token,
                auth.ws_key(ws),
                lambda model, results, sid: Connection(
                    ws, s, metrics, model, results, sid, worker=admission.worker
                ),
            )
            if resumed is not None:
                await resumed.serve(registry)
            return
        conn = Connection(ws, s, metrics, handle, results, uuid.uuid4().hex[:16], worker=admission.worker)
        try:
            conn.session = state.engine.open_session(handle, conn, encoding=encoding, sample_rate=rate)
        except LookbackError as exc:
            metrics.sessions_refused.labels("capacity").inc()
            await ws.send_text(error_message(exc.code, exc.message))
            await ws.close(code=Close.TRY_AGAIN_LATER, reason=exc.code)
            return
        if resumer is not None and ws.query_params.get("resumable") in ("1", "true"):
            # opt-in: only clients that can resume pay for checkpoints and see the new messages
            conn.resume = await resumer.new_state(auth.ws_key(ws))
            conn.resume.token_sent = conn.resume.token is not None
            conn.recent = deque(maxlen=s.resume_tail_messages)
            conn.ready_extra["resume_token"] = conn.resume.token
        await conn.serve(registry)
    finally:
        admission.reserved -= 1
