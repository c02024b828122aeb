"""Clips mixed from the ``wake2data.py`` pools: noise, babble, room reverb, level, perturbation.

Everything a clip holds is drawn from the generator it is given, so the held-out clips are a
fixed function of (split, seed) and training never sees the same mix twice.
"""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path

import numpy as np
from wake2data import CLIP, HOP, SR

TARGET_BEFORE = 2  # hops before the phrase's end that are already positive (32 ms)
TARGET_AFTER = 19  # hops after it (300 ms): the detector fires when the phrase ends
IGNORE_BEFORE = 12  # hops before the positive run that are neither target (-1: no loss there)
IGNORE_AFTER = 31  # ... nor after it, up to the end of the detection window (+500 ms)


MINED_SHARE = 0.3  # after mining: the share of negatives drawn by their mined weight


class Pools:
    """The utterance and noise pools of one split, as written by ``wake2data.main`` (int16 kept)."""

    def __init__(self, folder: Path, split: str) -> None:
        with np.load(folder / f"{split}.npz") as z:
            arr = {k: z[k] for k in z.files}
        self.pos = [arr["pos_audio"][a:b] for a, b in pairwise(arr["pos_offsets"])]
        self.neg = [arr["neg_audio"][a:b] for a, b in pairwise(arr["neg_offsets"])]
        self.noise = arr["noise"]
        meta = json.loads((folder / f"{split}.json").read_text())
        self.pos_meta: list[dict] = meta["pos"]
        self.neg_meta: list[dict] = meta["neg"]
        self.noise_kind: list[str] = meta["noise"]
        self.test = split == "test"
        self.neg_weights: np.ndarray | None = None  # hard-negative mining: sampling weights

    def pick_neg(self, rng: np.random.Generator) -> int:
        if self.neg_weights is not None and rng.random() < MINED_SHARE:
            return int(rng.choice(len(self.neg), p=self.neg_weights))
        return int(rng.integers(len(self.neg)))


def f32(u: np.ndarray) -> np.ndarray:
    return u.astype(np.float32) / 32000.0


def perturb(rng: np.random.Generator, u: np.ndarray) -> np.ndarray:
    """Speed, pitch and formants together (resampling by 0.85-1.18), a spectral tilt and a
    random one-pole low-pass: more voices and microphones from the few synthetic ones."""
    f = rng.uniform(0.85, 1.18)
    u = np.interp(np.arange(0, u.size - 1, f), np.arange(u.size), u)
    a = rng.uniform(-0.6, 0.6)
    u = u + a * np.concatenate([[0.0], np.diff(u)])
    if rng.random() < 0.3:
        k = rng.uniform(0.2, 0.7)  # y[n] = (1-k) x[n] + k y[n-1], via a short truncated kernel
        u = np.convolve(u, (1 - k) * k ** np.arange(24))[: u.size]
    return u.astype(np.float32)


def room(rng: np.random.Generator) -> np.ndarray:
    """A synthetic room impulse response: direct path + an exponentially decaying noise tail
    (RT60 0.15-0.9 s, direct-to-reverberant ratio -3..12 dB, 2-15 ms pre-delay)."""
    rt60 = rng.uniform(0.15, 0.9)
    n = int(min(rt60, 0.7) * SR)
    t = np.arange(n) / SR
    tail = rng.standard_normal(n) * np.exp(-6.9 * t / rt60)
    tail = np.convolve(tail, [0.25, 0.5, 0.25])[:n]  # a little duller than white
    delay = int(rng.uniform(0.002, 0.015) * SR)
    tail[:delay] = 0.0
    drr = rng.uniform(-3, 12)
    tail *= np.sqrt(10 ** (-drr / 10) / (np.sum(tail**2) + 1e-12))
    tail[0] = 1.0
    return tail


def reverberate(x: np.ndarray, h: np.ndarray) -> np.ndarray:
    size = 1 << int(np.ceil(np.log2(x.size + h.size)))
    y = np.fft.irfft(np.fft.rfft(x, size) * np.fft.rfft(h, size), size)[: x.size]
    return y * (np.sqrt(np.mean(x**2)) / (np.sqrt(np.mean(y**2)) + 1e-12))


