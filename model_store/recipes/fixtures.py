"""Write the test clips in tests/fixtures/audio/ with datagen's generator (held-out voices).

    python fixtures.py [--out ../../tests/fixtures/audio]

lookback_speech_noise.wav   10 s: speech with silence gaps, pink noise + 50/60 Hz hum, SNR 15 dB
lookback_speech_clicks.wav   8 s: speech with gaps, white noise + clicks, SNR 12 dB
lookback_noise_only.wav      6 s: brown noise + tones + hum, no speech
lookback_labels.json         per-128-sample-hop speech labels of each clip (run-length coded)

Deterministic for given espeak-ng (1.51) and SoX (14.4.2) versions: split "fixture"
of datagen.make_clip, which uses the held-out (test) voices and texts.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import soundfile as sf
from datagen import HOP, SR, make_clip

FIXTURES = {
    "lookback_speech_noise.wav": dict(
        index=1, seconds=10.0, speech=True, kinds=["pink", "hum"], snr_db=15.0, babble=False, peak_dbfs=-6.0
    ),
    "lookback_speech_clicks.wav": dict(
        index=7,
        seconds=8.0,
        speech=True,
        kinds=["white", "clicks"],
        snr_db=12.0,
        babble=False,
        peak_dbfs=-10.0,
    ),
    "lookback_noise_only.wav": dict(
        index=3,
        seconds=6.0,
        speech=False,
        kinds=["brown", "tone", "hum"],
        snr_db=0.0,
        babble=False,
        peak_dbfs=-20.0,
    ),
}


def rle(labels: np.ndarray) -> list[list[int]]:
    """[[first_hop, end_hop), ...] of the speech runs."""
    m = np.concatenate([[0], labels.astype(np.int8), [0]])
    d = np.diff(m)
    return [[int(a), int(b)] for a, b in zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1), strict=True)]


def main() -> None:
    here = Path(__file__).parent
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=here.parent.parent / "tests" / "fixtures" / "audio")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    index = {
        "hop_samples": HOP,
        "sample_rate": SR,
        "note": "speech runs per clip as [first_hop, end_hop) from datagen's labels",
        "clips": {},
    }
    for name, kw in FIXTURES.items():
        i = kw.pop("index")
        audio, labels, meta = make_clip("fixture", i, **kw)
        kw["index"] = i
        sf.write(args.out / name, audio, SR, subtype="PCM_16")
        index["clips"][name] = {
            "hops": int(labels.size),
            "speech": rle(labels),
            "voices": meta["voices"],
            "noise": meta["noise"],
            "snr_db": meta["snr_db"],
            "peak_dbfs": meta["peak_dbfs"],
        }
        print(
            f"fixtures: {name} {audio.size / SR:.1f} s, {labels.mean():.0%} speech, "
            f"{meta['voices']} {meta['noise']}"
        )
    text = re.sub(r"\[\s+(\d+),\s+(\d+)\s+\]", r"[\1, \2]", json.dumps(index, indent=1))
    (args.out / "lookback_labels.json").write_text(text + "\n")


if __name__ == "__main__":
    main()
