"""``lookback models check DIR``: exit 0 and a per-check report on a good model, 1 on a broken one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lookback.cli import main
from tests.streaming.support import small_vad, write_dir
from tests.streaming.test_broken_models import MisalignedStride, strided

ROOT = Path(__file__).resolve().parents[2]


def test_check_passes_the_shipped_default_model(capsys: pytest.CaptureFixture[str]) -> None:
    clip = ROOT / "tests" / "fixtures" / "audio" / "lookback_speech_clicks.wav"
    assert (
        main(["models", "check", str(ROOT / "model_store" / "lookback-vad" / "1"), "--clip", str(clip)]) == 0
    )
    out = capsys.readouterr().out
    assert "lookback-vad/1" in out and ": PASS" in out
    for name in ("batched == solo", "states live", "step == sequence"):
        assert f"[ok  ] {name}" in out


def test_check_json_on_an_exported_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = write_dir(small_vad(), tmp_path / "s" / "1", "s")
    assert main(["models", "check", str(folder), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True
    seq = next(c for c in report["checks"] if c["name"] == "step == sequence")
    assert set(seq["max_abs_diff"]) == {"score", "state conv", "state h"}
    assert seq["max_abs_diff"]["score"] <= 1e-5


def test_check_fails_a_broken_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = write_dir(strided(MisalignedStride), tmp_path / "b" / "1", "b")
    assert main(["models", "check", str(folder)]) == 1
    out = capsys.readouterr().out
    assert ": FAIL" in out and "[FAIL] step == sequence" in out


def test_check_refuses_a_path_that_is_not_a_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "check", str(tmp_path / "nope")]) == 2
    assert main(["models", "check", str(tmp_path)]) == 1  # a folder without model.json
    assert "[FAIL] manifest" in capsys.readouterr().out


def test_check_passes_silero_a_third_party_model(
    silero_model: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A hand-made model with a constant input, a state with batch axis 1 and no sequence graph."""
    folder = next((ROOT / "model_store" / silero_model).glob("*/model.json")).parent
    assert main(["models", "check", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "[ok  ] batched == solo" in out and "no sequence graph" in out
