"""The shipped wake-phrase models, model_store/lookback-wake/{1,2}: contract, parity, served end to end.

Streaming == offline == batched at three levels: the parity harness on the graphs (step
graph hop by hop at batch 1..64 vs the sequence graph in random chunks); the exporter's own
output (re-exporting the recipe's weights gives the shipped files, byte for byte); and the
server (``/v1/stream`` alone and four sessions at once, ``/v1/score``) against the step
graph run directly. Every test runs for each version in the store (version 1 stays loadable).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import soundfile as sf
from fastapi.testclient import TestClient

from lookback.engine.contract import Manifest, load_manifest
from lookback.engine.store import discover, open_graphs
from lookback.modelcheck import _Runner, _session, check_model_dir, run_sequence, run_steps

ROOT = Path(__file__).resolve().parents[2]
STORE = ROOT / "model_store"
RECIPES = {"1": STORE / "recipes" / "wake", "2": STORE / "recipes" / "wake2"}
# every version in the store (1 is committed; 2 is there once its recipe has run and exported it)
VERSIONS = sorted(p.parent.name for p in (STORE / "lookback-wake").glob("*/model.json"))
CLIP = ROOT / "tests" / "fixtures" / "wake" / "hey_lookback.wav"
TIMES = ROOT / "tests" / "fixtures" / "wake" / "hey_lookback.json"
TOL = 1e-5


@pytest.fixture(scope="module", params=VERSIONS)
def version(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def model_dir(version: str) -> Path:
    return STORE / "lookback-wake" / version


@pytest.fixture(scope="module")
def spec(model_dir: Path) -> Manifest:
    return load_manifest(model_dir / "model.json")


@pytest.fixture(scope="module")
def clip() -> np.ndarray:
    data, sr = sf.read(str(CLIP), dtype="int16")
    assert sr == 16000 and data.ndim == 1 and data.size % 256 == 0
    return data


def reference(spec: Manifest, clip: np.ndarray) -> np.ndarray:
    """The step graph hop by hop from the initial state: what every path must reproduce."""
    model_dir = STORE / spec.name / spec.version
    step = _Runner(spec, _session(model_dir / spec.graph.file), sequence=False)
    audio = np.concatenate([np.zeros(spec.context_samples, np.float32), clip.astype(np.float32) / 32768])
    got, _ = run_steps(step, [audio])
    return got[0][0][:, 0]


def detections(scores: np.ndarray, spec: Manifest) -> list[float]:
    """Event start times (s) with the manifest's threshold and hysteresis."""
    thr, neg = spec.events.threshold, spec.events.end_threshold
    off = int(np.ceil(spec.events.min_silence_ms / 1000 * spec.sample_rate / spec.hop_samples))
    starts, active, below = [], False, 0
    for i, s in enumerate(scores):
        if not active and s >= thr:
            starts.append((i + 1) * spec.hop_samples / spec.sample_rate)
            active, below = True, 0
        elif active:
            below = below + 1 if s < neg else 0
            active = below < off
    return starts


SHAPES = {  # version: (dilations, channels) of the dilated blocks b0..b5, bytes of both graphs at most
    "1": ((1, 2, 4, 8, 16, 16), 64, 1_000_000),
    "2": ((1, 2, 4, 8, 16, 32), 96, 1_100_000),  # 72 k weights + the 49 k-weight filterbank, twice
}


def test_manifest(spec: Manifest, version: str, model_dir: Path) -> None:
    assert spec.key == f"lookback-wake/{version}"
    assert (spec.hop_samples, spec.context_samples, spec.frame_samples) == (256, 384, 128)
    assert spec.labels == ["hey_lookback"]
    assert [s.input for s in spec.states] == ["down", "b0", "b1", "b2", "b3", "b4", "b5"]
    dilations, channels, max_bytes = SHAPES[version]
    assert [s.shape for s in spec.states] == [[1, 48]] + [[2 * d, channels] for d in dilations]
    assert all(s.batch_axis == 0 and s.output == s.input + "_out" for s in spec.states)
    assert spec.sequence is not None and 0.3 <= spec.events.threshold < 1.0
    total = sum((model_dir / f).stat().st_size for f in ("model.onnx", "sequence.onnx"))
    assert total < max_bytes


def test_engine_loads_it(version: str) -> None:
    stored = next(m for m in discover(STORE) if m.spec.key == f"lookback-wake/{version}")
    _step, seq = open_graphs(stored, providers="cpu", intra_op_threads=1, inter_op_threads=1)
    assert seq is not None


def test_parity_harness_passes(clip: np.ndarray, model_dir: Path) -> None:
    report = check_model_dir(model_dir, [clip.astype(np.float32) / 32768])
    assert report.ok, report.text()
    seq = next(c for c in report.checks if c.name == "step == sequence")
    assert seq.diffs["score"] <= TOL


def test_shipped_graphs_are_the_exporters_output(spec: Manifest, version: str) -> None:
    from lookback.streaming import build_graphs

    name = f"lookback_wake_recipe_train_{version}"
    recipe = RECIPES[version]
    sys.path.insert(0, str(recipe))
    try:
        mod_spec = importlib.util.spec_from_file_location(name, recipe / "train.py")
        assert mod_spec is not None and mod_spec.loader is not None
        mod: ModuleType = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(recipe))
    step, seq = build_graphs(mod.load_weights())
    assert spec.sequence is not None
    assert hashlib.sha256(step.SerializeToString()).hexdigest() == spec.graph.sha256
    assert hashlib.sha256(seq.SerializeToString()).hexdigest() == spec.sequence.sha256


