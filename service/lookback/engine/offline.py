"""Offline scoring: a clip in, chunks of scores and events out, in bounded memory.

The clip arrives as an async iterator of float32 chunks (samples in [-1, 1)); nothing
here ever holds more than one chunk plus a partial hop. With a ``sequence`` graph each
chunk is scored in one call of up to ``max_steps`` steps (in the offline executor, so
the event loop and the streaming batcher stay responsive); without one, the chunk goes
through an ordinary StreamSession and the shared micro-batcher. Either way the end is
padded like a streaming ``flush`` and events come from the same detector, so offline
and streaming results agree.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from lookback.engine.compute import initial_states
from lookback.engine.events import Event, EventDetector
from lookback.engine.pcm import ModelInput
from lookback.engine.served import ServedModel
from lookback.engine.session import StreamSession
from lookback.errors import LookbackError


@dataclass
class OfflineChunk:
    first_step: int
    scores: np.ndarray  # [n, labels] float32
    events: list[Event] = field(default_factory=list)


class SequenceScorer:
    """Carries context, states and a partial hop across chunks for the sequence graph."""

    def __init__(self, model: ServedModel) -> None:
        spec = model.spec
        assert spec.sequence is not None and model.sequence is not None
        self.spec = spec
        self.rt = model.sequence
        self.max_steps = spec.sequence.max_steps
        self.audio_name = spec.sequence.audio_input or spec.audio_input.name
        self.input = ModelInput(spec.audio_input.scale, spec.audio_input.layout)
        self.states = initial_states(spec, 1)
        self.context = np.zeros(spec.context_samples, np.float32)
        self.leftover = np.zeros(0, np.float32)
        self.constants = dict(model.step_compute.constants)
        self.out_names = [o.sequence_name or o.name for o in spec.outputs]

    def feed(self, samples: np.ndarray) -> np.ndarray:
        """Score every whole hop available; keep the remainder for the next chunk."""
        hop = self.spec.hop_samples
        audio = np.concatenate([self.leftover, samples.astype(np.float32, copy=False)])
        n = audio.size // hop
        self.leftover = audio[n * hop :].copy()
        parts = []
        for start in range(0, n, self.max_steps):
            k = min(self.max_steps, n - start)
            parts.append(self._run(audio[start * hop : (start + k) * hop], k))
        if not parts:
            return np.zeros((0, len(self.spec.labels)), np.float32)
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def finish(self) -> np.ndarray:
        """Zero-pad the partial hop, exactly as a streaming flush does."""
        if not self.leftover.size:
            return np.zeros((0, len(self.spec.labels)), np.float32)
        pad = np.zeros(self.spec.hop_samples - self.leftover.size, np.float32)
        tail, self.leftover = np.concatenate([self.leftover, pad]), np.zeros(0, np.float32)
        return self._run(tail, 1)

    def _run(self, new: np.ndarray, steps: int) -> np.ndarray:
        spec = self.spec
        window = np.concatenate([self.context, new])
        if spec.context_samples:
            self.context = window[-spec.context_samples :].copy()
        feeds = dict(self.constants)
        feeds[self.audio_name] = self.input.layout(self.input.scale(window)[None, :])
        feeds.update(self.states)
        outs = dict(zip(self.rt.output_names, self.rt.run(feeds), strict=True))
        for st in spec.states:
            self.states[st.input] = outs[st.output]
        cols = [np.asarray(outs[name], np.float32).reshape(steps, -1) for name in self.out_names]
        return cols[0] if len(cols) == 1 else np.concatenate(cols, axis=1)


async def score_clip(
    model: ServedModel,
    chunks: AsyncIterator[np.ndarray],
    *,
    executor: Executor,
    max_pending_steps: int = 1024,
) -> AsyncIterator[OfflineChunk]:
    """Score a clip chunk by chunk; yields each chunk's scores and new events."""
    if model.sequence is not None:
        async for out in _with_sequence(model, chunks, executor):
            yield out
    else:
        async for out in _with_batcher(model, chunks, max_pending_steps):
            yield out


async def _with_sequence(
    model: ServedModel, chunks: AsyncIterator[np.ndarray], executor: Executor
) -> AsyncIterator[OfflineChunk]:
    spec = model.spec
    loop = asyncio.get_running_loop()
    scorer = SequenceScorer(model)
    detector = EventDetector(
        spec.events, spec.event_label, sample_rate=spec.sample_rate, hop=spec.hop_samples
    )
    col = spec.labels.index(spec.event_label)
    step = 0

    def emit(scores: np.ndarray) -> OfflineChunk:
        nonlocal step
        out = OfflineChunk(step, scores, detector.scan(scores[:, col], step))
        step += len(scores)
        return out

    async for chunk in chunks:
        scores = await loop.run_in_executor(executor, scorer.feed, chunk)
        if len(scores):
            yield emit(scores)
    tail = emit(await loop.run_in_executor(executor, scorer.finish))
    tail.events.extend(detector.finish(step * spec.hop_samples))
    yield tail


class _Collect:
    """ResultSink that keeps one chunk's results for the offline batcher path."""

    def __init__(self, labels: int) -> None:
        self.rows: list[list[float]] = []
        self.events: list[Event] = []
        self.error: LookbackError | None = None
        self.labels = labels

    def on_result(self, index: int, time: float, scores: list[float], events: list[Event] | None) -> None:
        self.rows.append(scores)
        if events:
            self.events.extend(events)

    def on_error(self, index: int, error: LookbackError) -> None:
        self.error = error

    def take(self, first_step: int) -> OfflineChunk:
        if self.error is not None:
            raise self.error
        scores = (
            np.asarray(self.rows, dtype=np.float32) if self.rows else np.zeros((0, self.labels), np.float32)
        )
        out = OfflineChunk(first_step, scores, self.events)
        self.rows, self.events = [], []
        return out


async def _with_batcher(
    model: ServedModel, chunks: AsyncIterator[np.ndarray], max_pending_steps: int
) -> AsyncIterator[OfflineChunk]:
    spec = model.spec
    sink = _Collect(len(spec.labels))
    session = StreamSession(model, sink, encoding="pcm_f32le", max_pending_steps=max_pending_steps)
    frame = spec.frame_samples
    carry = np.zeros(0, np.float32)
    piece = max_pending_steps * spec.hop_samples
    try:
        step = 0
        async for chunk in chunks:
            audio = np.concatenate([carry, chunk.astype(np.float32, copy=False)])
            whole = (audio.size // frame) * frame
            carry = audio[whole:].copy()
            for start in range(0, whole, piece):
                session.push(audio[start : min(whole, start + piece)].tobytes())
                await session.wait_idle()
            if sink.rows:
                out = sink.take(step)
                step += len(out.scores)
                yield out
        if carry.size:  # pad the last partial frame; flush pads the partial hop
            session.push(np.concatenate([carry, np.zeros(frame - carry.size, np.float32)]).tobytes())
        session.flush()
        await session.wait_idle()
        out = sink.take(step)
        out.events.extend(session.finish())
        yield out
    finally:
        session.close()
