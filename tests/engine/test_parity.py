"""Parity: batched == solo, offline == streaming, Lookback's Silero == Silero's own package,
sessions isolated across slot reuse, and wrong input lengths refused.

These are the tests that make the engine's one promise: how a step is executed (alone,
in a batch of 64 interleaved sessions, offline through a sequence graph) never changes
its numbers, and a slot reused after a disconnect starts from the initial state.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from lookback.engine.engine import Engine
from lookback.engine.served import ServedModel
from lookback.engine.session import StreamSession
from lookback.engine.step import Step
from lookback.errors import BadAudio
from tests.engine.engine_support import (
    FRAME,
    SR,
    Collect,
    even_bursts,
    fixture_clips,
    offline_chunks,
    push_all,
    random_bursts,
    running_engine,
    score_offline,
    speech,
    stream_clip,
    to_s16,
    varied_clips,
    whole_frames,
)
from tests.engine.test_events import reference_events

REF = Path(__file__).resolve().parents[1] / "fixtures" / "silero_ref_probs.json"
N_SESSIONS = 64


class BatchLog:
    """Wraps ``handle.compute`` to record every batch's slots (and nothing else)."""

    def __init__(self, handle: ServedModel, monkeypatch: pytest.MonkeyPatch) -> None:
        self.real = handle.compute
        self.batches: list[list[int]] = []
        self.steps: list[int] = []  # hops per batch: a session's step may carry several
        monkeypatch.setattr(handle, "compute", self)

    def __call__(self, batch: Sequence[Step]) -> np.ndarray:
        self.batches.append([s.slot for s in batch])
        self.steps.append(sum(s.count for s in batch))
        return self.real(batch)

    @property
    def sizes(self) -> list[int]:
        return [len(b) for b in self.batches]


async def finish_session(session: StreamSession, sink: Collect) -> Collect:
    session.flush()
    await session.wait_idle()
    session.finish()
    sink.events = list(session.events)
    session.close()
    assert not sink.errors, sink.errors
    assert sink.indices == list(range(len(sink.indices)))
    return sink


# --- batched == solo ----------------------------------------------------------------------------

# model calls in the executor thread or on the loop, greedy or held to fill
BATCHING: dict[str, dict[str, object]] = {
    "thread": {"model_calls": "thread"},
    "inline": {"model_calls": "inline"},
    "inline-wait": {"model_calls": "inline", "max_wait_ms": 2.0, "adaptive_wait": False},
}


