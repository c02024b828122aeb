"""The wake model's test clip: tests/fixtures/wake/hey_lookback.wav + its phrase times.

Held-out voices only (test accents and variants): a near miss ("hey look"), an English
sentence, the phrase, another near miss, the phrase again in another voice, over low pink
noise. Deterministic (espeak-ng 1.51, SoX 14.4.2).

    python fixtures.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soundfile as sf
from wakedata import SR, _dg, synth

OUT = Path(__file__).resolve().parents[3] / "tests" / "fixtures" / "wake"
PARTS = [  # (text, voice, speed, pitch, phrase?)
    ("hey look", "en-gb-scotland+m7", 150, 40, False),
    ("please open the window", "en-gb-x-gbcwmd+f5", 160, 60, False),
    ("hey lookback", "en-gb-scotland+Andy", 150, 45, True),
    ("play it back", "en-gb-x-gbcwmd+robert", 170, 35, False),
    ("hey lookback", "en-gb-x-gbcwmd+Alicia", 140, 70, True),
]


def main() -> None:
    rng = np.random.default_rng(7)
    pieces, phrases, pos = [np.zeros(int(0.6 * SR), np.float32)], [], int(0.6 * SR)
    for text, voice, speed, pitch, is_phrase in PARTS:
        u = synth(voice, text, speed, pitch, 2)
        u = 0.5 * u / (np.abs(u).max() + 1e-9)
        pieces.append(u)
        pos += u.size
        if is_phrase:
            phrases.append(round(pos / SR, 3))
        gap = np.zeros(int(rng.uniform(0.7, 1.0) * SR), np.float32)
        pieces.append(gap)
        pos += gap.size
    x = np.concatenate(pieces)
    x = x + 0.003 * _dg._unit(_dg.noise_pink(rng, x.size))  # type: ignore[attr-defined]
    x = x[: x.size // 128 * 128]
    OUT.mkdir(parents=True, exist_ok=True)
    sf.write(OUT / "hey_lookback.wav", np.round(x * 32767).astype(np.int16), SR, subtype="PCM_16")
    (OUT / "hey_lookback.json").write_text(
        json.dumps(
            {"phrase_ends_s": phrases, "parts": [p[:2] for p in PARTS], "seconds": x.size / SR}, indent=1
        )
        + "\n"
    )
    print(f"wrote {OUT}: {x.size / SR:.2f} s, phrase ends {phrases}")


if __name__ == "__main__":
    main()
