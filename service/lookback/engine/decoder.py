"""Wire audio in another encoding or rate, turned into whole frames at the model's rate.

A session whose client sends the model's rate as ``pcm_s16le``/``pcm_f32le`` needs none of
this (its bytes go to the model as they are). Any other form (G.711, another rate) goes
through a ``WireDecoder`` the session owns: decode to float32, resample when the rates
differ, and hold back the samples that do not yet make a whole model frame, so the
session downstream sees exactly what a ``pcm_f32le`` client at the model's rate would
have sent. A message is then any whole number of samples of its encoding (one 20 ms
G.711 packet is 160 samples); steps are formed after resampling. The decoder's state
(resampler history, held-back samples, samples received) is part of the session's
snapshot, and its output does not depend on how the audio was cut into messages.
"""

from __future__ import annotations

import base64
import struct
from typing import Any

import numpy as np

from lookback.engine.pcm import BYTES_PER_SAMPLE, RATES_TEXT, SAMPLE_RATES, decode, float_problem
from lookback.engine.resample import Resampler
from lookback.errors import BadAudio, SnapshotError

_HEAD = struct.Struct("<qI")  # samples received, samples held back


def needs_decoder(encoding: str, sample_rate: int | None, model_rate: int) -> bool:
    """True unless the client sends PCM at the model's rate (no ``sample_rate``: the model's)."""
    return encoding not in ("pcm_s16le", "pcm_f32le") or (sample_rate or model_rate) != model_rate


def check_rate(sample_rate: int) -> None:
    if sample_rate not in SAMPLE_RATES:
        raise BadAudio(
            f"sample_rate {sample_rate} is not supported; use one of {RATES_TEXT}", code="bad_sample_rate"
        )


class WireDecoder:
    """``encoding`` at ``sample_rate`` -> float32 frames of ``frame_samples`` at ``model_rate``."""

    def __init__(
        self,
        encoding: str,
        sample_rate: int,
        model_rate: int,
        frame_samples: int,
        *,
        max_amplitude: float = 4.0,
    ) -> None:
        if encoding not in BYTES_PER_SAMPLE:
            raise BadAudio(f"unknown encoding {encoding[:40]!r}", code="bad_encoding")
        if sample_rate != model_rate:
            check_rate(sample_rate)
        self.encoding = encoding
        self.sample_rate = sample_rate
        self.model_rate = model_rate
        self.sample_bytes = BYTES_PER_SAMPLE[encoding]
        self.frame = frame_samples
        self.max_amplitude = max_amplitude
        self.resampler = Resampler(sample_rate, model_rate) if sample_rate != model_rate else None
        self.received = 0  # wire samples taken (all of them are in the snapshot's state)
        self._held = np.zeros(0, np.float32)  # model-rate samples short of a whole frame

    def check(self, data: bytes) -> np.ndarray:
        """The message's samples as float32, or BadAudio (nothing changes: refused whole)."""
        if len(data) % self.sample_bytes:
            raise BadAudio(
                f"message of {len(data)} bytes is not a whole number of {self.encoding} samples "
                f"({self.sample_bytes} bytes each)",
                code="partial_sample",
            )
        if self.encoding == "pcm_f32le":
            audio = np.frombuffer(data, "<f4").astype(np.float32)
            problem = float_problem(audio, self.max_amplitude)
            if problem is not None:
                raise BadAudio(problem[1], code=problem[0])
            return audio
        return decode(data, self.encoding)

    def output_samples(self, nbytes: int) -> int:
        """Model-rate samples (whole frames) that ``nbytes`` more wire bytes would release."""
        n = nbytes // self.sample_bytes
        made = n if self.resampler is None else self.resampler.available(n)
        total = self._held.size + made
        return total - total % self.frame

    def feed(self, audio: np.ndarray) -> np.ndarray:
        """Checked samples in, whole model frames out (float32, possibly none)."""
        self.received += audio.size
        out = audio if self.resampler is None else self.resampler.feed(audio)
        return self._frames(out, pad=False)

    def flush(self) -> np.ndarray:
        """End of stream (or ``flush``): the rest, zero-padded to a whole frame."""
        out = np.zeros(0, np.float32) if self.resampler is None else self.resampler.flush()
        return self._frames(out, pad=True)

    def _frames(self, out: np.ndarray, *, pad: bool) -> np.ndarray:
        if self._held.size:
            out = np.concatenate([self._held, out])
        whole = out.size - out.size % self.frame
        if pad and whole != out.size:
            whole += self.frame
            out = np.concatenate([out, np.zeros(whole - out.size, np.float32)])
        self._held = out[whole:].copy()
        return out[:whole]

    def wire_bytes(self, model_samples: int) -> int:
        """Wire bytes holding about ``model_samples`` samples' duration (message-size bounds)."""
        return max(1, model_samples * self.sample_rate // self.model_rate) * self.sample_bytes

    # -- state ---------------------------------------------------------------------------
    def get_state(self) -> dict[str, Any]:
        """What a snapshot keeps (JSON-ready): the form of the wire audio and where it stands."""
        held = np.ascontiguousarray(self._held, "<f4").tobytes()
        blob = _HEAD.pack(self.received, self._held.size) + held
        if self.resampler is not None:
            blob += self.resampler.get_state()
        return {
            "encoding": self.encoding,
            "sample_rate": self.sample_rate,
            "received": self.received,
            "state": base64.b64encode(blob).decode("ascii"),
        }

    @classmethod
    def from_state(cls, state: Any, model_rate: int, frame_samples: int, **kw: Any) -> WireDecoder:
        """The decoder ``get_state`` described; SnapshotError when it is not a valid one."""
        try:
            encoding, rate, blob = state["encoding"], state["sample_rate"], base64.b64decode(state["state"])
            if not isinstance(encoding, str) or not isinstance(rate, int) or isinstance(rate, bool):
                raise ValueError("decoder encoding or rate of the wrong type")
            dec = cls(encoding, rate, model_rate, frame_samples, **kw)
            received, held = _HEAD.unpack_from(blob)
            end = _HEAD.size + 4 * held
            if received != state["received"] or held >= frame_samples or len(blob) < end:
                raise ValueError("decoder counters out of range")
            dec.received = received
            dec._held = np.frombuffer(blob, "<f4", count=held, offset=_HEAD.size).astype(np.float32)
            if not np.isfinite(dec._held).all():
                raise ValueError("decoder holds non-finite samples")
            if dec.resampler is not None:
                dec.resampler.set_state(blob[end:])
                if dec.resampler.received != received:
                    raise ValueError("decoder and resampler disagree on the samples received")
            elif len(blob) != end:
                raise ValueError("decoder state has trailing bytes")
        except (KeyError, TypeError, ValueError, struct.error, BadAudio) as exc:
            raise SnapshotError(f"snapshot decoder state is invalid: {exc}") from exc
        return dec


def make_decoder(
    encoding: str, sample_rate: int | None, model_rate: int, frame_samples: int, *, max_amplitude: float = 4.0
) -> WireDecoder | None:
    """The decoder a session with this wire form needs, or None (PCM at the model's rate)."""
    if not needs_decoder(encoding, sample_rate, model_rate):
        return None
    rate = sample_rate or model_rate
    return WireDecoder(encoding, rate, model_rate, frame_samples, max_amplitude=max_amplitude)