@pytest.mark.parametrize("batching", list(BATCHING))
async def test_batched_equals_solo(any_model: str, batching: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """64 sessions, different clips, random bursts and interleavings, batched by the
    MicroBatcher, give for every step the numbers each session gets alone at batch 1."""
    name = any_model
    rng = random.Random(1234)
    clips = varied_clips(N_SESSIONS, 1.6, seed=7)
    # different lengths, so sessions join and leave batches at different times
    clips = [c[: FRAME * rng.randint(len(c) // FRAME // 2, len(c) // FRAME)] for c in clips]
    plans = [random_bursts(len(c) // FRAME, rng.choice([1, 2, 4, 8, 16]), rng) for c in clips]

    # solo: each session alone, one after the other, one hop per model call
    solo: list[Collect] = []
    async with running_engine(name, max_batch_size=1, max_steps_per_call=1) as engine:
        handle = engine.resolve(name)
        log = BatchLog(handle, monkeypatch)
        for clip in clips:
            sink = Collect()
            session = engine.open_session(handle, sink)
            await push_all(session, to_s16(clip), [1] * (len(clip) // FRAME))
            solo.append(await finish_session(session, sink))
        assert set(log.sizes) == {1}

    # batched: all 64 at once, random bursts, random arrival interleavings
    async with running_engine(
        name, max_batch_size=256, initial_slots=N_SESSIONS, **BATCHING[batching]
    ) as engine:
        handle = engine.resolve(name)
        log = BatchLog(handle, monkeypatch)

        async def drive(i: int) -> Collect:
            r = random.Random(i)
            for _ in range(r.randint(0, 40)):  # staggered starts
                await asyncio.sleep(0)
            sink = Collect()
            session = engine.open_session(handle, sink)
            data = to_s16(clips[i])
            pos = 0
            for k in plans[i]:
                for _ in range(r.choice([0, 0, 1, 2, 5])):  # interleave with the others
                    await asyncio.sleep(0)
                chunk = data[pos : pos + k * session.frame_bytes]
                pos += len(chunk)
                await session.wait_for_room(len(chunk))
                session.push(chunk)
            return await finish_session(session, sink)

        batched = await asyncio.gather(*(drive(i) for i in range(N_SESSIONS)))

    sizes = log.sizes
    assert all(len(set(b)) == len(b) for b in log.batches), "a batch held two steps of a session"
    assert max(sizes) >= 16, f"sessions were not batched together: sizes {sorted(set(sizes))}"
    assert sum(log.steps) == sum(len(s.rows) for s in solo)
    diffs = []
    for i, (a, b) in enumerate(zip(solo, batched, strict=True)):
        assert len(a.rows) == len(b.rows) > 0, f"session {i}"
        assert a.times == b.times
        diffs.append(float(np.max(np.abs(a.scores - b.scores))))
        assert a.events == b.events, f"session {i}: events differ"
    worst = max(diffs)
    exact = sum(d == 0.0 for d in diffs)
    print(
        f"\n[batched==solo {name}, {batching}] {N_SESSIONS} sessions, {sum(sizes)} steps in "
        f"{len(sizes)} batches (mean {np.mean(sizes):.1f}, max {max(sizes)}); "
        f"max |batched - solo| = {worst:.3g}; exactly equal: {worst == 0.0} "
        f"({exact}/{N_SESSIONS} sessions bit-identical)"
    )
    assert worst <= 1e-6


# --- offline == streaming -------------------------------------------------------------------------


def long_clip() -> np.ndarray:
    """~22 s: the speech fixture, a quieter noisy copy, and the fixture again (not whole frames)."""
    x = speech().astype(np.float64)
    rng = np.random.default_rng(3)
    noisy = 0.3 * x + rng.normal(0, 300, x.size)
    clip = np.concatenate([x, noisy, x[:75_001]])
    return np.clip(np.round(clip), -32768, 32767).astype(np.int16)


async def test_offline_equals_streaming(any_model: str) -> None:
    name = any_model
    clip = long_clip()
    assert clip.size % FRAME  # the end needs padding on both paths
    rng = random.Random(5)
    sizes = [rng.choice([0, 1, 17, 128, 500, 4096, 20_000]) for _ in range(40)] + [300_000]
    async with running_engine(name) as engine:
        handle = engine.resolve(name)
        uses_sequence = handle.sequence is not None
        assert uses_sequence == (name == "lookback-vad")
        if uses_sequence:  # a chunk of 300 000 samples must cross the graph's max_steps
            assert handle.spec.sequence is not None
            assert handle.spec.sequence.max_steps * handle.spec.hop_samples < 300_000
        streamed = await stream_clip(engine, handle, clip, frames_per_push=1)
        offline, events = await score_offline(engine, handle, offline_chunks(clip, sizes))
        # and one more offline pass with a single big chunk
        offline2, events2 = await score_offline(engine, handle, offline_chunks(clip, [clip.size]))
    hop = handle.spec.hop_samples
    assert len(streamed.rows) == len(offline) == -(-clip.size // hop)
    diff = float(np.max(np.abs(offline - streamed.scores)))
    diff2 = float(np.max(np.abs(offline2 - streamed.scores)))
    print(
        f"\n[offline==streaming {name}] {len(offline)} steps, "
        f"{'sequence graph' if uses_sequence else 'batcher'}: max diff {diff:.3g} / {diff2:.3g}"
    )
    assert diff <= 1e-5 and diff2 <= 1e-5
    assert [(e.event, e.label, e.time) for e in events] == [
        (e.event, e.label, e.time) for e in streamed.events
    ]
    assert events2 == streamed.events
    assert len(streamed.events) >= 4, "the clip should produce speech segments"
    assert streamed.events[-1].event == "end"


async def test_offline_equals_streaming_on_every_fixture_clip(any_model: str) -> None:
    name = any_model
    rng = random.Random(9)
    async with running_engine(name) as engine:
        handle = engine.resolve(name)
        for clip in fixture_clips():
            streamed = await stream_clip(engine, handle, clip, frames_per_push=7)
            sizes = [rng.randint(1, 9000) for _ in range(50)]
            offline, events = await score_offline(engine, handle, offline_chunks(clip, sizes))
            assert offline.shape == streamed.scores.shape
            assert float(np.max(np.abs(offline - streamed.scores))) <= 1e-5
            assert [(e.event, e.time) for e in events] == [(e.event, e.time) for e in streamed.events]


# --- Silero through Lookback == Silero's own package ----------------------------------------------


def reference() -> np.ndarray:
    ref = json.loads(REF.read_text())
    assert ref["model"] == "silero-vad" and ref["hop_samples"] == 512
    return np.asarray(ref["probs"], dtype=np.float32)


async def test_silero_matches_its_own_package(silero_model: str) -> None:
    ref = reference()
    clip = speech()
    async with running_engine("silero-vad") as engine:
        handle = engine.resolve("silero-vad")
        got = await stream_clip(engine, handle, clip, frames_per_push=1)
    assert len(got.rows) == ref.size
    diff = float(np.max(np.abs(got.scores[:, 0] - ref)))
    print(f"\n[silero==package] {ref.size} chunks, max diff {diff:.3g}, exact {diff == 0.0}")
    assert diff <= 1e-6
    assert got.times == [(i + 1) * 512 / SR for i in range(ref.size)]
    # and the events are those Silero's VADIterator makes from its own probabilities
    ev = handle.spec.events
    want = reference_events(
        ref.tolist(),
        512,
        threshold=ev.threshold,
        neg=ev.end_threshold,
        min_silence_ms=ev.min_silence_ms,
        pad_ms=ev.speech_pad_ms,
    )
    live = [(e.event, e.sample) for e in got.events]
    assert live[: len(want)] == [(kind, sample) for kind, sample, _ in want]
    assert len(want) >= 4 and live[len(want) :] in ([], [("end", ref.size * 512)])


async def test_silero_matches_its_own_package_while_batched(silero_model: str) -> None:
    """Eight concurrent copies of the reference clip, different bursts, all match it."""
    ref = reference()
    data = to_s16(whole_frames(speech()))
    n_frames = len(data) // 256
    async with running_engine("silero-vad") as engine:
        handle = engine.resolve("silero-vad")

        async def one(i: int) -> Collect:
            sink = Collect()
            session = engine.open_session(handle, sink)
            await push_all(session, data, random_bursts(n_frames, 1 + 3 * i, random.Random(i)))
            return await finish_session(session, sink)

        sinks = await asyncio.gather(*(one(i) for i in range(8)))
    for sink in sinks:
        assert float(np.max(np.abs(sink.scores[:, 0] - ref))) <= 1e-6


# --- session isolation ------------------------------------------------------------------------------


def loud_speech(seconds: float = 2.0) -> np.ndarray:
    x = speech().astype(np.float64)
    start = int(np.argmax(np.abs(x) > 3000))  # into the first sentence
    return np.clip(x[start : start + int(seconds * SR)] * 2.5, -32768, 32767).astype(np.int16)


def quiet(seconds: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(11)
    return rng.normal(0, 40, int(seconds * SR) // FRAME * FRAME).astype(np.int16)


async def fresh_scores(name: str, clip: np.ndarray) -> np.ndarray:
    async with running_engine(name) as engine:
        return (await stream_clip(engine, engine.resolve(name), clip)).scores


class Gate:
    """Holds the next model call in the executor until released."""

    def __init__(self, handle: ServedModel, monkeypatch: pytest.MonkeyPatch) -> None:
        self.real = handle.compute
        self.entered = threading.Event()
        self.release = threading.Event()
        self.release.set()
        monkeypatch.setattr(handle, "compute", self)

    def hold(self) -> None:
        self.entered.clear()
        self.release.clear()

    def __call__(self, batch: Sequence[Step]) -> np.ndarray:
        self.entered.set()
        assert self.release.wait(30)
        return self.real(batch)


async def test_stale_state_would_change_the_scores(any_model: str) -> None:
    """The control for the isolation tests: quiet audio after loud speech in one session
    scores differently from quiet audio in a fresh session."""
    name = any_model
    speech_then_quiet = np.concatenate([loud_speech(), quiet()])
    async with running_engine(name) as engine:
        both = await stream_clip(engine, engine.resolve(name), speech_then_quiet)
    after = both.scores[-len(quiet()) // engine.resolve(name).spec.hop_samples :]
    fresh = await fresh_scores(name, quiet())
    assert after.shape == fresh.shape
    assert float(np.max(np.abs(after - fresh))) > 1e-3


async def reused_slot_scores(engine: Engine, handle: ServedModel, slot: int) -> np.ndarray:
    sink = Collect()
    session = engine.open_session(handle, sink)
    assert session.slot == slot, "the freed slot should be the one reused"
    await push_all(session, to_s16(quiet()), [1] * (quiet().size // FRAME))
    return (await finish_session(session, sink)).scores


async def test_slot_reused_after_close_when_idle_starts_clean(any_model: str) -> None:
    name = any_model
    async with running_engine(name) as engine:
        handle = engine.resolve(name)
        sink = Collect()
        first = engine.open_session(handle, sink)
        slot = first.slot
        await push_all(first, to_s16(loud_speech()), even_bursts(loud_speech().size // FRAME, 4))
        await first.wait_idle()
        assert len(sink.rows) > 0 and float(sink.scores.max()) > 0.5  # it did hear speech
        first.close()
        assert handle.table.used == 0
        reused = await reused_slot_scores(engine, handle, slot)
    np.testing.assert_array_equal(reused, await fresh_scores(name, quiet()))


async def test_slot_reused_after_close_with_a_step_in_flight_starts_clean(
    any_model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = any_model
    async with running_engine(name) as engine:
        handle = engine.resolve(name)
        gate = Gate(handle, monkeypatch)
        sink = Collect()
        first = engine.open_session(handle, sink)
        slot = first.slot
        data = to_s16(loud_speech())
        await push_all(first, data[: len(data) // 2], even_bursts(len(data) // 2 // first.frame_bytes, 8))
        await first.wait_idle()
        gate.hold()
        first.push(data[len(data) // 2 : len(data) // 2 + 3 * first.hop_bytes])  # 3 more steps
        assert await asyncio.to_thread(gate.entered.wait, 30)
        assert first.pending_steps == 3
        first.close()  # disconnect: one step running in the executor, two queued
        assert handle.table.used == 1, "the slot must stay taken while its step runs"
        gate.release.set()
        # a step submitted now runs in the next batch, after the in-flight one has returned
        other = handle.table.acquire()
        await handle.batcher.submit_future(other, 0, bytes(handle.spec.hop_samples * 2))
        assert handle.table.used == 1  # only ``other``: the closed session's slot is free
        n_rows = len(sink.rows)
        reused = await reused_slot_scores(engine, handle, slot)
        assert len(sink.rows) == n_rows, "a closed session got results after close"
        handle.table.release(other)
    np.testing.assert_array_equal(reused, await fresh_scores(name, quiet()))


async def test_slot_reused_after_close_with_a_step_queued_in_the_batcher(
    any_model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Closed while its step waits for a batch: the step is withdrawn, the slot freed at once."""
    name = any_model
    async with running_engine(name) as engine:
        handle = engine.resolve(name)
        gate = Gate(handle, monkeypatch)
        first = engine.open_session(handle, Collect())
        await push_all(first, to_s16(loud_speech()), even_bursts(loud_speech().size // FRAME, 16))
        await first.wait_idle()
        slot = first.slot
        blocker = handle.table.acquire()
        gate.hold()
        running = handle.batcher.submit_future(blocker, 0, bytes(handle.spec.hop_samples * 2))
        assert await asyncio.to_thread(gate.entered.wait, 30)
        first.push(to_s16(loud_speech())[: first.hop_bytes])  # waits behind the held batch
        assert handle.batcher.backlog == 1
        first.close()
        assert handle.batcher.backlog == 0 and handle.table.used == 1  # only the blocker
        gate.release.set()
        await running
        reused = await reused_slot_scores(engine, handle, slot)
        handle.table.release(blocker)
    np.testing.assert_array_equal(reused, await fresh_scores(name, quiet()))


# --- shape guard ----------------------------------------------------------------------------------


async def test_partial_frames_are_refused(any_model: str) -> None:
    name = any_model
    async with running_engine(name) as engine:
        handle = engine.resolve(name)
        sink = Collect()
        s16 = engine.open_session(handle, sink)
        for n in (254, 1, 258, 3 * 256 + 2):
            with pytest.raises(BadAudio) as info:
                s16.push(bytes(n))
            assert info.value.code == "bad_frame_size"
        f32 = engine.open_session(handle, sink, encoding="pcm_f32le")
        with pytest.raises(BadAudio) as info:
            f32.push(bytes(256))  # one int16 frame is half a float32 frame
        assert info.value.code == "bad_frame_size"
        with pytest.raises(BadAudio) as info:
            s16.push(b"")
        assert info.value.code == "empty_message"
        assert s16.frames == 0 and s16.steps_made == 0 and f32.frames == 0
        s16.close()
        f32.close()
    assert not sink.rows and not sink.errors


@pytest.mark.parametrize("samples", [448, 511, 513, 576, 64, 0])
async def test_a_step_of_the_wrong_length_is_refused(silero_model: str, samples: int) -> None:
    """Silero accepts any window length; the engine must not: a step is exactly one hop."""
    async with running_engine("silero-vad") as engine:
        handle = engine.resolve("silero-vad")
        slot = handle.table.acquire()
        for payload in (bytes(samples * 2), np.zeros(samples, np.float32)):
            with pytest.raises(BadAudio, match="exactly 512 samples"):
                await handle.batcher.submit_future(slot, 0, payload)
        # the refused steps touched no state: the slot still scores like a fresh one
        row = await handle.batcher.submit_future(slot, 0, to_s16(loud_speech()[:512]))
    async with running_engine("silero-vad") as engine:
        handle = engine.resolve("silero-vad")
        fresh = await handle.batcher.submit_future(handle.table.acquire(), 0, to_s16(loud_speech()[:512]))
    np.testing.assert_array_equal(row, fresh)


async def test_engine_feeds_the_graph_exactly_context_plus_hop(
    any_model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = any_model
    async with running_engine(name, max_steps_per_call=1) as engine:  # the step graph only
        handle = engine.resolve(name)
        seen: list[tuple[int, ...]] = []
        real_run = handle.step.run

        def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            seen.append(feeds[handle.spec.audio_input.name].shape)
            return real_run(feeds)

        monkeypatch.setattr(handle.step, "run", run)
        sinks = [Collect() for _ in range(3)]
        sessions = [engine.open_session(handle, s) for s in sinks]
        for i, s in enumerate(sessions):
            s.push(to_s16(loud_speech()[: (i + 1) * handle.spec.hop_samples]))
        for s in sessions:
            await s.wait_idle()
            s.close()
    window = handle.spec.context_samples + handle.spec.hop_samples
    assert seen and all(shape[1:] == (window,) for shape in seen)
    assert sum(shape[0] for shape in seen) == 6
