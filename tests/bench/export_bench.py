"""Step-graph cost per stream: the exported default model vs the hand-written one it replaced.

The hand-written step graph (``StepGraph`` in the recipe, until the streaming exporter
replaced it) is read from git at ``--baseline-rev``; the exported one is the shipped
``model_store/lookback-vad/1/model.onnx``. Both run in ONNX Runtime on one thread pinned to
one core, at batch 1, 64 and 256, in interleaved rounds (A, B, A, B, ...) so that load on a
shared machine hits both alike; the figure is the median time of one call divided by the
batch. Every version of the wake-phrase model in the store is timed too (per stream and
per second of audio, since versions may differ in hop).

    python -m tests.bench.export_bench [--rounds 7] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from lookback.engine.contract import Manifest, load_manifest

ROOT = Path(__file__).resolve().parents[2]
STORE = ROOT / "model_store"
BASELINE_REV = "b1c0c85"
BATCHES = (1, 64, 256)


def _session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _feed(spec: Manifest, batch: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feed = {spec.audio_input.name: rng.uniform(-0.3, 0.3, (batch, spec.window_samples)).astype(np.float32)}
    for st in spec.states:
        shape = list(st.shape)
        shape.insert(st.batch_axis, batch)
        feed[st.input] = (rng.standard_normal(shape) * 0.3).astype(np.float32)
    return feed


def _median_call(sess: ort.InferenceSession, feed: dict[str, np.ndarray], seconds: float) -> float:
    times: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 20:
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def baseline_graph(rev: str, out: Path) -> Path:
    blob = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{rev}:model_store/lookback-vad/1/model.onnx"],
        check=True,
        capture_output=True,
    ).stdout
    out.write_bytes(blob)
    return out


def compare(a: Path, b: Path, spec: Manifest, rounds: int, seconds: float) -> dict[str, Any]:
    sa, sb = _session(a), _session(b)
    rows = {}
    for batch in BATCHES:
        feed = _feed(spec, batch)
        ta, tb = [], []
        for _ in range(rounds):
            ta.append(_median_call(sa, feed, seconds))
            tb.append(_median_call(sb, feed, seconds))
        ma, mb = float(np.median(ta)), float(np.median(tb))
        rows[f"batch {batch}"] = {
            "hand_written_us_per_stream": round(ma / batch * 1e6, 3),
            "exported_us_per_stream": round(mb / batch * 1e6, 3),
            "exported_over_hand_written": round(mb / ma, 3),
        }
    return rows


def single(path: Path, spec: Manifest, rounds: int, seconds: float) -> dict[str, Any]:
    sess = _session(path)
    out = {}
    for batch in BATCHES:
        feed = _feed(spec, batch)
        t = float(np.median([_median_call(sess, feed, seconds) for _ in range(rounds)]))
        out[f"batch {batch}"] = {"us_per_stream": round(t / batch * 1e6, 3), "us_per_call": round(t * 1e6, 1)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--seconds", type=float, default=0.3, help="per measurement block")
    ap.add_argument("--baseline-rev", default=BASELINE_REV)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    vad = STORE / "lookback-vad" / "1"
    spec = load_manifest(vad / "model.json")
    result: dict[str, Any] = {"onnxruntime": ort.__version__, "note": "shared machine: indicative only"}
    with tempfile.TemporaryDirectory() as tmp:
        base = baseline_graph(args.baseline_rev, Path(tmp) / "hand_written.onnx")
        result["lookback-vad"] = compare(base, vad / spec.graph.file, spec, args.rounds, args.seconds)
    for wake in sorted((STORE / "lookback-wake").glob("*/model.json")):
        wspec = load_manifest(wake)
        rows = single(wake.parent / wspec.graph.file, wspec, args.rounds, args.seconds)
        steps_per_s = wspec.sample_rate / wspec.hop_samples
        for row in rows.values():
            row["us_per_stream_second"] = round(row["us_per_stream"] * steps_per_s, 1)
        result[f"lookback-wake/{wspec.version}"] = rows
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
