"""REST: ``POST /v1/score``, ``GET /v1/models``, health, readiness and metrics.

The upload is never held in memory whole. Raw PCM, and WAV holding 16-bit PCM (what
nearly every recorder writes), are decoded and scored as the body arrives: the WAV
header is parsed from the first bytes, then the data chunk is raw PCM. Other WAVs,
FLAC and OGG need a seekable file for libsndfile, so the body is spooled to a temporary
file (counting bytes, 413 the moment ``max_upload_bytes`` is passed), then decoded and
scored block by block.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import struct
import tempfile
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Annotated, Any, Literal, NamedTuple

import numpy as np
import orjson
import soundfile as sf
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect

from lookback.api import auth
from lookback.engine.offline import OfflineChunk
from lookback.errors import LookbackError
from lookback.protocol import spec_for

if TYPE_CHECKING:
    from lookback.api.state import ScoreLease, ServiceState
    from lookback.engine.model import ModelHandle

router = APIRouter()
_OPT = orjson.OPT_SERIALIZE_NUMPY
_CONTAINER_TYPES = {
    "audio/wav",
    "audio/x-wav",
    "audio/wave",
    "audio/vnd.wave",
    "audio/flac",
    "audio/x-flac",
    "audio/ogg",
}
_RAW_TYPES = {"application/octet-stream", "audio/l16", "audio/pcm"}


class RestError(LookbackError):
    """A request-level refusal; its HTTP status comes from the protocol table."""


def _svc(request: Request) -> ServiceState:
    svc: ServiceState = request.app.state.lookback
    return svc


def require_key(request: Request) -> None:
    if not auth.key_ok(_svc(request).settings, auth.bearer(request)):
        raise RestError("missing or wrong API key (Authorization: Bearer <key>)", code="unauthorized")


class _Body:
    """The request body, part by part, counted against ``max_upload_bytes``.

    Every source reads through this. A client that hangs up mid-body is ``bad_audio``;
    one silent for ``idle_timeout_s`` mid-body gets 408, so a stalled upload cannot hold
    its place in the scoring queue forever.
    """

    def __init__(self, request: Request, max_bytes: int) -> None:
        self._parts = request.stream()
        self._timeout = _svc(request).settings.idle_timeout_s
        self.max_bytes = max_bytes
        self.received = 0

    async def next(self) -> bytes | None:
        try:
            part = await asyncio.wait_for(anext(self._parts, None), self._timeout)
        except TimeoutError:
            raise RestError(
                f"no body data for idle_timeout_s={self._timeout:g}", code="idle_timeout"
            ) from None
        except ClientDisconnect as exc:
            raise RestError("client disconnected mid-body", code="bad_audio") from exc
        if part is not None:
            self.received += len(part)
            if self.received > self.max_bytes:
                raise RestError(f"body exceeds max_upload_bytes={self.max_bytes}", code="upload_too_large")
        return part


# libsndfile quietly shortens a WAV whose data chunk runs past the end of the file; its
# log says so. 0xFFFFFFFF-style lengths mean "unknown" (streamed WAVs) and are fine.
_SHORT_DATA = re.compile(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)


def _truncated(snd: sf.SoundFile) -> bool:
    m = _SHORT_DATA.search(snd.extra_info)
    return m is not None and int(m.group(2)) < int(m.group(1)) < 0x7FFFFFFF


def error_response(exc: LookbackError, retry_after: int | None = None) -> JSONResponse:
    status = spec_for(exc.code).http
    headers = {}
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if status == 503:
        headers["Retry-After"] = str(retry_after or 1)
    return JSONResponse(
        {"error": {"code": exc.code, "message": exc.message}}, status_code=status, headers=headers or None
    )


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
    svc = _svc(request)
    ok = svc.engine.ready and not svc.draining
    body = {
        "ready": ok,
        "draining": svc.draining,
        "provider": svc.engine.provider,
        "models": sorted(svc.engine.models),
        "sessions": len(svc.connections),
        # resume degrades, never blocks serving: an unreachable store is reported, not fatal
        "resume": svc.resumer.readiness() if svc.resumer is not None else None,
    }
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/metrics", tags=["health"], summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    svc = _svc(request)
    if svc.settings.metrics_require_auth:
        require_key(request)
    svc.tick_metrics()
    return Response(generate_latest(svc.metrics.registry), media_type=CONTENT_TYPE_LATEST)


# -- models --------------------------------------------------------------------------------


@router.get(
    "/v1/models",
    tags=["models"],
    dependencies=[Depends(require_key)],
    summary="Loaded models: their contract and active execution provider",
)
async def models(request: Request) -> dict[str, Any]:
    svc = _svc(request)
    return {
        "default_model": svc.settings.default_model,
        "provider": svc.engine.provider,
        "models": svc.engine.describe(),
    }


# -- scoring -------------------------------------------------------------------------------


@router.post(
    "/v1/score",
    tags=["scoring"],
    dependencies=[Depends(require_key)],
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
        Literal["pcm_s16le", "pcm_f32le"], Query(description="raw PCM bodies only")
    ] = "pcm_s16le",
    sample_rate: Annotated[int | None, Query(ge=1, le=384000, description="raw PCM: required")] = None,
) -> Response:
    svc = _svc(request)
    s = svc.settings
    handle = svc.engine.resolve(model, version)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in _CONTAINER_TYPES and ctype not in _RAW_TYPES:
        raise RestError(
            f"unsupported content type {ctype[:60]!r}; send audio/wav, audio/flac, "
            "audio/ogg or application/octet-stream",
            code="bad_audio",
        )
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > s.max_upload_bytes:
        raise RestError(
            f"body of {length} bytes exceeds max_upload_bytes={s.max_upload_bytes}", code="upload_too_large"
        )
    lease = svc.admit_score()
    if lease is None:
        raise RestError("offline scoring queue is full; retry later", code="server_busy")
    try:
        if ctype in _RAW_TYPES:
            if sample_rate is not None and sample_rate != handle.spec.sample_rate:
                raise RestError(
                    f"sample_rate {sample_rate} differs from the model's {handle.spec.sample_rate}",
                    code="bad_sample_rate",
                )
            if sample_rate is None:
                raise RestError("raw PCM needs the sample_rate query parameter", code="bad_sample_rate")
            source: _Source = _RawSource(
                _Body(request, s.max_upload_bytes),
                encoding,
                handle,
                s.max_upload_seconds,
                s.offline_chunk_steps,
            )
        else:
            source = await _open_container(
                _Body(request, s.max_upload_bytes), handle, s.max_upload_seconds, s.offline_chunk_steps
            )
        await source.check()
    except BaseException:
        lease.release()
        raise
    return await _respond(svc, handle, source, format, lease)


async def _respond(
    svc: ServiceState, handle: ModelHandle, source: _Source, fmt: str, lease: ScoreLease
) -> Response:
    spec = handle.spec
    head = {
        "model": spec.name,
        "version": spec.version,
        "sample_rate": spec.sample_rate,
        "hop_samples": spec.hop_samples,
        "labels": spec.labels,
    }

    async def chunks() -> AsyncIterator[OfflineChunk]:
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
            yield orjson.dumps({"type": "header", **head}) + b"\n"
            try:
                async for c in chunks():
                    steps += len(c.scores)
                    events += [e.as_dict() for e in c.events]
                    yield (
                        orjson.dumps(
                            {
                                "type": "scores",
                                "first_step": c.first_step,
                                "scores": _columns(c.scores, spec.labels),
                                "events": [e.as_dict() for e in c.events],
                            },
                            option=_OPT,
                        )
                        + b"\n"
                    )
            except LookbackError as exc:
                yield orjson.dumps({"type": "error", "code": exc.code, "message": exc.message}) + b"\n"
                return
            yield (
                orjson.dumps(
                    {
                        "type": "summary",
                        "steps": steps,
                        "events": events,
                        "duration": source.samples / spec.sample_rate,
                    }
                )
                + b"\n"
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
        await self.stream_response(send)
        if self.background is not None:
            await self.background()


def _columns(scores: np.ndarray, labels: list[str]) -> dict[str, np.ndarray]:
    """Per-label float64 columns: JSON then carries each float32 score exactly."""
    wide = scores.astype(np.float64)
    return {lab: np.ascontiguousarray(wide[:, i]) for i, lab in enumerate(labels)}


class _Source:
    samples = 0

    async def check(self) -> None:
        """Fail before the response starts when the audio is unusable."""

    def chunks(self) -> AsyncIterator[np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _RawSource(_Source):
    """Raw PCM decoded while the body streams in: memory is one chunk, whatever the size.

    Also the data chunk of a streamed 16-bit WAV: ``first`` holds the bytes already read
    past its header and ``limit`` the length the header declares (None: up to the end),
    so trailing chunks are not scored and a short body is reported as truncated.
    """

    def __init__(
        self,
        body: _Body,
        encoding: str,
        handle: ModelHandle,
        max_seconds: float,
        chunk_steps: int,
        *,
        first: bytes | None = None,
        limit: int | None = None,
    ) -> None:
        self.dtype = np.dtype("<i2" if encoding == "pcm_s16le" else "<f4")
        self.max_samples = int(max_seconds * handle.spec.sample_rate)
        self.chunk_bytes = chunk_steps * handle.spec.hop_samples * self.dtype.itemsize
        self._first = first
        self._limit = limit
        self._body = body

    async def check(self) -> None:
        if self._first is not None:  # a WAV: its header was read, data may be empty
            return
        part = await self._body.next()
        while part == b"":
            part = await self._body.next()
        if not part:
            raise RestError("request body is empty", code="empty_body")
        self._first = part

    async def chunks(self) -> AsyncIterator[np.ndarray]:
        """Chunks of exactly ``chunk_bytes`` (the last one shorter), however the body was
        cut into parts on the way: so the scores do not depend on TCP packetisation."""
        size, step = self.dtype.itemsize, self.chunk_bytes
        left = self._limit  # data bytes not yet scored (None: all of the body)
        parts = [self._first] if self._first else []
        have = len(self._first or b"")
        done = False
        while not done:
            while have < step and (left is None or have < left):
                part = await self._body.next()
                if part is None:
                    done = True
                    break
                parts.append(part)
                have += len(part)
            blob = b"".join(parts) if len(parts) != 1 else parts[0]
            if left is not None and len(blob) >= left:
                blob, done = blob[:left], True
            if done:
                usable = len(blob) - len(blob) % size
                if usable != len(blob):
                    raise RestError(
                        "audio is truncated: the body ends inside a sample"
                        if self._limit is not None
                        else "raw body length is not a whole number of samples",
                        code="bad_audio",
                    )
            else:
                usable = len(blob) - len(blob) % step
            if left is not None:
                left -= usable
            parts = [blob[usable:]] if usable != len(blob) else []
            have = len(blob) - usable
            for at in range(0, usable, step):
                audio = self._decode(blob, at, min(step, usable - at))
                self.samples += audio.size
                if self.samples > self.max_samples:
                    raise RestError("audio exceeds max_upload_seconds", code="audio_too_long")
                yield audio
        if left:  # the header promised more than the body held
            raise RestError(
                f"audio is truncated: header promises "
                f"{self.samples + left // size} samples, body holds {self.samples}",
                code="bad_audio",
            )

    def _decode(self, blob: bytes, at: int, nbytes: int) -> np.ndarray:
        data = np.frombuffer(blob, self.dtype, count=nbytes // self.dtype.itemsize, offset=at)
        audio = np.empty(data.size, np.float32)
        if self.dtype.kind == "i":
            np.multiply(data, np.float32(1 / 32768), out=audio, casting="unsafe")
        else:
            audio[:] = data
            if not np.isfinite(audio).all():
                raise RestError("pcm_f32le body holds NaN or Inf", code="non_finite_audio")
        return audio


# -- WAV: 16-bit PCM streams; anything else is spooled for libsndfile ---------------------------

_PCM_GUID_TAIL = bytes.fromhex("000000001000800000aa00389b71")  # KSDATAFORMAT_SUBTYPE_PCM
_WAV_HEAD_MAX = 64 * 1024  # a header longer than this is left to libsndfile
_NEED_MORE = object()


class _WavHead(NamedTuple):
    channels: int
    rate: int
    data_offset: int
    data_bytes: int | None  # None: open-ended, up to the end of the body


def _parse_wav_head(buf: bytes) -> object:
    """A ``_WavHead`` for a 16-bit PCM WAV, ``_NEED_MORE``, or None (not streamable)."""
    if len(buf) < 12:
        return _NEED_MORE
    if buf[:4] != b"RIFF" or buf[8:12] != b"WAVE":
        return None
    pos, fmt = 12, None
    while pos <= _WAV_HEAD_MAX:
        if pos + 8 > len(buf):
            return _NEED_MORE
        cid = buf[pos : pos + 4]
        (size,) = struct.unpack_from("<I", buf, pos + 4)
        if cid == b"fmt ":
            if size < 16 or pos + 8 + size > len(buf):
                return _NEED_MORE if size >= 16 else None
            code, channels, rate = struct.unpack_from("<HHI", buf, pos + 8)
            (bits,) = struct.unpack_from("<H", buf, pos + 22)
            if code == 0xFFFE:  # WAVE_FORMAT_EXTENSIBLE: the real format is in the GUID
                sub = buf[pos + 32 : pos + 48] if size >= 40 else b""
                code = struct.unpack_from("<H", sub)[0] if sub[2:] == _PCM_GUID_TAIL else 0
            fmt = (code, channels, rate, bits)
        elif cid == b"data":
            if fmt is None or fmt[0] != 1 or fmt[3] != 16:
                return None
            known = size not in (0, 0xFFFFFFFF)  # streamed WAVs leave the length open
            return _WavHead(fmt[1], fmt[2], pos + 8, size if known else None)
        pos += 8 + size + (size & 1)  # chunks are word-aligned
    return None


async def _open_container(body: _Body, handle: ModelHandle, max_seconds: float, chunk_steps: int) -> _Source:
    """Stream a 16-bit PCM WAV as it arrives; spool anything else for libsndfile."""
    head = b""
    parsed: object = _NEED_MORE
    while parsed is _NEED_MORE:
        part = await body.next()
        if part is None:
            break
        head += part
        parsed = _parse_wav_head(head)
    if not isinstance(parsed, _WavHead):  # not one we stream: libsndfile decides
        return await _ContainerSource.open(body, head, handle, max_seconds, chunk_steps)
    spec, max_bytes = handle.spec, body.max_bytes
    _check_format(parsed.channels, parsed.rate, spec.sample_rate)
    if parsed.data_bytes is not None and parsed.data_offset + parsed.data_bytes > max_bytes:
        raise RestError(
            f"the WAV header declares {parsed.data_offset + parsed.data_bytes} "
            f"bytes; max_upload_bytes={max_bytes}",
            code="upload_too_large",
        )
    if parsed.data_bytes is not None and parsed.data_bytes // 2 > max_seconds * spec.sample_rate:
        raise RestError(
            f"audio of {parsed.data_bytes / 2 / spec.sample_rate:.0f}s exceeds "
            f"max_upload_seconds={max_seconds:g}",
            code="audio_too_long",
        )
    return _RawSource(
        body,
        "pcm_s16le",
        handle,
        max_seconds,
        chunk_steps,
        first=head[parsed.data_offset :],
        limit=parsed.data_bytes,
    )


def _check_format(channels: int, rate: int, model_rate: int) -> None:
    if channels != 1:
        raise RestError(f"audio has {channels} channels; send mono", code="bad_channels")
    if rate != model_rate:
        raise RestError(
            f"audio is {rate} Hz; the model needs {model_rate} Hz (Lookback never resamples silently)",
            code="bad_sample_rate",
        )


class _ContainerSource(_Source):
    """WAV/FLAC/OGG through libsndfile, from a spooled temp file, block by block."""

    def __init__(self, path: str, info: sf.SoundFile, chunk: int) -> None:
        self.path = path
        self.file = info
        self.chunk = chunk

    @classmethod
    async def open(
        cls, body: _Body, head: bytes, handle: ModelHandle, max_seconds: float, chunk_steps: int
    ) -> _ContainerSource:
        """Spool ``head`` (the bytes already read) and the rest of ``body``, then open."""
        fd, path = tempfile.mkstemp(prefix="lookback-", suffix=".upload")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(head)
                while (part := await body.next()) is not None:
                    f.write(part)
            if body.received == 0:
                raise RestError("request body is empty", code="empty_body")
            try:
                snd = sf.SoundFile(path)
            except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
                detail = str(exc).replace(path, "<upload>")  # never reveal server paths
                raise RestError(f"body is not decodable audio: {detail}", code="bad_audio") from exc
            spec = handle.spec
            try:
                _check_format(snd.channels, snd.samplerate, spec.sample_rate)
            except RestError:
                snd.close()
                raise
            if _truncated(snd):
                snd.close()
                raise RestError(
                    "audio is truncated: the WAV header promises more data than the body holds",
                    code="bad_audio",
                )
            if snd.frames > max_seconds * spec.sample_rate:
                snd.close()
                raise RestError(
                    f"audio of {snd.frames / spec.sample_rate:.0f}s exceeds "
                    f"max_upload_seconds={max_seconds:g}",
                    code="audio_too_long",
                )
            return cls(path, snd, chunk_steps * spec.hop_samples)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise

    async def chunks(self) -> AsyncIterator[np.ndarray]:
        while True:
            try:
                block = await asyncio.to_thread(self.file.read, self.chunk, "float32")
            except (sf.LibsndfileError, RuntimeError) as exc:
                raise RestError(f"audio is truncated or corrupt: {exc}", code="bad_audio") from exc
            if block.size == 0:
                break
            self.samples += block.size
            yield block
            if block.size < self.chunk:
                break
        if self.samples < self.file.frames:
            raise RestError(
                f"audio is truncated: header promises {self.file.frames} samples, body holds {self.samples}",
                code="bad_audio",
            )

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.file.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
