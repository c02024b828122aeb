"""Write RESULTS.md and det.png from the run's results.json and timings.json (every figure from the run)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

TARGET = (0.90, 1.0)  # issue 29: detection rate, false alarms per hour


def _at_fa(curve: list[dict], fa: float) -> dict | None:
    """The operating point with the highest detection whose false alarms stay within ``fa`` per hour."""
    ok = [c for c in curve if c["false_alarms_per_hour"] <= fa]
    return max(ok, key=lambda c: c["detection_rate"]) if ok else None


def det_png(r: dict, path: Path) -> None:
    test, val = r["test"], r["val_curve"]
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    for rows, label, style in (
        (test["curve"], "test (held-out voices)", "-"),
        (test.get("curve_without_near_misses", []), "test without its near-miss clips", "-."),
        (val, "val (training voices)", "--"),
    ):
        pts = sorted((max(c["false_alarms_per_hour"], 0.05), 1 - c["detection_rate"]) for c in rows)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker=".", ms=3, label=label)
    thr = test["threshold"]
    ax.plot(
        [max(test["false_alarms_per_hour"], 0.05)],
        [1 - test["detection_rate"]],
        "r*",
        ms=12,
        label=f"the recipe's threshold {thr} (set on val)",
    )
    half = _at_fa(test["curve"], 0.5)
    if half:
        ax.plot(
            [max(half["false_alarms_per_hour"], 0.05)],
            [1 - half["detection_rate"]],
            "ks",
            ms=7,
            label=f"0.5/h: threshold {half['threshold']}",
        )
    ax.axvline(1.0, color="grey", lw=0.8, ls=":")
    ax.axvline(0.5, color="grey", lw=0.8, ls=":")
    ax.axhline(0.10, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("false alarms per hour (0 plotted at 0.05)")
    ax.set_ylabel("miss rate")
    ax.set_title("lookback-wake/2 (candidate): DET curve, miss rate vs false alarms per hour")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def _table(groups: dict, other: dict) -> str:
    return "\n".join(
        f"| {k} | {v['clips']} | {v['rate']} | {other.get(k, {}).get('rate', '-')} |"
        for k, v in groups.items()
    )


def main() -> None:
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--run", type=Path, default=here.parent / "runs" / "lookback-wake2")
    ap.add_argument("--out", type=Path, default=here / "RESULTS.md")
    ap.add_argument("--data", type=Path, default=here.parent / "data" / "wake2")
    args = ap.parse_args()
    r = json.loads((args.run / "results.json").read_text())
    timings_path = args.run / "timings.json"
    t = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    synth_path = args.data / "datagen.json"
    synth = json.loads(synth_path.read_text())["seconds"] if synth_path.is_file() else "?"
    det_png(r, args.out.parent / "det.png")
    test, val = r["test"], r["val"]
    by = test["detection_by"]
    by9 = test["at_0.9"]["detection_by"]
    t9 = test["at_0.9"]
    fa_kind = "\n".join(
        f"| {k} | {v['clips']} | {v['false_alarms']} |" for k, v in test["false_alarms_by_kind"].items()
    )
    fa_engine = "\n".join(
        f"| {k} | {v['clips']} | {v['false_alarms']} |" for k, v in test["false_alarms_by_engine"].items()
    )
    points = [c for c in test["curve"] if c["threshold"] in (0.5, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995)]
    points += [test] if test["threshold"] not in [c["threshold"] for c in points] else []
    points.sort(key=lambda c: c["threshold"])
    curve = "\n".join(
        f"| {c['threshold']} | {c['detection_rate']} | {c['false_alarms_per_hour']} |" for c in points
    )
    half, one = _at_fa(test["curve"], 0.5), _at_fa(test["curve"], 1.0)
    nn = test.get("curve_without_near_misses", [])
    nn_one, nn_ten = _at_fa(nn, 1.0), _at_fa(nn, 10.0)

    def point(p: dict | None) -> str:
        return (
            f"detection {p['detection_rate']} at threshold {p['threshold']} ({p['false_alarms_per_hour']}/h)"
            if p
            else "none"
        )

    rows = [
        (
            f"threshold (chosen on val: the lowest with at most {val['max_fa_per_hour']} "
            "false alarms per hour)",
            f"{test['threshold']}",
        ),
        (
            f"detection rate ({test['positives']} phrase clips, one per held-out phrase utterance; "
            "an event within -0.3..+0.5 s of the phrase end)",
            f"**{test['detection_rate']}**",
        ),
        (
            f"false alarms per hour ({test['negative_hours']} h of 3 s negative clips streamed back to back, "
            "state carried)",
            f"**{test['false_alarms_per_hour']}** ({test['false_alarms']} in {test['negative_hours']} h)",
        ),
        ("best detection at <= 1 false alarm per hour (test curve)", point(one)),
        ("best detection at <= 0.5 false alarms per hour (test curve)", point(half)),
        (
            "the same stream without its near-miss clips: best detection at <= 1 / <= 10 false alarms "
            "per hour",
            f"{point(nn_one)} / {point(nn_ten)}",
        ),
        (
            f"val (training voices, other utterances; {val['negative_clips']} negative clips): "
            "detection / false alarms per hour",
            f"{val['detection_rate']} / {val['false_alarms_per_hour']}",
        ),
    ]
    summary = "| | value |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)
    pools = r["pools"]
    m = r["mining"]
    hardest = ", ".join(f'"{h["text"]}" ({h["engine"]}, {h["score"]})' for h in m["hardest"][:8])
    met = test["detection_rate"] >= TARGET[0] and test["false_alarms_per_hour"] <= TARGET[1]
    status = (
        "It meets the target of issue 29 (detection >= 0.90 at <= 1 false alarm per hour on the "
        "held-out test set)."
        if met
        else "It does **not** meet the target of issue 29 (detection >= 0.90 at <= 1 false alarm per hour on "
        "the held-out test set), so it is not shipped: `model_store/` keeps `lookback-wake/1`."
    )
    text = f"""# lookback-wake/2 (candidate): results

