"""MicroBatcher: failure isolation, greedy batching, the size cap, max_wait, and stop.

The model call is wrapped (never slept around): a ``threading.Event`` holds a batch in
the executor while the test submits more steps, so what forms the next batch is
decided by the test, not by timing.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from lookback.engine import engine as engine_module
from lookback.engine.batcher import MicroBatcher
from lookback.engine.engine import Engine
from lookback.engine.served import ServedModel
from lookback.engine.step import Step
from lookback.errors import BadAudio, InferenceError
from tests.engine.engine_support import SILERO_KEY, running_engine

pytestmark = pytest.mark.usefixtures("silero_model")

HOP_BYTES = 512 * 2


def payload(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return rng.integers(-3000, 3000, 512).astype("<i2").tobytes()


def metric(engine: Engine, name: str, **labels: str) -> float:
    value = engine.metrics.registry.get_sample_value(name, {"model": SILERO_KEY, **labels})
    return 0.0 if value is None else value


class Recorder:
    """Wraps ``handle.compute``: records batch sizes and slots; can hold the next batch."""

    def __init__(self, handle: ServedModel, monkeypatch: pytest.MonkeyPatch) -> None:
        self.real = handle.compute
        self.sizes: list[int] = []
        self.slots: list[list[int]] = []
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.gate.set()
        monkeypatch.setattr(handle, "compute", self)

    def hold_next(self) -> None:
        self.entered.clear()
        self.gate.clear()

    async def wait_entered(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, 30), "the batch never started"

    def __call__(self, batch: Sequence[Step]) -> np.ndarray:
        self.sizes.append(len(batch))
        self.slots.append([s.slot for s in batch])
        self.entered.set()
        assert self.gate.wait(30), "test never released the batch"
        return self.real(batch)


def slots(handle: ServedModel, n: int) -> list[int]:
    return [handle.table.acquire() for _ in range(n)]


async def test_failing_compute_fails_the_whole_batch_then_recovers(monkeypatch: pytest.MonkeyPatch) -> None:
    async with running_engine("silero-vad") as engine:
        handle = engine.resolve("silero-vad")
        real = handle.compute
        calls: list[int] = []

        def flaky(batch: Sequence[Step]) -> np.ndarray:
            calls.append(len(batch))
            if len(calls) == 1:
                raise RuntimeError("CUDA fell over")
            return real(batch)

        monkeypatch.setattr(handle, "compute", flaky)
        ss = slots(handle, 3)
        # submitted before the loop runs the batcher: one batch of 3
        futs = [handle.batcher.submit_future(s, 0, payload(s)) for s in ss]
        results = await asyncio.gather(*futs, return_exceptions=True)
        assert calls == [3]
        for r in results:
            assert isinstance(r, InferenceError)
            assert r.code == "inference_failed"
            assert "batch of 3" in r.message and "CUDA fell over" in r.message
        assert metric(engine, "lookback_batch_failures_total") == 1
        assert metric(engine, "lookback_batches_total") == 0
        # the batcher carries on: the next batch succeeds
        futs = [handle.batcher.submit_future(s, 1, payload(s)) for s in ss]
        rows = await asyncio.gather(*futs)
        assert calls == [3, 3]
        assert all(len(r) == 1 and 0.0 <= r[0] <= 1.0 for r in rows)
        assert metric(engine, "lookback_batch_failures_total") == 1
        assert metric(engine, "lookback_batches_total") == 1
        assert metric(engine, "lookback_steps_total") == 3


async def test_wrong_row_count_fails_the_batch_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    async with running_engine("silero-vad") as engine:
        handle = engine.resolve("silero-vad")
        real = handle.compute
        monkeypatch.setattr(handle, "compute", lambda batch: real(batch)[:-1])
        futs = [handle.batcher.submit_future(s, 0, payload(s)) for s in slots(handle, 3)]
        results = await asyncio.gather(*futs, return_exceptions=True)
        for r in results:
            assert isinstance(r, InferenceError) and r.code == "inference_failed"
            assert "model returned 2 rows for a batch of 3" in r.message
        assert metric(engine, "lookback_batch_failures_total") == 1


async def test_lookback_error_from_compute_reaches_waiters_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    async with running_engine("silero-vad") as engine:
        handle = engine.resolve("silero-vad")

        def refuse(batch: Sequence[Step]) -> np.ndarray:
            raise BadAudio("nope", code="bad_frame_size")

        monkeypatch.setattr(handle, "compute", refuse)
        fut = handle.batcher.submit_future(slots(handle, 1)[0], 0, payload(0))
        with pytest.raises(BadAudio) as info:
            await fut
        assert info.value.code == "bad_frame_size"


async def test_a_broken_waiter_does_not_starve_the_batch() -> None:
    class Broken:
        def set_result(self, result: Any) -> None:
            raise RuntimeError("consumer bug")

        def set_exception(self, exception: BaseException) -> None:
            raise RuntimeError("consumer bug")

    async with running_engine("silero-vad") as engine:
        handle = engine.resolve("silero-vad")
        a, b = slots(handle, 2)
        handle.batcher.submit(Step(a, 0, payload(a), Broken(), time.perf_counter()))
        fut = handle.batcher.submit_future(b, 0, payload(b))
        assert len(await fut) == 1
        assert len(await handle.batcher.submit_future(a, 1, payload(a))) == 1


async def test_greedy_batching_next_batch_forms_while_one_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    async with running_engine("silero-vad", max_batch_size=256) as engine:
        handle = engine.resolve("silero-vad")
        rec = Recorder(handle, monkeypatch)
        ss = slots(handle, 6)
        # idle runtime: a single step starts a batch at once
        assert len(await handle.batcher.submit_future(ss[0], 0, payload(0))) == 1
        assert rec.sizes == [1]
        rec.hold_next()
        first = handle.batcher.submit_future(ss[0], 1, payload(1))
        await rec.wait_entered()  # batch [ss0] is running in the executor
        later = [handle.batcher.submit_future(s, 0, payload(s)) for s in ss[1:]]
        assert handle.batcher.backlog == 5
        rec.gate.set()
        await asyncio.gather(first, *later)
        assert rec.sizes == [1, 1, 5]
        assert rec.slots[2] == ss[1:]  # FIFO
        assert metric(engine, "lookback_batch_size_count") == 3
        assert metric(engine, "lookback_batch_size_sum") == 7
        assert metric(engine, "lookback_batch_size_bucket", le="1.0") == 2
        assert metric(engine, "lookback_batch_size_bucket", le="4.0") == 2
        assert metric(engine, "lookback_batch_size_bucket", le="8.0") == 3
        assert metric(engine, "lookback_steps_total") == 7


async def test_max_batch_size_caps_each_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    async with running_engine("silero-vad", max_batch_size=4, initial_slots=16) as engine:
        handle = engine.resolve("silero-vad")
        rec = Recorder(handle, monkeypatch)
        ss = slots(handle, 11)
        rec.hold_next()
        first = handle.batcher.submit_future(ss[0], 0, payload(0))
        await rec.wait_entered()
        later = [handle.batcher.submit_future(s, 0, payload(s)) for s in ss[1:]]
        rec.gate.set()
        await asyncio.gather(first, *later)
        assert rec.sizes == [1, 4, 4, 2]
        assert [s for batch in rec.slots for s in batch] == ss


def watch_fill(batcher: MicroBatcher, monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
    """An event set when the batcher starts holding a batch back to fill it."""
    filling = asyncio.Event()
    real_fill = batcher._fill

    async def fill(loop: asyncio.AbstractEventLoop) -> bool:
        filling.set()
        return await real_fill(loop)

    monkeypatch.setattr(batcher, "_fill", fill)
    return filling


async def test_max_wait_holds_a_batch_until_it_fills(monkeypatch: pytest.MonkeyPatch) -> None:
    # a 60 s wait that must not be waited out: the batch starts the moment it is full
    async with running_engine(
        "silero-vad", max_batch_size=4, max_wait_ms=60_000, adaptive_wait=False
    ) as engine:
        handle = engine.resolve("silero-vad")
        batcher = handle.batcher
        rec = Recorder(handle, monkeypatch)
        filling = watch_fill(batcher, monkeypatch)
        ss = slots(handle, 4)
        t0 = time.monotonic()
        futs = [batcher.submit_future(ss[0], 0, payload(0))]
        await filling.wait()  # the batcher holds one step, waiting for more
        assert rec.sizes == []
        futs.append(batcher.submit_future(ss[1], 0, payload(1)))
        futs.append(batcher.submit_future(ss[2], 0, payload(2)))
        await asyncio.sleep(0)  # let the batcher see two new steps: still not full
        assert rec.sizes == []
        futs.append(batcher.submit_future(ss[3], 0, payload(3)))
        await asyncio.gather(*futs)
        assert rec.sizes == [4]
        assert time.monotonic() - t0 < 30


async def test_max_wait_deadline_runs_a_partial_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    async with running_engine("silero-vad", max_batch_size=8, max_wait_ms=5, adaptive_wait=False) as engine:
        handle = engine.resolve("silero-vad")
        rec = Recorder(handle, monkeypatch)
        (s,) = slots(handle, 1)
        assert len(await handle.batcher.submit_future(s, 0, payload(0))) == 1
        assert rec.sizes == [1]


async def test_max_wait_never_waits_once_every_open_session_is_ready(monkeypatch: pytest.MonkeyPatch) -> None:
    # two open sessions, a 60 s wait and room for 8: nobody else can add a step, so go now
    async with running_engine(
        "silero-vad", max_batch_size=8, max_wait_ms=60_000, adaptive_wait=False
    ) as engine:
        handle = engine.resolve("silero-vad")
        rec = Recorder(handle, monkeypatch)
        ss = slots(handle, 2)
        t0 = time.monotonic()
        await asyncio.gather(*(handle.batcher.submit_future(s, 0, payload(s)) for s in ss))
        assert rec.sizes == [2]
        assert time.monotonic() - t0 < 30


async def test_fill_deadline_and_a_new_step_in_the_same_tick(monkeypatch: pytest.MonkeyPatch) -> None:
    """The deadline timer fires and, before the batcher resumes, a step completes the
    batch: the step is queued once and nothing raises (it used to resolve a done future)."""
    async with running_engine(
        "silero-vad", max_batch_size=2, max_wait_ms=60_000, adaptive_wait=False
    ) as engine:
        handle = engine.resolve("silero-vad")
        batcher = handle.batcher
        rec = Recorder(handle, monkeypatch)
        filling = watch_fill(batcher, monkeypatch)
        ss = slots(handle, 3)
        first = batcher.submit_future(ss[0], 0, payload(0))
        await filling.wait()
        batcher._end_fill()  # what the deadline timer calls
        second = batcher.submit_future(ss[1], 0, payload(1))  # same tick: batch now full
        await asyncio.gather(first, second)
        assert rec.sizes == [2]


@pytest.mark.parametrize(
    ("mode", "provider", "cpus", "inline"),
    [
        ("auto", "CPUExecutionProvider", 1, True),
        ("auto", "CPUExecutionProvider", 2, False),
        ("auto", "CUDAExecutionProvider", 1, False),
        ("inline", "CPUExecutionProvider", 4, True),
        ("thread", "CPUExecutionProvider", 1, False),
    ],
)
def test_model_calls_inline_only_where_a_thread_buys_nothing(
    mode: str, provider: str, cpus: int, inline: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine_module, "usable_cpus", lambda: cpus)
    assert engine_module.inline_model_calls(mode, provider) is inline


async def test_inline_batcher_still_lets_the_loop_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Model calls on the event loop: a session that always has a next step ready must
    not keep the loop from running anything else."""
    async with running_engine("silero-vad", model_calls="inline") as engine:
        handle = engine.resolve("silero-vad")
        assert handle.batcher.inline
        (s,) = slots(handle, 1)
        done = 0
        stop = False

        def chain(fut: asyncio.Future[Any]) -> None:
            nonlocal done
            done += 1
            if not stop:
                handle.batcher.submit_future(s, 0, payload(0)).add_done_callback(chain)

        handle.batcher.submit_future(s, 0, payload(0)).add_done_callback(chain)
        ticks = 0
        while done < 20:  # this task gets turns while the chain keeps the batcher busy
            ticks += 1
            await asyncio.sleep(0)
        stop = True
        assert ticks >= 20


