"""Async Python client for Lookback: WebSocket streaming and REST scoring.

``stream`` sends frames from any (async) iterable while a concurrent reader yields the
server's messages, so a long stream never deadlocks on an unread socket. ``file_messages``
cuts a file into messages in the wire form asked for (PCM, G.711; the file's own rate when
asked, which the server resamples): the client never resamples.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import numpy as np
import orjson
import websockets
from websockets.exceptions import InvalidStatus

from lookback.engine.pcm import BYTES_PER_SAMPLE, RATES_TEXT, SAMPLE_RATES, encode_g711
from lookback.protocol import decode_results_binary, split_results

FRAME = 128
MODEL_RATE = 16000  # the rate FRAME is counted in: what a stream without sample_rate carries
MESSAGE_MS = 20  # per message in another wire form (G.711, another rate): a telephony packet
# Resume refusals worth another try: the old owner's lease (conflict), a store briefly
# unreachable, a secret another replica has not re-offered yet (after an empty store restart).
RETRY_RESUME = ("resume_conflict", "resume_unavailable", "resume_secret_rotated")
MAX_ROTATED_TRIES = 6  # about 4 s of backoff: the replicas re-offer their secrets every second


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


def encode(samples: np.ndarray, encoding: str) -> bytes:
    """int16 (or float32 for ``pcm_f32le``) samples -> the wire bytes of ``encoding``."""
    if encoding == "pcm_f32le":
        if samples.dtype != np.float32:
            samples = samples.astype(np.float32) * np.float32(1 / 32768)
        return samples.astype("<f4").tobytes()
    if samples.dtype != np.int16:
        raise LookbackClientError("bad_encoding", f"{encoding} is encoded from int16 samples")
    if encoding == "pcm_s16le":
        return samples.astype("<i2").tobytes()
    if encoding in ("mulaw", "alaw"):
        return encode_g711(samples, encoding)
    raise LookbackClientError("bad_encoding", f"unknown encoding {encoding!r}")


class FileAudio:
    """A file cut into messages: ``messages``, the ``sample_rate`` to declare (None: the model's),
    the file's ``rate`` and ``duration`` in seconds."""

    def __init__(self, messages: list[bytes], sample_rate: int | None, rate: int, duration: float) -> None:
        self.messages, self.sample_rate, self.rate, self.duration = messages, sample_rate, rate, duration


def file_messages(
    path: str | Path,
    *,
    encoding: str = "pcm_s16le",
    sample_rate: int | str | None = None,
    frames_per_message: int = 1,
    message_ms: int = MESSAGE_MS,
) -> FileAudio:
    """A soundfile-readable file as messages in ``encoding``, at the file's own rate.

    ``sample_rate``: None (the file must be at the model's 16 kHz: nothing is resampled
    unless asked), ``"native"`` (declare the file's rate; the server resamples), or a number
    that must be the file's rate (the client never resamples). PCM at 16 kHz goes in whole
    128-sample frames, ``frames_per_message`` a message (the last zero-padded); any other
    form in messages of ``message_ms`` ms (any whole number of samples is allowed there;
    20 ms is a telephony packet), the last one shorter.
    """
    if encoding not in BYTES_PER_SAMPLE:
        raise LookbackClientError("bad_encoding", f"unknown encoding {encoding!r}")
    samples, rate = read_wav(path)
    if sample_rate is None:
        if rate != MODEL_RATE:
            raise LookbackClientError(
                "bad_sample_rate",
                f"{path} is {rate} Hz and the client does not resample: declare its rate "
                "(sample_rate='native', --sample-rate native) and the server resamples it",
            )
    elif sample_rate != "native" and int(sample_rate) != rate:
        raise LookbackClientError(
            "bad_sample_rate",
            f"{path} is {rate} Hz, not {sample_rate}; the client does not resample (use native)",
        )
    if rate not in SAMPLE_RATES:
        raise LookbackClientError("bad_sample_rate", f"{path} is {rate} Hz; the server takes {RATES_TEXT}")
    declared = None if rate == MODEL_RATE else rate
    if encoding == "pcm_f32le":
        import soundfile as sf

        data, _ = sf.read(str(path), dtype="float32", always_2d=True)
        audio: np.ndarray = data[:, 0].copy()
    else:
        audio = samples
    if rate == MODEL_RATE and encoding in ("pcm_s16le", "pcm_f32le"):
        messages = [
            encode(np.frombuffer(m, audio.dtype), encoding) for m in frames_of(audio, frames_per_message)
        ]
    else:
        per, rest = divmod(rate * message_ms, 1000)
        if per < 1 or rest:
            raise LookbackClientError(
                "bad_message_size", f"{message_ms} ms is not a whole number of samples at {rate} Hz"
            )
        wire = encode(audio, encoding)
        step = per * BYTES_PER_SAMPLE[encoding]
        messages = [wire[i : i + step] for i in range(0, len(wire), step)]
    return FileAudio(messages, declared, rate, len(samples) / rate)


class LookbackClient:
    def __init__(
        self, base_url: str = "http://127.0.0.1:8000", *, api_key: str | None = None, timeout: float = 60.0
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self.resumes = 0  # resumes during the last stream()

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
        self,
        path: str | Path,
        *,
        model: str | None = None,
        version: str | None = None,
        sample_rate: int | str | None = None,
    ) -> dict[str, Any]:
        """Score a clip file with ``POST /v1/score``; the file is streamed, not loaded.

        ``sample_rate`` (a number, or ``"native"``: the file's) lets the server resample a
        file at another rate than the model's; without it such a file is refused.
        """
        if sample_rate == "native":
            import soundfile as sf

            sample_rate = int(sf.info(str(path)).samplerate)
        params = {
            k: str(v)
            for k, v in {"model": model, "version": version, "sample_rate": sample_rate}.items()
            if v
        }
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
        sample_rate: int | None = None,
        results: str = "all",
        realtime: bool = False,
        frame_seconds: float = FRAME / 16000,
        resume: bool = True,
        max_resumes: int = 20,
        replay_buffer_s: float = 120.0,
        result_format: str = "json",
    ) -> AsyncIterator[dict[str, Any]]:
        """Stream audio messages; yield every server message up to and including summary.

        ``results="batch"`` asks the server for one ``results`` message per model call (fewer,
        cheaper sends); the client splits each into the per-step ``result`` messages
        ``results="all"`` yields, so callers see the same results and the same events (an
        event then follows the last result of its model call rather than its own step).

        With ``resume`` (the default) a dropped connection, a drained server (close 4100)
        or a crashed one is resumed transparently: the client reconnects with its resume
        token (bounded exponential backoff), replays the audio the server has not made
        durable (kept in a buffer of at most ``replay_buffer_s`` seconds, trimmed at each
        ``checkpoint``) and drops the duplicate results and events the new server re-sends.
        ``checkpoint`` messages are consumed here, not yielded; ``self.resumes`` counts
        the resumes of the last stream. A resume refused as ``resume_conflict``,
        ``resume_unavailable`` or (a few times) ``resume_secret_rotated`` is retried;
        other refusals raise ``LookbackClientError`` with their code.

        ``encoding`` and ``sample_rate`` declare the messages' wire form (no ``sample_rate``:
        the model's; ``file_messages`` builds them); samples, pacing and replay count in
        that form (``frame_seconds`` paces 128 samples when no ``sample_rate`` is given).
        """
        sample_seconds = 1 / sample_rate if sample_rate else frame_seconds / FRAME
        st = _ResumeStream(messages, BYTES_PER_SAMPLE.get(encoding, 2), replay_buffer_s, sample_seconds)
        self.resumes = 0
        query = {"model": model, "version": version, "encoding": encoding, "results": results}
        if sample_rate:
            query["sample_rate"] = str(sample_rate)
        if result_format != "json":  # binary: results as float32 rows, yielded as dicts all the same
            query["result_format"] = result_format
        if resume:
            query["resumable"] = "1"
        first = True
        backoff = 0.1
        while True:
            if first:
                url = self.ws_url(**query)
            else:
                url = self.ws_url(
                    resume=st.token,
                    next_step=st.next_step if results != "events" else None,
                    sent=st.sent_samples,
                )
            try:
                conn = await websockets.connect(
                    url,
                    additional_headers=self._headers,
                    compression=None,
                    max_size=2**24,
                    open_timeout=self.timeout,
                )
            except InvalidStatus as exc:  # refused before the upgrade (401, 403, 503)
                err = _refused(exc)
                if first or err.code not in ("draining", "server_busy", "http_error"):
                    raise err from exc
                backoff = await self._retry(st, backoff, max_resumes, err)
                continue
            except OSError as exc:
                if first:
                    raise
                backoff = await self._retry(st, backoff, max_resumes, exc)
                continue
            outcome = None
            async with conn as ws:
                ready = orjson.loads(await ws.recv())
                if ready.get("type") == "error":
                    code = ready["code"]
                    if code == "resume_secret_rotated":
                        st.rotated += 1
                    if not first and code in RETRY_RESUME and st.rotated <= MAX_ROTATED_TRIES:
                        backoff = await self._retry(st, backoff, max_resumes, code)
                        continue
                    raise LookbackClientError(code, ready["message"])
                st.on_ready(ready)
                if first:
                    yield ready
                    first = False
                else:
                    self.resumes += 1
                    backoff = 0.1
                    st.rotated = 0
                sender = asyncio.create_task(st.send(ws, realtime))
                try:
                    async for raw in ws:
                        msg = orjson.loads(raw) if isinstance(raw, str) else decode_results_binary(raw, ready)
                        if msg.get("type") == "results":  # results=batch: per step for callers
                            for one in split_results(msg):
                                if st.keep(one):
                                    yield one
                            continue
                        if st.keep(msg):
                            yield msg
                        if msg.get("type") == "summary":
                            outcome = "done"
                            break
                except websockets.ConnectionClosed:
                    pass
                finally:
                    if not sender.done():
                        sender.cancel()
                    with contextlib.suppress(asyncio.CancelledError, websockets.ConnectionClosed):
                        await sender
            if outcome == "done":
                return
            code = ws.close_code
            if not resume or st.token is None or (code is not None and (code == 1000 or 4400 <= code < 4500)):
                raise LookbackClientError(
                    "connection_closed", f"stream closed with {code} ({ws.close_reason or 'no reason'})"
                )
            backoff = await self._retry(st, backoff, max_resumes, None)

    async def _retry(self, st: _ResumeStream, backoff: float, max_resumes: int, exc: object) -> float:
        st.attempts += 1
        if st.attempts > max_resumes * 20 or self.resumes >= max_resumes:
            raise LookbackClientError(
                "resume_failed", f"gave up resuming after {st.attempts} attempts: {exc}"
            )
        if not st.replayable:
            raise LookbackClientError(
                "resume_failed", "replay buffer overflowed: the audio to replay is gone"
            )
        await asyncio.sleep(backoff)  # reconnect backoff (bounded), not a wait on state
        return min(backoff * 2, 2.0)


