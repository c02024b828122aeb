"""The exporter: its output is accepted by the engine's own loader, serves the same numbers
as PyTorch, and it refuses what it cannot stream with an error that says why."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lookback.engine.store import discover, latest, open_graphs
from lookback.streaming import (
    LSTM,
    CausalConv1d,
    Delay,
    DepthwiseConv1d,
    ExportError,
    Frontend,
    Linear,
    ReLU,
    Residual,
    Sequential,
    StreamingModel,
    UnsupportedLayer,
    export,
    mel_basis,
)
from lookback.streaming.graph import Graph
from lookback.streaming.layers import Elementwise
from tests.streaming.support import small_vad


def test_export_writes_a_model_the_engine_loads(tmp_path: Path) -> None:
    model = small_vad()
    report = export(model, tmp_path / "store" / "tiny" / "1", name="tiny", events={"threshold": 0.6})
    assert report.ok, report.text()
    names = [c.name for c in report.checks]
    assert names == [
        "manifest",
        "files",
        "signature",
        "batched == solo",
        "states live",
        "step == sequence",
        "reference",
        "onnx == torch",
    ]
    stored = latest(discover(tmp_path / "store"), "tiny")
    spec = stored.spec
    assert (spec.hop_samples, spec.context_samples, spec.frame_samples) == (128, 384, 128)
    assert [(s.input, s.output, s.shape, s.batch_axis) for s in spec.states] == [
        ("conv", "conv_out", [2, 24], 0),
        ("h", "h_out", [1, 16], 1),
    ]
    assert spec.labels == ["speech"] and spec.events.threshold == 0.6
    step, seq = open_graphs(stored, providers="cpu", intra_op_threads=1, inter_op_threads=1)
    assert seq is not None
    assert {p.name for p in step.session.get_inputs()} == {"audio", "conv", "h"}


def test_multi_label_strided_model(tmp_path: Path) -> None:
    """Stride 2 in the body: a 256-sample hop, two front-end frames per step; three labels;
    an LSTM (two states), a delay, a residual depthwise block."""
    torch.manual_seed(3)
    model = StreamingModel(
        Frontend(mel_basis(16), 128),
        [
            CausalConv1d(16, 12, 4, stride=2, name="down"),
            ReLU(),
            Residual(DepthwiseConv1d(12, 3, dilation=2), ReLU(), Linear(12, 12)),
            Delay(12, 2),
            LSTM(12, 8, name="mem"),
            Linear(8, 3),
        ],
        labels=["a", "b", "c"],
    )
    out = tmp_path / "m" / "1"
    report = export(model, out, name="m")
    assert report.ok, report.text()
    spec = json.loads((out / "model.json").read_text())
    assert spec["hop_samples"] == 256 and spec["context_samples"] == 384
    assert [s["input"] for s in spec["states"]] == ["down", "conv0", "delay0", "mem_h", "mem_c"]
    assert [s["shape"] for s in spec["states"]] == [[2, 16], [4, 12], [2, 12], [1, 8], [1, 8]]
    assert spec["outputs"] == [{"name": "score", "labels": ["a", "b", "c"]}]


def test_the_step_graph_is_lowered_to_fast_ops(tmp_path: Path) -> None:
    import onnx

    out = tmp_path / "v" / "1"
    export(small_vad(), out, name="v")
    ops = [n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node]
    assert "Conv" not in ops and "GRU" not in ops  # one frame: Gemm/MatMul and the cell
    assert ops.count("Gemm") >= 4
    seq_ops = [n.op_type for n in onnx.load(str(out / "sequence.onnx")).graph.node]
    assert "GRU" in seq_ops


def test_refuses_a_module_that_is_not_a_streaming_layer() -> None:
    with pytest.raises(UnsupportedLayer, match=r"torch\.nn\.modules\.conv\.Conv1d is not a streaming layer"):
        Sequential(nn.Conv1d(4, 4, 3))


def test_refuses_a_residual_that_changes_rate_or_width() -> None:
    with pytest.raises(UnsupportedLayer, match="strided"):
        Residual(CausalConv1d(4, 4, 3, stride=2))
    with pytest.raises(UnsupportedLayer, match="equal widths"):
        Residual(Linear(4, 5))


class BatchMean(Elementwise):
    """Subtracts the mean over the batch: the classic batch-dependent result."""

    def forward_stateful(self, x: torch.Tensor, states: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list]:
        return x - x.mean(dim=0, keepdim=True), []

    def emit(self, g: Graph, x: str, frames: int | None, states: list[str]) -> tuple[str, list[str]]:
        return g.op("Sub", [x, g.op("ReduceMean", [x], axes=[0], keepdims=1)]), []


def test_refuses_to_write_the_manifest_when_parity_fails(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = StreamingModel(
        Frontend(mel_basis(8), 128), [CausalConv1d(8, 4, 2), BatchMean(), Linear(4, 1)], labels=["x"]
    )
    out = tmp_path / "bad" / "1"
    with pytest.raises(ExportError, match="batched == solo") as info:
        export(model, out, name="bad")
    assert info.value.report is not None and "batched == solo" in info.value.report.failed()
    assert not (out / "model.json").exists()
    assert not (tmp_path / "bad").exists()  # no scratch, and no empty folder, left behind


def test_server_modules_do_not_import_torch() -> None:
    code = (
        "import sys; import lookback.app, lookback.cli, lookback.modelcheck, lookback.server; "
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('lookback.streaming')); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_export_matches_torch_on_a_real_clip(tmp_path: Path) -> None:
    import soundfile as sf

    root = Path(__file__).resolve().parents[2]
    clip = sf.read(str(root / "tests/fixtures/audio/lookback_speech_noise.wav"), dtype="int16")[0]
    clip = clip[: 16000 * 3].astype(np.float32) / 32768.0
    report = export(small_vad(seed=5), tmp_path / "r" / "1", name="r", clips=[clip])
    torch_check = report.checks[-1]
    assert torch_check.name == "onnx == torch" and torch_check.ok
    assert torch_check.diffs["score"] <= 1e-5


def test_a_patch_down_sampler_exports(tmp_path: Path) -> None:
    """k = s = 2 reads no frame of a previous step: no state, and the export passes (the
    harness once refused it: "the graph ignores state 'conv0'")."""
    torch.manual_seed(0)
    model = StreamingModel(
        Frontend(mel_basis(8), 128), [CausalConv1d(8, 6, 2, stride=2), ReLU(), Linear(6, 1)], labels=["x"]
    )
    report = export(model, tmp_path / "patch" / "1", name="patch")
    assert report.ok, report.text()
    spec = latest(discover(tmp_path), "patch").spec
    assert spec.states == [] and spec.hop_samples == 256


def test_refuses_a_hop_that_is_not_whole_wire_frames_when_built() -> None:
    """Before a minute of training is spent: the model itself refuses, not the export."""
    with pytest.raises(
        UnsupportedLayer, match=r"hop_samples 64 .* not a multiple of the 128-sample wire frame"
    ):
        StreamingModel(Frontend(mel_basis(8, window=256), 64), [Linear(8, 1)], labels=["x"])
    # a stride that makes whole frames is fine: 64 x 2 = 128
    StreamingModel(Frontend(mel_basis(8, window=256), 64), [CausalConv1d(8, 1, 2, stride=2)], labels=["x"])


def test_refuses_duplicate_or_reserved_state_names_when_built() -> None:
    with pytest.raises(ValueError, match="state names must be unique"):
        StreamingModel(
            Frontend(mel_basis(8), 128),
            [CausalConv1d(8, 8, 3, name="c"), CausalConv1d(8, 1, 3, name="c")],
            labels=["x"],
        )
    with pytest.raises(ValueError, match=r"'lookback\.' are the server's"):
        StreamingModel(Frontend(mel_basis(8), 128), [CausalConv1d(8, 1, 3, name="lookback.c")], labels=["x"])


def test_a_refused_export_leaves_no_empty_folder(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = StreamingModel(
        Frontend(mel_basis(8), 128), [CausalConv1d(8, 4, 2), BatchMean(), Linear(4, 1)], labels=["x"]
    )
    with pytest.raises(ExportError):
        export(model, tmp_path / "store" / "bad" / "1", name="bad")
    assert list(tmp_path.iterdir()) == []  # neither bad/ nor store/ was left behind


def test_strided_residual_suggests_and_takes_a_projection_shortcut(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedLayer, match=r"shortcut=CausalConv1d\(4, 6, 1, stride=2\)"):
        Residual(CausalConv1d(4, 6, 3, stride=2))
    torch.manual_seed(2)
    block = Residual(CausalConv1d(8, 6, 3, stride=2), ReLU(), shortcut=CausalConv1d(8, 6, 1, stride=2))
    assert (block.in_channels, block.out_channels, block.stride) == (8, 6, 2)
    with torch.no_grad():
        x = torch.randn(2, 8, 8)
        assert block.shortcut is not None
        expect = block.shortcut(x) + block.inner(x)
        assert torch.allclose(block(x), expect)
    model = StreamingModel(Frontend(mel_basis(8), 128), [block, Linear(6, 1)], labels=["x"])
    report = export(model, tmp_path / "proj" / "1", name="proj")
    assert report.ok, report.text()
