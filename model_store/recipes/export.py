"""Export the trained VAD to the step graph, the sequence graph and model.json.

    python export.py --checkpoint runs/lookback-vad/best.pt --out ../lookback-vad/1

model.onnx     audio [B, 512], conv [B, 2, F], h [1, B, H] -> score [B, 1], conv_out, h_out
sequence.onnx  audio [B, 384 + N*128], conv, h -> score [B, N], conv_out, h_out

The sequence graph is ``model.LookbackVAD`` itself; the step graph is ``model.StepGraph``,
the same weights written as matrix products, which ORT runs about 3x faster than the
Conv form. Both go through torch's TorchScript-based ONNX exporter (opset 17; the
sequence graph's GRU maps to the ONNX GRU op, the step graph writes the cell out).
The export checks each graph against torch (max abs
diff <= 1e-5 on random audio and on a real clip), checks the sequence graph against
the step graph run step by step, N = 1 and N = 2048, checks that a step graph row at
batch 64 equals the same row run alone, bit for bit, sets the event threshold on the
val split (``train.plateau_threshold``), and writes model.json with the files' sha256.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from model import (
    CONTEXT,
    HOP,
    WINDOW,
    LookbackVAD,
    StepGraph,
    count_parameters,
    describe_frontend,
)

TOL = 1e-5
OPSET = 17
NAMES_IN = ["audio", "conv", "h"]
NAMES_OUT = ["score", "conv_out", "h_out"]


def _fix_shapes(path: Path, model: LookbackVAD, step: bool) -> None:
    """Pin the static output dims the exporter leaves symbolic (conv_out's K-1, score's 1)."""
    m = onnx.load(str(path))
    if m.ir_version > 10:  # ORT 1.31 refuses IR 14; the TorchScript exporter writes 8
        m.ir_version = 10
    want = {
        "conv_out": ["B", model.kernel - 1, model.n_bands],
        "h_out": [1, "B", model.hidden],
        "score": ["B", 1] if step else ["B", "N"],
    }
    for out in m.graph.output:
        dims = out.type.tensor_type.shape.dim
        for d, v in zip(dims, want[out.name], strict=True):
            if isinstance(v, int):
                d.ClearField("dim_param")
                d.dim_value = v
            else:
                d.ClearField("dim_value")
                d.dim_param = v
    onnx.checker.check_model(m)
    onnx.save(m, str(path))


def export(model: LookbackVAD, path: Path, step: bool) -> None:
    n = 1 if step else 8
    audio = torch.zeros(2, CONTEXT + n * HOP)
    conv, h = model.initial_states(2)
    axes = {
        "audio": {0: "B"} if step else {0: "B", 1: "T"},
        "conv": {0: "B"},
        "h": {1: "B"},
        "score": {0: "B"} if step else {0: "B", 1: "N"},
        "conv_out": {0: "B"},
        "h_out": {1: "B"},
    }
    module = StepGraph(model).eval() if step else model
    torch.onnx.export(
        module,
        (audio, conv, h),
        str(path),
        input_names=NAMES_IN,
        output_names=NAMES_OUT,
        dynamic_axes=axes,
        opset_version=OPSET,
        dynamo=False,
        do_constant_folding=True,
    )
    _fix_shapes(path, model, step)


def session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_steps(
    step: ort.InferenceSession, audio: np.ndarray, conv: np.ndarray, h: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run the step graph hop by hop over audio [B, 384 + N*128]."""
    n = (audio.shape[1] - CONTEXT) // HOP
    scores = []
    for t in range(n):
        s, conv, h = step.run(None, {"audio": audio[:, t * HOP : t * HOP + WINDOW], "conv": conv, "h": h})
        scores.append(s)
    return np.concatenate(scores, axis=1), conv, h


def max_diff(a: list, b: list) -> float:
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(a, b, strict=True))


