"""Helpers for engine tests: result sinks, engines, clips and streaming drivers."""

from __future__ import annotations

import contextlib
import random
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from lookback.engine.engine import Engine
from lookback.engine.events import Event
from lookback.engine.served import ServedModel
from lookback.engine.session import StreamSession
from lookback.errors import LookbackError
from lookback.settings import Settings

REPO = Path(__file__).resolve().parents[2]
STORE = REPO / "model_store"
AUDIO = REPO / "tests" / "fixtures" / "audio"
SILERO_KEY = "silero-vad/6.2.3"
DEFAULT_KEY = "lookback-vad/1"
SR = 16000
FRAME = 128


def settings(**overrides: object) -> Settings:
    """``tests.conftest.test_settings`` (imported lazily: its name would be collected as a test)."""
    from tests.conftest import test_settings as make

    return make(**overrides)


def require_default_model() -> str:
    """The default model must be in the store; its tests fail (never skip) without it."""
    folder = STORE / "lookback-vad" / "1"
    missing = [f for f in ("model.json", "model.onnx", "sequence.onnx") if not (folder / f).is_file()]
    if missing:
        pytest.fail(f"default model lookback-vad/1 is not in {STORE}: missing {missing}", pytrace=False)
    return DEFAULT_KEY


@contextlib.asynccontextmanager
async def running_engine(*models: str, **overrides: object) -> AsyncIterator[Engine]:
    overrides.setdefault("model_store", STORE)
    engine = Engine(settings(models=list(models), **overrides))
    await engine.start()
    try:
        yield engine
    finally:
        await engine.stop()


# --- sinks ----------------------------------------------------------------------------------


@dataclass
class Collect:
    """ResultSink recording everything, in call order."""

    indices: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    rows: list[np.ndarray] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    errors: list[tuple[int, LookbackError]] = field(default_factory=list)

    def on_result(self, index: int, time: float, scores: list[float], events: list[Event] | None) -> None:
        self.indices.append(index)
        self.times.append(time)
        self.rows.append(np.array(scores, dtype=np.float32, copy=True))
        if events:
            self.events.extend(events)

    def on_error(self, index: int, error: LookbackError) -> None:
        self.errors.append((index, error))

    @property
    def scores(self) -> np.ndarray:
        if not self.rows:
            return np.zeros((0, 1), np.float32)
        return np.stack(self.rows)


# --- audio ----------------------------------------------------------------------------------


def read_clip(name: str) -> np.ndarray:
    data, rate = sf.read(str(AUDIO / name), dtype="int16")
    assert rate == SR and data.ndim == 1
    return data


def speech() -> np.ndarray:
    return read_clip("silero_ref_speech.wav")


def whole_frames(x: np.ndarray) -> np.ndarray:
    """Zero-pad to a whole number of 128-sample frames."""
    return np.pad(x, (0, (-x.size) % FRAME))


def to_s16(x: np.ndarray) -> bytes:
    return np.asarray(x).astype("<i2").tobytes()


def fixture_clips() -> list[np.ndarray]:
    """Every 16 kHz mono clip in tests/fixtures/audio (the Silero reference clip at least)."""
    clips = [read_clip(p.name) for p in sorted(AUDIO.glob("*.wav"))]
    assert clips, f"no clips in {AUDIO}"
    return clips


def varied_clips(n: int, seconds: float, seed: int = 0) -> list[np.ndarray]:
    """``n`` different int16 clips: slices/offsets/gains of the fixture clips plus noise,
    a tone and silence, each a whole number of frames long."""
    rng = np.random.default_rng(seed)
    bases = [c.astype(np.float64) for c in fixture_clips()]
    length = int(seconds * SR) // FRAME * FRAME
    clips = []
    for i in range(n):
        base = bases[i % len(bases)]
        offset = int(rng.integers(0, base.size - length))
        gain = float(rng.uniform(0.05, 1.5))
        x = base[offset : offset + length] * gain
        x += rng.normal(0.0, rng.uniform(0, 800), length)
        if i % 8 == 3:  # a tone burst
            t = np.arange(length) / SR
            x += 3000 * np.sin(2 * np.pi * rng.uniform(100, 3000) * t) * (t > rng.uniform(0, 1))
        if i % 8 == 5:  # silence for a while
            x[: length // 2] = 0
        clips.append(np.clip(np.round(x), -32768, 32767).astype(np.int16))
    return clips


def even_bursts(n_frames: int, k: int) -> list[int]:
    """Frame counts per push: ``k`` at a time, then the remainder."""
    return [k] * (n_frames // k) + ([n_frames % k] if n_frames % k else [])


def random_bursts(n_frames: int, max_burst: int, rng: random.Random) -> list[int]:
    """Frame counts per push, summing to ``n_frames``."""
    out = []
    left = n_frames
    while left:
        k = min(left, rng.randint(1, max_burst))
        out.append(k)
        left -= k
    return out


# --- driving sessions -----------------------------------------------------------------------


async def push_all(
    session: StreamSession, data: bytes, bursts: Iterable[int], frame_bytes: int | None = None
) -> None:
    """Push ``data`` in bursts of whole frames, waiting for room (never dropping audio)."""
    fb = frame_bytes or session.frame_bytes
    pos = 0
    for k in bursts:
        chunk = data[pos : pos + k * fb]
        pos += len(chunk)
        await session.wait_for_room(len(chunk))
        session.push(chunk)
    assert pos == len(data)


async def stream_clip(
    engine: Engine, handle: ServedModel, clip: np.ndarray, *, frames_per_push: int = 1, flush: bool = True
) -> Collect:
    """One session, alone: the clip pushed ``frames_per_push`` frames at a time."""
    sink = Collect()
    session = engine.open_session(handle, sink)
    try:
        data = to_s16(whole_frames(clip))
        await push_all(session, data, even_bursts(len(data) // session.frame_bytes, frames_per_push))
        if flush:
            session.flush()
        await session.wait_idle()
        session.finish()
        sink.events = list(session.events)
    finally:
        session.close()
    assert not sink.errors, sink.errors
    assert sink.indices == list(range(len(sink.indices)))
    return sink


async def offline_chunks(clip: np.ndarray, sizes: Sequence[int]) -> AsyncIterator[np.ndarray]:
    """A clip as float32 chunks of the given sizes (cycled)."""
    x = clip.astype(np.float32) / np.float32(32768.0)
    pos, i = 0, 0
    while pos < x.size:
        k = sizes[i % len(sizes)]
        yield x[pos : pos + k]
        pos += k
        i += 1


async def score_offline(
    engine: Engine, handle: ServedModel, chunks: AsyncIterator[np.ndarray]
) -> tuple[np.ndarray, list[Event]]:
    rows, events = [], []
    expected_first = 0
    async for out in engine.score(handle, chunks):
        assert out.first_step == expected_first
        expected_first += len(out.scores)
        rows.append(out.scores)
        events.extend(out.events)
    return np.concatenate(rows), events
