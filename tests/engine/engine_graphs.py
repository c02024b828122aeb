"""Tiny hand-built ONNX graphs and manifests for contract and store tests.

A toy model ``toy/1`` mirrors the shape of a real streaming model without any weights:

    audio [B, context + hop]  -> score [B, L]   = mean of the hop's new samples
    conv  [B, 3, 2]   (batch axis 0) -> conv_out  passthrough
    h     [1, B, 4]   (batch axis 1) -> h_out     passthrough
    sr    int64 scalar constant, consumed (times zero) so ORT keeps it

and its sequence graph maps ``audio [B, context + N*hop]`` to ``score [B, N]``. Every
port can be redeclared (name, dtype, shape) to build the mismatches a contract must
refuse; the ops are rank-agnostic so ORT loads the mutated graphs and reports their
real signature.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 10  # ORT 1.31 refuses the IR 14 that onnx 1.23 writes by default
OPSET = 17

CONTEXT = 64
HOP = 128

ELEM = {
    "float32": TensorProto.FLOAT,
    "float64": TensorProto.DOUBLE,
    "float16": TensorProto.FLOAT16,
    "int64": TensorProto.INT64,
    "int32": TensorProto.INT32,
    "int16": TensorProto.INT16,
}

Dim = int | str


@dataclass(frozen=True)
class Port:
    name: str
    dtype: str
    shape: list[Dim]


@dataclass
class ToyGraph:
    """The declared signature of a toy graph; mutate a copy to make a mismatch."""

    audio: Port
    states: list[tuple[Port, Port]]  # (input, output); an output of None is left out
    constants: list[Port]
    scores: list[Port]
    extra_inputs: list[Port] = field(default_factory=list)
    sequence: bool = False
    context: int = CONTEXT
    hop: int = HOP

    def with_(self, **kw: Any) -> ToyGraph:
        return replace(copy.deepcopy(self), **kw)


def step_signature(*, labels: int = 1) -> ToyGraph:
    return ToyGraph(
        audio=Port("audio", "float32", ["B", CONTEXT + HOP]),
        states=[
            (Port("conv", "float32", ["B", 3, 2]), Port("conv_out", "float32", ["B", 3, 2])),
            (Port("h", "float32", [1, "B", 4]), Port("h_out", "float32", [1, "B", 4])),
        ],
        constants=[Port("sr", "int64", [])],
        scores=[Port("score", "float32", ["B", labels])],
    )


def sequence_signature(*, labels: int = 1) -> ToyGraph:
    sig = step_signature()
    return sig.with_(
        audio=Port("audio", "float32", ["B", "T"]),
        sequence=True,
        scores=[Port("score", "float32", ["B", "N"] if labels == 1 else ["B", "N", labels])],
    )


def _vi(p: Port) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(p.name, ELEM[p.dtype], p.shape)


def build(sig: ToyGraph) -> onnx.ModelProto:
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(value, name))
        return name

    zero = const("_zero", np.array(0.0, np.float32))
    a = sig.audio.name
    nodes.append(helper.make_node("Cast", [a], ["_audio_f"], to=TensorProto.FLOAT))
    if sig.sequence:
        # new samples -> [B, N, hop] -> per-step mean [B, N]
        starts = const("_starts", np.array([sig.context], np.int64))
        ends = const("_ends", np.array([np.iinfo(np.int64).max], np.int64))
        axes = const("_axes", np.array([-1], np.int64))
        shape = const("_steps_shape", np.array([0, -1, sig.hop], np.int64))
        nodes += [
            helper.make_node("Slice", ["_audio_f", starts, ends, axes], ["_new"]),
            helper.make_node("Reshape", ["_new", shape], ["_steps"]),
            helper.make_node("ReduceMean", ["_steps"], ["_base"], axes=[2], keepdims=0),
        ]
    else:
        # whatever the declared rank: flatten to [B, X] and average -> [B]
        nodes += [
            helper.make_node("Flatten", ["_audio_f"], ["_flat"], axis=1),
            helper.make_node("ReduceMean", ["_flat"], ["_base"], axes=[1], keepdims=0),
        ]
    # Every other input is consumed (summed, times zero) so ORT keeps it in the signature.
    side = [p.name for p, _ in sig.states] + [p.name for p in sig.constants]
    side += [p.name for p in sig.extra_inputs]
    acc = "_base"
    for i, name in enumerate(side):
        nodes += [
            helper.make_node("Cast", [name], [f"_c{i}"], to=TensorProto.FLOAT),
            helper.make_node("ReduceSum", [f"_c{i}"], [f"_s{i}"], keepdims=0),
            helper.make_node("Mul", [f"_s{i}", zero], [f"_z{i}"]),
            helper.make_node("Add", [acc, f"_z{i}"], [f"_acc{i}"]),
        ]
        acc = f"_acc{i}"
    outputs = []
    for j, port in enumerate(sig.scores):
        rank = len(port.shape)
        base_rank = 2 if sig.sequence else 1
        cur = acc
        if rank > base_rank:  # add trailing label axes, then broadcast to the declared size
            ax = const(f"_unsq{j}", np.arange(base_rank, rank, dtype=np.int64))
            nodes.append(helper.make_node("Unsqueeze", [cur, ax], [f"_u{j}"]))
            target = [1] * base_rank + [d if isinstance(d, int) else 1 for d in port.shape[base_rank:]]
            shp = const(f"_expand{j}", np.array(target, np.int64))
            nodes.append(helper.make_node("Expand", [f"_u{j}", shp], [f"_e{j}"]))
            cur = f"_e{j}"
        to = ELEM[port.dtype]
        nodes.append(helper.make_node("Cast", [cur], [port.name], to=to))
        outputs.append(_vi(port))
    for p_in, p_out in sig.states:
        if p_out is None:
            continue
        if p_out.dtype == p_in.dtype:
            nodes.append(helper.make_node("Identity", [p_in.name], [p_out.name]))
        else:
            nodes.append(helper.make_node("Cast", [p_in.name], [p_out.name], to=ELEM[p_out.dtype]))
        outputs.append(_vi(p_out))
    inputs = [_vi(sig.audio)] + [_vi(p) for p, _ in sig.states]
    inputs += [_vi(p) for p in sig.constants] + [_vi(p) for p in sig.extra_inputs]
    graph = helper.make_graph(nodes, "toy", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def save(sig: ToyGraph, path: Path) -> str:
    """Write the graph; returns its sha256."""
    data = build(sig).SerializeToString()
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def toy_manifest(
    *, labels: list[str] | None = None, sequence: bool = False, version: str = "1", name: str = "toy"
) -> dict[str, Any]:
    """A manifest matching ``step_signature()`` (hashes filled in by ``write_model``)."""
    m: dict[str, Any] = {
        "name": name,
        "version": version,
        "sample_rate": 16000,
        "frame_samples": 128,
        "hop_samples": HOP,
        "context_samples": CONTEXT,
        "graph": {"file": "model.onnx", "sha256": "0" * 64},
        "audio_input": {"name": "audio", "dtype": "float32", "scale": "int16/32768", "layout": "BT"},
        "states": [
            {"input": "conv", "output": "conv_out", "shape": [3, 2], "batch_axis": 0},
            {"input": "h", "output": "h_out", "shape": [1, 4], "batch_axis": 1, "initial": 0.25},
        ],
        "constants": [{"name": "sr", "dtype": "int64", "shape": [], "value": 16000}],
        "outputs": [{"name": "score", "labels": labels or ["speech"]}],
    }
    if sequence:
        m["sequence"] = {"file": "sequence.onnx", "sha256": "0" * 64, "max_steps": 16}
    return m


def write_model(
    store: Path,
    manifest: dict[str, Any] | None = None,
    *,
    step: ToyGraph | None = None,
    seq: ToyGraph | None = None,
) -> Path:
    """Write ``<store>/<name>/<version>/`` with graphs and a manifest carrying their hashes."""
    manifest = copy.deepcopy(manifest or toy_manifest())
    folder = store / manifest["name"] / manifest["version"]
    folder.mkdir(parents=True, exist_ok=True)
    n_labels = sum(len(o["labels"]) for o in manifest["outputs"])
    manifest["graph"]["sha256"] = save(
        step or step_signature(labels=n_labels), folder / manifest["graph"]["file"]
    )
    if manifest.get("sequence"):
        manifest["sequence"]["sha256"] = save(
            seq or sequence_signature(labels=n_labels), folder / manifest["sequence"]["file"]
        )
    (folder / "model.json").write_text(json.dumps(manifest, indent=1))
    return folder
