"""StreamSession: frames -> ordered steps, bounded queue, flush, bad input refused whole."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import numpy as np
import pytest

from lookback.engine.events import Event
from lookback.engine.pcm import Encoding
from lookback.engine.served import ServedModel
from lookback.engine.session import StreamSession
from lookback.engine.step import Step
from lookback.errors import BackpressureError, BadAudio, CapacityError, SessionClosed
from tests.engine.engine_support import (
    FRAME,
    SR,
    Collect,
    even_bursts,
    push_all,
    running_engine,
    speech,
    stream_clip,
    to_s16,
    whole_frames,
)


class Gate:
    """Holds model calls in the executor until released; counts the calls."""

    def __init__(self, handle: ServedModel, monkeypatch: pytest.MonkeyPatch) -> None:
        self.real = handle.compute
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls = 0
        monkeypatch.setattr(handle, "compute", self)

    async def wait_entered(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, 30)

    def __call__(self, batch: Sequence[Step]) -> np.ndarray:
        self.calls += 1
        self.entered.set()
        assert self.release.wait(30)
        return self.real(batch)


def clip_f32(x: np.ndarray) -> bytes:
    return (x.astype(np.float32) / np.float32(32768.0)).astype("<f4").tobytes()


async def test_results_arrive_in_step_order_with_times(any_model: str) -> None:
    name = any_model
    clip = speech()[: 3 * SR]
    async with running_engine(name) as engine:
        handle = engine.resolve(name)
        hop = handle.spec.hop_samples
        sinks = [Collect() for _ in range(4)]
        sessions = [engine.open_session(handle, s) for s in sinks]
        data = to_s16(whole_frames(clip))
        n = len(data) // 256

        async def drive(i: int) -> None:
            await push_all(sessions[i], data, even_bursts(n, 1 + 5 * i))
            sessions[i].flush()
            await sessions[i].wait_idle()

        await asyncio.gather(*(drive(i) for i in range(4)))
        for s in sessions:
            s.close()
    steps = -(-n * FRAME // hop)
    for sink in sinks:
        assert sink.indices == list(range(steps))
        assert sink.times == [(i + 1) * hop / SR for i in range(steps)]
        np.testing.assert_array_equal(sink.scores, sinks[0].scores)


async def test_pending_queue_is_bounded_and_wait_for_room_unblocks(
    silero_model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_engine("silero-vad", max_pending_steps=4, max_frames_per_message=4) as engine:
        handle = engine.resolve("silero-vad")
        gate = Gate(handle, monkeypatch)
        sink = Collect()
        session = engine.open_session(handle, sink)
        hop = session.hop_bytes
        data = to_s16(speech()[: 8 * 512])
        assert session.push(data[:hop]) == 1
        await gate.wait_entered()  # step 0 is running, held
        assert session.push(data[hop : 4 * hop]) == 3  # 1 in flight + 3 queued = the bound
        assert session.pending_steps == 4
        frames_before = session.frames
        with pytest.raises(BackpressureError) as info:
            session.push(data[4 * hop : 5 * hop])
        assert info.value.code == "too_many_pending_steps"
        assert session.frames == frames_before and session.steps_made == 4  # refused whole
        # a partial hop makes no step: still accepted
        assert session.push(data[4 * hop : 4 * hop + 256]) == 0
        with pytest.raises(BackpressureError):  # one message that could never fit
            await session.wait_for_room(5 * hop)
        waiter = asyncio.create_task(session.wait_for_room(hop))
        await asyncio.sleep(0)
        assert not waiter.done()
        gate.release.set()  # steps complete; room appears
        await asyncio.wait_for(waiter, 30)
        assert session.pending_steps <= 3
        session.push(data[4 * hop + 256 : 5 * hop + 256])
        await session.wait_idle()
        session.close()
    assert sink.indices == [0, 1, 2, 3, 4]
    assert not sink.errors


async def test_backpressure_resumes_reading_at_half_the_bound(silero_model: str) -> None:
    """A full session's transport waits for the queue to drain to half the bound, so an
    overloaded server parks each reader once per many messages, not once per message."""
    async with running_engine(
        "silero-vad", max_pending_steps=8, max_frames_per_message=4, max_steps_per_call=1
    ) as engine:
        handle = engine.resolve("silero-vad")
        await handle.batcher.stop()  # completions are driven by hand below
        session = engine.open_session(handle, Collect())
        hop = session.hop_bytes
        for _ in range(8):
            session.push(bytes(hop))
        with pytest.raises(BackpressureError):
            session.push(bytes(hop))
        waiter = asyncio.create_task(session.wait_for_room(hop))
        await asyncio.sleep(0)
        assert not waiter.done()
        seen = []  # (pending steps, reader resumed) after each completed step
        ready = handle.batcher._ready  # the stopped batcher's queue: steps wait here
        while not waiter.done():
            ready.popleft().waiter.set_result([[0.0]])  # the step in flight completes
            for _ in range(3):
                await asyncio.sleep(0)
            seen.append((session.pending_steps, waiter.done()))
        assert seen == [(7, False), (6, False), (5, False), (4, True)]
        session.push(bytes(hop))  # and it fits
        assert session.pending_steps == 5
        session.close()


async def test_flush_zero_pads_and_counts_padding(silero_model: str) -> None:
    clip = speech()[SR : SR + 512 + 3 * FRAME]  # one hop and three frames
    async with running_engine("silero-vad") as engine:
        handle = engine.resolve("silero-vad")
        sink = Collect()
        session = engine.open_session(handle, sink)
        assert session.flush() == 0  # nothing buffered: nothing to do
        assert session.push(to_s16(clip)) == 1
        assert session.buffered_samples == 3 * FRAME
        assert session.flush() == 1
        assert session.padded_samples == FRAME and session.buffered_samples == 0
        assert session.samples == 1024
        assert session.flush() == 0
        await session.wait_idle()
        session.close()
        # the same audio with the zero frame sent explicitly
        padded = await stream_clip(
            engine, handle, np.concatenate([clip, np.zeros(FRAME, np.int16)]), flush=False
        )
    assert sink.indices == [0, 1] and sink.times == [512 / SR, 1024 / SR]
    np.testing.assert_array_equal(sink.scores, padded.scores)


async def test_flush_pads_float32_too(silero_model: str) -> None:
    async with running_engine("silero-vad") as engine:
        handle = engine.resolve("silero-vad")
        session = engine.open_session(handle, Collect(), encoding="pcm_f32le")
        session.push(clip_f32(speech()[:FRAME]))
        assert session.flush() == 1 and session.padded_samples == 512 - FRAME
        await session.wait_idle()
        session.close()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
async def test_non_finite_float_audio_is_refused_and_touches_nothing(any_model: str, bad: float) -> None:
    name = any_model
    clip = speech()[SR : SR + 2 * 4 * 512]
    frames = [clip_f32(clip[i : i + FRAME]) for i in range(0, clip.size, FRAME)]
    async with running_engine(name) as engine:
        handle = engine.resolve(name)
        sink = Collect()
        session = engine.open_session(handle, sink, encoding="pcm_f32le")
        poisoned = np.frombuffer(frames[3], "<f4").copy()
        poisoned[17] = bad
        for i, frame in enumerate(frames):
            if i in (3, 6):  # mid-hop for Silero: the partial hop must survive untouched
                state = (session.frames, session.buffered_samples, session.steps_made)
                for msg in (poisoned.tobytes(), frame + poisoned.tobytes()):
                    with pytest.raises(BadAudio) as info:
                        session.push(msg)
                    assert info.value.code == "non_finite_audio"
                assert (session.frames, session.buffered_samples, session.steps_made) == state
            await session.wait_for_room(len(frame))
            session.push(frame)
        await session.wait_idle()
        session.close()
        clean = Collect()
        other = engine.open_session(handle, clean, encoding="pcm_f32le")
        other.push(b"".join(frames))
        await other.wait_idle()
        other.close()
    assert not sink.errors and len(sink.rows) == len(clean.rows) > 0
    np.testing.assert_array_equal(sink.scores, clean.scores)


async def test_int16_and_float32_encodings_give_identical_scores(any_model: str) -> None:
    name = any_model
    clip = whole_frames(speech()[: 4 * SR])
    clip[100] = -32768  # the extremes convert exactly too
    clip[101] = 32767
    async with running_engine(name) as engine:
        handle = engine.resolve(name)
        results = []
        encoded: list[tuple[Encoding, bytes]] = [("pcm_s16le", to_s16(clip)), ("pcm_f32le", clip_f32(clip))]
        for encoding, data in encoded:
            sink = Collect()
            session = engine.open_session(handle, sink, encoding=encoding)
            assert session.frame_bytes == FRAME * (2 if encoding == "pcm_s16le" else 4)
            await push_all(session, data, even_bursts(clip.size // FRAME, 3))
            await session.wait_idle()
            session.close()
            results.append(sink.scores)
    assert len(results[0]) == clip.size // handle.spec.hop_samples
    np.testing.assert_array_equal(results[0], results[1])


async def test_closed_session_refuses_audio_and_frees_its_slot(silero_model: str) -> None:
    async with running_engine("silero-vad") as engine:
        handle = engine.resolve("silero-vad")
        session = engine.open_session(handle, Collect())
        assert handle.table.used == 1
        session.close()
        session.close()  # idempotent
        assert handle.table.used == 0 and session.slot == -1
        with pytest.raises(SessionClosed):
            session.push(bytes(256))
        assert session.flush() == 0
        await session.wait_idle()


async def test_unknown_encoding_is_refused(silero_model: str) -> None:
    async with running_engine("silero-vad") as engine:
        with pytest.raises(BadAudio) as info:
            engine.open_session(engine.resolve("silero-vad"), Collect(), encoding="pcm_u8")  # type: ignore[arg-type]
        assert info.value.code == "bad_encoding"
        assert engine.resolve("silero-vad").table.used == 0


async def test_sessions_beyond_capacity_are_refused(silero_model: str) -> None:
    async with running_engine(
        "silero-vad", max_sessions=1, max_concurrent_scores=1, max_queued_scores=0
    ) as engine:
        handle = engine.resolve("silero-vad")
        a = engine.open_session(handle, Collect())
        b = engine.open_session(handle, Collect())
        with pytest.raises(CapacityError):
            engine.open_session(handle, Collect())
        a.close()
        c = engine.open_session(handle, Collect())
        b.close()
        c.close()


async def test_failed_batch_reaches_the_sink_as_an_error_and_the_session_goes_on(
    silero_model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_engine("silero-vad", max_steps_per_call=1) as engine:
        handle = engine.resolve("silero-vad")
        real = handle.compute
        calls = []

        def flaky(batch: Sequence[Step]) -> np.ndarray:
            calls.append(len(batch))
            if len(calls) == 2:
                raise RuntimeError("boom")
            return real(batch)

        monkeypatch.setattr(handle, "compute", flaky)
        sink = Collect()
        session = engine.open_session(handle, sink)
        session.push(to_s16(speech()[: 3 * 512]))
        await session.wait_idle()
        session.close()
    assert sink.indices == [0, 2]
    assert [(i, e.code) for i, e in sink.errors] == [(1, "inference_failed")]
    assert session.steps_done == 2 and session.steps_failed == 1


async def test_finish_closes_an_open_segment_at_the_stream_end(silero_model: str) -> None:
    x = speech()
    start = int(np.argmax(np.abs(x) > 3000))
    clip = whole_frames(x[start : start + SR // 2])  # cut in the middle of speech
    async with running_engine("silero-vad") as engine:
        got = await stream_clip(engine, engine.resolve("silero-vad"), clip)
    assert [e.event for e in got.events] == ["start", "end"]
    assert got.events[-1].sample == len(got.rows) * 512


@pytest.mark.parametrize("encoding", ["pcm_s16le", "pcm_f32le"])
async def test_empty_message_is_refused_for_every_encoding(encoding: str) -> None:
    """The one-hop fast path must never take an empty message (regression: f32 did)."""
    async with running_engine("silero-vad") as engine:
        sink = Collect()
        session = engine.open_session(engine.resolve("silero-vad"), sink, encoding=encoding)  # type: ignore[arg-type]
        with pytest.raises(BadAudio) as info:
            session.push(b"")
        assert info.value.code == "empty_message"
        assert session.steps_made == 0 and session.frames == 0
        session.close()


async def test_a_waiting_step_takes_new_hops_up_to_max_steps_per_call(silero_model: str) -> None:
    """Hops that become ready while the session's step waits for a batch join it (up to
    max_steps_per_call); once a batch has taken it, they queue and form the next step."""
    async with running_engine(
        "silero-vad", max_steps_per_call=4, max_pending_steps=16, max_frames_per_message=16
    ) as engine:
        handle = engine.resolve("silero-vad")
        await handle.batcher.stop()  # completions are driven by hand below
        sink = Collect()
        session = engine.open_session(handle, sink)
        hop = session.hop_bytes
        ready = handle.batcher._ready
        assert session.push(bytes(hop)) == 1
        assert session.push(bytes(2 * hop)) == 2
        assert len(ready) == 1 and ready[0].count == 3 and session.pending_steps == 3
        assert session.push(bytes(3 * hop)) == 3  # one joins (4 = the cap), two queue
        assert len(ready) == 1 and ready[0].count == 4 and session.pending_steps == 6
        step = ready.popleft()
        step.taken = True  # what the batcher does when a batch takes it
        assert session.push(bytes(hop)) == 1  # queued behind, never added to a taken step
        assert step.count == 4 and session.pending_steps == 7
        step.waiter.set_result([[float(i)] for i in range(4)])
        assert sink.indices == [0, 1, 2, 3] and [r[0] for r in sink.rows] == [0.0, 1.0, 2.0, 3.0]
        assert len(ready) == 1 and (ready[0].index, ready[0].count) == (4, 3)  # queued hops merged
        assert session.pending_steps == 3
        with pytest.raises(BackpressureError):
            session.push(bytes(14 * hop))
        session.close()


async def test_a_sink_that_closes_the_session_gets_no_more_rows_of_that_step(silero_model: str) -> None:
    class CloseOnFirst(Collect):
        session: StreamSession | None = None

        def on_result(self, index: int, time: float, scores: list[float], events: list[Event] | None) -> None:
            super().on_result(index, time, scores, events)
            assert self.session is not None
            self.session.close()

    async with running_engine("silero-vad") as engine:
        handle = engine.resolve("silero-vad")
        await handle.batcher.stop()  # completions are driven by hand below
        sink = CloseOnFirst()
        session = sink.session = engine.open_session(handle, sink)
        assert session.push(bytes(3 * session.hop_bytes)) == 3
        (step,) = handle.batcher._ready
        assert step.count == 3
        handle.batcher._ready.clear()
        step.taken = True
        step.waiter.set_result([[0.1], [0.2], [0.3]])
        assert sink.indices == [0] and session.closed and session.slot == -1
        assert handle.table.used == 0


class RowsSink(Collect):
    """A sink that takes a multi-hop step's rows in one call (``GroupedSink.on_rows``)."""

    def __init__(self) -> None:
        super().__init__()
        self.row_calls = 0
        self.hop, self.rate = 0, SR

    def on_rows(self, first: int, rows: np.ndarray) -> None:
        self.row_calls += 1
        assert rows.dtype == np.float32 and rows.ndim == 2 and len(rows) > 1
        assert np.isfinite(rows).all()
        for i, row in enumerate(rows.tolist()):
            k = first + i
            self.on_result(k, (k + 1) * self.hop / self.rate, row, None)