class _ResumeStream:
    """The audio of one logical stream across connections: source, replay buffer, dedup."""

    def __init__(
        self,
        messages: Iterable[bytes] | AsyncIterable[bytes],
        bytes_per_sample: int,
        replay_buffer_s: float,
        sample_seconds: float,
    ) -> None:
        self.source = messages
        self.iter: Any = None
        self.bps = bytes_per_sample
        self.sample_seconds = sample_seconds
        self.limit = int(replay_buffer_s / sample_seconds) * bytes_per_sample
        self.buf: deque[tuple[int, bytes]] = deque()  # (first sample, message) not yet durable
        self.buf_bytes = 0
        self.pulled = 0  # samples taken from the source
        self.sent_samples = 0  # samples sent on the current connection
        self.cursor = 0  # next sample to send
        self.exhausted = False
        self.replayable = True
        self.token: str | None = None
        self.next_step = 0
        self.events_seen = 0
        self.skip_events = 0
        self.attempts = 0
        self.rotated = 0  # resume_secret_rotated answers so far
        self.t0: float | None = None
        self._pulling: asyncio.Future[bytes | None] | None = None

    def on_ready(self, ready: dict[str, Any]) -> None:
        if ready.get("resume_token"):
            self.token = ready["resume_token"]
        if ready.get("resumed"):
            self.cursor = int(ready["replay_from_sample"])
            self.skip_events = max(0, self.events_seen - int(ready.get("events_sent", self.events_seen)))
            if self.buf and self.cursor < self.buf[0][0]:
                self.replayable = False
                raise LookbackClientError("resume_failed", "the server resumed before the replay buffer")
        self.sent_samples = self.cursor

    def keep(self, msg: dict[str, Any]) -> bool:
        """Track the stream; False for what must not reach the caller (duplicates, checkpoints)."""
        kind = msg.get("type")
        if kind == "result":
            if msg["step"] < self.next_step:
                return False
            self.next_step = msg["step"] + 1
        elif kind == "event":
            if self.skip_events:
                self.skip_events -= 1
                return False
            self.events_seen += 1
        elif kind == "checkpoint":
            if msg.get("resume_token"):
                self.token = msg["resume_token"]
            self._trim(int(msg["samples"]))
            return False
        return True

    def _trim(self, durable: int) -> None:
        while self.buf and self.buf[0][0] + len(self.buf[0][1]) // self.bps <= durable:
            self.buf_bytes -= len(self.buf.popleft()[1])

    async def _next(self) -> bytes | None:
        if self.exhausted:
            return None
        if self.iter is None:
            src = self.source
            self.iter = src.__aiter__() if isinstance(src, AsyncIterable) else iter(src)
        try:
            if isinstance(self.source, AsyncIterable):
                m = await self.iter.__anext__()
            else:
                m = next(self.iter)
        except (StopIteration, StopAsyncIteration):
            self.exhausted = True
            return None
        self.buf.append((self.pulled, m))
        self.buf_bytes += len(m)
        self.pulled += len(m) // self.bps
        while self.buf_bytes > self.limit and len(self.buf) > 1:
            self.buf_bytes -= len(self.buf.popleft()[1])
            self.replayable = False  # audio the server may still need is gone
        return m

    async def _pull(self) -> None:
        """Take the next source message into the buffer, surviving a cancelled sender.

        The pull runs as its own task, awaited through ``shield``: cancelling a sender
        (its connection dropped) must never cancel the caller's async generator, which
        would end the source early; the next connection's sender awaits the same pull.
        """
        if self._pulling is None:
            self._pulling = asyncio.ensure_future(self._next())
        try:
            await asyncio.shield(self._pulling)
        finally:
            if self._pulling.done():
                self._pulling = None

    async def send(self, ws: Any, realtime: bool) -> None:
        """Send what the server lacks (from ``cursor``), then the rest of the source, then end."""
        if self.t0 is None:
            self.t0 = time.monotonic()
        while True:
            todo = []
            for start, m in reversed(self.buf):
                if start + len(m) // self.bps <= self.cursor:
                    break
                todo.append((start, m))
            for start, m in reversed(todo):
                await ws.send(m[max(0, self.cursor - start) * self.bps :])
                self.cursor = self.sent_samples = start + len(m) // self.bps
            if self.exhausted:
                break
            await self._pull()
            if realtime:
                delay = self.t0 + self.pulled * self.sample_seconds - time.monotonic()
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
