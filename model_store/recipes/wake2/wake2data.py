"""Synthetic data for ``lookback-wake/2``: "hey lookback" from three TTS engines, hours of negatives.

Engines (all from Debian packages, voices inside the package, nothing fetched at run time):

- espeak-ng: English accents and non-native English voices x voice variants, speed and pitch
  (``../datagen.py``'s ``synth``);
- Flite's built-in voices (``flite``: kal, kal16, slt, awb, rms), duration stretch and f0;
- Festival (``festival`` + ``festvox-kallpc16k``, ``festvox-kdlpc16k``, ``festvox-us-slt-hts``;
  ``festvox-italp16k``, ``festvox-czech-dita``, ``festvox-suopuhe-lj`` for other-language
  speech), duration stretch.

Whole voices are held out: the ``test`` split speaks with espeak-ng accents and variants,
Flite voices (awb, rms) and a Festival voice (ked) that ``train`` and ``val`` never have.

Negatives: systematic near misses (a neighbour of "hey" before "lookback", "hey" before a
neighbour of "lookback", either word alone, ...), English sentences (commands, numbers,
names; some with "hey" or "look"/"back" in them) and other-language speech, from every
engine. Utterances are synthesised once into int16 pools (``main``, cached: a split whose
pool file exists is not synthesised again); clips are mixed from the pools (``make_clip``)
with noise, babble, room reverb, level steps, and in training speed/pitch/formant
perturbation.

    python wake2data.py --out ../data/wake2 [--workers 2]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np


def _vad_datagen() -> object:
    """The default model's datagen (espeak-ng synthesis, voice variants, noise makers), reused."""
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
_unit, random_text, espeak = _dg._unit, _dg.random_text, _dg.synth  # type: ignore[attr-defined]

SR = 16000
HOP = 256
CLIP = 188 * 256  # 3 s in whole hops
PHRASES = ["hey lookback", "hey look back", "hey, lookback", "hey lookback!", "hey lookback?"]

# --- near misses, generated systematically ---------------------------------------------------
HEY_NEIGHBOURS = ["hi", "say", "okay", "they", "day", "way", "hello", "yay", "hey there", "so"]
LOOKBACK_NEIGHBOURS = [
    "look",
    "Luke",
    "lookbook",
    "lockback",
    "luckback",
    "look pack",
    "look bag",
    "lookout",
    "look black",
    "hook back",
    "cookbook",
    "notebook",
    "playback",
    "feedback",
    "throwback",
    "setback",
    "outlook",
    "lock box",
    "book back",
    "look at that",
    "lucky",
    "Lou",
    "buddy",
    "back",
    "black",
    "look up",
]
OTHER_NEAR = [
    "lookback",
    "look back",
    "take a look back",
    "play it back",
    "hey",
    "hey hey",
    "hey, hold back",
    "hey, look, back off",
    "the lookback feature",
    "look back at it",
    "I look back",
    "hey you, look",
]


def near_miss(rng: np.random.Generator) -> str:
    r = rng.random()
    if r < 0.35:
        return f"{HEY_NEIGHBOURS[int(rng.integers(len(HEY_NEIGHBOURS)))]} lookback"
    if r < 0.75:
        return f"hey {LOOKBACK_NEIGHBOURS[int(rng.integers(len(LOOKBACK_NEIGHBOURS)))]}"
    return OTHER_NEAR[int(rng.integers(len(OTHER_NEAR)))]


_WORD_TEXT = (
    "the weather is nice today please call me tomorrow open door what time it turn on lights "
    "music kitchen coffee meeting number seven hello thanks good morning where are you going back "
    "look book lock lucky black table window water play stop next song volume up down set timer "
    "minutes remind buy milk bread station train late early office home garden dog cat run walk "
    "talk listen hear okay yes no maybe later again never always hey she he we they said would "
    "could should lunch dinner car bus left right street city phone message send read email "
    "twenty thirty forty five six eight nine ten hundred first second third price today's news "
    "sarah john peter maria david emma lucas chloe london paris berlin monday friday weekend"
)
WORDS = _WORD_TEXT.split()


def english_sentence(rng: np.random.Generator) -> str:
    while True:
        words = [WORDS[int(i)] for i in rng.integers(0, len(WORDS), int(rng.integers(2, 10)))]
        text = " ".join(words)
        if "hey look" not in text and "hey luck" not in text:
            return text


