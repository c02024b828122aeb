"""Wire audio at every rate and encoding, built from the 16 kHz fixture clips."""

from __future__ import annotations

import numpy as np

from lookback.engine.pcm import G711

RATES = (8000, 16000, 22050, 24000, 32000, 44100, 48000)


def at_rate(clip: np.ndarray, rate: int) -> np.ndarray:
    """The int16 ``clip`` (16 kHz) as float32 at ``rate`` (linear interpolation: any test input)."""
    x = clip.astype(np.float64) / 32768.0
    n = int(x.size * rate // 16000)
    t = np.arange(n) * (16000 / rate)
    return np.interp(t, np.arange(x.size), x).astype(np.float32)


def nearest_code(table: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The G.711 code whose value is nearest each sample: an encoder that is not ours to test."""
    order = np.argsort(table)
    values = table[order].astype(np.float64) / 32768.0
    idx = np.clip(np.searchsorted(values, x), 1, values.size - 1)
    lower = np.abs(x - values[idx - 1]) <= np.abs(x - values[idx])
    return order[np.where(lower, idx - 1, idx)].astype(np.uint8)


def encode(x: np.ndarray, encoding: str) -> bytes:
    """Float32 samples as wire bytes in ``encoding``."""
    if encoding == "pcm_f32le":
        return x.astype("<f4").tobytes()
    if encoding == "pcm_s16le":
        return np.clip(np.round(x * 32768.0), -32768, 32767).astype("<i2").tobytes()
    return nearest_code(G711[encoding], x).tobytes()


def cuts(n_bytes: int, sample_bytes: int, sizes: list[int]) -> list[int]:
    """Message lengths in bytes, ``sizes`` samples each (cycled), covering ``n_bytes``."""
    out, pos, i = [], 0, 0
    while pos < n_bytes:
        k = min(sizes[i % len(sizes)] * sample_bytes, n_bytes - pos)
        out.append(k)
        pos += k
        i += 1
    return out