def test_detects_the_phrase_and_not_the_near_misses(
    spec: Manifest, clip: np.ndarray, model_dir: Path
) -> None:
    assert spec.sequence is not None
    ends = json.loads(TIMES.read_text())["phrase_ends_s"]
    seq = _Runner(spec, _session(model_dir / spec.sequence.file), sequence=True)
    audio = np.concatenate([np.zeros(spec.context_samples, np.float32), clip.astype(np.float32) / 32768])
    scores, _ = run_sequence(seq, audio[None], [clip.size // spec.hop_samples])
    found = detections(scores[0][0, :, 0], spec)
    print(f"\n[wake {spec.version}] phrase ends {ends}, detections at {found}")
    assert len(found) == len(ends)
    for t, end in zip(found, ends, strict=True):
        assert end - 0.3 <= t <= end + 0.5


# --- served end to end -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    from lookback.app import create_app
    from lookback.settings import Settings

    models = [f"lookback-wake/{v}" for v in VERSIONS]
    settings = Settings(model_store=STORE, models=models, default_model="lookback-wake")
    with TestClient(create_app(settings)) as c:
        yield c


class WsSession:
    """One /v1/stream session driven step by step: send a chunk, read its results."""

    def __init__(self, ws: object, hop_frames: int) -> None:
        self.ws = ws
        self.hop_frames = hop_frames
        self.scores: list[float] = []
        self.events: list[tuple[str, float]] = []
        ready = ws.receive_json()  # type: ignore[attr-defined]
        assert ready["type"] == "ready" and ready["hop_samples"] == 256

    def send(self, frames: bytes) -> None:
        self.ws.send_bytes(frames)  # type: ignore[attr-defined]

    def read(self, results: int) -> None:
        want = len(self.scores) + results
        while len(self.scores) < want:
            self.take(self.ws.receive_json())  # type: ignore[attr-defined]

    def take(self, msg: dict) -> bool:
        if msg["type"] == "result":
            self.scores.append(msg["scores"]["hey_lookback"])
        elif msg["type"] == "event":
            self.events.append((msg["event"], msg["time"]))
        else:
            assert msg["type"] == "summary", msg
            return True
        return False

    def finish(self) -> None:
        self.ws.send_text(json.dumps({"type": "end"}))  # type: ignore[attr-defined]
        while not self.take(self.ws.receive_json()):  # type: ignore[attr-defined]
            pass


def _stream(
    client: TestClient, clips: list[np.ndarray], version: str, chunk_frames: int = 16
) -> list[WsSession]:
    """All clips at once, one session each, chunks sent round robin: their steps batch together."""
    with contextlib.ExitStack() as stack:
        sessions = [
            WsSession(
                stack.enter_context(
                    client.websocket_connect(f"/v1/stream?model=lookback-wake&version={version}&results=all")
                ),
                2,
            )
            for _ in clips
        ]
        data = [c.astype("<i2").tobytes() for c in clips]
        step = chunk_frames * 256
        for pos in range(0, max(len(d) for d in data), step):
            active = [(s, d[pos : pos + step]) for s, d in zip(sessions, data, strict=True) if pos < len(d)]
            for s, part in active:
                s.send(part)
            for s, part in active:
                s.read(len(part) // 512)
        for s in sessions:
            s.finish()
    return sessions


def test_served_streaming_equals_offline_equals_batched(
    client: TestClient, spec: Manifest, clip: np.ndarray, version: str
) -> None:
    ref = reference(spec, clip)
    # REST: the whole clip offline
    wav = CLIP.read_bytes()
    r = client.post(
        f"/v1/score?model=lookback-wake&version={version}", content=wav, headers={"content-type": "audio/wav"}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    offline = np.asarray(body["scores"]["hey_lookback"], np.float32)
    assert body["hop_samples"] == 256 and offline.shape == ref.shape
    assert float(np.max(np.abs(offline - ref))) <= TOL
    # WebSocket: alone
    (alone,) = _stream(client, [clip], version)
    assert float(np.max(np.abs(np.asarray(alone.scores, np.float32) - ref))) <= TOL
    # WebSocket: four sessions at once, different clips (shifted and scaled copies)
    clips = [clip, clip[256 * 37 :], (clip[: 256 * 300] // 2).astype(np.int16), clip[256 * 5 :]]
    together = _stream(client, clips, version, chunk_frames=8)
    for c, s in zip(clips, together, strict=True):
        assert float(np.max(np.abs(np.asarray(s.scores, np.float32) - reference(spec, c)))) <= TOL
    # the events are the same on both paths, and they are the phrase detections
    rest_events = [(e["event"], e["time"]) for e in body["events"]]
    assert alone.events == rest_events == together[0].events
    starts = [t for kind, t in rest_events if kind == "start"]
    ends = json.loads(TIMES.read_text())["phrase_ends_s"]
    assert len(starts) == len(ends)
