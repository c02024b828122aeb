"""REST: ``POST /v1/score``, ``GET /v1/models``, health, readiness and metrics.

Routes only: the upload decoders are in ``lookback.api.uploads``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
import orjson
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.background import BackgroundTask
from starlette.datastructures import State

from lookback import protocol
from lookback.api import auth
from lookback.api.admission import ScoreLease
from lookback.api.query import unique_query
from lookback.api.uploads import CONTAINER_TYPES, RAW_TYPES, Body, RawSource, Source, open_container
from lookback.engine.offline import OfflineChunk
from lookback.engine.pcm import RATES_TEXT, SAMPLE_RATES
from lookback.errors import LookbackError, RequestError

if TYPE_CHECKING:
    from lookback.engine.served import ServedModel

router = APIRouter()
_OPT = orjson.OPT_SERIALIZE_NUMPY


def _state(request: Request) -> State:
    state: State = request.app.state
    return state


def require_key(request: Request) -> None:
    if not auth.key_ok(_state(request).settings, auth.bearer(request)):
        raise RequestError("missing or wrong API key (Authorization: Bearer <key>)", code="unauthorized")


# -- health --------------------------------------------------------------------------------


@router.get("/healthz", tags=["health"], summary="Liveness: the process answers")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    tags=["health"],
    summary="Readiness: models loaded and warm, not draining",
    responses={503: {"description": "not ready (loading or draining)"}},
)
async def readyz(request: Request) -> JSONResponse:
    svc = _state(request)
    ok = svc.engine.ready and not svc.admission.draining
    body = {
        "ready": ok,
        "draining": svc.admission.draining,
        "provider": svc.engine.provider,
        "models": sorted(svc.engine.models),
        # a model that failed to load is not served; the others are (ready stays true)
        "failed": dict(svc.engine.failed),
        "sessions": len(svc.connections),
        # resume degrades, never blocks serving: an unreachable store is reported, not fatal
        "resume": svc.resumer.readiness() if svc.resumer is not None else None,
    }
    peers = svc.admission.peers
    if peers is not None:  # --workers N: ready only when every worker is
        ok = body["ready"] = ok and peers.all_ready()
        body["draining"] = svc.admission.draining or peers.any_draining()
        body["sessions"] = peers.sessions()
        body["workers"] = peers.describe()
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/metrics", tags=["health"], summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    svc = _state(request)
    if svc.settings.metrics_require_auth:
        require_key(request)
    svc.connections.tick_metrics()
    return Response(generate_latest(svc.metrics.registry), media_type=CONTENT_TYPE_LATEST)


# -- models --------------------------------------------------------------------------------


@router.get(
    "/v1/models",
    tags=["models"],
    dependencies=[Depends(unique_query), Depends(require_key)],
    summary="Loaded models: their contract and active execution provider",
)
async def models(request: Request) -> dict[str, Any]:
    svc = _state(request)
    return {
        "default_model": svc.settings.default_model,
        "provider": svc.engine.provider,
        "models": svc.engine.describe(),
    }


# -- scoring -------------------------------------------------------------------------------


@router.post(
    "/v1/score",
    tags=["scoring"],
    dependencies=[Depends(unique_query), Depends(require_key)],
    summary="Score a whole clip offline (same numbers as streaming it)",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "audio/wav": {"schema": {"type": "string", "format": "binary"}},
                "audio/flac": {"schema": {"type": "string", "format": "binary"}},
                "audio/ogg": {"schema": {"type": "string", "format": "binary"}},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            },
        }
    },
    responses={
        200: {
            "description": "scores and events (format=ndjson: one JSON line per chunk)",
            "content": {"application/x-ndjson": {"schema": {"type": "string"}}},
        },
        400: {"description": "bad request"},
        401: {"description": "unauthorized"},
        404: {"description": "unknown model"},
        413: {"description": "too large"},
        415: {"description": "not audio"},
        503: {"description": "busy"},
    },
)
async def score(
    request: Request,
    model: Annotated[str | None, Query(description="default: the configured model")] = None,
    version: Annotated[str | None, Query(description="default: latest")] = None,
    format: Annotated[Literal["json", "ndjson"], Query()] = "json",
    encoding: Annotated[
        Literal["pcm_s16le", "pcm_f32le", "mulaw", "alaw"], Query(description="raw bodies only")
    ] = "pcm_s16le",
    sample_rate: Annotated[
        int | None,
        Query(
            ge=1,
            le=384000,
            description="raw bodies: required; 8000, 16000, 22050, 24000, 32000, 44100 or 48000",
        ),
    ] = None,
) -> Response:
    svc = _state(request)
    s = svc.settings
    handle = svc.engine.resolve(model, version)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in CONTAINER_TYPES and ctype not in RAW_TYPES:
        raise RequestError(
            f"unsupported content type {ctype[:60]!r}; send audio/wav, audio/flac, "
            "audio/ogg or application/octet-stream",
            code="bad_audio",
        )
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > s.max_upload_bytes:
        raise RequestError(
            f"body of {length} bytes exceeds max_upload_bytes={s.max_upload_bytes}", code="upload_too_large"
        )
    lease = svc.admission.admit_score()
    if lease is None:
        raise RequestError("offline scoring queue is full; retry later", code="server_busy")
    body = Body(
        request,
        s.max_upload_bytes,
        s.idle_timeout_s,
        min_rate=s.min_upload_rate_bps,
        rate_grace=s.upload_rate_grace_s,
    )
    try:
        if sample_rate is not None and sample_rate not in (*SAMPLE_RATES, handle.spec.sample_rate):
            raise RequestError(
                f"sample_rate {sample_rate} not supported; use one of "
                f"{RATES_TEXT} (the model's is {handle.spec.sample_rate})",
                code="bad_sample_rate",
            )
        if ctype in RAW_TYPES:
            if sample_rate is None:
                raise RequestError("raw PCM needs the sample_rate query parameter", code="bad_sample_rate")
            source: Source = RawSource(
                body,
                encoding,
                handle,
                s.max_upload_seconds,
                s.offline_chunk_steps,
                max_amplitude=s.max_float_amplitude,
                sample_rate=sample_rate,
            )
        else:
            source = await open_container(
                body,
                handle,
                s.max_upload_seconds,
                s.offline_chunk_steps,
                max_amplitude=s.max_float_amplitude,
                sample_rate=sample_rate,
            )
        await source.check()
    except BaseException:
        lease.release()
        raise
    return await _respond(svc, handle, source, format, lease)


async def _respond(svc: State, handle: ServedModel, source: Source, fmt: str, lease: ScoreLease) -> Response:
    spec = handle.spec
    head = protocol.ndjson_header(
        model=spec.name,
        version=spec.version,
        sample_rate=spec.sample_rate,
        hop_samples=spec.hop_samples,
        labels=spec.labels,
    )

    async def chunks() -> AsyncGenerator[OfflineChunk, None]:
        try:
            async with lease.running():
                async for chunk in svc.engine.score(handle, source.chunks()):
                    yield chunk
            svc.metrics.offline_clips.labels(spec.key).inc()
            svc.metrics.offline_seconds.labels(spec.key).inc(source.samples / spec.sample_rate)
        finally:
            cleanup()

    def cleanup() -> None:
        source.close()
        lease.release()

    if fmt == "ndjson":

        async def lines() -> AsyncIterator[bytes]:
            steps, events = 0, []
            yield protocol.ndjson_line("header", head)
            try:
                async with contextlib.aclosing(chunks()) as scored:  # releases the lease at once
                    async for c in scored:
                        steps += len(c.scores)
                        events += [e.as_dict() for e in c.events]
                        yield protocol.ndjson_line(
                            "scores",
                            {
                                "first_step": c.first_step,
                                "scores": _columns(c.scores, spec.labels),
                                "events": [e.as_dict() for e in c.events],
                            },
                        )
            except LookbackError as exc:
                svc.metrics.error(exc.code)
                yield protocol.ndjson_line("error", {"code": exc.code, "message": exc.message})
                return
            yield protocol.ndjson_line(
                "summary", {"steps": steps, "events": events, "duration": source.samples / spec.sample_rate}
            )

        return _BodyReadingStream(
            lines(), media_type="application/x-ndjson", background=BackgroundTask(cleanup)
        )

    parts: list[np.ndarray] = []
    events: list[dict[str, object]] = []
    try:
        async for c in chunks():
            parts.append(c.scores)
            events += [e.as_dict() for e in c.events]
    finally:
        cleanup()
    scores = np.concatenate(parts) if parts else np.zeros((0, len(spec.labels)), np.float32)
    body = {
        **head,
        "steps": int(scores.shape[0]),
        "duration": source.samples / spec.sample_rate,
        "scores": _columns(scores, spec.labels),
        "events": events,
    }
    return Response(orjson.dumps(body, option=_OPT), media_type="application/json")


class _BodyReadingStream(StreamingResponse):
    """A streamed response whose generator is still reading the request body.

    Starlette's StreamingResponse, under ASGI spec < 2.4 (uvicorn says 2.3), runs a task
    that calls ``receive()`` to notice a disconnect, and that task would swallow body
    parts meant for the scorer. Here the body reader itself notices a client that goes.
    """

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await self.stream_response(send)
        except OSError:  # the transport dropped a client that stopped reading (send_timeout)
            if hasattr(self.body_iterator, "aclose"):
                await self.body_iterator.aclose()
        if self.background is not None:
            await self.background()


def _columns(scores: np.ndarray, labels: list[str]) -> dict[str, np.ndarray]:
    """Per-label float64 columns: JSON then carries each float32 score exactly."""
    wide = scores.astype(np.float64)
    return {lab: np.ascontiguousarray(wide[:, i]) for i, lab in enumerate(labels)}