async def test_multi_hop_rows_in_one_pass_equal_the_per_step_path(any_model: str) -> None:
    """A sink with ``on_rows`` gets a 10-hop step's rows as one array when no hop has an
    event, and the per-step calls otherwise: the results and events are the same, bit
    for bit, as a sink that only has ``on_result``."""
    clip = speech()
    async with running_engine(any_model.split("/")[0]) as engine:
        handle = engine.resolve(any_model.split("/")[0])
        data = to_s16(whole_frames(clip))
        sinks: list[Collect] = []
        for sink in (Collect(), RowsSink()):
            if isinstance(sink, RowsSink):
                sink.hop = handle.spec.hop_samples
            session = engine.open_session(handle, sink)
            frames = len(data) // session.frame_bytes
            await push_all(session, data, even_bursts(frames, 10 * handle.spec.frames_per_hop))
            session.flush()
            await session.wait_idle()
            sink.events = list(session.events)
            session.close()
            sinks.append(sink)
        plain, rows = sinks
        assert isinstance(rows, RowsSink) and rows.row_calls > 0
        assert rows.indices == plain.indices == list(range(len(plain.indices)))
        assert rows.times == plain.times
        assert np.array_equal(rows.scores, plain.scores)
        assert plain.events and rows.events == plain.events  # the clip has speech: rows with events too
