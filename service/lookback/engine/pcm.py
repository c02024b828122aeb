"""PCM in one place: wire encodings, the non-finite and range checks, scaling to the model's
input and its ``BT``/``B1T`` layout.

G.711 (``mulaw``, ``alaw``: 8 bits a sample, telephony) decodes through a 256-entry table
to the 16-bit value ITU-T G.711 assigns each code, then like ``pcm_s16le``.

The session, the batched step, offline scoring and the REST decoder all go through
here, so a sample means the same number on every path: int16 ``x`` becomes the float32
``x * (1/32768)`` (exact: a power of two), float32 arrives already in ``[-1, 1)``, and a
``raw`` model gets the int16 value as a float (float32 input times 32768, exact too).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from lookback.errors import BadAudio

Encoding = Literal["pcm_s16le", "pcm_f32le", "mulaw", "alaw"]
BYTES_PER_SAMPLE: dict[str, int] = {"pcm_s16le": 2, "pcm_f32le": 4, "mulaw": 1, "alaw": 1}
ENCODINGS_TEXT = "pcm_s16le, pcm_f32le, mulaw or alaw"
# sample rates a client may send; any other than the model's is resampled (engine/resample.py)
SAMPLE_RATES = (8000, 16000, 22050, 24000, 32000, 44100, 48000)
RATES_TEXT = ", ".join(str(r) for r in SAMPLE_RATES)
S16 = np.dtype("<i2")
F32 = np.dtype("<f4")
_S16_UNIT = np.float32(1.0 / 32768.0)


def _mulaw_table() -> np.ndarray:
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    exponent, mantissa = (u >> 4) & 7, u & 0x0F
    magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84
    return np.where(u & 0x80, -magnitude, magnitude).astype(np.int16)


def _alaw_table() -> np.ndarray:
    a = np.arange(256, dtype=np.int32) ^ 0x55
    exponent, mantissa = (a >> 4) & 7, a & 0x0F
    magnitude = np.where(
        exponent == 0, (mantissa << 4) + 8, ((mantissa << 4) + 0x108) << np.maximum(exponent - 1, 0)
    )
    return np.where(a & 0x80, magnitude, -magnitude).astype(np.int16)


G711: dict[str, np.ndarray] = {"mulaw": _mulaw_table(), "alaw": _alaw_table()}
# float32 samples of each code (value / 32768, exact)
_G711_F32 = {name: table.astype(np.float32) * np.float32(1.0 / 32768.0) for name, table in G711.items()}
# the code nearest zero (mulaw 0, alaw +8/32768): a gap filled with byte 0 would be full scale
SILENCE_BYTE = {"pcm_s16le": 0, "pcm_f32le": 0, "mulaw": 0xFF, "alaw": 0xD5}


def _mulaw_encode_table() -> np.ndarray:
    """The µ-law code of every int16 (index: the value as uint16), as ITU-T G.711 encodes."""
    x = np.arange(65536, dtype=np.int32)
    x = np.where(x >= 32768, x - 65536, x) >> 2  # 14 bits
    mask = np.where(x < 0, 0x7F, 0xFF)
    mag = np.minimum(np.abs(x), 8159) + 33
    seg = np.searchsorted(np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF]), mag)
    code = np.where(seg >= 8, 0x7F, (seg << 4) | ((mag >> (seg + 1)) & 0x0F))
    return (code ^ mask).astype(np.uint8)


def _alaw_encode_table() -> np.ndarray:
    """The A-law code of every int16 (index: the value as uint16), as ITU-T G.711 encodes."""
    x = np.arange(65536, dtype=np.int32)
    x = np.where(x >= 32768, x - 65536, x) >> 3  # 13 bits
    mask = np.where(x >= 0, 0xD5, 0x55)
    mag = np.where(x >= 0, x, -x - 1)
    seg = np.searchsorted(np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF]), mag)
    code = np.where(seg >= 8, 0x7F, (seg << 4) | ((mag >> np.where(seg < 2, 1, seg)) & 0x0F))
    return (code ^ mask).astype(np.uint8)


_G711_ENCODE: dict[str, np.ndarray] = {}


def encode_g711(samples: np.ndarray, encoding: str) -> bytes:
    """int16 samples -> G.711 bytes (``mulaw`` or ``alaw``): what a phone line would carry.

    The encoder producers use (the client, the load generator); the server only decodes.
    """
    if encoding not in _G711_ENCODE:
        _G711_ENCODE[encoding] = {"mulaw": _mulaw_encode_table, "alaw": _alaw_encode_table}[encoding]()
    return _G711_ENCODE[encoding][np.asarray(samples, np.int16).view(np.uint16)].tobytes()


def silence(encoding: str, samples: int) -> bytes:
    """``samples`` samples of silence in ``encoding`` (G.711's zero code is not byte 0)."""
    return bytes([SILENCE_BYTE[encoding]]) * (samples * BYTES_PER_SAMPLE[encoding])


def check_encoding(encoding: str) -> None:
    if encoding not in BYTES_PER_SAMPLE:
        raise BadAudio(f"unknown encoding {encoding!r}", code="bad_encoding")


def refuse_non_finite(samples: np.ndarray, what: str) -> None:
    """Refuse float audio holding NaN or Inf: one such sample would poison a state."""
    if not np.isfinite(samples).all():
        raise BadAudio(f"pcm_f32le {what} holds NaN or Inf samples", code="non_finite_audio")


def float_problem(audio: np.ndarray, max_amplitude: float) -> tuple[str, str] | None:
    """(code, message) when float32 ``audio`` must be refused, else None. One pass.

    The one rule for float audio on every ingestion path (WebSocket, REST, broker sources):
    full scale is 1.0, samples up to ``max_amplitude`` (``max_float_amplitude``, default 4.0:
    12 dB of headroom) are taken as they are, anything larger and NaN/Inf is refused whole
    before it reaches a model, since huge finite values drive a recurrent state to Inf, then
    NaN, which would poison every later step.
    """
    if audio.size == 0:
        return None
    peak = float(np.max(np.abs(audio)))  # NaN anywhere makes the peak NaN
    if peak <= max_amplitude:
        return None
    if not np.isfinite(peak):
        return "non_finite_audio", "float audio holds NaN or Inf samples"
    return (
        "audio_out_of_range",
        f"float sample of magnitude {peak:.3g} outside [-{max_amplitude:g}, {max_amplitude:g}] "
        "(full scale is 1.0)",
    )


def decode(data: bytes, encoding: str, *, offset: int = 0, count: int = -1) -> np.ndarray:
    """Float32 samples in ``[-1, 1)`` from PCM bytes (checked finite for pcm_f32le)."""
    table = _G711_F32.get(encoding)
    if table is not None:
        return table[np.frombuffer(data, np.uint8, count=count, offset=offset)]
    if encoding == "pcm_s16le":
        pcm = np.frombuffer(data, S16, count=count, offset=offset)
        audio = np.empty(pcm.size, np.float32)
        np.multiply(pcm, _S16_UNIT, out=audio, casting="unsafe")
        return audio
    audio = np.frombuffer(data, F32, count=count, offset=offset).astype(np.float32)
    refuse_non_finite(audio, "body")
    return audio


class ModelInput:
    """Writes hops into the model's audio input: scale (``int16/32768`` or ``raw``) and layout."""

    def __init__(self, scale: str, layout: str) -> None:
        raw = scale == "raw"
        self._s16_scale = np.float32(1.0) if raw else _S16_UNIT
        self._f32_scale = np.float32(32768.0) if raw else None
        self._b1t = layout == "B1T"

    def put_s16(self, dest: np.ndarray, pcm: bytes) -> None:
        """``dest`` (float32, any shape of ``len(pcm) // 2`` samples) <- int16 PCM bytes."""
        np.multiply(np.frombuffer(pcm, S16).reshape(dest.shape), self._s16_scale, out=dest, casting="unsafe")

    def put_f32(self, dest: np.ndarray, samples: np.ndarray) -> None:
        """``dest`` <- float32 samples in ``[-1, 1)``."""
        if self._f32_scale is None:
            dest[...] = samples.reshape(dest.shape)
        else:
            np.multiply(samples.reshape(dest.shape), self._f32_scale, out=dest)

    def scale(self, samples: np.ndarray) -> np.ndarray:
        """Float32 samples in ``[-1, 1)`` as the model wants them (a view when unscaled)."""
        return samples if self._f32_scale is None else samples * self._f32_scale

    def layout(self, windows: np.ndarray) -> np.ndarray:
        """``[B, T]`` windows in the graph's layout (``[B, 1, T]`` for ``B1T``)."""
        return windows[:, None, :] if self._b1t else windows
