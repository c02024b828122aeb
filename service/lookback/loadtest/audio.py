"""The clip a load run loops, cut once into pre-built messages shared by all sessions."""

from __future__ import annotations

import math
import random
from typing import TYPE_CHECKING

from lookback.loadtest.config import FRAME, MAX_AUDIO_SECONDS, SAMPLE_RATE, LoadtestError
from lookback.loadtest.rawclient import ws_frame

if TYPE_CHECKING:
    import numpy as np


def load_audio(path: str | None, seed: int = 0) -> np.ndarray:
    """int16 mono samples at 16 kHz, at most MAX_AUDIO_SECONDS (synthetic when no path)."""
    import numpy as np

    limit = int(MAX_AUDIO_SECONDS * SAMPLE_RATE)
    if path is None:
        rng = np.random.default_rng(seed)
        n = 10 * SAMPLE_RATE
        t = np.arange(n) / SAMPLE_RATE
        gate = (np.sin(2 * np.pi * 0.25 * t) > 0).astype(np.float64)  # 2 s on, 2 s off
        tone = np.sin(2 * np.pi * 220 * t) * 0.3 * gate
        x = tone + rng.standard_normal(n) * 0.02
        return (np.clip(x, -1, 1) * 32767).astype(np.int16)
    import soundfile as sf

    data, rate = sf.read(path, dtype="int16", always_2d=True, frames=limit)
    if rate != SAMPLE_RATE:
        raise LoadtestError(f"{path}: {rate} Hz; the load test streams {SAMPLE_RATE} Hz audio")
    if data.shape[1] != 1:
        raise LoadtestError(f"{path}: {data.shape[1]} channels; need mono")
    samples = data[:, 0].copy()
    if len(samples) < FRAME:
        raise LoadtestError(f"{path}: shorter than one frame")
    return samples


def build_messages(
    samples: np.ndarray, frames_per_message: int, seed: int, framed: bool = True
) -> list[bytes]:
    """The clip cut into messages of k whole frames (looping); masked frames when framed."""
    import numpy as np

    k = frames_per_message
    n_frames = len(samples) // FRAME
    reps = max(1, math.ceil(k / max(n_frames, 1)))
    x = np.tile(samples[: n_frames * FRAME], reps)
    n_msgs = max(1, (len(x) // FRAME) // k)
    raw = [x[i * k * FRAME : (i + 1) * k * FRAME].astype("<i2").tobytes() for i in range(n_msgs)]
    if not framed:
        return raw
    rng = random.Random(seed)
    return [ws_frame(0x2, m, rng.randbytes(4)) for m in raw]


# ------------------------------------------------------------------------------------------
# One process's sessions
