"""The default model written with lookback.streaming: the shipped graphs ARE the exporter's output.

The recipe's weights (``model_store/recipes/lookback-vad-1.weights.npz``) exported by
``lookback.streaming`` give byte-identical files to the shipped ones, and their scores equal
those of the hand-written step graph they replaced (kept as reference scores on the fixture
clips) within 1e-5.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path
from types import ModuleType

import numpy as np
import soundfile as sf

from lookback.engine.contract import load_manifest
from lookback.modelcheck import _Runner, _session, run_sequence, run_steps

ROOT = Path(__file__).resolve().parents[2]
MODEL_DIR = ROOT / "model_store" / "lookback-vad" / "1"
RECIPE = ROOT / "model_store" / "recipes"
HANDWRITTEN = ROOT / "tests" / "fixtures" / "lookback_vad_handwritten_scores.json"


def recipe_model() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lookback_vad_recipe_model", RECIPE / "model.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_shipped_graphs_are_the_exporters_output() -> None:
    from lookback.streaming import build_graphs

    model = recipe_model().load_weights()
    step, seq = build_graphs(model)
    manifest = load_manifest(MODEL_DIR / "model.json")
    assert manifest.sequence is not None
    assert hashlib.sha256(step.SerializeToString()).hexdigest() == manifest.graph.sha256
    assert hashlib.sha256(seq.SerializeToString()).hexdigest() == manifest.sequence.sha256
    assert [s.input for s in manifest.states] == model.state_names() == ["conv", "h"]


def test_scores_equal_the_hand_written_step_graph() -> None:
    ref = json.loads(HANDWRITTEN.read_text())
    assert ref["model"] == "lookback-vad/1"
    spec = load_manifest(MODEL_DIR / "model.json")
    assert spec.sequence is not None
    step = _Runner(spec, _session(MODEL_DIR / spec.graph.file), sequence=False)
    seq = _Runner(spec, _session(MODEL_DIR / spec.sequence.file), sequence=True)
    for name, want in ref["clips"].items():
        x = (
            sf.read(str(ROOT / "tests" / "fixtures" / "audio" / name), dtype="int16")[0].astype(np.float32)
            / 32768
        )
        clip = np.concatenate([np.zeros(spec.context_samples, np.float32), x[: x.size // 128 * 128]])
        want_a = np.asarray(want, np.float32)
        got, _ = run_steps(step, [clip])
        assert got[0][0][:, 0].shape == want_a.shape
        assert float(np.max(np.abs(got[0][0][:, 0] - want_a))) <= 1e-5, name
        whole, _ = run_sequence(seq, clip[None], [want_a.size])
        assert float(np.max(np.abs(whole[0][0, :, 0] - want_a))) <= 1e-5, name