async def test_stop_fails_queued_steps_after_the_running_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    async with running_engine("silero-vad") as engine:
        handle = engine.resolve("silero-vad")
        rec = Recorder(handle, monkeypatch)
        ss = slots(handle, 4)
        rec.hold_next()
        running = handle.batcher.submit_future(ss[0], 0, payload(0))
        await rec.wait_entered()
        queued = [handle.batcher.submit_future(s, 0, payload(s)) for s in ss[1:]]
        stopping = asyncio.create_task(handle.batcher.stop())
        await asyncio.sleep(0)
        assert not stopping.done()  # waits for the batch in flight
        rec.gate.set()
        await stopping
        assert len(await running) == 1  # the running batch completes
        for fut in queued:
            with pytest.raises(InferenceError) as info:
                await fut
            assert info.value.code == "draining"
        assert rec.sizes == [1]
        assert handle.batcher.backlog == 0


async def test_cancel_withdraws_only_a_queued_step(monkeypatch: pytest.MonkeyPatch) -> None:
    async with running_engine("silero-vad") as engine:
        handle = engine.resolve("silero-vad")
        batcher: MicroBatcher = handle.batcher
        rec = Recorder(handle, monkeypatch)
        a, b = slots(handle, 2)
        loop = asyncio.get_running_loop()
        rec.hold_next()
        step_a = Step(a, 0, payload(a), loop.create_future(), time.perf_counter())
        batcher.submit(step_a)
        await rec.wait_entered()
        step_b = Step(b, 0, payload(b), loop.create_future(), time.perf_counter())
        batcher.submit(step_b)
        assert batcher.cancel(step_b) is True
        assert batcher.cancel(step_a) is False  # running: cannot be withdrawn
        rec.gate.set()
        await step_a.waiter  # type: ignore[misc]
        assert rec.sizes == [1] and not step_b.waiter.done()  # type: ignore[attr-defined]


