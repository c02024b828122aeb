"""The parity harness catches the four ways a streaming twin goes silently wrong.

Each test builds the broken model (exported files and manifest written WITHOUT the check,
as a hand-made or mis-exported model would ship), shows that it loads (the contract loader
alone does not see the fault), and that ``check_model_dir`` fails it on the right check.
A healthy control passes the same harness.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch
from onnx import helper

from lookback.engine.store import discover, latest, open_graphs
from lookback.modelcheck import Report, check_model_dir
from lookback.streaming import (
    CausalConv1d,
    ExportError,
    Frontend,
    Linear,
    ReLU,
    StreamingModel,
    export,
    mel_basis,
)
from lookback.streaming.graph import Graph
from tests.streaming.support import rehash, small_vad, write_dir
from tests.streaming.test_export import BatchMean


def loads(folder: Path) -> None:
    """The engine's loader accepts it: hashes and signatures are fine."""
    stored = latest(discover(folder.parent.parent), folder.parent.name)
    open_graphs(stored, providers="cpu", intra_op_threads=1, inter_op_threads=1)


def check(folder: Path) -> Report:
    report = check_model_dir(folder)
    print(report.text())
    return report


def test_healthy_control_passes(tmp_path: Path) -> None:
    folder = write_dir(small_vad(), tmp_path / "good" / "1", "good")
    loads(folder)
    report = check(folder)
    assert report.ok and report.failed() == []


class MisalignedStride(CausalConv1d):
    """Trained like ``nn.Conv1d(stride=s)`` with left padding: output j sees frames up to
    j*s, while the streaming twin emits when the hop's last frame (j*s + s - 1) arrives."""

    _step = False

    def kept(self) -> int:
        return self.past  # the whole window's past: the misaligned window reaches that far

    def offset(self) -> int:
        return self.stride - 1 if self._step else 0

    def emit(self, g: Graph, x: str, frames: int | None, states: list[str]) -> tuple[str, list[str]]:
        self._step = frames is not None
        try:
            return super().emit(g, x, frames, states)
        finally:
            self._step = False


def strided(conv: type[CausalConv1d]) -> StreamingModel:
    torch.manual_seed(1)
    return StreamingModel(
        Frontend(mel_basis(12), 128), [conv(12, 8, 3, stride=2), ReLU(), Linear(8, 1)], labels=["x"]
    )


def test_causal_stride_misaligned_with_the_hop(tmp_path: Path) -> None:
    folder = write_dir(strided(MisalignedStride), tmp_path / "stride" / "1", "stride")
    loads(folder)
    report = check(folder)
    assert report.failed() == ["step == sequence"]
    assert next(c for c in report.checks if c.name == "step == sequence").diffs["score"] > 1e-3
    # the correctly aligned layer passes, and the exporter refuses the misaligned one
    assert check(write_dir(strided(CausalConv1d), tmp_path / "ok" / "1", "ok")).ok
    with pytest.raises(ExportError, match=r"\[FAIL\] step == sequence"):
        export(strided(MisalignedStride), tmp_path / "refused" / "1", name="refused")
    assert not (tmp_path / "refused" / "1" / "model.json").exists()


def test_state_output_not_fed_back(tmp_path: Path) -> None:
    """The exporter dropped the conv cache: conv_out is the input state passed through."""
    folder = write_dir(small_vad(), tmp_path / "cache" / "1", "cache")
    m = onnx.load(str(folder / "model.onnx"))
    for node in m.graph.node:
        for i, name in enumerate(node.output):
            if name == "conv_out":
                node.output[i] = "conv_out_dropped"
    m.graph.node.append(helper.make_node("Identity", ["conv"], ["conv_out"]))
    onnx.save(m, str(folder / "model.onnx"))
    rehash(folder)
    loads(folder)
    report = check(folder)
    assert "states live" in report.failed() and "step == sequence" in report.failed()
    live = next(c for c in report.checks if c.name == "states live")
    assert "'conv'" in live.detail and "not fed back" in live.detail


def test_batch_dependent_result(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = StreamingModel(
        Frontend(mel_basis(8), 128), [CausalConv1d(8, 4, 2), BatchMean(), Linear(4, 1)], labels=["x"]
    )
    folder = write_dir(model, tmp_path / "batch" / "1", "batch")
    loads(folder)
    report = check(folder)
    assert "batched == solo" in report.failed()
    batched = next(c for c in report.checks if c.name == "batched == solo")
    assert "depends on its batch" in batched.detail and batched.diffs["score"] > 1e-3


def _symbolic_dims(path: Path, tensor: str) -> None:
    """What many exporters write: every dim of a state symbolic (the new state reshaped to
    the old one's runtime shape), so neither ORT nor the loader knows where the batch is."""
    m = onnx.load(str(path))
    out = tensor + "_out"
    for node in m.graph.node:
        for i, name in enumerate(node.output):
            if name == out:
                node.output[i] = out + "_raw"
    m.graph.node.append(helper.make_node("Shape", [tensor], [tensor + "_shape"]))
    m.graph.node.append(helper.make_node("Reshape", [out + "_raw", tensor + "_shape"], [out]))
    for vi in list(m.graph.input) + list(m.graph.output):
        if vi.name in (tensor, tensor + "_out"):
            for i, d in enumerate(vi.type.tensor_type.shape.dim):
                d.ClearField("dim_value")
                d.dim_param = f"{vi.name}_{i}"
    onnx.save(m, str(path))


def test_state_batch_axis_in_the_wrong_place(tmp_path: Path) -> None:
    """The GRU state is [1, B, H] in the graph; the manifest says [B, 1, H] (batch axis 0).
    At batch 1 the two layouts coincide, so single-stream tests pass; batching breaks."""
    folder = write_dir(small_vad(), tmp_path / "axis" / "1", "axis")
    for f in ("model.onnx", "sequence.onnx"):
        _symbolic_dims(folder / f, "h")
    spec = json.loads((folder / "model.json").read_text())
    assert spec["states"][1]["input"] == "h" and spec["states"][1]["batch_axis"] == 1
    spec["states"][1]["batch_axis"] = 0
    (folder / "model.json").write_text(json.dumps(spec))
    rehash(folder)
    loads(folder)  # the loader cannot tell (with known dims it refuses: see the control below)
    single = check_model_dir(folder, batch_sizes=(1,))
    assert next(c for c in single.checks if c.name == "step == sequence").ok  # one stream is fine
    report = check(folder)
    assert "batched == solo" in report.failed()
    assert report.checks[2].name == "signature" and report.checks[2].ok


def test_state_batch_axis_in_the_wrong_place_with_known_dims_is_refused_at_load(tmp_path: Path) -> None:
    from lookback.errors import ContractError

    folder = write_dir(small_vad(), tmp_path / "axis2" / "1", "axis2")
    spec = json.loads((folder / "model.json").read_text())
    spec["states"][1]["batch_axis"] = 0
    (folder / "model.json").write_text(json.dumps(spec))
    with pytest.raises(ContractError, match="batch axis 0 of 'h' is fixed"):
        loads(folder)
    report = check(folder)
    assert report.failed() == ["signature"]
