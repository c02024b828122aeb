"""Synthetic VAD data: espeak-ng speech with silence gaps, mixed with several kinds of noise.

Every clip is a deterministic function of (split, clip index): the same espeak-ng and
sox versions give the same bytes. Speech comes from espeak-ng (many languages, voice
variants, speeds, pitches, word gaps; random pseudo-word texts in the language's
script), resampled to 16 kHz by sox. Frame labels (one per 128-sample hop) come from
the clean speech's energy: a frame is speech when its energy is within ``REL_DB`` of
its utterance's loudest frame; gaps up to ``FILL_FRAMES`` inside speech are filled and
speech runs shorter than ``MIN_RUN_FRAMES`` dropped.

Splits
  train  training voices, texts and noise kinds (seed 1)
  val    same distribution as train, other seeds: checkpoint choice and threshold tuning
  test   held out: other languages, other voice variants, other text generator seed,
         other noise seeds, two noise kinds never seen in training (wind, dtmf)

Output (never one big array in RAM): ``data/<split>/shard_XXX.audio.npy`` int16 and
``shard_XXX.labels.npy`` uint8, concatenated clips, each a multiple of 512 samples,
plus ``shard_XXX.json`` with each clip's offset, length and mix parameters.

    python datagen.py --out data --train-clips 900 --val-clips 60 --test-clips 120
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SR = 16000
HOP = 128
ALIGN = 512  # clip lengths are a multiple of this (Silero's hop) for easy comparisons
REL_DB = 35.0
FILL_FRAMES = 10  # 80 ms
MIN_RUN_FRAMES = 3
CLIPS_PER_SHARD = 40

# --- voices ---------------------------------------------------------------------------

LATIN = [
    "af",
    "an",
    "ca",
    "cs",
    "cy",
    "da",
    "de",
    "en-us",
    "en-gb",
    "en-029",
    "en-gb-x-rp",
    "eo",
    "es",
    "es-419",
    "et",
    "eu",
    "fi",
    "fr-fr",
    "fr-be",
    "ga",
    "gd",
    "hr",
    "ht",
    "ia",
    "id",
    "is",
    "it",
    "la",
    "lb",
    "lt",
    "lv",
    "mi",
    "ms",
    "mt",
    "nb",
    "pap",
    "pt",
    "pt-br",
    "ro",
    "sk",
    "sl",
    "sq",
    "sv",
    "tn",
    "az",
    "haw",
]
CYRILLIC = ["ru", "bg", "be", "mk", "kk"]
TEST_LATIN = ["nl", "pl", "hu", "sw", "tr", "vi", "en-gb-scotland", "fr-ch", "gn"]
TEST_CYRILLIC = ["uk"]
TEST_GREEK = ["el"]

TRAIN_VARIANTS = [
    "",
    "m1",
    "m2",
    "m3",
    "m4",
    "m5",
    "m6",
    "f1",
    "f2",
    "f3",
    "f4",
    "klatt",
    "klatt2",
    "klatt4",
    "Alex",
    "Andrea",
    "Annie",
    "adam",
    "aunty",
    "belinda",
    "benjamin",
    "boris",
    "caleb",
    "david",
    "ed",
    "edward",
    "grandma",
    "grandpa",
    "iven",
    "iven2",
    "john",
    "linda",
    "max",
    "michel",
    "norbert",
    "paul",
    "pablo",
    "steph",
    "travis",
    "victor",
    "Mario",
    "Hugo",
    "Lee",
    "Michael",
]
TEST_VARIANTS = [
    "m7",
    "f5",
    "klatt3",
    "klatt5",
    "Alicia",
    "Andy",
    "antonio",
    "gustave",
    "iven3",
    "Denis",
    "Gene",
    "Diogo",
    "marcelo",
    "kaukovalta",
    "miguel",
    "robert",
    "rob",
    "steph2",
    "Storm",
    "Marco",
]


def _scripts(split: str) -> list[tuple[str, str]]:
    if split == "test":
        return (
            [(v, "latin") for v in TEST_LATIN]
            + [(v, "cyrillic") for v in TEST_CYRILLIC]
            + [(v, "greek") for v in TEST_GREEK]
        )
    return [(v, "latin") for v in LATIN] + [(v, "cyrillic") for v in CYRILLIC]


def _variants(split: str) -> list[str]:
    return TEST_VARIANTS if split == "test" else TRAIN_VARIANTS


# --- texts ------------------------------------------------------------------------------

ALPHABETS = {
    "latin": (
        "b c d f g h j k l m n p r s t v w z br tr st sh ch pl gr kl sp dr fr",
        "a e i o u a e i o u ai ou ea y",
        "n s r l t k m",
    ),
    "cyrillic": (
        "б в г д ж з к л м н п р с т ф х ц ч ш бр тр ст пл гр кр",
        "а е и о у ы я ю э а о и",
        "н с р л т к м й",
    ),
    "greek": ("β γ δ ζ θ κ λ μ ν ξ π ρ σ τ φ χ ψ στ πρ τρ", "α ε η ι ο υ ω α ο ει ου", "ς ν"),
}


def random_text(rng: np.random.Generator, script: str) -> str:
    onsets, vowels, codas = (s.split() for s in ALPHABETS[script])
    words = []
    for _ in range(int(rng.integers(2, 13))):
        if rng.random() < 0.06:
            words.append(str(int(rng.integers(0, 2000))))
            continue
        w = ""
        for _ in range(int(rng.integers(1, 5))):
            if rng.random() < 0.85:
                w += onsets[int(rng.integers(len(onsets)))]
            w += vowels[int(rng.integers(len(vowels)))]
            if rng.random() < 0.3:
                w += codas[int(rng.integers(len(codas)))]
        if script == "greek":
            w = w[:-1] + "ς" if w.endswith("σ") else w
        words.append(w)
        if rng.random() < 0.08:
            words[-1] += ","
    return " ".join(words)


def synth(voice: str, text: str, speed: int, pitch: int, gap: int) -> np.ndarray:
    """espeak-ng -> sox -> float32 at 16 kHz, leading/trailing silence trimmed."""
    esp = subprocess.Popen(
        ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-g", str(gap), "--stdout", text],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    sox = subprocess.run(
        [
            "sox",
            "-D",
            "-t",
            "wav",
            "-",
            "-t",
            "raw",
            "-e",
            "signed-integer",
            "-b",
            "16",
            "-c",
            "1",
            "-r",
            str(SR),
            "-",
        ],
        stdin=esp.stdout,
        capture_output=True,
        check=True,
    )
    assert esp.stdout is not None
    esp.stdout.close()
    esp.wait()
    x = np.frombuffer(sox.stdout, dtype="<i2").astype(np.float32) / 32768.0
    if x.size == 0 or not np.any(x):
        return np.zeros(0, np.float32)
    env = np.abs(x)
    on = np.flatnonzero(env > env.max() * 10 ** (-50 / 20))
    return x[max(on[0] - 32, 0) : on[-1] + 32]


@dataclass
class Voice:
    lang: str
    script: str
    variant: str
    speed: int
    pitch: int
    gap: int

    @property
    def name(self) -> str:
        return self.lang + (f"+{self.variant}" if self.variant else "")


def random_voice(rng: np.random.Generator, split: str) -> Voice:
    scripts = _scripts(split)
    lang, script = scripts[int(rng.integers(len(scripts)))]
    variants = _variants(split)
    return Voice(
        lang,
        script,
        variants[int(rng.integers(len(variants)))],
        int(rng.integers(95, 260)),
        int(rng.integers(5, 95)),
        int(rng.integers(0, 8)),
    )


# --- noise --------------------------------------------------------------------------------


def _unit(x: np.ndarray) -> np.ndarray:
    r = float(np.sqrt(np.mean(x.astype(np.float64) ** 2)))
    return (x / r).astype(np.float32) if r > 0 else x.astype(np.float32)


def _coloured(rng: np.random.Generator, n: int, exponent: float, lo: float = 20.0) -> np.ndarray:
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1 / SR)
    spec *= np.where(f < lo, 0.0, 1.0 / np.maximum(f, lo) ** (exponent / 2))
    return _unit(np.fft.irfft(spec, n))


def _envelope(
    rng: np.random.Generator, n: int, on_s: tuple[float, float], off_s: tuple[float, float]
) -> np.ndarray:
    env = np.zeros(n, np.float32)
    pos = int(rng.uniform(0, off_s[1]) * SR)
    ramp = int(0.005 * SR)
    while pos < n:
        length = int(rng.uniform(*on_s) * SR)
        seg = np.ones(length, np.float32)
        r = min(ramp, length // 2)
        if r:
            seg[:r] = np.linspace(0, 1, r)
            seg[-r:] = np.linspace(1, 0, r)
        seg = seg[: n - pos]
        env[pos : pos + seg.size] = seg
        pos += length + int(rng.uniform(*off_s) * SR)
    return env


def noise_white(rng: np.random.Generator, n: int) -> np.ndarray:
    return _unit(rng.standard_normal(n))


def noise_pink(rng: np.random.Generator, n: int) -> np.ndarray:
    return _coloured(rng, n, 1.0)


def noise_brown(rng: np.random.Generator, n: int) -> np.ndarray:
    return _coloured(rng, n, 2.0)


def noise_hum(rng: np.random.Generator, n: int) -> np.ndarray:
    f0 = float(rng.choice([50.0, 60.0])) * rng.uniform(0.995, 1.005)
    t = np.arange(n) / SR
    x = np.zeros(n)
    for k in range(1, int(rng.integers(2, 12))):
        x += (
            rng.uniform(0.05, 1.0)
            / k ** rng.uniform(0, 1.5)
            * np.sin(2 * np.pi * k * f0 * t + rng.uniform(0, 2 * np.pi))
        )
    return _unit(x)


def noise_tone(rng: np.random.Generator, n: int) -> np.ndarray:
    t = np.arange(n) / SR
    x = np.zeros(n)
    for _ in range(int(rng.integers(1, 4))):
        x += rng.uniform(0.3, 1) * np.sin(2 * np.pi * rng.uniform(100, 6000) * t + rng.uniform(0, 2 * np.pi))
    if rng.random() < 0.5:
        x *= _envelope(rng, n, (0.05, 1.0), (0.05, 1.5))
    return _unit(x)


def noise_clicks(rng: np.random.Generator, n: int) -> np.ndarray:
    x = np.zeros(n)
    rate = rng.uniform(0.5, 15)
    for pos in np.flatnonzero(rng.random(n) < rate / SR):
        length = int(rng.integers(16, 400))
        burst = rng.standard_normal(length) * np.exp(-np.arange(length) / rng.uniform(3, 60))
        burst *= rng.uniform(0.2, 1.0)
        x[pos : pos + length] += burst[: n - pos]
    return _unit(x) if np.any(x) else _unit(rng.standard_normal(n) * 1e-3)


def noise_bursts(rng: np.random.Generator, n: int) -> np.ndarray:
    """Non-stationary filtered noise bursts (doors, rustle, traffic passing)."""
    base = _coloured(rng, n, float(rng.uniform(0, 2)))
    return _unit(base * _envelope(rng, n, (0.03, 0.6), (0.2, 2.5)) + 1e-3 * base)


def noise_music(rng: np.random.Generator, n: int) -> np.ndarray:
    """Harmonic notes changing every 0.15-0.8 s: music-like tonal structure."""
    x = np.zeros(n)
    pos = 0
    while pos < n:
        length = min(int(rng.uniform(0.15, 0.8) * SR), n - pos)
        t = np.arange(length) / SR
        env = np.exp(-t / rng.uniform(0.1, 1.0))
        for _ in range(int(rng.integers(1, 4))):
            f0 = 110 * 2 ** (rng.integers(0, 36) / 12)
            for k in range(1, 6):
                x[pos : pos + length] += env * np.sin(2 * np.pi * k * f0 * t) / k**1.5
        pos += length
    return _unit(x)


def noise_wind(rng: np.random.Generator, n: int) -> np.ndarray:
    """Held out: low-passed noise with slow random amplitude modulation."""
    base = _coloured(rng, n, 2.5, lo=10.0)
    mod = _coloured(rng, n, 4.0, lo=0.3)
    return _unit(base * (1.2 + np.tanh(mod)))


def noise_dtmf(rng: np.random.Generator, n: int) -> np.ndarray:
    """Held out: telephone dual-tone beeps."""
    t = np.arange(n) / SR
    lo = float(rng.choice([697, 770, 852, 941]))
    hi = float(rng.choice([1209, 1336, 1477, 1633]))
    x = np.sin(2 * np.pi * lo * t) + np.sin(2 * np.pi * hi * t)
    return _unit(x * _envelope(rng, n, (0.05, 0.3), (0.05, 0.8)))


NoiseFn = Callable[[np.random.Generator, int], np.ndarray]
TRAIN_NOISES: dict[str, NoiseFn] = {
    "white": noise_white,
    "pink": noise_pink,
    "brown": noise_brown,
    "hum": noise_hum,
    "tone": noise_tone,
    "clicks": noise_clicks,
    "bursts": noise_bursts,
    "music": noise_music,
}
TEST_NOISES: dict[str, NoiseFn] = {**TRAIN_NOISES, "wind": noise_wind, "dtmf": noise_dtmf}


# --- labels ---------------------------------------------------------------------------------


def frame_db(x: np.ndarray) -> np.ndarray:
    e = (x.astype(np.float64).reshape(-1, HOP) ** 2).mean(axis=1)
    return 10 * np.log10(e + 1e-20)


def _runs(mask: np.ndarray, value: bool) -> list[tuple[int, int]]:
    m = np.concatenate([[False], mask == value, [False]]).astype(np.int8)
    d = np.diff(m)
    return list(zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1), strict=True))


def smooth_labels(mask: np.ndarray) -> np.ndarray:
    mask = mask.copy()
    for a, b in _runs(mask, False):
        if a > 0 and b < mask.size and b - a <= FILL_FRAMES:
            mask[a:b] = True
    for a, b in _runs(mask, True):
        if b - a < MIN_RUN_FRAMES:
            mask[a:b] = False
    return mask


# --- clips ------------------------------------------------------------------------------------

SPLIT_SEEDS = {"train": 1, "val": 2, "test": 3, "fixture": 4}


def make_clip(
    split: str,
    index: int,
    *,
    seconds: float | None = None,
    speech: bool | None = None,
    kinds: list[str] | None = None,
    snr_db: float | None = None,
    babble: bool | None = None,
    peak_dbfs: float | None = None,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """One clip: int16 audio (a multiple of 512 samples), uint8 labels per hop, metadata."""
    rng = np.random.default_rng([SPLIT_SEEDS[split], index])
    text_split = "test" if split in ("test", "fixture") else "train"
    noises = TEST_NOISES if text_split == "test" else TRAIN_NOISES
    if seconds is None:
        seconds = rng.uniform(8, 14)
    n = int(seconds * SR) // ALIGN * ALIGN
    if speech is None:
        speech = rng.random() > 0.1
    clean = np.zeros(n, np.float32)
    ref_db = np.full(n // HOP, np.inf)
    voices = []
    if speech:
        pos = int(rng.uniform(0.05, 2.0) * SR)
        while pos < n - SR // 2:
            v = random_voice(rng, text_split)
            u = synth(v.name, random_text(rng, v.script), v.speed, v.pitch, v.gap)
            if u.size < HOP * 4:
                continue
            u = u[: n - pos] * 10 ** (rng.uniform(-8, 0) / 20) / (np.abs(u).max() + 1e-9)
            clean[pos : pos + u.size] = u
            f0, f1 = pos // HOP, (pos + u.size + HOP - 1) // HOP
            ref_db[f0:f1] = frame_db(clean[f0 * HOP : f1 * HOP]).max()
            voices.append(v.name)
            pos += u.size + int(rng.uniform(0.15, 2.5) * SR)
    labels = smooth_labels(frame_db(clean) > ref_db - REL_DB)

    if kinds is None:
        r = rng.random()
        count = 0 if (speech and r < 0.08) else int(rng.integers(1, 4))
        names = sorted(noises)
        kinds = [names[int(i)] for i in rng.choice(len(names), count, replace=False)]
    noise = np.zeros(n, np.float32)
    for k in kinds:
        noise += noises[k](rng, n) * 10 ** (rng.uniform(-10, 0) / 20)
    if babble is None:  # babble is background to a foreground talker, never alone
        babble = bool(speech and rng.random() < 0.25)
    bab = np.zeros(n, np.float32)
    if babble:
        for _ in range(int(rng.integers(2, 6))):
            p = int(rng.uniform(-1, 0.9) * n)
            while p < n:
                v = random_voice(rng, text_split)
                u = synth(v.name, random_text(rng, v.script), v.speed, v.pitch, v.gap)
                a, b = max(p, 0), min(p + u.size, n)
                if b > a:
                    bab[a:b] += u[a - p : b - p] / (np.abs(u).max() + 1e-9)
                p += u.size + int(rng.uniform(0, 0.4) * SR)

    speech_rms = float(np.sqrt(np.mean(clean[np.repeat(labels, HOP)] ** 2))) if labels.any() else 0.1
    if snr_db is None:
        snr_db = float(rng.uniform(-5, 30) if text_split == "train" else rng.uniform(0, 30))
    mix = clean.astype(np.float64)
    if np.any(noise):
        mix += _unit(noise) * speech_rms * 10 ** (-snr_db / 20)
    bab_snr = float(rng.uniform(15, 30))
    if np.any(bab):
        mix += _unit(bab) * speech_rms * 10 ** (-bab_snr / 20)
    mix += rng.standard_normal(n) * 10 ** (rng.uniform(-100, -70) / 20)  # dither / mic floor
    if peak_dbfs is None:
        peak_dbfs = float(rng.uniform(-3, -1) if text_split == "train" else rng.uniform(-35, -1))
    mix *= 10 ** (peak_dbfs / 20) / (np.abs(mix).max() + 1e-12)
    audio = np.clip(np.round(mix * 32768), -32768, 32767).astype(np.int16)
    meta = {
        "index": index,
        "samples": n,
        "voices": voices,
        "noise": kinds,
        "snr_db": round(snr_db, 2),
        "babble": bool(np.any(bab)),
        "babble_snr_db": round(bab_snr, 2) if np.any(bab) else None,
        "peak_dbfs": round(peak_dbfs, 2),
        "speech_frames": int(labels.sum()),
    }
    return audio, labels.astype(np.uint8), meta


def write_shard(split: str, shard: int, first: int, count: int, out: Path) -> tuple[int, int]:
    audios, labels, metas = [], [], []
    offset = 0
    for i in range(first, first + count):
        a, lab, meta = make_clip(split, i)
        meta["offset"] = offset
        offset += a.size
        audios.append(a)
        labels.append(lab)
        metas.append(meta)
    stem = out / split / f"shard_{shard:03d}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    np.save(f"{stem}.audio.npy", np.concatenate(audios))
    np.save(f"{stem}.labels.npy", np.concatenate(labels))
    Path(f"{stem}.json").write_text(json.dumps({"split": split, "clips": metas}, indent=1))
    return offset, int(sum(x.sum() for x in labels))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "data")
    ap.add_argument("--train-clips", type=int, default=900)
    ap.add_argument("--val-clips", type=int, default=60)
    ap.add_argument("--test-clips", type=int, default=120)
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    args = ap.parse_args()
    t0 = time.time()
    jobs = []
    for split, total in (("train", args.train_clips), ("val", args.val_clips), ("test", args.test_clips)):
        for s, first in enumerate(range(0, total, CLIPS_PER_SHARD)):
            jobs.append((split, s, first, min(CLIPS_PER_SHARD, total - first), args.out))
    with ProcessPoolExecutor(args.workers) as pool:
        results = list(pool.map(write_shard, *zip(*jobs, strict=True)))
    summary: dict[str, dict[str, float]] = {}
    for job, (samples, speech) in zip(jobs, results, strict=True):
        d = summary.setdefault(job[0], {"clips": 0, "hours": 0.0, "speech_frames": 0, "frames": 0})
        d["clips"] += job[3]
        d["hours"] += samples / SR / 3600
        d["speech_frames"] += speech
        d["frames"] += samples // HOP
    for d in summary.values():
        d["speech_fraction"] = round(d["speech_frames"] / d["frames"], 3)
        d["hours"] = round(d["hours"], 3)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"datagen: {json.dumps(summary)} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
