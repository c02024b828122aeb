"""The clip a load run loops, cut once into pre-built messages shared by all sessions."""

from __future__ import annotations

import math
import random
from typing import TYPE_CHECKING

from lookback.loadtest.config import FRAME, MAX_AUDIO_SECONDS, SAMPLE_RATE, LoadtestError
from lookback.loadtest.rawclient import ws_frame

if TYPE_CHECKING:
    import numpy as np


def load_audio(path: str | None, seed: int = 0, rate: int = SAMPLE_RATE) -> np.ndarray:
    """int16 mono samples at ``rate``, at most MAX_AUDIO_SECONDS (synthetic when no path).

    A file must be at ``rate`` already: the load test streams what producers send and
    never resamples on the client.
    """
    import numpy as np

    limit = int(MAX_AUDIO_SECONDS * rate)
    if path is None:
        rng = np.random.default_rng(seed)
        n = 10 * rate
        t = np.arange(n) / rate
        gate = (np.sin(2 * np.pi * 0.25 * t) > 0).astype(np.float64)  # 2 s on, 2 s off
        tone = np.sin(2 * np.pi * 220 * t) * 0.3 * gate
        x = tone + rng.standard_normal(n) * 0.02
        return (np.clip(x, -1, 1) * 32767).astype(np.int16)
    import soundfile as sf

    data, file_rate = sf.read(path, dtype="int16", always_2d=True, frames=limit)
    if file_rate != rate:
        hint = "" if rate != SAMPLE_RATE else f" (pass --sample-rate {file_rate} to stream it as it is)"
        raise LoadtestError(f"{path}: {file_rate} Hz; this run streams {rate} Hz audio{hint}")
    if data.shape[1] != 1:
        raise LoadtestError(f"{path}: {data.shape[1]} channels; need mono")
    samples = data[:, 0].copy()
    if len(samples) < FRAME:
        raise LoadtestError(f"{path}: shorter than one frame")
    return samples


def encode(samples: np.ndarray, encoding: str) -> bytes:
    """int16 samples as wire bytes: PCM (float32 = int16 / 32768, exact) or G.711."""
    import numpy as np

    if encoding == "pcm_s16le":
        return samples.astype("<i2").tobytes()
    if encoding == "pcm_f32le":
        return (samples.astype(np.float32) * np.float32(1 / 32768)).astype("<f4").tobytes()
    from lookback.engine.pcm import encode_g711

    return encode_g711(samples, encoding)


def build_messages(
    samples: np.ndarray,
    frames_per_message: int,
    seed: int,
    framed: bool = True,
    *,
    encoding: str = "pcm_s16le",
    message_samples: int | None = None,
) -> list[bytes]:
    """The clip cut into messages (looping); masked frames when framed.

    Messages hold ``k`` whole frames, or ``message_samples`` samples (G.711, another rate:
    any whole number of samples) in ``encoding``. A clip of whole frames loops without a
    partial frame; another form loops the whole clip.
    """
    import numpy as np

    per = message_samples or frames_per_message * FRAME
    base = samples if message_samples else samples[: len(samples) // FRAME * FRAME]
    reps = max(1, math.ceil(per / max(len(base), 1)))
    x = np.tile(base, reps)
    n_msgs = max(1, len(x) // per)
    raw = [encode(x[i * per : (i + 1) * per], encoding) for i in range(n_msgs)]
    return frame_messages(raw, seed) if framed else raw


def frame_messages(raw: list[bytes], seed: int) -> list[bytes]:
    """``raw`` as masked binary WebSocket frames, ready to write (the raw client's form)."""
    rng = random.Random(seed)
    return [ws_frame(0x2, m, rng.randbytes(4)) for m in raw]


# ------------------------------------------------------------------------------------------
# One process's sessions