async def test_a_malformed_step_fails_alone_not_its_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """A wrong-length step is refused at submit; the steps around it still run in one batch."""
    async with running_engine("silero-vad") as engine:
        handle = engine.resolve("silero-vad")
        rec = Recorder(handle, monkeypatch)
        rec.hold_next()
        slots = [handle.table.acquire() for _ in range(4)]
        blocker = handle.submit_future(slots[0], 0, payload(0))
        await rec.wait_entered()
        good = [handle.submit_future(s, 0, payload(i)) for i, s in enumerate(slots[1:3])]
        bad = handle.submit_future(slots[3], 0, payload(9)[:-2])
        rec.gate.set()
        with pytest.raises(BadAudio, match="refused before batching"):
            await bad
        rows = await asyncio.gather(blocker, *good)
        assert all(np.isfinite(r).all() for r in rows)
        assert rec.sizes == [1, 2]  # the bad step never reached a batch


def test_adaptive_wait_grows_with_load_and_is_published() -> None:
    """No fill wait while the process has CPU to spare, max_wait_ms near a full core; the
    busy ratio and the model's CPU share go to /metrics."""
    from lookback.metrics import Metrics

    metrics = Metrics()

    def batcher(label: str, **kw: Any) -> MicroBatcher:  # a model call that is never made
        zeros = lambda steps: np.zeros((len(steps), 1), np.float32)  # noqa: E731
        return MicroBatcher(zeros, lambda: 1, label=label, metrics=metrics, max_batch_size=8, **kw)

    b = batcher("m/1", max_wait_ms=4.0, adaptive_wait=True)
    assert b.wait == 0.0  # idle until measured otherwise
    for busy, want in ((0.2, 0.0), (0.5, 0.0), (0.7, 0.002), (0.9, 0.004), (1.0, 0.004)):
        b.load.busy, b.load.model_share = busy, 0.25
        b._tune()
        assert b.wait == pytest.approx(want), busy
    get = metrics.registry.get_sample_value
    assert get("lookback_process_busy_ratio", {"model": "m/1"}) == 1.0
    assert get("lookback_model_cpu_share", {"model": "m/1"}) == 0.25
    assert get("lookback_batch_wait_budget_seconds", {"model": "m/1"}) == pytest.approx(0.004)
    fixed = batcher("m/2", max_wait_ms=4.0)
    assert fixed.wait == pytest.approx(0.004)


def test_load_window_measures_cpu_and_the_model_share() -> None:
    from lookback.engine.batcher import LoadWindow

    w = LoadWindow(period=0.05)
    t0 = time.perf_counter()
    spin = time.process_time() + 0.06  # CPU work, not a sleep: the window must see it busy
    while time.process_time() < spin:
        pass
    assert w.add(0.03, time.perf_counter())
    assert w.busy > 0.3
    assert 0.2 < w.model_share < 1.0
    assert not w.add(0.0, t0)  # a window has not passed since it closed


async def test_a_waiting_batch_starts_at_fill_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    # three open sessions, room for 8, a 60 s wait: two steps are enough (batch_fill_rows=2)
    async with running_engine(
        "silero-vad", max_batch_size=8, max_wait_ms=60_000, adaptive_wait=False, batch_fill_rows=2
    ) as engine:
        handle = engine.resolve("silero-vad")
        rec = Recorder(handle, monkeypatch)
        ss = slots(handle, 3)
        t0 = time.monotonic()
        await asyncio.gather(*(handle.batcher.submit_future(s, 0, payload(s)) for s in ss[:2]))
        assert rec.sizes == [2]
        assert time.monotonic() - t0 < 30
