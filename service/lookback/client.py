"""Async Python client for Lookback: WebSocket streaming and REST scoring.

``stream`` sends frames from any (async) iterable while a concurrent reader yields the
server's messages, so a long stream never deadlocks on an unread socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import numpy as np
import orjson
import websockets
from websockets.exceptions import InvalidStatus

FRAME = 128


class LookbackClientError(Exception):
    def __init__(self, code: str, message: str, status: int | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.status = code, message, status


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """Mono int16 samples and the rate of a WAV/FLAC/OGG file (via libsndfile)."""
    import soundfile as sf

    data, rate = sf.read(str(path), dtype="int16", always_2d=True)
    if data.shape[1] != 1:
        raise LookbackClientError("bad_channels", f"{path}: {data.shape[1]} channels; need mono")
    return data[:, 0].copy(), int(rate)


def frames_of(samples: np.ndarray, frames_per_message: int = 1) -> list[bytes]:
    """int16 samples -> messages of whole 128-sample frames, the last one zero-padded."""
    pad = (-len(samples)) % FRAME
    if pad:
        samples = np.concatenate([samples, np.zeros(pad, samples.dtype)])
    step = FRAME * frames_per_message
    return [samples[i : i + step].tobytes() for i in range(0, len(samples), step)]


class LookbackClient:
    def __init__(
        self, base_url: str = "http://127.0.0.1:8000", *, api_key: str | None = None, timeout: float = 60.0
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout

    @property
    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def ws_url(self, **params: Any) -> str:
        base = self.base_url.replace("http://", "ws://").replace("https://", "wss://")
        query = {k: v for k, v in params.items() if v is not None}
        return f"{base}/v1/stream" + (f"?{urlencode(query)}" if query else "")

    async def models(self) -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=self.timeout) as http:
            r = await http.get(f"{self.base_url}/v1/models", headers=self._headers)
            return _json_or_raise(r)

    async def score(
        self, path: str | Path, *, model: str | None = None, version: str | None = None
    ) -> dict[str, Any]:
        """Score a clip file with ``POST /v1/score``; the file is streamed, not loaded."""
        params = {k: v for k, v in {"model": model, "version": version}.items() if v}
        suffix = Path(path).suffix.lower()
        ctype = {".flac": "audio/flac", ".ogg": "audio/ogg"}.get(suffix, "audio/wav")

        async def body() -> AsyncIterator[bytes]:
            with open(path, "rb") as f:  # noqa: ASYNC230 - 1 MB reads, local disk
                while block := f.read(1 << 20):
                    yield block

        async with httpx.AsyncClient(timeout=self.timeout) as http:
            r = await http.post(
                f"{self.base_url}/v1/score",
                params=params,
                content=body(),
                headers={**self._headers, "Content-Type": ctype},
            )
            return _json_or_raise(r)

    async def stream(
        self,
        messages: Iterable[bytes] | AsyncIterable[bytes],
        *,
        model: str | None = None,
        version: str | None = None,
        encoding: str = "pcm_s16le",
        results: str = "all",
        realtime: bool = False,
        frame_seconds: float = FRAME / 16000,
    ) -> AsyncIterator[dict[str, Any]]:
        """Stream audio messages; yield every server message up to and including summary."""
        url = self.ws_url(model=model, version=version, encoding=encoding, results=results)
        try:
            conn = await websockets.connect(
                url,
                additional_headers=self._headers,
                compression=None,
                max_size=2**24,
                open_timeout=self.timeout,
            )
        except InvalidStatus as exc:  # refused before the upgrade (401, 403, 503)
            raise _refused(exc) from exc
        async with conn as ws:
            ready = orjson.loads(await ws.recv())
            if ready.get("type") == "error":
                raise LookbackClientError(ready["code"], ready["message"])
            yield ready
            sender = asyncio.create_task(self._send(ws, messages, realtime, frame_seconds))
            try:
                async for raw in ws:
                    msg = orjson.loads(raw)
                    yield msg
                    if msg.get("type") == "summary":
                        break
            finally:
                if not sender.done():
                    sender.cancel()
                with contextlib.suppress(asyncio.CancelledError, websockets.ConnectionClosed):
                    await sender

    @staticmethod
    async def _send(
        ws: Any, messages: Iterable[bytes] | AsyncIterable[bytes], realtime: bool, frame_seconds: float
    ) -> None:
        start = time.monotonic()
        sent = 0.0
        if isinstance(messages, AsyncIterable):
            async for m in messages:
                await ws.send(m)
        else:
            for m in messages:
                await ws.send(m)
                if realtime:
                    sent += len(m) / 2 / FRAME * frame_seconds
                    delay = start + sent - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)  # pacing to real time, not waiting on state
        await ws.send(orjson.dumps({"type": "end"}).decode())


def _refused(exc: InvalidStatus) -> LookbackClientError:
    """A WebSocket handshake answered with an HTTP error: the code from its JSON body."""
    status = exc.response.status_code
    try:
        err = orjson.loads(bytes(exc.response.body or b""))["error"]
        return LookbackClientError(err["code"], err["message"], status)
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return LookbackClientError("http_error", f"WebSocket refused with HTTP {status}", status)


def _json_or_raise(r: httpx.Response) -> dict[str, Any]:
    body = r.json()
    if r.status_code >= 400:
        err = body.get("error", {}) if isinstance(body, dict) else {}
        raise LookbackClientError(err.get("code", "http_error"), err.get("message", r.text), r.status_code)
    return body
