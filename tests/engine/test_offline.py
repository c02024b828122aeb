"""Offline scoring: long clips in bounded memory, chunk by chunk, on both paths."""

from __future__ import annotations

import tracemalloc
from collections.abc import AsyncIterator, Sequence

import numpy as np
import pytest

from lookback.engine.engine import Engine
from lookback.engine.multistep import STEPS
from lookback.errors import InferenceError
from tests.engine.engine_support import SR, running_engine, score_offline, speech

MINUTES = 10


def metric(engine: Engine, name: str) -> float:
    value = engine.metrics.registry.get_sample_value(name, {"model": "silero-vad/6.2.3"})
    return 0.0 if value is None else value


class Source:
    """A synthetic clip generated chunk by chunk (float32 throughout, few temporaries):
    noise, a gated tone, and stretches of the speech fixture every other 30 s."""

    def __init__(self, seconds: float, chunk_sizes: Sequence[int], seed: int = 0) -> None:
        self.total = int(seconds * SR)
        self.sizes = chunk_sizes
        rng = np.random.default_rng(seed)
        t = np.arange(7 * SR, dtype=np.float32) / np.float32(SR)
        tone = np.float32(0.2) * np.sin(np.float32(2 * np.pi * 440) * t) * (t > 5)
        self.bed = (rng.normal(0, 0.01, t.size).astype(np.float32) + tone).astype(np.float32)
        self.speech = speech().astype(np.float32) / np.float32(32768.0)
        self.produced = 0  # samples handed out

    @staticmethod
    def _cycle(src: np.ndarray, start: int, out: np.ndarray) -> None:
        pos = 0
        while pos < out.size:
            k = min(out.size - pos, src.size - (start + pos) % src.size)
            i = (start + pos) % src.size
            out[pos : pos + k] = src[i : i + k]
            pos += k

    async def chunks(self) -> AsyncIterator[np.ndarray]:
        i = 0
        while self.produced < self.total:
            n = min(self.sizes[i % len(self.sizes)], self.total - self.produced)
            i += 1
            x = np.empty(n, np.float32)
            self._cycle(self.bed, self.produced, x)
            if (self.produced // (30 * SR)) % 2:
                voice = np.empty(n, np.float32)
                self._cycle(self.speech, self.produced, voice)
                x += voice
            self.produced += n
            yield x


async def test_ten_minutes_through_the_sequence_graph_in_bounded_memory(
    default_model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_engine(default_model) as engine:
        handle = engine.resolve(default_model)
        spec = handle.spec
        assert handle.sequence is not None and spec.sequence is not None
        max_window = spec.context_samples + spec.sequence.max_steps * spec.hop_samples
        lengths: list[int] = []
        real_run = handle.sequence.run
        audio_name = spec.sequence.audio_input or spec.audio_input.name

        def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            lengths.append(feeds[audio_name].shape[-1])
            return real_run(feeds)

        monkeypatch.setattr(handle.sequence, "run", run)
        # mostly 1 s chunks; a few bigger than one call of the sequence graph
        big = spec.sequence.max_steps * spec.hop_samples + 12_345
        source = Source(MINUTES * 60, [SR] * 29 + [big])
        n_scores, ahead, events = 0, 0, 0
        tracemalloc.start()
        try:
            async for out in engine.score(handle, source.chunks()):
                assert out.first_step == n_scores
                n_scores += len(out.scores)
                events += len(out.events)
                # the source is never read far ahead of what has been scored
                ahead = max(ahead, source.produced - n_scores * spec.hop_samples)
                assert np.isfinite(out.scores).all()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    clip_bytes = source.total * 4
    print(
        f"\n[offline {MINUTES} min] {n_scores} steps, {len(lengths)} graph calls, longest "
        f"{max(lengths)} samples, python peak {peak / 2**20:.1f} MiB "
        f"(whole clip would be {clip_bytes / 2**20:.1f} MiB), {events} events"
    )
    assert n_scores == -(-source.total // spec.hop_samples)
    assert max(lengths) <= max_window
    assert max(lengths) == max_window  # the big chunks were split at max_steps
    assert ahead <= big + spec.hop_samples
    assert peak < clip_bytes / 3, f"peak {peak} bytes: the clip was materialized"


async def test_a_long_clip_through_the_multistep_graph_in_bounded_calls(
    silero_model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a sequence graph (Silero) a clip is scored by the multi-step graph, many
    hops per call and never more than ``offline_chunk_steps``, without the batcher."""
    chunk_steps = 32
    async with running_engine("silero-vad", offline_chunk_steps=chunk_steps) as engine:
        handle = engine.resolve("silero-vad")
        assert handle.sequence is None
        assert handle.multistep is not None
        calls: list[int] = []
        real_run = handle.multistep.run

        def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            calls.append(int(feeds[STEPS]))
            return real_run(feeds)

        monkeypatch.setattr(handle.multistep, "run", run)
        source = Source(60, [3 * SR + 77, 1000, 5])
        n_scores = 0
        async for out in engine.score(handle, source.chunks()):
            assert out.first_step == n_scores
            n_scores += len(out.scores)
        assert handle.table.used == 0  # offline scoring takes no streaming slot
        assert metric(engine, "lookback_batches_total") == 0  # nor the batcher
    assert n_scores == -(-source.total // 512)
    assert sum(calls) == n_scores
    assert max(calls) == chunk_steps


async def test_empty_clip_yields_one_empty_chunk(any_model: str) -> None:
    async def nothing() -> AsyncIterator[np.ndarray]:
        return
        yield np.zeros(0, np.float32)  # pragma: no cover - makes this an async generator

    async with running_engine(any_model) as engine:
        handle = engine.resolve(any_model)
        outs = [out async for out in engine.score(handle, nothing())]
    assert len(outs) == 1 and outs[0].scores.shape == (0, 1) and outs[0].events == []


async def test_tiny_clip_is_padded_to_one_step(any_model: str) -> None:
    async def one() -> AsyncIterator[np.ndarray]:
        yield np.full(10, 0.1, np.float32)

    async with running_engine(any_model) as engine:
        handle = engine.resolve(any_model)
        scores, _ = await score_offline(engine, handle, one())
    assert scores.shape == (1, 1)


async def test_offline_model_failure_raises_a_clear_error(
    silero_model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_engine("silero-vad") as engine:
        handle = engine.resolve("silero-vad")

        def broken(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            raise RuntimeError("device lost")

        monkeypatch.setattr(handle.multistep, "run", broken)
        with pytest.raises(InferenceError, match="device lost"):
            await score_offline(engine, handle, Source(2, [SR]).chunks())
        assert handle.table.used == 0


async def test_the_next_chunk_is_read_while_one_scores_and_an_early_stop_closes_the_source(
    any_model: str,
) -> None:
    """Scoring overlaps the upload by one chunk (never more), and a consumer that stops
    early (a client gone, an error) leaves no read of the source running."""
    import asyncio
    import contextlib

    read: list[int] = []
    closed = asyncio.Event()

    async def source() -> AsyncIterator[np.ndarray]:
        try:
            for i in range(50):
                read.append(i)
                yield np.zeros(SR, np.float32)
        finally:
            closed.set()

    async with running_engine(any_model) as engine:
        handle = engine.resolve(any_model)
        async with contextlib.aclosing(engine.score(handle, source())) as scored:
            first = await anext(scored)
            assert len(first.scores) > 0
            assert read == [0, 1]  # chunk 1 was read while chunk 0 scored; chunk 2 was not
        assert closed.is_set()
        assert not [t for t in asyncio.all_tasks() if "anext" in repr(t.get_coro())]
