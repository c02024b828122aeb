"""MicroBatcher: one per model; gathers the ready steps of all sessions into one call.

The batcher knows a function, not a model (as Ray Serve's ``_BatchQueue`` and MLServer's
adaptive batcher do): ``compute(steps) -> rows`` runs one batch, one row per hop in step
order; ``occupancy()`` says how many sessions are open. It never looks inside a payload.

Continuous batching: when the runtime is idle a batch starts with whatever is ready;
while it runs, ready steps pile up and form the next one. ``max_batch_size`` caps a
batch. A small batch may be held back to fill, counted from when its oldest step became
ready, and never once every open session has a step ready (nobody else could add one).
How long is adaptive (``adaptive_wait``): nothing while the process has CPU to spare, up
to ``max_wait_ms`` as it nears a full core, because a model call's fixed cost (the
runtime's call, gathers and scatters) is what a loaded server must stop paying per row;
with ``adaptive_wait`` off, every small batch may wait ``max_wait_ms``. The wait is one
future with a deadline timer, woken early only when the batch is full: no sleep-polling
and no per-step wake-up. A session has at most one step in flight because its next step
needs the state this one produces, so a batch never holds two steps of one session; a
step may carry several of its hops.

The model call runs in a dedicated executor thread, so the event loop keeps receiving
frames while ONNX Runtime (which releases the GIL) computes on another core. When the
process may use a single CPU that thread buys no parallelism and costs two thread
hand-offs per batch, so ``model_calls=auto`` then calls the model inline on the event
loop, yielding to it once per batch.

Every step carries a waiter (see ``step.py``) that gets the step's rows: a list of one row
of Python floats for a one-hop step, a float32 array ``[count, labels]`` for a step of
several hops (its consumer can take them in one pass). A failed batch
fails every waiter with ``InferenceError`` and the batcher carries on with the next batch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from lookback.engine.step import FirstRow, Step
from lookback.errors import InferenceError, LookbackError
from lookback.metrics import Metrics

log = logging.getLogger("lookback.batcher")

# adaptive wait: none below this share of a core in use, max_wait_ms from _WAIT_FULL up
_WAIT_FROM, _WAIT_FULL = 0.5, 0.9

#: One batch: the steps in, one score row per hop out (``[sum of counts, labels]``).
Compute = Callable[[Sequence[Step]], np.ndarray]


class MicroBatcher:
    def __init__(
        self,
        compute: Compute,
        occupancy: Callable[[], int],
        *,
        label: str,
        metrics: Metrics,
        max_batch_size: int,
        max_wait_ms: float,
        inline: bool = False,
        adaptive_wait: bool = False,
        fill_rows: int = 0,
    ) -> None:
        self.compute = compute  # looked up per batch: tests and tools may wrap it
        self.occupancy = occupancy
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.adaptive = adaptive_wait
        # a waiting batch also stops at this many steps (0: max_batch_size): past it a
        # model call's cost per row no longer falls, so waiting buys latency, not CPU
        self.fill_rows = fill_rows or max_batch_size
        self.wait = 0.0 if adaptive_wait else self.max_wait  # this batch's fill budget
        self.load = LoadWindow()
        self.inline = inline  # call the model on the event loop (single-CPU processes)
        self._ready: deque[Step] = deque()
        self._idle: asyncio.Future[None] | None = None  # set while the loop waits for work
        self._full: asyncio.Future[None] | None = None  # set while a batch waits to fill
        self._fill_target = 0  # steps that end the fill wait early
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._running = False
        m = metrics
        self._m_steps = m.steps.labels(label)
        self._m_batches = m.batches.labels(label)
        self._m_failures = m.batch_failures.labels(label)
        self._m_size = m.batch_size.labels(label)
        self._m_run = m.model_run.labels(label)
        self._m_backlog = m.backlog.labels(label)
        self._m_wait = m.queue_wait
        self._m_latency = m.frame_latency
        self._m_share = m.model_cpu_share.labels(label)
        self._m_busy = m.process_busy.labels(label)
        self._m_wait_budget = m.batch_wait_budget.labels(label)
        self._label = label

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
        """Queue a step for the next batch (its payload is the submitter's to get right)."""
        step.t_ready = time.perf_counter()
        self._ready.append(step)
        if self._idle is not None:
            self._idle.set_result(None)
            self._idle = None
        elif self._full is not None and len(self._ready) >= self._fill_target:
            self._end_fill()

    def submit_future(self, slot: int, index: int, payload: bytes | np.ndarray) -> asyncio.Future:
        """Submit a one-hop step and get a Future for its score row (tests, tools)."""
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self.submit(Step(slot, index, payload, FirstRow(fut), time.perf_counter()))
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
            if not (self.wait and await self._fill(loop)) and self.inline:
                # Let the loop read what has arrived before taking the batch: chained
                # steps of backlogged sessions would otherwise keep it from ever reading.
                await asyncio.sleep(0)
            if not self._ready:  # every step was withdrawn (sessions closed) meanwhile
                continue
            n = min(len(self._ready), self.max_batch_size)
            batch = [self._ready.popleft() for _ in range(n)]
            total = 0
            for step in batch:
                step.taken = True
                total += step.count
            self._m_backlog.set(len(self._ready))
            t0 = time.perf_counter()
            try:
                if self.inline:
                    out = self.compute(batch)
                else:
                    out = await loop.run_in_executor(self._executor, self.compute, batch)
                if len(out) != total:
                    raise InferenceError(f"model returned {len(out)} rows for a batch of {total}")
            except Exception as exc:  # a failed batch must not stop the batcher
                self._fail(batch, exc)
                continue
            t1 = time.perf_counter()
            if self.load.add(t1 - t0, t1):
                self._tune()
            self._m_batches.inc()
            self._m_steps.inc(total)
            self._m_size.observe(total)
            self._m_run.observe(t1 - t0)
            readies = np.array([s.t_ready for s in batch], np.float64)
            arrivals = np.array([s.t_arrival for s in batch], np.float64)
            if total != n:  # one observation per step: a step's hops share its times
                counts = [s.count for s in batch]
                readies, arrivals = np.repeat(readies, counts), np.repeat(arrivals, counts)
            self._m_wait.observe_many(t0 - readies, self._label)
            if total == n:  # one hop each: python floats, cheaper per step than row views
                rows = out.tolist()
                for i, step in enumerate(batch):
                    try:
                        step.waiter.set_result(rows[i : i + 1])
                    except Exception:  # a broken consumer must not stop the batcher
                        log.exception("waiter raised on a result")
            else:  # a step of several hops gets its rows as one array, for a one-pass consumer
                pos = 0
                for step in batch:
                    k = step.count
                    try:
                        step.waiter.set_result(out[pos : pos + k] if k > 1 else [out[pos].tolist()])
                    except Exception:  # a broken consumer must not stop the batcher
                        log.exception("waiter raised on a result")
                    pos += k
            self._m_latency.observe_many(time.perf_counter() - arrivals, self._label)

    async def _fill(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Hold the batch until it is full, every open session is in it, or its oldest
        step has waited ``max_wait``; False if there was nothing to wait for."""
        target = min(self.max_batch_size, self.fill_rows, self.occupancy())
        remaining = self._ready[0].t_ready + self.wait - time.perf_counter()
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

    def _tune(self) -> None:
        """A window closed: publish the CPU split, and size the next fill budget by load."""
        busy, share = self.load.busy, self.load.model_share
        self._m_busy.set(busy)
        self._m_share.set(share)
        if self.adaptive:
            self.wait = self.max_wait * min(1.0, max(0.0, (busy - _WAIT_FROM) / (_WAIT_FULL - _WAIT_FROM)))
            self._m_wait_budget.set(self.wait)

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


class LoadWindow:
    """The process's CPU use and the model's share of it, over windows of ``period`` s.

    ``busy``: process CPU seconds per wall second (every thread; ONNX Runtime's too);
    ``model_share``: the wall time of model calls (gather, run, scatter) per CPU second,
    the share of the work that batching makes cheaper. One ``process_time`` call per
    window, not per batch.
    """

    __slots__ = ("_cpu0", "_model", "_t0", "busy", "model_share", "period")

    def __init__(self, period: float = 0.2) -> None:
        self.period = period
        self._t0 = time.perf_counter()
        self._cpu0 = time.process_time()
        self._model = 0.0
        self.busy = 0.0
        self.model_share = 0.0

    def add(self, model_s: float, now: float) -> bool:
        """Count one model call; True when a window closed (``busy``/``model_share`` new)."""
        self._model += model_s
        wall = now - self._t0
        if wall < self.period:
            return False
        cpu = time.process_time()
        used = cpu - self._cpu0
        self.busy = used / wall
        self.model_share = min(1.0, self._model / used) if used > 0 else 0.0
        self._t0, self._cpu0, self._model = now, cpu, 0.0
        return True
