"""docs/byom.md's custom-layer example runs as written and exports a model that passes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lookback.engine.store import discover, latest, open_graphs

DOC = Path(__file__).resolve().parents[2] / "docs" / "byom.md"


def example() -> str:
    text = DOC.read_text()
    block = re.search(
        r"<!-- custom-layer-example -->\s*```python\n(.*?)```\s*<!-- /custom-layer-example -->", text, re.S
    )
    assert block is not None, "docs/byom.md lost its custom-layer example"
    return block.group(1)


def test_the_custom_layer_example_exports_and_serves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    scope: dict[str, object] = {"__name__": "byom_example"}
    exec(compile(example(), str(DOC), "exec"), scope)
    report = scope["report"]
    assert getattr(report, "ok", False)
    assert ": PASS" in capsys.readouterr().out
    stored = latest(discover(tmp_path / "my_store"), "delta-vad")
    assert [s.input for s in stored.spec.states] == ["delta", "conv0", "gru0"]
    assert stored.spec.states[0].shape == [1, 24]
    open_graphs(stored, providers="cpu", intra_op_threads=1, inter_op_threads=1)
