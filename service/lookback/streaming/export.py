"""``export``: a trained ``StreamingModel`` -> model.onnx (step), sequence.onnx, model.json.

The step graph takes ``context + hop`` samples and every state, and returns the scores and
the new states; the sequence graph takes ``context + N * hop`` samples and the same states.
States are derived from the layers (names, shapes, batch axis, dtype, initial value), the
batch axis is symbolic in both graphs. Files are written to a scratch folder next to
``out``, the parity harness (``lookback.modelcheck``) runs on it, then the graphs are
compared with the PyTorch module itself; only if everything passes do the files move into
``out``, model.json last. A failed check raises ``ExportError`` with the report and leaves
``out`` untouched (and no folder the export created).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from lookback.errors import ContractError
from lookback.modelcheck import (
    TOL,
    Check,
    Report,
    _max,
    _Runner,
    _session,
    check_model_dir,
    random_clips,
    run_steps,
)
from lookback.streaming.graph import Graph
from lookback.streaming.model import FRAME_SAMPLES, StreamingModel

OUTPUT = "score"


class ExportError(ContractError):
    """The exported graphs failed a check; ``report`` says which and by how much."""

    def __init__(self, message: str, report: Report | None = None) -> None:
        super().__init__(message)
        self.report = report


def build_graphs(model: StreamingModel) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """The step graph and the sequence graph of a model (eval mode, weights frozen in)."""
    model.validate()  # again: layers may have been changed since the model was built
    names = model.state_names()
    decls = model.state_decls()
    labels = len(model.labels)
    graphs = []
    for step in (True, False):
        g = Graph()
        with torch.no_grad():
            y, new = model.emit(g, "audio", step, list(names))
        g.rename(y, OUTPUT)
        for n, s in zip(names, new, strict=True):
            g.rename(s, n + "_out")
        states = [(n, d.full_shape("B")) for n, d in zip(names, decls, strict=True)]  # type: ignore[arg-type]
        audio = ["B", model.context_samples + model.hop_samples] if step else ["B", "T"]
        score = ["B", labels] if step else (["B", "N"] if labels == 1 else ["B", "N", labels])
        doc = "lookback step graph" if step else "lookback sequence graph"
        graphs.append(
            g.model(
                [("audio", audio), *states], [(OUTPUT, score), *((n + "_out", s) for n, s in states)], doc
            )
        )
    return graphs[0], graphs[1]


def manifest(
    model: StreamingModel,
    files: dict[str, Path],
    *,
    name: str,
    version: str,
    description: str = "",
    license: str | None = None,
    events: dict[str, Any] | None = None,
    max_steps: int = 2048,
) -> dict[str, Any]:
    def sha(p: Path) -> str:
        return hashlib.sha256(p.read_bytes()).hexdigest()

    spec: dict[str, Any] = {
        "name": name,
        "version": version,
        "description": description,
        "license": license,
        "sample_rate": model.sample_rate,
        "frame_samples": FRAME_SAMPLES,
        "hop_samples": model.hop_samples,
        "context_samples": model.context_samples,
        "graph": {"file": files["graph"].name, "sha256": sha(files["graph"])},
        "audio_input": {"name": "audio", "dtype": "float32", "scale": "int16/32768", "layout": "BT"},
        "states": [
            {
                "input": n,
                "output": n + "_out",
                "shape": list(d.shape),
                "batch_axis": d.batch_axis,
                "dtype": "float32",
                "initial": d.initial,
            }
            for n, d in zip(model.state_names(), model.state_decls(), strict=True)
        ],
        "outputs": [{"name": OUTPUT, "labels": model.labels}],
        "events": events or {},
        "sequence": {
            "file": files["sequence"].name,
            "sha256": sha(files["sequence"]),
            "max_steps": max_steps,
        },
    }
    if license is None:
        del spec["license"]
    return spec


def compare_torch(
    model: StreamingModel,
    path: Path,
    clips: list[np.ndarray] | None = None,
    *,
    tol: float = TOL,
    seed: int = 1,
) -> Check:
    """The exported step graph, hop by hop at batch 8 (mixed lengths), vs the PyTorch module."""
    from lookback.engine.contract import load_manifest

    spec = load_manifest(Path(path) / "model.json")
    step = _Runner(spec, _session(Path(path) / spec.graph.file), sequence=False)
    rng = np.random.default_rng(seed)
    group = random_clips(spec, 8, 40, rng)
    for c in clips or []:
        n = c.size // spec.hop_samples * spec.hop_samples
        group.append(np.concatenate([np.zeros(spec.context_samples, np.float32), c[:n].astype(np.float32)]))
    got, _ = run_steps(step, group)
    worst = 0.0
    model.eval()
    with torch.no_grad():
        for clip, g in zip(group, got, strict=True):
            ref = model(torch.from_numpy(clip[None]))[0].numpy()  # [N, L]
            worst = max(worst, _max(ref, g[0]))
    ok = worst <= tol
    detail = f"step graph hop by hop == PyTorch forward on {len(group)} clips"
    if not ok:
        detail = "the exported step graph differs from the PyTorch module"
    return Check("onnx == torch", ok, detail, {OUTPUT: worst})


def export(
    model: StreamingModel,
    out: Path,
    *,
    name: str,
    version: str = "1",
    description: str = "",
    license: str | None = None,
    events: dict[str, Any] | None = None,
    max_steps: int = 2048,
    clips: list[np.ndarray] | None = None,
    tol: float = TOL,
) -> Report:
    """Write the model directory ``out`` if, and only if, the parity harness passes."""
    model.eval()
    step, seq = build_graphs(model)
    out = Path(out)
    created = [p for p in (out, *out.parents) if not p.exists()]  # deepest first
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".export-", dir=out.parent))
    done = False
    try:
        files = {"graph": scratch / "model.onnx", "sequence": scratch / "sequence.onnx"}
        onnx.save(step, str(files["graph"]))
        onnx.save(seq, str(files["sequence"]))
        spec = manifest(
            model,
            files,
            name=name,
            version=version,
            description=description,
            license=license,
            events=events,
            max_steps=max_steps,
        )
        (scratch / "model.json").write_text(json.dumps(spec, indent=2) + "\n")
        report = check_model_dir(scratch, clips, tol=tol)
        if report.ok:
            report.checks.append(compare_torch(model, scratch, clips, tol=tol))
        if not report.ok:
            raise ExportError(f"export refused: parity check failed\n{report.text()}", report)
        out.mkdir(parents=True, exist_ok=True)
        (out / "model.json").unlink(missing_ok=True)  # a stale manifest never names new files
        for f in files.values():
            shutil.move(str(f), str(out / f.name))
        shutil.move(str(scratch / "model.json"), str(out / "model.json"))
        report.model = f"{name}/{version} ({out})"
        done = True
        return report
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if not done:  # a refused export leaves no empty folder behind
            for folder in created:
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()
