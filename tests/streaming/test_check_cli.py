"""``lookback models check DIR``: exit 0 and a per-check report on a good model, 1 on a broken one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lookback.cli import main
from lookback.streaming import StreamingModel
from tests.streaming.support import drop_sequence, edit_manifest, rehash, small_vad, twin_convs, write_dir
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
    assert main(["models", "check", str(folder), "--allow-unverified"]) == 0
    out = capsys.readouterr().out
    assert "[ok  ] batched == solo" in out and "[skip] reference" in out


def _clip_and_reference(model: StreamingModel, tmp_path: Path) -> tuple[Path, Path]:
    """A WAV clip and the PyTorch module's scores for it (from zero state): ``[N, labels]``."""
    import soundfile as sf
    import torch

    rng = np.random.default_rng(3)
    pcm = (rng.standard_normal(128 * 40) * 3000).astype(np.int16)
    wav = tmp_path / "clip.wav"
    sf.write(str(wav), pcm, 16000, subtype="PCM_16")
    audio = np.concatenate([np.zeros(model.context_samples), pcm / 32768.0]).astype(np.float32)
    model.eval()
    with torch.no_grad():
        scores = model(torch.from_numpy(audio[None]))[0].numpy()
    np.save(tmp_path / "scores.npy", scores)
    return wav, tmp_path / "scores.npy"


def _swap_states(spec: dict) -> None:
    a, b = spec["states"]
    a["output"], b["output"] = b["output"], a["output"]


def test_without_a_reference_the_scores_are_not_certified(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Swapped same-shaped state outputs, no sequence graph: every self-consistency check
    passes, yet the scores are wrong. Without a reference the check says so, exits 4."""
    folder = write_dir(twin_convs(), tmp_path / "swapped" / "1", "swapped")
    drop_sequence(folder)
    edit_manifest(folder, _swap_states)
    assert main(["models", "check", str(folder)]) == 4
    out = capsys.readouterr().out
    assert ": PASS" not in out and ": UNVERIFIED" in out
    assert "[ok  ] reference" not in out and "[skip] reference" in out and "--reference" in out
    assert main(["models", "check", str(folder), "--allow-unverified"]) == 0
    assert "[skip] reference" in capsys.readouterr().out


def test_a_reference_scores_file_catches_swapped_states(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = twin_convs()
    wav, ref = _clip_and_reference(model, tmp_path)
    good = write_dir(model, tmp_path / "good" / "1", "good")
    drop_sequence(good)
    assert main(["models", "check", str(good), "--clip", str(wav), "--reference", str(ref)]) == 0
    out = capsys.readouterr().out
    assert ": PASS" in out and "[ok  ] reference" in out
    bad = write_dir(model, tmp_path / "bad" / "1", "bad")
    drop_sequence(bad)
    edit_manifest(bad, _swap_states)
    assert main(["models", "check", str(bad), "--clip", str(wav), "--reference", str(ref)]) == 1
    out = capsys.readouterr().out
    assert "[FAIL] reference" in out and "clip.wav" in out
    # a reference needs the clip it was computed on
    assert main(["models", "check", str(good), "--reference", str(ref)]) == 2


def test_two_states_naming_one_output_fail_the_check_as_they_fail_the_server(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The server's multi-step Loop graph cannot define one name twice: the manifest is refused."""
    folder = write_dir(twin_convs(), tmp_path / "dup" / "1", "dup")
    drop_sequence(folder)  # with a sequence graph, step == sequence would fail it too
    edit_manifest(folder, lambda spec: spec["states"][1].update(output=spec["states"][0]["output"]))
    assert main(["models", "check", str(folder), "--allow-unverified"]) == 1
    out = capsys.readouterr().out
    assert "[FAIL] manifest" in out and "output names must be unique" in out and "a_out" in out


def test_the_check_builds_the_multi_step_graph_the_server_builds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A step graph ONNX Runtime loads but the server's Loop graph cannot take (a node output
    in the server's reserved ``lookback.`` namespace) fails the check, not the server."""
    import onnx

    folder = write_dir(small_vad(), tmp_path / "reserved" / "1", "reserved")
    for f in ("model.onnx", "sequence.onnx"):
        m = onnx.load(str(folder / f))
        old = m.graph.node[0].output[0]
        for node in m.graph.node:
            node.input[:] = ["lookback.x" if i == old else i for i in node.input]
            node.output[:] = ["lookback.x" if o == old else o for o in node.output]
        onnx.save(m, str(folder / f))
    rehash(folder)
    assert main(["models", "check", str(folder)]) == 1
    out = capsys.readouterr().out
    assert "[FAIL] signature" in out and "reserved" in out


def test_models_list_shows_the_model_the_server_would_refuse(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = write_dir(twin_convs(), tmp_path / "dup" / "1", "dup")
    edit_manifest(folder, lambda spec: spec["states"][1].update(output=spec["states"][0]["output"]))
    write_dir(small_vad(), tmp_path / "good" / "1", "good")
    assert main(["models", "--model-store", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "good/1: ok" in out and "dup/1: refused:" in out
