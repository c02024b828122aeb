"""Export the trained VAD with Lookback's streaming exporter: model.onnx, sequence.onnx, model.json.

    python export.py --run runs/lookback-vad --out ../lookback-vad/1 --data data
    python export.py --weights lookback-vad-1.weights.npz --out ../lookback-vad/1

model.onnx     audio [B, 512], conv [B, 2, F], h [1, B, H] -> score [B, 1], conv_out, h_out
sequence.onnx  audio [B, 384 + N*128], conv, h -> score [B, N], conv_out, h_out

``lookback.streaming.export`` writes both graphs from the layers of ``model.build_model``
(the step graph lowered to matrix products with a time-major conv state and the GRU cell
written out), derives the states of model.json, and runs the parity harness
(``lookback.modelcheck``: batched == solo, states live, step == sequence in random chunks,
and the graphs against the PyTorch module, here also on a real test clip); it refuses to
write anything if a check fails. This script sets the event threshold on the val split
(``train.plateau_threshold``) and writes the description.

``--weights`` re-exports the trained tensors kept in git (``lookback-vad-1.weights.npz``,
written by the training path) with the threshold and description of the model.json already
in ``--out``: the shipped graphs are exactly what this writes (tests/model_store checks the
hashes).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from model import WEIGHTS, build_model, count_parameters, describe_frontend, load_weights, save_weights

from lookback.streaming import StreamingModel, export


def tune_threshold(model: StreamingModel, data: Path, info: dict) -> float:
    """The manifest threshold, from the val split (never the test split)."""
    from shards import Split
    from train import plateau_threshold, score_split

    scores, labels = score_split(model, Split(data, "val"))
    thr, f1, best = plateau_threshold(scores, labels)
    info["threshold"] = {
        "value": thr,
        "val_f1": round(f1, 4),
        "val_best_f1": round(best, 4),
        "rule": "closest to 0.5 within 0.002 of the best val F1",
    }
    print(f"threshold: {thr} (val F1 {f1:.4f}; best val F1 {best:.4f})")
    return thr


def description(model: StreamingModel, threshold: float, info: dict) -> str:
    best = info.get("best_val", {})
    conv, gru = model.body.layers[0], model.body.layers[2]
    return (
        "Lookback's default streaming voice-activity detector, trained from scratch by "
        "model_store/recipes (run.sh) on synthetic data: espeak-ng speech (many languages, "
        "voices, speeds, pitches) with silence gaps, mixed with white/pink/brown noise, "
        "50/60 Hz hum, tones, clicks, bursts, music-like tones and low-level babble at "
        "random SNRs and gains; frame labels from the clean speech energy. "
        f"Network: {describe_frontend()} (a fixed Conv1d over a 512-sample window), "
        f"causal Conv1d K={conv.kernel_size} (state conv = last {conv.past} feature "
        f"frames), GRU {gru.hidden}, linear, sigmoid; {count_parameters(model)} parameters. "
        f"Training: {info.get('steps')} steps of {info.get('batch')}x{info.get('frames')} "
        f"hops on {info.get('train_hours')} h of audio on CPU (torch {info.get('torch')}, "
        f"deterministic); val F1 {best.get('f1', float('nan')):.3f}, "
        f"AUC {best.get('auc', float('nan')):.4f}; threshold {threshold} tuned on val "
        f"(closest to 0.5 within 0.002 of the best val F1). "
        "One score per 128-sample hop (8 ms). See model_store/recipes/RESULTS.md."
    )


def events(threshold: float) -> dict:
    return {
        "threshold": threshold,
        "neg_threshold": round(threshold - 0.15, 2),
        "min_silence_ms": 100,
        "speech_pad_ms": 30,
        "min_speech_ms": 0,
    }


def main() -> None:
    here = Path(__file__).parent
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--run", type=Path, default=here / "runs" / "lookback-vad")
    ap.add_argument("--out", type=Path, default=here.parent / "lookback-vad" / "1")
    ap.add_argument("--data", type=Path, default=here / "data")
    ap.add_argument("--weights", type=Path, help=f"re-export these trained tensors (e.g. {WEIGHTS.name})")
    args = ap.parse_args()

    torch.manual_seed(0)
    if args.weights:
        old = json.loads((args.out / "model.json").read_text())
        model = load_weights(args.weights)
        desc, ev = old["description"], old["events"]
    else:
        model = build_model()
        model.load_state_dict(torch.load(args.run / "best.pt", weights_only=True))
        model.eval()
        info = json.loads((args.run / "train.json").read_text())
        threshold = tune_threshold(model, args.data, info)
        (args.run / "export.json").write_text(json.dumps(info["threshold"], indent=1))
        desc, ev = description(model, threshold, info), events(threshold)

    clips = []
    try:
        from shards import Split

        clips.append(np.asarray(Split(args.data, "test").clips[0].audio, np.float32) / 32768.0)
    except FileNotFoundError:
        fixture = here.parents[1] / "tests" / "fixtures" / "audio" / "lookback_speech_noise.wav"
        if fixture.is_file():
            import soundfile as sf

            clips.append(sf.read(str(fixture), dtype="int16")[0].astype(np.float32) / 32768.0)
    report = export(
        model,
        args.out,
        name="lookback-vad",
        version="1",
        description=desc,
        license="MIT",
        events=ev,
        clips=clips,
    )
    print(report.text())
    sizes = {p.name: p.stat().st_size for p in (args.out / "model.onnx", args.out / "sequence.onnx")}
    if not args.weights:  # the shipped model's tensors go with it; any other export keeps its own
        shipped = args.out.resolve() == (here.parent / "lookback-vad" / "1").resolve()
        save_weights(model, WEIGHTS if shipped else args.run / WEIGHTS.name)
    print(f"export: wrote {args.out} ({sizes}), threshold {ev['threshold']}")


if __name__ == "__main__":
    main()
