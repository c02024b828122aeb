"""Synthetic wake-phrase data: "hey lookback" in many voices against other words, noise, silence.

espeak-ng (via ``../datagen.py``'s ``synth``) speaks the phrase in English accents and a few
non-native ones, with every voice variant, speed 100-220 wpm, pitch 5-95 and word gaps; the
negatives are near misses ("hey look", "look back", "hey Luke", "playback", ...), random
English sentences and pseudo-words in many languages. Utterances are synthesised once into
pools; clips are mixed from the pools on the fly (``make_clip``): training never sees the
same mix twice, and the held-out clips are a fixed function of their index.

Splits: ``train`` and ``val`` share voices (different seeds); ``test`` uses other voice
variants, other accents (en-gb-scotland, en-gb-x-gbcwmd, nl, pl) and two noise kinds
training never had (wind, DTMF).

    python wakedata.py --out ../data/wake
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np


def _vad_datagen() -> object:
    """The default model's datagen (espeak-ng synthesis, voices, noise makers), reused."""
    path = Path(__file__).resolve().parents[1] / "datagen.py"
    spec = importlib.util.spec_from_file_location("vad_datagen", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["vad_datagen"] = mod
    spec.loader.exec_module(mod)
    return mod


_dg = _vad_datagen()
TEST_NOISES, TRAIN_NOISES = _dg.TEST_NOISES, _dg.TRAIN_NOISES  # type: ignore[attr-defined]
TEST_VARIANTS, TRAIN_VARIANTS = _dg.TEST_VARIANTS, _dg.TRAIN_VARIANTS  # type: ignore[attr-defined]
_unit, random_text, synth = _dg._unit, _dg.random_text, _dg.synth  # type: ignore[attr-defined]

SR = 16000
HOP = 256  # the wake model's hop: front end 128 x stride 2
CLIP = 188 * 256  # training / test clip length: 3 s in whole hops
PHRASES = ["hey lookback", "hey look back", "hey, lookback", "hey lookback!"]
CONFUSABLES = [
    "hey look",
    "look back",
    "lookback",
    "hey Luke",
    "hello back",
    "hey lucky",
    "hey buddy",
    "okay look",
    "hey black",
    "playback",
    "feedback",
    "hey lock",
    "hey book",
    "hey look at that",
    "take a look back",
    "hey",
    "look",
    "hey Lou",
    "a lookout",
    "hey cookbook",
    "hey notebook",
    "lucky break",
    "play it back",
    "hey, hold back",
    "hey, look, back off",
    "hey lock box",
]
WORDS = [
    "the",
    "weather",
    "is",
    "nice",
    "today",
    "please",
    "call",
    "me",
    "tomorrow",
    "open",
    "door",
    "what",
    "time",
    "it",
    "turn",
    "on",
    "lights",
    "music",
    "kitchen",
    "coffee",
    "meeting",
    "number",
    "seven",
    "hello",
    "thanks",
    "good",
    "morning",
    "where",
    "are",
    "you",
    "going",
    "back",
    "look",
    "book",
    "lock",
    "lucky",
    "black",
    "table",
    "window",
    "water",
    "play",
    "stop",
    "next",
    "song",
    "volume",
    "up",
    "down",
    "set",
    "timer",
    "minutes",
    "remind",
    "buy",
    "milk",
    "bread",
    "station",
    "train",
    "late",
    "early",
    "office",
    "home",
    "garden",
    "dog",
    "cat",
    "run",
    "walk",
    "talk",
    "listen",
    "hear",
    "okay",
    "yes",
    "no",
    "maybe",
    "later",
    "again",
    "never",
    "always",
]
ACCENTS = {
    "train": ["en-us", "en-gb", "en-029", "en-gb-x-rp", "en-gb-x-gbclan"],
    "test": ["en-gb-scotland", "en-gb-x-gbcwmd"],
}
NON_NATIVE = {"train": ["de", "fr-fr", "es", "it", "pt", "sv", "da"], "test": ["nl", "pl"]}
OTHER_LANGS = ["de", "fr-fr", "es", "it", "pt", "cs", "fi", "ro", "sk", "sv", "id", "ru", "bg"]
SEEDS = {"train": 11, "val": 12, "test": 13}
POOL = {"train": (700, 1100), "val": (100, 200), "test": (200, 500)}


def voice(rng: np.random.Generator, split: str) -> tuple[str, int, int, int]:
    group = "test" if split == "test" else "train"
    langs = NON_NATIVE[group] if rng.random() < 0.15 else ACCENTS[group]
    variants = TEST_VARIANTS if group == "test" else TRAIN_VARIANTS
    lang = langs[int(rng.integers(len(langs)))]
    var = variants[int(rng.integers(len(variants)))]
    lo, hi = (95, 230) if group == "test" else (100, 220)
    return (
        lang + (f"+{var}" if var else ""),
        int(rng.integers(lo, hi)),
        int(rng.integers(5, 95)),
        int(rng.integers(0, 6)),
    )


def english_sentence(rng: np.random.Generator) -> str:
    while True:
        words = [WORDS[int(i)] for i in rng.integers(0, len(WORDS), int(rng.integers(2, 9)))]
        text = " ".join(words)
        if "hey look" not in text:
            return text


def utterance(split: str, kind: str, index: int) -> tuple[np.ndarray, dict]:
    """One pooled utterance (float32, trimmed), deterministic in (split, kind, index)."""
    rng = np.random.default_rng([SEEDS[split], 0 if kind == "pos" else 1, index])
    for _ in range(5):
        name, speed, pitch, gap = voice(rng, split)
        if kind == "pos":
            text, sub = PHRASES[int(rng.integers(len(PHRASES)))], "phrase"
        else:
            r = rng.random()
            if r < 0.4:
                text, sub = CONFUSABLES[int(rng.integers(len(CONFUSABLES)))], "near miss"
            elif r < 0.75:
                text, sub = english_sentence(rng), "english"
            else:
                lang = OTHER_LANGS[int(rng.integers(len(OTHER_LANGS)))]
                script = "cyrillic" if lang in ("ru", "bg") else "latin"
                text, sub = random_text(rng, script), "other language"
                name = lang + name[name.index("+") :] if "+" in name else lang
        u = synth(name, text, speed, pitch, gap)
        if 0.15 * SR < u.size < 1.8 * SR or (kind == "neg" and u.size >= 0.15 * SR):
            u = u[: int(1.9 * SR)]
            return (u / (np.abs(u).max() + 1e-9)).astype(np.float32), {
                "voice": name,
                "text": text,
                "kind": sub,
            }
    return np.zeros(0, np.float32), {"voice": "", "text": "", "kind": "none"}


def _job(args: tuple[str, str, int]) -> tuple[np.ndarray, dict]:
    return utterance(*args)


def noise_pool(split: str, count: int, seconds: float = 3.0) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng([SEEDS[split], 2])
    kinds = TEST_NOISES if split == "test" else TRAIN_NOISES
    names = sorted(kinds)
    out, labels = [], []
    for i in range(count):
        k = names[i % len(names)]
        out.append(_unit(kinds[k](rng, int(seconds * SR))))
        labels.append(k)
    return np.stack(out).astype(np.float32), labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "data" / "wake")
    ap.add_argument("--scale", type=float, default=1.0, help="pool sizes x this")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    summary = {}
    with ProcessPoolExecutor(args.workers) as pool:
        for split, (n_pos, n_neg) in POOL.items():
            arrays: dict[str, np.ndarray] = {}
            meta: dict[str, list] = {}
            for kind, n in (("pos", int(n_pos * args.scale)), ("neg", int(n_neg * args.scale))):
                res = [r for r in pool.map(_job, [(split, kind, i) for i in range(n)]) if r[0].size]
                sizes = np.array([u.size for u, _ in res])
                arrays[f"{kind}_audio"] = np.concatenate([u for u, _ in res])
                arrays[f"{kind}_offsets"] = np.concatenate([[0], np.cumsum(sizes)])
                meta[kind] = [m for _, m in res]
            noise, kinds = noise_pool(split, 120 if split == "train" else 40)
            arrays["noise"] = noise
            np.savez(args.out / f"{split}.npz", **arrays)
            (args.out / f"{split}.json").write_text(json.dumps({**meta, "noise": kinds}, indent=1))
            summary[split] = {"pos": len(meta["pos"]), "neg": len(meta["neg"]), "noise": len(kinds)}
    print(f"wake datagen: {summary} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()


# --- mixing clips from the pools ---------------------------------------------------------------


class Pools:
    """The utterance and noise pools of one split, as written by ``main``."""

    def __init__(self, folder: Path, split: str) -> None:
        with np.load(folder / f"{split}.npz") as z:
            arr = {k: z[k] for k in z.files}
        self.pos = [
            arr["pos_audio"][a:b]
            for a, b in zip(arr["pos_offsets"][:-1], arr["pos_offsets"][1:], strict=True)
        ]
        self.neg = [
            arr["neg_audio"][a:b]
            for a, b in zip(arr["neg_offsets"][:-1], arr["neg_offsets"][1:], strict=True)
        ]
        self.noise = arr["noise"]
        meta = json.loads((folder / f"{split}.json").read_text())
        self.neg_kind = [m["kind"] for m in meta["neg"]]
        self.noise_kind = meta["noise"]
        self.test = split == "test"


TARGET_BEFORE = 2  # hops before the phrase's end that are already positive (32 ms)
TARGET_AFTER = 19  # hops after it (300 ms): the detector fires when the phrase ends


def perturb(rng: np.random.Generator, u: np.ndarray) -> np.ndarray:
    """Training-only voice variety: speed and pitch together (resampling by 0.88-1.12) and a
    first-order spectral tilt, so the few synthetic voices stand for more real ones."""
    f = rng.uniform(0.88, 1.12)
    u = np.interp(np.arange(0, u.size - 1, f), np.arange(u.size), u)
    a = rng.uniform(-0.6, 0.6)
    return (u + a * np.concatenate([[0.0], np.diff(u)])).astype(np.float32)


def make_clip(
    rng: np.random.Generator, pools: Pools, positive: bool, n: int = CLIP, augment: bool = False
) -> tuple[np.ndarray, np.ndarray, dict]:
    """audio float32 [n], target per 256-sample hop, metadata (phrase end sample or None).

    Positive clips end the phrase after 1.3 s or more (a slow "hey lookback" takes 1.4 s),
    half of them with other speech before it; negatives hold 1-3 other utterances, noise or
    a floor; 30% of clips get a level step, as at the boundary of two recordings.
    """
    clean = np.zeros(n, np.float64)
    target = np.zeros(n // HOP, np.float32)
    meta: dict = {"end": None, "kind": "phrase" if positive else "silence", "noise": []}
    if positive:
        u = pools.pos[int(rng.integers(len(pools.pos)))]
        u = (perturb(rng, u) if augment else u) * 10 ** (rng.uniform(-8, 0) / 20)
        end = int(rng.uniform(1.3, n / SR - 0.03) * SR)
        start = end - u.size
        if start < 0:
            u, start = u[-start:], 0
        clean[start:end] += u
        if rng.random() < 0.5 and start > 0.4 * SR:  # other speech before the phrase
            v = pools.neg[int(rng.integers(len(pools.neg)))]
            stop = start - int(rng.uniform(0.1, 0.5) * SR)
            if stop > 0:
                v = v[-stop:] * 10 ** (rng.uniform(-8, 0) / 20)
                clean[stop - v.size : stop] += v
        e = end // HOP
        target[max(0, e - TARGET_BEFORE) : e + TARGET_AFTER] = 1.0
        meta["end"] = end
    else:
        r = rng.random()
        if r < 0.75:  # one or two other utterances
            for _ in range(1 + int(rng.integers(0, 3))):
                i = int(rng.integers(len(pools.neg)))
                v = (perturb(rng, pools.neg[i]) if augment else pools.neg[i]) * 10 ** (
                    rng.uniform(-8, 0) / 20
                )
                if v.size < n:  # anywhere, at most 30% of it cut off at either edge
                    start = int(rng.uniform(-0.3 * v.size, n - 0.7 * v.size))
                else:
                    start = -int(rng.uniform(0, v.size - n + 1))
                a, b = max(start, 0), min(start + v.size, n)
                if b > a:
                    clean[a:b] += v[a - start : b - start]
                meta["kind"] = pools.neg_kind[i]
        elif r < 0.9:
            meta["kind"] = "noise"
    speech_rms = float(np.sqrt(np.mean(clean[clean != 0] ** 2))) if np.any(clean) else 0.05
    mix = clean
    if meta["kind"] == "noise" or rng.random() < 0.75:
        for _ in range(1 + int(rng.random() < 0.3)):
            k = int(rng.integers(len(pools.noise)))
            a = int(rng.integers(0, pools.noise.shape[1]))  # a wrapped crop of the 3 s noise clip
            snr = rng.uniform(0, 30) if pools.test else rng.uniform(-3, 30)
            mix = mix + np.take(pools.noise[k], np.arange(a, a + n), mode="wrap") * speech_rms * 10 ** (
                -snr / 20
            )
            meta["noise"].append(pools.noise_kind[k])
    mix = mix + rng.standard_normal(n) * 10 ** (rng.uniform(-100, -70) / 20)
    if rng.random() < 0.3:  # a level step, as where one recording follows another in a stream
        k = int(rng.integers(1, n))
        mix[:k] *= 10 ** (rng.uniform(-20, 0) / 20)
    peak = rng.uniform(-35, -1) if pools.test else rng.uniform(-40, -1)
    mix *= 10 ** (peak / 20) / (np.abs(mix).max() + 1e-12)
    audio = np.round(mix * 32768).clip(-32768, 32767) / 32768.0  # int16 resolution, as served
    return audio.astype(np.float32), target, meta
