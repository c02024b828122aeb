"""Offline scoring: a clip in, chunks of scores and events out, in bounded memory.

The clip arrives as an async iterator of float32 chunks (samples in [-1, 1)); nothing
here ever holds more than two chunks plus a partial hop: the next chunk is read and
decoded on the event loop while the current one is scored in the executor, so a clip's
model calls do not wait for its upload between chunks. Each chunk is scored in calls
of up to ``max_steps`` hops, in the offline executor so the event loop and the
streaming batcher stay responsive: through the model's own ``sequence`` graph when it
ships one, else through the multi-step graph built at load (the step graph in a
``Loop``, which gives the streaming path's numbers bit for bit). The end is padded like
a streaming ``flush`` and events come from the same detector, so offline and streaming
results agree.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from lookback.engine.compute import initial_states
from lookback.engine.events import Event, EventDetector
from lookback.engine.multistep import AUDIO, STEPS, scores_out, state_in, state_out
from lookback.engine.pcm import ModelInput
from lookback.engine.served import ServedModel
from lookback.errors import InferenceError, LookbackError


@dataclass
class OfflineChunk:
    first_step: int
    scores: np.ndarray  # [n, labels] float32
    events: list[Event] = field(default_factory=list)


class ClipScorer:
    """Carries context, states and a partial hop across chunks, one clip at a time."""

    def __init__(self, model: ServedModel, max_steps: int = 2048) -> None:
        spec = model.spec
        self.spec = spec
        self.input = ModelInput(spec.audio_input.scale, spec.audio_input.layout)
        self.states = initial_states(spec, 1)
        self.context = np.zeros(spec.context_samples, np.float32)
        self.leftover = np.zeros(0, np.float32)
        self.constants = dict(model.step_compute.constants)
        if spec.sequence is not None and model.sequence is not None:
            self.rt = model.sequence
            self.max_steps = spec.sequence.max_steps
            self.audio_name = spec.sequence.audio_input or spec.audio_input.name
            self.state_names = [(st.input, st.input, st.output) for st in spec.states]
            self.out_names = [o.sequence_name or o.name for o in spec.outputs]
        elif model.multistep is not None:
            self.rt = model.multistep
            self.max_steps = max_steps
            self.audio_name = AUDIO
            self.state_names = [(st.input, state_in(st.input), state_out(st.output)) for st in spec.states]
            self.out_names = [scores_out(o.name) for o in spec.outputs]
        else:  # the step graph, one hop per call: its outputs are [1, ...] rows too
            self.rt = model.step
            self.max_steps = 1
            self.audio_name = spec.audio_input.name
            self.state_names = [(st.input, st.input, st.output) for st in spec.states]
            self.out_names = [o.name for o in spec.outputs]

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
        feeds = dict(self.constants)
        feeds[self.audio_name] = self.input.layout(self.input.scale(window)[None, :])
        if self.audio_name == AUDIO:
            feeds[STEPS] = np.array(steps, np.int64)
        for state, feed, _ in self.state_names:
            feeds[feed] = self.states[state]
        try:
            outs = dict(zip(self.rt.output_names, self.rt.run(feeds), strict=True))
        except LookbackError:
            raise
        except Exception as exc:  # ORT raises its own types; the caller gets our base
            raise InferenceError(f"model call failed for {steps} offline steps: {exc}") from exc
        if spec.context_samples:
            self.context = window[-spec.context_samples :].copy()
        for state, _, out in self.state_names:
            self.states[state] = outs[out]
        # sequence graphs give [1, N(, L)], the multi-step graph [N, 1(, L)]: N rows either way
        cols = [np.asarray(outs[name], np.float32).reshape(steps, -1) for name in self.out_names]
        return cols[0] if len(cols) == 1 else np.concatenate(cols, axis=1)


async def score_clip(
    model: ServedModel,
    chunks: AsyncIterator[np.ndarray],
    *,
    executor: Executor,
    max_steps: int = 2048,
) -> AsyncGenerator[OfflineChunk, None]:
    """Score a clip chunk by chunk; yields each chunk's scores and new events.

    ``max_steps`` bounds one call of the multi-step graph (a sequence graph has its own).
    """
    spec = model.spec
    loop = asyncio.get_running_loop()
    scorer = ClipScorer(model, max_steps)
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

    source = aiter(chunks)
    ahead: asyncio.Future[np.ndarray | None] = asyncio.ensure_future(anext(source, None))
    try:
        while (chunk := await ahead) is not None:
            ahead = asyncio.ensure_future(anext(source, None))  # read on while this one scores
            scores = await loop.run_in_executor(executor, scorer.feed, chunk)
            if len(scores):
                yield emit(scores)
    finally:  # stopped early (an error, a client gone): the read-ahead must not outlive us
        ahead.cancel()
        await asyncio.wait([ahead])
        if not ahead.cancelled():
            ahead.exception()  # retrieved: an error after an error is not "never retrieved"
        close = getattr(source, "aclose", None)
        if close is not None:
            await close()  # the upload reader stops now, not when garbage-collected
    tail = emit(await loop.run_in_executor(executor, scorer.finish))
    tail.events.extend(detector.finish(step * spec.hop_samples))
    yield tail