def check(model: LookbackVAD, step_path: Path, seq_path: Path, clip: np.ndarray | None) -> None:
    step, seq = session(step_path), session(seq_path)
    rng = np.random.default_rng(0)
    cases = {
        "random": (
            rng.uniform(-0.5, 0.5, (3, CONTEXT + 300 * HOP)).astype(np.float32)
            * rng.uniform(0.001, 1, (3, 1)).astype(np.float32)
        )
    }
    if clip is not None:
        n = (clip.size // HOP) * HOP
        cases["real clip"] = np.concatenate([np.zeros(CONTEXT, np.float32), clip[:n]])[None]
    for name, audio in cases.items():
        b = audio.shape[0]
        conv = rng.standard_normal((b, model.kernel - 1, model.n_bands)).astype(np.float32)
        h = (0.5 * rng.standard_normal((1, b, model.hidden))).astype(np.float32)
        with torch.no_grad():
            ref = [
                x.numpy() for x in model(torch.from_numpy(audio), torch.from_numpy(conv), torch.from_numpy(h))
            ]
        got_seq = seq.run(None, {"audio": audio, "conv": conv, "h": h})
        got_step = run_steps(step, audio, conv, h)
        d_seq, d_step = max_diff(ref, got_seq), max_diff(ref, list(got_step))
        d_both = max_diff(got_seq, list(got_step))
        n = (audio.shape[1] - CONTEXT) // HOP
        print(
            f"check [{name}, B={b}, N={n}]: max|torch - sequence.onnx| = {d_seq:.2e}, "
            f"max|torch - model.onnx steps| = {d_step:.2e}, "
            f"max|sequence - steps| = {d_both:.2e}"
        )
        if max(d_seq, d_step, d_both) > TOL:
            sys.exit(f"export check failed: difference above {TOL}")
    # N = 1 and N = 2048 through the sequence graph; batch 1 and 256 through the step graph
    for n in (1, 2048):
        audio = rng.uniform(-0.3, 0.3, (2, CONTEXT + n * HOP)).astype(np.float32)
        conv, h = (x.numpy() for x in model.initial_states(2))
        s, c, hh = seq.run(None, {"audio": audio, "conv": conv, "h": h})
        assert s.shape == (2, n) and c.shape == conv.shape and hh.shape == h.shape
        with torch.no_grad():
            ref = [
                x.numpy() for x in model(torch.from_numpy(audio), torch.from_numpy(conv), torch.from_numpy(h))
            ]
        d = max_diff(ref, [s, c, hh])
        print(f"check [sequence N={n}]: shapes ok, max|torch - onnx| = {d:.2e}")
        if d > TOL:
            sys.exit(f"export check failed: difference above {TOL}")
    for b in (1, 256):
        conv, h = (x.numpy() for x in model.initial_states(b))
        s, c, hh = step.run(None, {"audio": np.zeros((b, WINDOW), np.float32), "conv": conv, "h": h})
        assert s.shape == (b, 1) and c.shape == conv.shape and hh.shape == h.shape
    print("check: step graph runs at batch 1 and 256")
    b = 64  # batched == solo: the server's parity promise starts here
    feed = {
        "audio": rng.uniform(-0.3, 0.3, (b, WINDOW)).astype(np.float32),
        "conv": rng.standard_normal((b, model.kernel - 1, model.n_bands)).astype(np.float32),
        "h": (0.5 * rng.standard_normal((1, b, model.hidden))).astype(np.float32),
    }
    batched = step.run(None, feed)
    for i in range(b):
        solo = step.run(
            None,
            {
                "audio": feed["audio"][i : i + 1],
                "conv": feed["conv"][i : i + 1],
                "h": feed["h"][:, i : i + 1],
            },
        )
        if not all(
            np.array_equal(x[i : i + 1] if k < 2 else x[:, i : i + 1], y)
            for k, (x, y) in enumerate(zip(batched, solo, strict=True))
        ):
            sys.exit(f"export check failed: step graph row {i} differs at batch {b} and alone")
    print(f"check: step graph rows at batch {b} equal the rows run alone, bit for bit")


def tune_threshold(model: LookbackVAD, data: Path, info: dict) -> float:
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


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def manifest(model: LookbackVAD, out: Path, threshold: float, info: dict) -> dict:
    best = info.get("best_val", {})
    desc = (
        "Lookback's default streaming voice-activity detector, trained from scratch by "
        "model_store/recipes (run.sh) on synthetic data: espeak-ng speech (many languages, "
        "voices, speeds, pitches) with silence gaps, mixed with white/pink/brown noise, "
        "50/60 Hz hum, tones, clicks, bursts, music-like tones and low-level babble at "
        "random SNRs and gains; frame labels from the clean speech energy. "
        f"Network: {describe_frontend()} (a fixed Conv1d over a 512-sample window), "
        f"causal Conv1d K={model.kernel} (state conv = last {model.kernel - 1} feature "
        f"frames), GRU {model.hidden}, linear, sigmoid; {count_parameters(model)} parameters. "
        f"Training: {info.get('steps')} steps of {info.get('batch')}x{info.get('frames')} "
        f"hops on {info.get('train_hours')} h of audio on CPU (torch {info.get('torch')}, "
        f"deterministic); val F1 {best.get('f1', float('nan')):.3f}, "
        f"AUC {best.get('auc', float('nan')):.4f}; threshold {threshold} tuned on val "
        f"(closest to 0.5 within 0.002 of the best val F1). "
        "One score per 128-sample hop (8 ms). See model_store/recipes/RESULTS.md."
    )
    return {
        "name": "lookback-vad",
        "version": "1",
        "description": desc,
        "license": "MIT",
        "sample_rate": 16000,
        "frame_samples": HOP,
        "hop_samples": HOP,
        "context_samples": CONTEXT,
        "graph": {"file": "model.onnx", "sha256": sha256(out / "model.onnx")},
        "audio_input": {"name": "audio", "dtype": "float32", "scale": "int16/32768", "layout": "BT"},
        "states": [
            {
                "input": "conv",
                "output": "conv_out",
                "shape": [model.kernel - 1, model.n_bands],
                "batch_axis": 0,
                "dtype": "float32",
                "initial": 0.0,
            },
            {
                "input": "h",
                "output": "h_out",
                "shape": [1, model.hidden],
                "batch_axis": 1,
                "dtype": "float32",
                "initial": 0.0,
            },
        ],
        "outputs": [{"name": "score", "labels": ["speech"]}],
        "events": {
            "threshold": threshold,
            "neg_threshold": round(threshold - 0.15, 2),
            "min_silence_ms": 100,
            "speech_pad_ms": 30,
            "min_speech_ms": 0,
        },
        "sequence": {"file": "sequence.onnx", "sha256": sha256(out / "sequence.onnx"), "max_steps": 2048},
    }


def main() -> None:
    here = Path(__file__).parent
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--run", type=Path, default=here / "runs" / "lookback-vad")
    ap.add_argument("--out", type=Path, default=here.parent / "lookback-vad" / "1")
    ap.add_argument("--data", type=Path, default=here / "data")
    args = ap.parse_args()

    torch.manual_seed(0)
    model = LookbackVAD()
    model.load_state_dict(torch.load(args.run / "best.pt", weights_only=True))
    model.eval()
    info = json.loads((args.run / "train.json").read_text())
    threshold = tune_threshold(model, args.data, info)
    args.out.mkdir(parents=True, exist_ok=True)
    step_path, seq_path = args.out / "model.onnx", args.out / "sequence.onnx"
    export(model, step_path, step=True)
    export(model, seq_path, step=False)

    clip = None
    try:
        from shards import Split

        c = Split(args.data, "test").clips[0]
        clip = np.asarray(c.audio, np.float32) / 32768.0
    except FileNotFoundError:
        print("check: no test shards, checking on random audio only")
    check(model, step_path, seq_path, clip)

    (args.run / "export.json").write_text(json.dumps(info["threshold"], indent=1))
    spec = manifest(model, args.out, threshold, info)
    (args.out / "model.json").write_text(json.dumps(spec, indent=2) + "\n")
    sizes = {p.name: p.stat().st_size for p in (step_path, seq_path)}
    print(f"export: wrote {args.out} ({sizes}), threshold {threshold}")


if __name__ == "__main__":
    main()