OTHER_LANGS = ["de", "fr-fr", "es", "it", "pt", "cs", "fi", "ro", "sk", "sv", "id", "ru", "bg"]
ESPEAK_ACCENTS = {
    "train": ["en-us", "en-gb", "en-029", "en-gb-x-rp", "en-gb-x-gbclan"],
    "test": ["en-gb-scotland", "en-gb-x-gbcwmd"],
}
ESPEAK_NON_NATIVE = {"train": ["de", "fr-fr", "es", "it", "pt", "sv", "da"], "test": ["nl", "pl"]}
FLITE_VOICES = {"train": ["kal", "kal16", "slt"], "test": ["awb", "rms"]}
FESTIVAL_VOICES = {"train": ["kal_diphone", "cmu_us_slt_arctic_hts"], "test": ["ked_diphone"]}
FESTIVAL_OTHER = {"train": ["lp_diphone", "czech_dita"], "test": ["suo_fi_lj_diphone"]}
ENGINE_SHARE = {"train": (0.5, 0.25, 0.25), "test": (0.4, 0.3, 0.3)}  # espeak, flite, festival
SEEDS = {"train": 21, "val": 22, "test": 23}
POOL = {"train": (3000, 7000), "val": (400, 1500), "test": (1200, 3000)}


def spec_for(split: str, kind: str, index: int) -> dict:
    """What to synthesise for one pooled utterance: engine, voice, speed, text (deterministic)."""
    rng = np.random.default_rng([SEEDS[split], 0 if kind == "pos" else 1, index])
    group = "test" if split == "test" else "train"
    if kind == "pos":
        text, sub = PHRASES[int(rng.integers(len(PHRASES)))], "phrase"
    else:
        r = rng.random()
        if r < 0.35:
            text, sub = near_miss(rng), "near miss"
        elif r < 0.75:
            text, sub = english_sentence(rng), "english"
        else:
            text, sub = "", "other language"
    stretch = float(np.exp(rng.uniform(np.log(0.72), np.log(1.4))))  # >1 = slower
    e = rng.random()
    share = ENGINE_SHARE[group]
    if e < share[0]:
        engine = "espeak"
        if sub == "other language":
            lang = OTHER_LANGS[int(rng.integers(len(OTHER_LANGS)))]
            text = random_text(rng, "cyrillic" if lang in ("ru", "bg") else "latin")
        else:
            langs = ESPEAK_NON_NATIVE[group] if rng.random() < 0.15 else ESPEAK_ACCENTS[group]
            lang = langs[int(rng.integers(len(langs)))]
        variants = TEST_VARIANTS if group == "test" else TRAIN_VARIANTS
        var = variants[int(rng.integers(len(variants)))]
        voice = lang + (f"+{var}" if var else "")
        params = {
            "speed": round(165 / stretch),
            "pitch": int(rng.integers(5, 95)),
            "gap": int(rng.integers(0, 6)),
        }
    elif e < share[0] + share[1]:
        engine = "flite"
        voice = FLITE_VOICES[group][int(rng.integers(len(FLITE_VOICES[group])))]
        if sub == "other language":
            text = random_text(rng, "latin")  # English letter-to-sound on pseudo-words
        params = {"f0": int(rng.integers(80, 230))}
    else:
        engine = "festival"
        if sub == "other language":
            voice = FESTIVAL_OTHER[group][int(rng.integers(len(FESTIVAL_OTHER[group])))]
            text = random_text(rng, "latin")
        else:
            voice = FESTIVAL_VOICES[group][int(rng.integers(len(FESTIVAL_VOICES[group])))]
        params = {}
    return {
        "engine": engine,
        "voice": voice,
        "text": text,
        "kind": sub,
        "stretch": round(stretch, 3),
        **params,
    }


def _sox16k(path: str) -> np.ndarray:
    out = subprocess.run(
        ["sox", "-D", path, "-t", "raw", "-e", "signed-integer", "-b", "16", "-c", "1", "-r", str(SR), "-"],
        capture_output=True,
        check=True,
    ).stdout
    return np.frombuffer(out, dtype="<i2").astype(np.float32) / 32768.0


def _trim(x: np.ndarray) -> np.ndarray:
    if x.size == 0 or not np.any(x):
        return np.zeros(0, np.float32)
    env = np.abs(x)
    on = np.flatnonzero(env > env.max() * 10 ** (-50 / 20))
    return x[max(on[0] - 32, 0) : on[-1] + 32]


def _clean_text(text: str) -> str:
    return text.replace('"', "").replace("\\", "")