def babble(rng: np.random.Generator, pools: Pools, n: int) -> np.ndarray:
    out = np.zeros(n)
    for _ in range(int(rng.integers(3, 7))):
        v = f32(pools.neg[int(rng.integers(len(pools.neg)))])
        start = int(rng.integers(-v.size // 2, n))
        a, b = max(start, 0), min(start + v.size, n)
        if b > a:
            out[a:b] += v[a - start : b - start] * rng.uniform(0.3, 1.0)
    return out / (np.sqrt(np.mean(out**2)) + 1e-9)


def make_clip(
    rng: np.random.Generator,
    pools: Pools,
    positive: bool,
    n: int = CLIP,
    augment: bool = False,
    pos_index: int | None = None,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """audio float32 [n], target per 256-sample hop (1, 0, or -1 where no loss applies: just
    before and after the positive run, where the phrase may or may not be complete), metadata.

    Positive clips end the phrase 1.3 s or more into the clip, half of them with other speech
    before it; negatives hold 1-3 other utterances (near misses among them), noise alone or a
    floor. Then room reverb (40%), noise or babble (75%) at an SNR relative to the speech,
    a mic floor, a level step (30%) and a peak level of -40..-1 dBFS.
    """
    clean = np.zeros(n, np.float64)
    target = np.zeros(n // HOP, np.float32)
    meta: dict = {"end": None, "kind": "phrase" if positive else "silence", "noise": [], "snr": None}
    if positive:
        i = int(rng.integers(len(pools.pos))) if pos_index is None else pos_index
        m = pools.pos_meta[i]
        meta.update(engine=m["engine"], voice=m["voice"], stretch=m["stretch"])
        u = f32(pools.pos[i])
        u = (perturb(rng, u) if augment else u) * 10 ** (rng.uniform(-8, 0) / 20)
        end = int(rng.uniform(1.3, n / SR - 0.03) * SR)
        start = end - u.size
        if start < 0:
            u, start = u[-start:], 0
        clean[start:end] += u
        if rng.random() < 0.5 and start > 0.4 * SR:  # other speech before the phrase
            v = f32(pools.neg[pools.pick_neg(rng)])
            stop = start - int(rng.uniform(0.1, 0.5) * SR)
            if stop > 0:
                v = v[-stop:] * 10 ** (rng.uniform(-8, 0) / 20)
                clean[stop - v.size : stop] += v
        e = end // HOP
        target[max(0, e - IGNORE_BEFORE) : e + IGNORE_AFTER] = -1.0  # the word's last sounds: no loss
        target[max(0, e - TARGET_BEFORE) : e + TARGET_AFTER] = 1.0
        meta["end"] = end
    else:
        r = rng.random()
        if r < 0.8:
            for k in range(1 + int(rng.integers(0, 3))):
                i = pools.pick_neg(rng)
                v = f32(pools.neg[i])
                v = (perturb(rng, v) if augment else v) * 10 ** (rng.uniform(-8, 0) / 20)
                whole = pools.neg_meta[i]["kind"] == "near miss"  # cut, "okay lookback" may become the phrase
                if whole and v.size < n:
                    start = int(rng.uniform(0, n - v.size))
                elif v.size < n:  # anywhere, at most 30% of it cut off at either edge
                    start = int(rng.uniform(-0.3 * v.size, n - 0.7 * v.size))
                else:
                    start = -int(rng.uniform(0, v.size - n + 1))
                a, b = max(start, 0), min(start + v.size, n)
                if b > a:
                    clean[a:b] += v[a - start : b - start]
                if k == 0:
                    m = pools.neg_meta[i]
                    meta.update(kind=m["kind"], engine=m["engine"], voice=m["voice"], index=i)
        elif r < 0.93:
            meta["kind"] = "noise"
    if np.any(clean) and rng.random() < 0.4:
        clean = reverberate(clean, room(rng))
        meta["reverb"] = True
    speech_rms = float(np.sqrt(np.mean(clean[np.abs(clean) > 1e-4] ** 2))) if np.any(clean) else 0.05
    mix = clean.copy()
    if meta["kind"] == "noise" or rng.random() < 0.75:
        snr = float(rng.uniform(0, 30) if pools.test else rng.uniform(-3, 30))
        meta["snr"] = round(snr, 1)
        for j in range(1 + int(rng.random() < 0.3)):
            if rng.random() < 0.2:
                noise = babble(rng, pools, n)
                meta["noise"].append("babble")
            else:
                k = int(rng.integers(len(pools.noise)))
                a = int(rng.integers(0, pools.noise.shape[1]))  # a wrapped crop of the 3 s noise clip
                noise = np.take(pools.noise[k], np.arange(a, a + n), mode="wrap")
                meta["noise"].append(pools.noise_kind[k])
            mix = mix + noise * speech_rms * 10 ** (-(snr + 3 * j) / 20)
    mix = mix + rng.standard_normal(n) * 10 ** (rng.uniform(-100, -70) / 20)
    if rng.random() < 0.3:  # a level step, as where one recording follows another in a stream
        k = int(rng.integers(1, n))
        mix[:k] *= 10 ** (rng.uniform(-20, 0) / 20)
    peak = rng.uniform(-35, -1) if pools.test else rng.uniform(-40, -1)
    mix *= 10 ** (peak / 20) / (np.abs(mix).max() + 1e-12)
    audio = np.round(mix * 32768).clip(-32768, 32767) / 32768.0  # int16 resolution, as served
    return audio.astype(np.float32), target, meta
