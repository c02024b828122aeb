"""``lookback models convert module.py:build weights.pt OUT_DIR``: the file needs no Lookback
import; the weights are a plain ``state_dict``; a refusal says why and writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lookback.cli import main

SOURCE = """
import torch
import torch.nn.functional as F
from torch import nn


class KWS(nn.Module):
    def __init__(self, bidirectional: bool = False) -> None:
        super().__init__()
        self.fb = nn.Conv1d(1, 32, 512, stride=128)
        self.conv = nn.Conv1d(32, 16, 5, dilation=2)
        self.gru = nn.GRU(16, 8, batch_first=True, bidirectional=bidirectional)
        self.out = nn.Linear(8 * (2 if bidirectional else 1), 2)

    def forward(self, audio):
        x = torch.log(self.fb(audio.unsqueeze(1)) ** 2 + 1e-6)
        x = F.relu(self.conv(F.pad(x, (8, 0))))
        y, _ = self.gru(x.transpose(1, 2))
        return torch.sigmoid(self.out(y))


def build():
    return KWS()


def build_bidirectional():
    return KWS(bidirectional=True)
"""


def test_convert_a_file_and_its_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "kws.py"
    src.write_text(SOURCE)
    torch.manual_seed(0)
    ns: dict = {}
    exec(compile(SOURCE, str(src), "exec"), ns)
    trained = ns["build"]()
    with torch.no_grad():
        trained.out.bias.fill_(0.25)  # a weight build() alone would not give
    torch.save(trained.state_dict(), tmp_path / "w.pt")
    out = tmp_path / "store" / "kws" / "3"
    code = main(
        [
            "models",
            "convert",
            f"{src}:build",
            str(tmp_path / "w.pt"),
            str(out),
            "--hop",
            "128",
            "--labels",
            "yes,no",
        ]
    )
    text = capsys.readouterr().out
    assert code == 0, text
    assert "PASS" in text and "[ok  ] onnx == torch" in text
    assert "hop 128 samples (8 ms), context 384, states conv[32, 8]@0, gru[1, 8]@1" in text
    spec = json.loads((out / "model.json").read_text())
    assert (spec["name"], spec["version"]) == ("kws", "3")
    assert spec["outputs"][0]["labels"] == ["yes", "no"]
    import onnx
    from onnx import numpy_helper

    consts = [numpy_helper.to_array(t) for t in onnx.load(str(out / "model.onnx")).graph.initializer]
    assert any(c.shape == (2,) and (c == 0.25).all() for c in consts)  # the saved weights, not build()'s


def test_a_refused_conversion_exits_2_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "kws.py"
    src.write_text(SOURCE)
    out = tmp_path / "store" / "kws" / "1"
    assert main(["models", "convert", f"{src}:build_bidirectional", "-", str(out)]) == 2
    assert "bidirectional GRU reads the clip backwards" in capsys.readouterr().err
    assert not out.exists()
    assert main(["models", "convert", f"{src}:build", "-", str(out), "--hop", "256"]) == 2
    assert "the module's hop is 128 samples" in capsys.readouterr().err
