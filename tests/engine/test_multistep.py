"""Multi-step execution: k hops of a session in one model call, with the same bits.

The step graph wrapped in a ``Loop`` (built at load) must give every hop's scores, the
states and the audio context exactly (``==``) as k single-step calls do, at any batch
size, whatever the grouping; streaming with mixed message sizes must equal one frame
per message bit for bit; Silero through it still equals Silero's own package.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence

import numpy as np
import pytest

from lookback.engine.compute import StepCompute
from lookback.engine.multistep import STEPS
from lookback.engine.served import ServedModel
from lookback.engine.slabs import CONTEXT
from lookback.engine.step import Step
from tests.engine.engine_support import (
    FRAME,
    SR,
    Collect,
    offline_chunks,
    push_all,
    random_bursts,
    running_engine,
    score_offline,
    speech,
    stream_clip,
    to_s16,
    varied_clips,
)
from tests.engine.test_parity import finish_session, reference

KS = list(range(1, 33))


def hop_audio(rng: np.random.Generator, hops: int, hop: int, encoding: str) -> np.ndarray:
    """Speech-like int16 samples, or float32 samples off the int16 grid."""
    base = speech()
    start = int(rng.integers(0, base.size - hops * hop))
    x = base[start : start + hops * hop].astype(np.float64) * rng.uniform(0.2, 1.5)
    x += rng.normal(0, 200, x.size)
    if encoding == "pcm_s16le":
        return np.clip(np.round(x), -32768, 32767).astype(np.int16)
    return np.clip(x / 32768.0 + rng.normal(0, 1e-6, x.size), -1.0, 0.999).astype(np.float32)


def payload(audio: np.ndarray) -> bytes | np.ndarray:
    return audio.astype("<i2").tobytes() if audio.dtype == np.int16 else audio


def slab_rows(handle: ServedModel, slots: Sequence[int]) -> dict[str, np.ndarray]:
    return {name: slab[list(slots)].copy() for name, slab in handle.table.slabs.items()}


class Calls:
    """Counts the graph calls (and their k) a batch makes."""

    def __init__(self, handle: ServedModel, monkeypatch: pytest.MonkeyPatch) -> None:
        self.step = 0
        self.multi: list[int] = []
        assert handle.multistep is not None
        real_step, real_multi = handle.step.run, handle.multistep.run

        def step(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            self.step += 1
            return real_step(feeds)

        def multi(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            self.multi.append(int(feeds[STEPS]))
            return real_multi(feeds)

        monkeypatch.setattr(handle.step, "run", step)
        monkeypatch.setattr(handle.multistep, "run", multi)


@pytest.mark.parametrize("encoding", ["pcm_s16le", "pcm_f32le"])
async def test_multi_hop_steps_equal_single_steps_exactly(
    any_model: str, encoding: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """B sessions (1..64), each cut at random points into steps of 1..32 hops, mixed in
    one batch per round, against twin sessions run one hop per call: every score, state
    row and context row is equal (==) after every round."""
    name = any_model
    rng = np.random.default_rng(17 if encoding == "pcm_s16le" else 18)
    async with running_engine(name, max_batch_size=256, initial_slots=128) as engine:
        handle = engine.resolve(name)
        hop = handle.spec.hop_samples
        seen_k: set[int] = set()
        for batch_size in (1, 2, 5, 64):
            multi = [handle.table.acquire() for _ in range(batch_size)]
            single = [handle.table.acquire() for _ in range(batch_size)]
            plans = [list(rng.permutation(KS)[: 2 + batch_size % 3]) for _ in range(batch_size)]
            index = [0] * batch_size
            for rnd in range(max(len(p) for p in plans)):
                members = [i for i in range(batch_size) if rnd < len(plans[i])]
                batch, audio = [], {}
                for i in members:
                    k = int(plans[i][rnd])
                    seen_k.add(k)
                    audio[i] = hop_audio(rng, k, hop, encoding)
                    batch.append(Step(multi[i], index[i], payload(audio[i]), None, 0.0, count=k))  # type: ignore[arg-type]
                twins = [single[i] for i in members]
                assert_like_single_steps(handle, batch, twins, [audio[i] for i in members])
                for i in members:
                    index[i] += len(audio[i]) // hop
            for s in multi + single:
                handle.table.release(s)
        assert CONTEXT in handle.table.slabs or handle.spec.context_samples == 0
    assert seen_k == set(KS)  # the cut points covered every k in 1..32


def assert_like_single_steps(
    handle: ServedModel, batch: list[Step], twins: list[int], audio: list[np.ndarray]
) -> None:
    """Run ``batch``, then each step's hops one per call on its twin slot: every score
    equal (==), and every slab row of the batch's slots equal to its twin's."""
    hop = handle.spec.hop_samples
    got = handle.compute(batch)
    assert got.shape == (sum(s.count for s in batch), len(handle.spec.labels))
    want = []
    for step, twin, samples in zip(batch, twins, audio, strict=True):  # in hop order
        for j in range(len(samples) // hop):
            one = samples[j * hop : (j + 1) * hop]
            want.append(handle.compute([Step(twin, step.index + j, payload(one), None, 0.0)]))  # type: ignore[arg-type]
    assert (got == np.concatenate(want)).all()
    after_multi = slab_rows(handle, [s.slot for s in batch])
    after_single = slab_rows(handle, twins)
    for slab in after_multi:
        assert np.array_equal(after_multi[slab], after_single[slab]), f"{slab} differs"


@pytest.mark.parametrize(
    "counts",
    [
        [4, 4, 4],  # one message size for everyone: the audio goes straight into the windows
        [2, 1, 3],  # as many hops as three steps of 2, but not uniform
        [1, 3, 2],
    ],
)
async def test_uniform_and_lookalike_batches_equal_single_steps(any_model: str, counts: list[int]) -> None:
    """A batch whose steps all carry k hops takes the direct path; one whose hops merely
    add up to k per step must not: both equal single steps exactly, twice in a row."""
    rng = np.random.default_rng(sum(counts))
    async with running_engine(any_model, max_batch_size=256, initial_slots=16) as engine:
        handle = engine.resolve(any_model)
        hop = handle.spec.hop_samples
        slots = [handle.table.acquire() for _ in counts]
        twins = [handle.table.acquire() for _ in counts]
        for rnd in range(2):
            audio = [hop_audio(rng, k, hop, "pcm_s16le") for k in counts]
            batch = [
                Step(s, rnd * k, payload(a), None, 0.0, count=k)  # type: ignore[arg-type]
                for s, a, k in zip(slots, audio, counts, strict=True)
            ]
            assert_like_single_steps(handle, batch, twins, audio)


@pytest.mark.parametrize(
    ("counts", "multi", "step"),
    [
        ([10, 10, 10], [10], 0),  # one message size for everyone: one [B, 10] call
        ([5, 5, 12, 1], [12, 5], 1),  # 3 distinct counts <= 3 powers of two (8, 4, 1)
        ([3, 5, 6, 7, 9, 12], [8, 4, 2], 1),  # 6 distinct counts > 4 powers of two
    ],
)
async def test_a_batch_runs_the_fewest_calls(
    silero_model: str, monkeypatch: pytest.MonkeyPatch, counts: list[int], multi: list[int], step: int
) -> None:
    """One call per distinct hop count, or per power of two present, whichever is fewer."""
    async with running_engine("silero-vad") as engine:
        handle = engine.resolve("silero-vad")
        calls = Calls(handle, monkeypatch)
        slots = [handle.table.acquire() for _ in counts]
        batch = [
            Step(s, 0, bytes(512 * 2 * k), None, 0.0, count=k)  # type: ignore[arg-type]
            for s, k in zip(slots, counts, strict=True)
        ]
        rows = handle.compute(batch)
        assert rows.shape == (sum(counts), 1)
        assert calls.multi == multi and calls.step == step


async def test_streaming_mixed_message_sizes_equal_one_frame_per_message(
    any_model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """64 sessions, messages of 1 to 64 frames mixed at random, several hops per call:
    the same result sequence, bit for bit, as one frame per message and one hop per call."""
    name = any_model
    n = 64
    rng = random.Random(99)
    clips = varied_clips(n, 1.2, seed=21)
    reference_runs: list[Collect] = []
    async with running_engine(name, max_steps_per_call=1, max_batch_size=256, initial_slots=n) as engine:
        handle = engine.resolve(name)

        async def one_frame(i: int) -> Collect:
            sink = Collect()
            session = engine.open_session(handle, sink)
            await push_all(session, to_s16(clips[i]), [1] * (clips[i].size // FRAME))
            return await finish_session(session, sink)

        reference_runs = list(await asyncio.gather(*(one_frame(i) for i in range(n))))

    async with running_engine(name, max_batch_size=256, initial_slots=n) as engine:
        handle = engine.resolve(name)
        counts: list[int] = []
        real = handle.compute

        def log(batch: Sequence[Step]) -> np.ndarray:
            counts.extend(s.count for s in batch)
            return real(batch)

        monkeypatch.setattr(handle, "compute", log)

        async def mixed(i: int) -> Collect:
            sink = Collect()
            session = engine.open_session(handle, sink)
            plan = random_bursts(clips[i].size // FRAME, 64, random.Random(i))
            data, pos = to_s16(clips[i]), 0
            for k in plan:
                for _ in range(rng.choice([0, 0, 1, 3])):
                    await asyncio.sleep(0)
                chunk = data[pos : pos + k * session.frame_bytes]
                pos += len(chunk)
                await session.wait_for_room(len(chunk))
                session.push(chunk)
            return await finish_session(session, sink)

        runs = await asyncio.gather(*(mixed(i) for i in range(n)))
    assert max(counts) > 1, "no step carried several hops"
    for i, (a, b) in enumerate(zip(reference_runs, runs, strict=True)):
        assert a.indices == b.indices and a.times == b.times, f"session {i}"
        assert np.array_equal(a.scores, b.scores), f"session {i}: scores differ"
        assert a.events == b.events, f"session {i}: events differ"


async def test_silero_in_chunked_messages_equals_its_own_package(silero_model: str) -> None:
    """20 frames (5 hops) per message: several hops per call, Silero's reference numbers,
    and exactly the numbers of one frame per message."""
    ref = reference()
    clip = speech()
    async with running_engine("silero-vad") as engine:
        handle = engine.resolve("silero-vad")
        chunked = await stream_clip(engine, handle, clip, frames_per_push=20)
    async with running_engine("silero-vad", max_steps_per_call=1) as engine:
        single = await stream_clip(engine, engine.resolve("silero-vad"), clip, frames_per_push=1)
    assert len(chunked.rows) == ref.size
    assert float(np.max(np.abs(chunked.scores[:, 0] - ref))) <= 1e-6
    assert np.array_equal(chunked.scores, single.scores)
    assert chunked.events == single.events


async def test_offline_silero_equals_streaming_exactly(silero_model: str) -> None:
    """Offline Silero goes through the multi-step graph: the streaming numbers, bit for bit."""
    clip = speech()
    async with running_engine("silero-vad") as engine:
        handle = engine.resolve("silero-vad")
        streamed = await stream_clip(engine, handle, clip, frames_per_push=1)
        offline, events = await score_offline(engine, handle, offline_chunks(clip, [SR, 777, 40_000]))
    assert np.array_equal(offline, streamed.scores)
    assert [(e.event, e.sample) for e in events] == [(e.event, e.sample) for e in streamed.events]


async def test_load_proves_the_multistep_graph_and_the_check_can_fail(
    any_model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_engine(any_model) as engine:
        handle = engine.resolve(any_model)
        assert handle.multistep is not None and handle.max_steps_per_call == 16
        assert handle.step_compute.multistep_agrees(batch=7, steps=9, seed=3)
        real = handle.multistep.run

        def off_by_one_ulp(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            outs = real(feeds)
            outs[-1] = np.nextafter(outs[-1], np.float32(2.0))  # the last score output
            return outs

        monkeypatch.setattr(handle.multistep, "run", off_by_one_ulp)
        assert not handle.step_compute.multistep_agrees()


async def test_a_multistep_graph_that_disagrees_is_not_used(
    silero_model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the check at load fails, the model serves one hop per call, and offline scoring
    falls back to the step graph: still the streaming numbers, exactly."""
    monkeypatch.setattr(StepCompute, "multistep_agrees", lambda self: False)
    clip = speech()[: 5 * SR]
    async with running_engine("silero-vad") as engine:
        handle = engine.resolve("silero-vad")
        assert handle.multistep is None and handle.max_steps_per_call == 1
        chunked = await stream_clip(engine, handle, clip, frames_per_push=20)
        offline, _ = await score_offline(engine, handle, offline_chunks(clip, [SR, 999]))
    monkeypatch.undo()
    async with running_engine("silero-vad") as engine:
        handle = engine.resolve("silero-vad")
        assert handle.multistep is not None
        multi = await stream_clip(engine, handle, clip, frames_per_push=20)
    assert np.array_equal(chunked.scores, multi.scores)
    assert np.array_equal(offline, multi.scores)