{status}

Produced by `wake2/train.py` (last run of `bash model_store/recipes/wake2/run.sh`); every figure
comes from `runs/lookback-wake2/results.json` of that run (`results.py` writes this file and
`det.png`).

## Held-out test set

Voices no training or val clip has: espeak-ng accents en-gb-scotland, en-gb-x-gbcwmd and
non-native nl, pl with espeak-ng voice variants training never had; Flite's awb and rms;
Festival's ked (diphone); Finnish Festival speech among the other-language negatives. Noise
at 0-30 dB SNR including two kinds training never had (wind, DTMF), babble of held-out
voices, synthetic room reverb in 40% of clips, peak level -35..-1 dBFS.
Pools: {pools["test"]["pos"]} phrase and {pools["test"]["neg"]} other utterances.

{summary}

![DET curve](det.png)

Operating points on the test set:

| threshold | detection rate | false alarms per hour |
|---|---|---|
{curve}

Detection by engine, at the recipe's threshold and at 0.9 (detection {t9["detection_rate"]} at
{t9["false_alarms_per_hour"]} false alarms per hour):

| engine | clips | detection at the recipe's threshold | at 0.9 |
|---|---|---|---|
{_table(by["engine"], by9["engine"])}

by voice (espeak-ng: by language/accent):

| voice | clips | detection at the recipe's threshold | at 0.9 |
|---|---|---|---|
{_table(by["voice"], by9["voice"])}

by SNR (of the noise or babble mixed in):

| SNR | clips | detection at the recipe's threshold | at 0.9 |
|---|---|---|---|
{_table(by["snr"], by9["snr"])}

by speaking rate (duration stretch of the synthesis; espeak-ng: 165 wpm / rate):

| speed | clips | detection at the recipe's threshold | at 0.9 |
|---|---|---|---|
{_table(by["speed"], by9["speed"])}

by room:

| room | clips | detection at the recipe's threshold | at 0.9 |
|---|---|---|---|
{_table(by["reverb"], by9["reverb"])}

False alarms at the recipe's threshold by kind of negative clip:

| kind | clips (3 s) | false alarms |
|---|---|---|
{fa_kind}

and by the engine of the clip's first utterance:

| engine | clips (3 s) | false alarms |
|---|---|---|
{fa_engine}

"near miss" clips say a neighbour of "hey" before "lookback" ("okay lookback", "hi lookback",
"say lookback", ...), "hey" before a neighbour of "lookback" ("hey look", "hey Luke", "hey
lookbook", "hey lockback", "hey playback", ...), or "lookback", "look back", "hey" alone.

## Training

- {r["parameters"]} trainable parameters, receptive field {r["receptive_field_frames"]} front-end
  frames (2 s), one score per 256 samples
- round 1: {r["steps"][0]} steps of {r["batch"]} three-second clips mixed on the fly from
  {pools["train"]["pos"]} phrase and {pools["train"]["neg"]} other utterances (resampled by
  0.85-1.18, tilted, low-passed; reverb, noise, babble); hard-negative mining: every training
  negative utterance scored alone ({m["seconds"]} s; {m["above_0.5"]} of {m["utterances"]} scored
  0.5 or more; hardest: {hardest}); round 2: {r["steps"][1]} steps, 30% of the negatives
  drawn in proportion to their mined score; torch {r["torch"]}, one thread
- wall-clock on 2 shared CPU cores: synthesising the pools {synth} s (first run; later runs
  reuse them: datagen stage {t.get("datagen", "?")} s this run),
  training {r["train_seconds"]} s, evaluation {r["eval_seconds"]} s (train + evaluation + export:
  {t.get("train", "?")} s)

These are synthetic-speech figures; real voices, rooms and microphones will differ.
"""
    args.out.write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