def synth_batch(specs: list[dict]) -> list[np.ndarray]:
    """Synthesise specs (one Festival process for all of the batch's Festival ones)."""
    out: list[np.ndarray | None] = [None] * len(specs)
    with tempfile.TemporaryDirectory(prefix="wake2-") as tmp:
        fest = [(i, s) for i, s in enumerate(specs) if s["engine"] == "festival"]
        if fest:
            lines = []
            for i, s in fest:
                lines.append(f"(voice_{s['voice']})")
                lines.append(f"(Parameter.set 'Duration_Stretch {s['stretch']})")
                text = _clean_text(s["text"])
                lines.append(f'(utt.save.wave (utt.synth (Utterance Text "{text}")) "{tmp}/{i}.wav" \'riff)')
            script = Path(tmp) / "batch.scm"
            script.write_text("\n".join(lines) + "\n")
            subprocess.run(["festival", "--batch", str(script)], capture_output=True, timeout=600)
        for i, s in enumerate(specs):
            try:
                if s["engine"] == "espeak":
                    x = espeak(s["voice"], s["text"], s["speed"], s["pitch"], s["gap"])
                elif s["engine"] == "flite":
                    wav = f"{tmp}/{i}.wav"
                    subprocess.run(
                        [
                            "flite",
                            "-voice",
                            s["voice"],
                            "--setf",
                            f"duration_stretch={s['stretch']}",
                            "--setf",
                            f"int_f0_target_mean={s['f0']}",
                            "-t",
                            _clean_text(s["text"]),
                            "-o",
                            wav,
                        ],
                        capture_output=True,
                        check=True,
                        timeout=60,
                    )
                    x = _trim(_sox16k(wav))
                else:
                    wav = f"{tmp}/{i}.wav"
                    x = _trim(_sox16k(wav)) if os.path.exists(wav) else np.zeros(0, np.float32)
            except (subprocess.SubprocessError, OSError):
                x = np.zeros(0, np.float32)
            out[i] = x
    return [x if x is not None else np.zeros(0, np.float32) for x in out]


def _job(args: tuple[str, str, int, int]) -> list[tuple[np.ndarray, dict]]:
    split, kind, first, count = args
    specs = [spec_for(split, kind, i) for i in range(first, first + count)]
    res = []
    for x, s in zip(synth_batch(specs), specs, strict=True):
        ok = 0.15 * SR < x.size < 2.2 * SR if kind == "pos" else x.size >= 0.15 * SR
        if ok:
            x = x[: int(3.0 * SR)]
            x = x / (np.abs(x).max() + 1e-9)
            res.append((np.round(x * 32000).astype(np.int16), s))
    return res


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
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "data" / "wake2")
    ap.add_argument("--scale", type=float, default=1.0, help="pool sizes x this")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--batch", type=int, default=40, help="utterances per synthesis job")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    summary = {}
    with ProcessPoolExecutor(args.workers) as pool:
        for split, (n_pos, n_neg) in POOL.items():
            if (args.out / f"{split}.npz").is_file() and (args.out / f"{split}.json").is_file():
                summary[split] = "cached"
                continue
            arrays: dict[str, np.ndarray] = {}
            meta: dict[str, list] = {}
            for kind, n in (("pos", int(n_pos * args.scale)), ("neg", int(n_neg * args.scale))):
                jobs = [(split, kind, a, min(args.batch, n - a)) for a in range(0, n, args.batch)]
                res = [r for batch in pool.map(_job, jobs) for r in batch]
                sizes = np.array([u.size for u, _ in res])
                arrays[f"{kind}_audio"] = np.concatenate([u for u, _ in res])
                arrays[f"{kind}_offsets"] = np.concatenate([[0], np.cumsum(sizes)])
                meta[kind] = [m for _, m in res]
                print(f"{split} {kind}: {len(res)}/{n} in {time.time() - t0:.0f} s", flush=True)
            noise, kinds = noise_pool(split, 160 if split == "train" else 60)
            arrays["noise"] = noise
            np.savez(args.out / f"{split}.npz", **arrays)
            (args.out / f"{split}.json").write_text(json.dumps({**meta, "noise": kinds}, indent=0))
            summary[split] = {"pos": len(meta["pos"]), "neg": len(meta["neg"]), "noise": len(kinds)}
    print(f"wake2 datagen: {summary} in {time.time() - t0:.0f} s")
    if "cached" not in summary.values():  # what synthesising every pool took (results.py reports it)
        (args.out / "datagen.json").write_text(
            json.dumps({"seconds": round(time.time() - t0), "pools": summary})
        )


if __name__ == "__main__":
    main()
