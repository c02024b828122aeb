"""Helpers for the streaming tests: run one layer's ONNX emission, small models, clips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from lookback.streaming import (
    GRU,
    CausalConv1d,
    Frontend,
    Linear,
    ReLU,
    StreamingLayer,
    StreamingModel,
    mel_basis,
)
from lookback.streaming.graph import Graph

TOL = 1e-5


def session(model: object) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])  # type: ignore[attr-defined]


def layer_session(layer: StreamingLayer, frames: int | None) -> ort.InferenceSession:
    """The layer alone as an ONNX graph: x (+ states) -> y (+ new states)."""
    decls = layer.all_state_decls()
    names = [f"s{i}" for i in range(len(decls))]
    g = Graph()
    with torch.no_grad():
        y, new = layer.emit(g, "x", frames, list(names))
    g.rename(y, "y")
    for n, s in zip(names, new, strict=True):
        g.rename(s, n + "_out")
    x_dims: list = ["B", layer.in_channels] if frames == 1 else ["B", frames or "T", layer.in_channels]
    states = [(n, d.full_shape("B")) for n, d in zip(names, decls, strict=True)]  # type: ignore[arg-type]
    out_frames = None if frames is None else frames // layer.stride
    y_dims: list = (
        ["B", layer.out_channels] if out_frames == 1 else ["B", out_frames or "N", layer.out_channels]
    )
    return session(g.model([("x", x_dims), *states], [("y", y_dims), *((n + "_out", s) for n, s in states)]))


def run_layer(
    sess: ort.InferenceSession, x: np.ndarray, states: list[np.ndarray], frames: int | None, chunks: list[int]
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Feed x [B, T, C] through the layer graph in chunks of frames; concatenate the outputs."""
    ys, t = [], 0
    for c in chunks:
        part = x[:, t : t + c]
        if frames == 1:
            part = part[:, 0]
        outs = sess.run(None, {"x": part, **{f"s{i}": s for i, s in enumerate(states)}})
        y = outs[0]
        ys.append(y[:, None] if y.ndim == 2 else y)
        states = list(outs[1:])
        t += c
    return np.concatenate(ys, axis=1), states


def torch_chunks(
    layer: StreamingLayer, x: torch.Tensor, states: list[torch.Tensor], chunks: list[int]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    ys, t = [], 0
    with torch.no_grad():
        for c in chunks:
            y, states = layer.forward_stateful(x[:, t : t + c], states)
            ys.append(y)
            t += c
    return torch.cat(ys, dim=1), states


def random_chunks(total: int, unit: int, rng: np.random.Generator) -> list[int]:
    out: list[int] = []
    while sum(out) < total:
        out.append(unit * int(rng.integers(1, 6)))
    out[-1] -= sum(out) - total
    return [c for c in out if c > 0]


def small_vad(seed: int = 0, hidden: int = 16) -> StreamingModel:
    torch.manual_seed(seed)
    fe = Frontend(mel_basis(24), 128)
    return StreamingModel(
        fe,
        [CausalConv1d(24, 16, 3, name="conv"), ReLU(), GRU(16, hidden, name="h"), Linear(hidden, 1)],
        labels=["speech"],
    )


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0


def write_dir(model: StreamingModel, out: Path, name: str = "broken") -> Path:
    """The exported files and manifest WITHOUT the parity check: how a broken model ships."""
    import json

    import onnx

    from lookback.streaming.export import build_graphs, manifest

    out.mkdir(parents=True, exist_ok=True)
    step, seq = build_graphs(model)
    onnx.save(step, str(out / "model.onnx"))
    onnx.save(seq, str(out / "sequence.onnx"))
    files = {"graph": out / "model.onnx", "sequence": out / "sequence.onnx"}
    spec = manifest(model, files, name=name, version="1")
    (out / "model.json").write_text(json.dumps(spec, indent=2))
    return out


def rehash(folder: Path) -> None:
    """Update model.json's sha256 fields after a graph file was edited."""
    import hashlib
    import json

    spec = json.loads((folder / "model.json").read_text())
    for key in ("graph", "sequence"):
        if spec.get(key):
            spec[key]["sha256"] = hashlib.sha256((folder / spec[key]["file"]).read_bytes()).hexdigest()
    (folder / "model.json").write_text(json.dumps(spec, indent=2))


def twin_convs(seed: int = 0) -> StreamingModel:
    """Two states of the same shape (``a`` and ``b``): a manifest can swap them unnoticed."""
    torch.manual_seed(seed)
    return StreamingModel(
        Frontend(mel_basis(8), 128),
        [CausalConv1d(8, 8, 3, name="a"), ReLU(), CausalConv1d(8, 8, 3, name="b"), ReLU(), Linear(8, 1)],
        labels=["x"],
    )


def edit_manifest(folder: Path, edit: object) -> None:
    """Apply ``edit(spec)`` to model.json in place."""
    import json

    spec = json.loads((folder / "model.json").read_text())
    edit(spec)  # type: ignore[operator]
    (folder / "model.json").write_text(json.dumps(spec, indent=2))


def drop_sequence(folder: Path) -> None:
    """A hand-made model: the step graph only."""
    edit_manifest(folder, lambda spec: spec.pop("sequence"))
    (folder / "sequence.onnx").unlink()
