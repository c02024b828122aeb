"""MicroBatcher: one per model; gathers the ready steps of all sessions into one call.

Continuous batching: when the runtime is idle a batch starts with whatever is ready;
while it runs, ready steps pile up and form the next one. ``max_batch_size`` caps a
batch. ``max_wait_ms`` (0 = greedy) may hold a small batch back to fill it, counted from
when its oldest step became ready, and never once every open session has a step ready
(nobody else could add one). The wait is one future with a deadline timer, woken early
only when the batch is full: no sleep-polling and no per-step wake-up. A session has at
most one step in flight because its next step needs the state this one produces, so a
batch never holds two steps of one session.

The model call (gather, run, scatter) runs in a dedicated executor thread, so the event
loop keeps receiving frames while ONNX Runtime (which releases the GIL) computes on
another core. When the process may use a single CPU that thread buys no parallelism and
costs two thread hand-offs per batch, so ``model_calls=auto`` then calls the model
inline on the event loop, yielding to it once per batch.

Every step carries a waiter with the ``asyncio.Future`` interface (``set_result`` /
``set_exception``): a Future by default, or the session itself on the streaming hot
path to save an allocation and a callback hop per step. A failed batch fails every
waiter with ``InferenceError`` and the batcher carries on with the next batch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from lookback.errors import BadAudio, InferenceError, LookbackError

if TYPE_CHECKING:
    from lookback.engine.model import ModelHandle

log = logging.getLogger("lookback.batcher")

_S16 = np.dtype("<i2")
_F32 = np.dtype("<f4")


class Waiter(Protocol):
    def set_result(self, result: Any) -> None: ...
    def set_exception(self, exception: BaseException) -> None: ...


class Step:
    """One model step of one session: ``hop_samples`` new samples, PCM bytes or float32."""

    __slots__ = ("index", "payload", "slot", "t_arrival", "t_ready", "waiter")

    def __init__(
        self, slot: int, index: int, payload: bytes | np.ndarray, waiter: Waiter, t_arrival: float
    ) -> None:
        self.slot = slot
        self.index = index
        self.payload = payload  # bytes: pcm_s16le; ndarray: float32 in [-1, 1)
        self.waiter = waiter
        self.t_arrival = t_arrival
        self.t_ready = 0.0


class MicroBatcher:
    def __init__(
        self, handle: ModelHandle, *, max_batch_size: int, max_wait_ms: float, inline: bool = False
    ) -> None:
        self.handle = handle
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.inline = inline  # call the model on the event loop (single-CPU processes)
        self._ready: deque[Step] = deque()
        self._idle: asyncio.Future[None] | None = None  # set while the loop waits for work
        self._full: asyncio.Future[None] | None = None  # set while a batch waits to fill
        self._fill_target = 0  # steps that end the fill wait early
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._running = False
        label = handle.spec.key
        m = handle.metrics
        self._m_steps = m.steps.labels(label)
        self._m_batches = m.batches.labels(label)
        self._m_failures = m.batch_failures.labels(label)
        self._m_size = m.batch_size.labels(label)
        self._m_run = m.model_run.labels(label)
        self._m_backlog = m.backlog.labels(label)
        self._m_wait = m.queue_wait
        self._m_latency = m.frame_latency
        self._label = label
        self._hop = handle.spec.hop_samples
        self._hop_bytes = 2 * self._hop  # pcm_s16le payloads

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        if self._task is not None:
            return
        if not self.inline:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"batch-{self._label}")
        self._running = True
        self._task = asyncio.create_task(self._run(), name=f"batcher:{self._label}")

    async def stop(self) -> None:
        """Stop after the batch in flight; steps still queued fail with a clear error."""
        self._running = False
        for waiting in (self._idle, self._full):
            if waiting is not None and not waiting.done():
                waiting.set_result(None)
        self._idle = self._full = None
        if self._task is not None:
            await self._task
            self._task = None
        while self._ready:
            self._ready.popleft().waiter.set_exception(
                InferenceError("server stopping: step not run", code="draining")
            )
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    @property
    def backlog(self) -> int:
        return len(self._ready)

    # -- submission --------------------------------------------------------------------
    def submit(self, step: Step) -> None:
        """Queue a step for the next batch; a malformed one fails alone, here, not its batch."""
        p = step.payload
        if (len(p) != self._hop_bytes) if isinstance(p, bytes) else (p.shape != (self._hop,)):
            step.waiter.set_exception(
                BadAudio(f"a step must carry exactly {self._hop} samples; refused before batching")
            )
            return
        self.enqueue(step)

    def enqueue(self, step: Step) -> None:
        """Queue a step built by a StreamSession (exact hop by construction: unchecked)."""
        step.t_ready = time.perf_counter()
        self._ready.append(step)
        if self._idle is not None:
            self._idle.set_result(None)
            self._idle = None
        elif self._full is not None and len(self._ready) >= self._fill_target:
            self._end_fill()

    def submit_future(self, slot: int, index: int, payload: bytes | np.ndarray) -> asyncio.Future:
        """Submit a step and get a Future for its output row (tests, offline)."""
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self.submit(Step(slot, index, payload, fut, time.perf_counter()))
        return fut

    def cancel(self, step: Step) -> bool:
        """Withdraw a step that no batch has taken yet; False if it is running."""
        try:
            self._ready.remove(step)
        except ValueError:
            return False
        return True

    # -- the loop ----------------------------------------------------------------------
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self._running:
            if not self._ready:
                self._m_backlog.set(0)
                self._idle = loop.create_future()
                await self._idle
                continue
            if not (self.max_wait and await self._fill(loop)) and self.inline:
                # Let the loop read what has arrived before taking the batch: chained
                # steps of backlogged sessions would otherwise keep it from ever reading.
                await asyncio.sleep(0)
            if not self._ready:  # every step was withdrawn (sessions closed) meanwhile
                continue
            n = min(len(self._ready), self.max_batch_size)
            batch = [self._ready.popleft() for _ in range(n)]
            self._m_backlog.set(len(self._ready))
            t0 = time.perf_counter()
            try:
                if self.inline:
                    out = self.handle.compute(batch)
                else:
                    out = await loop.run_in_executor(self._executor, self.handle.compute, batch)
                if len(out) != n:
                    raise InferenceError(f"model returned {len(out)} rows for a batch of {n}")
            except Exception as exc:  # a failed batch must not stop the batcher
                self._fail(batch, exc)
                continue
            t1 = time.perf_counter()
            self._m_batches.inc()
            self._m_steps.inc(n)
            self._m_size.observe(n)
            self._m_run.observe(t1 - t0)
            self._m_wait.observe_many(t0 - np.array([s.t_ready for s in batch], np.float64), self._label)
            rows = out.tolist()  # python floats: cheaper per step than numpy row views
            for step, row in zip(batch, rows, strict=True):
                try:
                    step.waiter.set_result(row)
                except Exception:  # a broken consumer must not stop the batcher
                    log.exception("waiter raised on a result")
            self._m_latency.observe_many(
                time.perf_counter() - np.array([s.t_arrival for s in batch], np.float64), self._label
            )

    async def _fill(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Hold the batch until it is full, every open session is in it, or its oldest
        step has waited ``max_wait``; False if there was nothing to wait for."""
        target = min(self.max_batch_size, self.handle.table.used)
        remaining = self._ready[0].t_ready + self.max_wait - time.perf_counter()
        if len(self._ready) >= target or remaining <= 0:
            return False
        self._fill_target = target
        self._full = full = loop.create_future()
        timer = loop.call_later(remaining, self._end_fill)
        try:
            await full
        finally:
            timer.cancel()
            self._full = None
        return True

    def _end_fill(self) -> None:
        full, self._full = self._full, None
        if full is not None:
            full.set_result(None)

    def _fail(self, batch: list[Step], exc: BaseException) -> None:
        err = (
            exc
            if isinstance(exc, LookbackError)
            else InferenceError(f"model call failed for a batch of {len(batch)}: {exc}")
        )
        log.error("batch of %d failed: %s", len(batch), exc)
        self._m_failures.inc()
        for step in batch:
            try:
                step.waiter.set_exception(err)
            except Exception:  # one broken waiter must not starve the others
                log.exception("waiter raised while failing a batch")
