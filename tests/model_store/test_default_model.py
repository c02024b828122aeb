"""The shipped default model, model_store/lookback-vad/1: graphs, manifest, hashes, sanity.

Needs only onnxruntime, numpy and soundfile (no torch). The model and the fixture clips
are made by model_store/recipes (run.sh).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from lookback.engine.contract import (
    GraphPort,
    Manifest,
    check_sequence_graph,
    check_step_graph,
    load_manifest,
)
from tests.support import AUDIO, read_clip

ROOT = Path(__file__).resolve().parents[2]
MODEL_DIR = ROOT / "model_store" / "lookback-vad" / "1"
SPEECH_CLIPS = ["lookback_speech_noise.wav", "lookback_speech_clicks.wav"]
NOISE_CLIP = "lookback_noise_only.wav"
TOL = 1e-5


def _session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def spec() -> Manifest:
    return load_manifest(MODEL_DIR / "model.json")


@pytest.fixture(scope="module")
def step(spec: Manifest) -> ort.InferenceSession:
    return _session(MODEL_DIR / spec.graph.file)


@pytest.fixture(scope="module")
def sequence(spec: Manifest) -> ort.InferenceSession:
    assert spec.sequence is not None
    return _session(MODEL_DIR / spec.sequence.file)


def _clip(name: str) -> np.ndarray:
    return read_clip(name).astype(np.float32) / 32768.0


def _states(spec: Manifest, batch: int = 1) -> dict[str, np.ndarray]:
    out = {}
    for st in spec.states:
        shape = list(st.shape)
        shape.insert(st.batch_axis, batch)
        out[st.input] = np.full(shape, st.initial, dtype=np.float32)
    return out


def _padded(spec: Manifest, audio: np.ndarray) -> np.ndarray:
    """Zero context before the first hop, whole hops only."""
    n = audio.size // spec.hop_samples * spec.hop_samples
    return np.concatenate([np.zeros(spec.context_samples, np.float32), audio[:n]])


def _run_steps(
    spec: Manifest, step: ort.InferenceSession, audio: np.ndarray
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    states = _states(spec)
    hop, win = spec.hop_samples, spec.window_samples
    scores = []
    for t in range((audio.size - spec.context_samples) // hop):
        feed = {spec.audio_input.name: audio[None, t * hop : t * hop + win], **states}
        outs = dict(zip([o.name for o in step.get_outputs()], step.run(None, feed), strict=True))
        scores.append(outs["score"][0, 0])
        states = {st.input: outs[st.output] for st in spec.states}
    return np.asarray(scores, np.float32), states


def _run_sequence(
    spec: Manifest, seq: ort.InferenceSession, audio: np.ndarray, chunks: list[int]
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    states = _states(spec)
    hop, ctx = spec.hop_samples, spec.context_samples
    names = [o.name for o in seq.get_outputs()]
    scores, t = [], 0
    for n in chunks:
        feed = {spec.audio_input.name: audio[None, t * hop : ctx + (t + n) * hop], **states}
        outs = dict(zip(names, seq.run(None, feed), strict=True))
        assert outs["score"].shape == (1, n)
        scores.append(outs["score"][0])
        states = {st.input: outs[st.output] for st in spec.states}
        t += n
    return np.concatenate(scores), states


def test_manifest_is_valid(spec: Manifest) -> None:
    assert spec.key == "lookback-vad/1"
    assert (spec.sample_rate, spec.frame_samples, spec.hop_samples, spec.context_samples) == (
        16000,
        128,
        128,
        384,
    )
    assert [(s.input, s.output, s.batch_axis) for s in spec.states] == [
        ("conv", "conv_out", 0),
        ("h", "h_out", 1),
    ]
    assert spec.labels == ["speech"]
    assert 0.2 < spec.events.threshold < 0.8
    assert spec.sequence is not None and spec.sequence.max_steps == 2048


def test_manifest_matches_graphs(
    spec: Manifest, step: ort.InferenceSession, sequence: ort.InferenceSession
) -> None:
    check_step_graph(
        spec, [GraphPort.of(p) for p in step.get_inputs()], [GraphPort.of(p) for p in step.get_outputs()]
    )
    check_sequence_graph(
        spec,
        [GraphPort.of(p) for p in sequence.get_inputs()],
        [GraphPort.of(p) for p in sequence.get_outputs()],
    )


def test_sha256_matches_files(spec: Manifest) -> None:
    assert spec.sequence is not None
    for g in (spec.graph, spec.sequence):
        assert hashlib.sha256((MODEL_DIR / g.file).read_bytes()).hexdigest() == g.sha256


def test_model_is_small() -> None:
    total = sum((MODEL_DIR / f).stat().st_size for f in ("model.onnx", "sequence.onnx"))
    assert (MODEL_DIR / "model.onnx").stat().st_size < 1_000_000
    assert total < 2_000_000


@pytest.mark.parametrize("seed", [0, 1])
def test_sequence_in_random_chunks_equals_steps(
    spec: Manifest, step: ort.InferenceSession, sequence: ort.InferenceSession, seed: int
) -> None:
    audio = _padded(spec, _clip(SPEECH_CLIPS[seed % len(SPEECH_CLIPS)])[: 16000 * 5])
    total = (audio.size - spec.context_samples) // spec.hop_samples
    rng = np.random.default_rng(seed)
    chunks: list[int] = [1, 1]
    while sum(chunks) < total:
        chunks.append(int(rng.choice([1, 2, 3, int(rng.integers(4, 40)), int(rng.integers(40, 300))])))
    chunks[-1] -= sum(chunks) - total
    chunks = [c for c in chunks if c > 0]
    assert 1 in chunks and max(chunks) > 40

    ref, ref_states = _run_steps(spec, step, audio)
    got, got_states = _run_sequence(spec, sequence, audio, chunks)
    assert got.shape == ref.shape == (total,)
    assert float(np.max(np.abs(got - ref))) <= TOL
    for name in ref_states:
        assert got_states[name].shape == ref_states[name].shape
        assert float(np.max(np.abs(got_states[name] - ref_states[name]))) <= TOL


def test_batched_step_equals_single(spec: Manifest, step: ort.InferenceSession) -> None:
    """Batch axis 1 of h is really the batch: rows of a batch equal runs alone."""
    rng = np.random.default_rng(3)
    b = 5
    audio = rng.uniform(-0.2, 0.2, (b, spec.window_samples)).astype(np.float32)
    states = {k: rng.standard_normal(v.shape).astype(np.float32) * 0.5 for k, v in _states(spec, b).items()}
    batched = step.run(None, {"audio": audio, **states})
    for i in range(b):
        alone = step.run(
            None,
            {"audio": audio[i : i + 1], "conv": states["conv"][i : i + 1], "h": states["h"][:, i : i + 1]},
        )
        assert np.max(np.abs(alone[0] - batched[0][i : i + 1])) <= TOL
        assert np.max(np.abs(alone[1] - batched[1][i : i + 1])) <= TOL
        assert np.max(np.abs(alone[2] - batched[2][:, i : i + 1])) <= TOL


def test_long_sequence_and_silence(spec: Manifest, sequence: ort.InferenceSession) -> None:
    assert spec.sequence is not None
    n = spec.sequence.max_steps
    audio = np.zeros((2, spec.context_samples + n * spec.hop_samples), np.float32)
    outs = sequence.run(None, {"audio": audio, **_states(spec, 2)})
    assert outs[0].shape == (2, n)
    # digital silence is not speech, not even at the start from zero state
    assert float(outs[0].max()) < spec.events.end_threshold
    assert float(outs[0][:, 10:].max()) < 0.1


def test_scores_are_sensible(spec: Manifest, sequence: ort.InferenceSession) -> None:
    labels = json.loads((AUDIO / "lookback_labels.json").read_text())["clips"]
    thr = spec.events.threshold
    for name in SPEECH_CLIPS:
        audio = _padded(spec, _clip(name))
        n = (audio.size - spec.context_samples) // spec.hop_samples
        scores, _ = _run_sequence(spec, sequence, audio, [n])
        mask = np.zeros(n, bool)
        for a, b in labels[name]["speech"]:
            mask[a:b] = True
        assert mask.any() and (~mask).any()
        assert float(np.mean(scores[mask] >= thr)) > 0.8, name
        assert float(np.mean(scores[~mask] < thr)) > 0.7, name
        assert float(np.mean(scores[mask])) > float(np.mean(scores[~mask])) + 0.4, name
    audio = _padded(spec, _clip(NOISE_CLIP))
    n = (audio.size - spec.context_samples) // spec.hop_samples
    scores, _ = _run_sequence(spec, sequence, audio, [n])
    assert float(np.mean(scores >= thr)) < 0.1
    assert float(np.mean(scores)) < 0.2


def test_engine_store_loads_it() -> None:
    """The engine's own loader finds the model, checks its hashes and both signatures."""
    from lookback.engine.store import discover, latest, open_graphs

    stored = latest(discover(ROOT / "model_store"), "lookback-vad")
    assert stored.spec.key == "lookback-vad/1"
    _step, seq = open_graphs(stored, providers="cpu", intra_op_threads=1, inter_op_threads=1)
    assert seq is not None
