"""Upload decoders of ``POST /v1/score``: the body as it arrives, turned into float32 audio.

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
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import soundfile as sf
from starlette.requests import ClientDisconnect, Request

from lookback.engine.decoder import WireDecoder, make_decoder
from lookback.engine.pcm import RATES_TEXT, SAMPLE_RATES, float_problem
from lookback.errors import RequestError

if TYPE_CHECKING:
    from lookback.engine.served import ServedModel

CONTAINER_TYPES = {
    "audio/wav",
    "audio/x-wav",
    "audio/wave",
    "audio/vnd.wave",
    "audio/flac",
    "audio/x-flac",
    "audio/ogg",
}
RAW_TYPES = {"application/octet-stream", "audio/l16", "audio/pcm"}


class Body:
    """The request body, part by part, counted against ``max_upload_bytes``.

    Every source reads through this. A client that hangs up mid-body is ``bad_audio``;
    one silent for ``idle_timeout_s`` mid-body gets 408 ``idle_timeout``, and one that
    trickles bytes slower than ``min_upload_rate_bps`` gets 408 ``upload_too_slow``, so a
    stalled upload cannot hold its place in the scoring queue. The rate counts only the
    time spent waiting for the client, not the time the server spent scoring or queueing.
    """

    def __init__(
        self,
        request: Request,
        max_bytes: int,
        timeout: float,
        *,
        min_rate: float = 0.0,
        rate_grace: float = 5.0,
    ) -> None:
        self._parts = request.stream()
        self._timeout = timeout
        self._min_rate = min_rate
        self._grace = rate_grace
        self._waited = 0.0
        self.max_bytes = max_bytes
        self.received = 0

    async def next(self) -> bytes | None:
        timeout, slow = self._timeout, False
        if self._min_rate > 0:
            allowed = max(self._grace, self.received / self._min_rate) - self._waited
            if allowed < timeout:
                timeout, slow = max(allowed, 0.0), True
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            part = await asyncio.wait_for(anext(self._parts, None), timeout)
        except TimeoutError:
            if slow:
                raise RequestError(
                    f"body arrives slower than min_upload_rate_bps={self._min_rate:g}", code="upload_too_slow"
                ) from None
            raise RequestError(
                f"no body data for idle_timeout_s={self._timeout:g}", code="idle_timeout"
            ) from None
        except ClientDisconnect as exc:
            raise RequestError("client disconnected mid-body", code="bad_audio") from exc
        finally:
            self._waited += loop.time() - started
        if part is not None:
            self.received += len(part)
            if self.received > self.max_bytes:
                raise RequestError(f"body exceeds max_upload_bytes={self.max_bytes}", code="upload_too_large")
        return part


# libsndfile quietly shortens a WAV whose data chunk runs past the end of the file; its
# log says so. 0xFFFFFFFF-style lengths mean "unknown" (streamed WAVs) and are fine.
_SHORT_DATA = re.compile(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)


def _truncated(snd: sf.SoundFile) -> bool:
    m = _SHORT_DATA.search(snd.extra_info)
    return m is not None and int(m.group(2)) < int(m.group(1)) < 0x7FFFFFFF


class Source:
    samples = 0

    async def check(self) -> None:
        """Fail before the response starts when the audio is unusable."""

    def chunks(self) -> AsyncIterator[np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class RawSource(Source):
    """Raw PCM decoded while the body streams in: memory is one chunk, whatever the size.

    Also the data chunk of a streamed 16-bit WAV: ``first`` holds the bytes already read
    past its header and ``limit`` the length the header declares (None: up to the end),
    so trailing chunks are not scored and a short body is reported as truncated.
    """

    def __init__(
        self,
        body: Body,
        encoding: str,
        handle: ServedModel,
        max_seconds: float,
        chunk_steps: int,
        *,
        first: bytes | None = None,
        limit: int | None = None,
        max_amplitude: float = 4.0,
        sample_rate: int | None = None,
    ) -> None:
        self.max_amplitude = max_amplitude
        spec = handle.spec
        # another encoding or rate: the WebSocket session's decoder, so the numbers match
        self.decoder = make_decoder(
            encoding, sample_rate, spec.sample_rate, spec.frame_samples, max_amplitude=max_amplitude
        )
        self.dtype = np.dtype({"pcm_s16le": "<i2", "pcm_f32le": "<f4"}.get(encoding, "u1"))
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
            raise RequestError("request body is empty", code="empty_body")
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
                    raise RequestError(
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
                    raise RequestError("audio exceeds max_upload_seconds", code="audio_too_long")
                yield audio
        if self.decoder is not None and not left:
            tail = self.decoder.flush()
            self.samples += tail.size
            yield tail
        if left:  # the header promised more than the body held
            raise RequestError(
                f"audio is truncated: header promises "
                f"{self.samples + left // size} samples, body holds {self.samples}",
                code="bad_audio",
            )

    def _decode(self, blob: bytes, at: int, nbytes: int) -> np.ndarray:
        if self.decoder is not None:  # model-rate float32 frames; samples count at that rate
            return self.decoder.feed(self.decoder.check(blob[at : at + nbytes]))
        data = np.frombuffer(blob, self.dtype, count=nbytes // self.dtype.itemsize, offset=at)
        audio = np.empty(data.size, np.float32)
        if self.dtype.kind == "i":
            np.multiply(data, np.float32(1 / 32768), out=audio, casting="unsafe")
        else:
            audio[:] = data
            problem = float_problem(audio, self.max_amplitude)
            if problem is not None:
                raise RequestError(problem[1], code=problem[0])
        return audio


# -- WAV: 16-bit PCM streams; anything else is spooled for libsndfile ---------------------------

_PCM_GUID_TAIL = bytes.fromhex("000000001000800000aa00389b71")  # KSDATAFORMAT_SUBTYPE_PCM
_WAV_HEAD_MAX = 64 * 1024  # a header longer than this is left to libsndfile
_FMT_MAX = 1024  # a fmt chunk is 16, 18 or 40 bytes; more is not a WAV we should buffer
_NEED_MORE = object()


class _WavHead(NamedTuple):
    channels: int
    rate: int
    data_offset: int
    data_bytes: int | None  # None: open-ended, up to the end of the body


def _parse_wav_head(buf: bytes | bytearray) -> object:
    """A ``_WavHead`` for a 16-bit PCM WAV, ``_NEED_MORE``, or None (not streamable).

    Reads at most ``_WAV_HEAD_MAX`` bytes of chunks before the data chunk, and refuses a
    fmt chunk above ``_FMT_MAX`` at once instead of waiting for its bytes."""
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
            if size > _FMT_MAX:
                raise RequestError(
                    f"WAV fmt chunk declares {size} bytes; at most {_FMT_MAX}", code="bad_audio"
                )
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


async def open_container(
    body: Body,
    handle: ServedModel,
    max_seconds: float,
    chunk_steps: int,
    *,
    max_amplitude: float = 4.0,
    sample_rate: int | None = None,
) -> Source:
    """Stream a 16-bit PCM WAV as it arrives; spool anything else for libsndfile.

    A file at another rate than the model's is resampled only when ``sample_rate`` (the
    query) names that rate: the client asked for it."""
    head = bytearray()
    parsed: object = _NEED_MORE
    while parsed is _NEED_MORE and len(head) <= _WAV_HEAD_MAX + 8:
        part = await body.next()
        if part is None:
            break
        head += part
        parsed = _parse_wav_head(head)
    if not isinstance(parsed, _WavHead):  # not one we stream: libsndfile decides
        return await _ContainerSource.open(
            body,
            bytes(head),
            handle,
            max_seconds,
            chunk_steps,
            max_amplitude=max_amplitude,
            asked=sample_rate,
        )
    spec, max_bytes = handle.spec, body.max_bytes
    _check_format(parsed.channels, parsed.rate, spec.sample_rate, sample_rate)
    if parsed.data_bytes is not None and parsed.data_offset + parsed.data_bytes > max_bytes:
        raise RequestError(
            f"the WAV header declares {parsed.data_offset + parsed.data_bytes} "
            f"bytes; max_upload_bytes={max_bytes}",
            code="upload_too_large",
        )
    if parsed.data_bytes is not None and parsed.data_bytes // 2 > max_seconds * parsed.rate:
        raise RequestError(
            f"audio of {parsed.data_bytes / 2 / parsed.rate:.0f}s exceeds max_upload_seconds={max_seconds:g}",
            code="audio_too_long",
        )
    return RawSource(
        body,
        "pcm_s16le",
        handle,
        max_seconds,
        chunk_steps,
        first=bytes(head[parsed.data_offset :]),
        limit=parsed.data_bytes,
        max_amplitude=max_amplitude,
        sample_rate=parsed.rate,
    )


def _check_format(channels: int, rate: int, model_rate: int, asked: int | None = None) -> None:
    if channels != 1:
        raise RequestError(f"audio has {channels} channels; send mono", code="bad_channels")
    if asked is not None and asked != rate:
        raise RequestError(f"sample_rate={asked} but the audio is {rate} Hz", code="bad_sample_rate")
    if rate != model_rate and (asked != rate or rate not in SAMPLE_RATES):
        raise RequestError(
            f"audio is {rate} Hz; the model needs {model_rate} Hz (Lookback never resamples silently: "
            f"add sample_rate={rate} to ask for it, if it is one of {RATES_TEXT})",
            code="bad_sample_rate",
        )


class _ContainerSource(Source):
    """WAV/FLAC/OGG through libsndfile, from a spooled temp file, block by block."""

    def __init__(
        self,
        path: str,
        info: sf.SoundFile,
        chunk: int,
        max_amplitude: float,
        decoder: WireDecoder | None = None,
    ) -> None:
        self.path = path
        self.file = info
        self.chunk = chunk
        self.max_amplitude = max_amplitude
        self.decoder = decoder  # a file at another rate (asked for): resampled as it is read
        self.read = 0  # file samples read

    @classmethod
    async def open(
        cls,
        body: Body,
        head: bytes,
        handle: ServedModel,
        max_seconds: float,
        chunk_steps: int,
        *,
        max_amplitude: float = 4.0,
        asked: int | None = None,
    ) -> _ContainerSource:
        """Spool ``head`` (the bytes already read) and the rest of ``body``, then open."""
        fd, path = tempfile.mkstemp(prefix="lookback-", suffix=".upload")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(head)
                while (part := await body.next()) is not None:
                    f.write(part)
            if body.received == 0:
                raise RequestError("request body is empty", code="empty_body")
            try:
                snd = sf.SoundFile(path)
            except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
                detail = str(exc).replace(path, "<upload>")  # never reveal server paths
                raise RequestError(f"body is not decodable audio: {detail}", code="bad_audio") from exc
            spec = handle.spec
            try:
                _check_format(snd.channels, snd.samplerate, spec.sample_rate, asked)
            except RequestError:
                snd.close()
                raise
            if _truncated(snd):
                snd.close()
                raise RequestError(
                    "audio is truncated: the WAV header promises more data than the body holds",
                    code="bad_audio",
                )
            if snd.frames > max_seconds * snd.samplerate:
                snd.close()
                raise RequestError(
                    f"audio of {snd.frames / snd.samplerate:.0f}s exceeds max_upload_seconds={max_seconds:g}",
                    code="audio_too_long",
                )
            dec = make_decoder(
                "pcm_f32le", snd.samplerate, spec.sample_rate, spec.frame_samples, max_amplitude=max_amplitude
            )
            return cls(path, snd, chunk_steps * spec.hop_samples, max_amplitude, dec)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise

    async def chunks(self) -> AsyncIterator[np.ndarray]:
        while True:
            try:
                block = await asyncio.to_thread(self.file.read, self.chunk, "float32")
            except (sf.LibsndfileError, RuntimeError) as exc:
                raise RequestError(f"audio is truncated or corrupt: {exc}", code="bad_audio") from exc
            if block.size == 0:
                break
            problem = float_problem(block, self.max_amplitude)  # float WAVs: one rule with raw f32
            if problem is not None:
                raise RequestError(problem[1], code=problem[0])
            self.read += block.size
            out = block if self.decoder is None else self.decoder.feed(block)
            self.samples += out.size  # at the model's rate
            yield out
            if block.size < self.chunk:
                break
        if self.read < self.file.frames:
            raise RequestError(
                f"audio is truncated: header promises {self.file.frames} samples, body holds {self.read}",
                code="bad_audio",
            )
        if self.decoder is not None:
            tail = self.decoder.flush()
            self.samples += tail.size
            yield tail

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.file.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
