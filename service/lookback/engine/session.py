"""StreamSession: one client's stream of frames turned into ordered model steps.

Frames accumulate to the model's hop; each full hop is a ready step. A session keeps at
most one step in flight (its next step needs the state this one produces) and a bounded
queue of the rest, so a bursty client is smoothed over successive batches and a runaway
one is refused instead of growing memory. Results reach the transport through a
``ResultSink`` in step order, on the event loop. ``flush`` zero-pads a partial hop so no
accepted audio goes unscored; times keep counting the padded samples.

The session is the waiter of its own in-flight step (Future interface), which keeps the
per-step cost on the hot path to a few attribute writes.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np

from lookback.engine.batcher import Step
from lookback.engine.events import Event, EventDetector
from lookback.errors import BackpressureError, BadAudio, LookbackError, SessionClosed

if TYPE_CHECKING:
    from lookback.engine.model import ModelHandle
    from lookback.engine.snapshot import Snapshot

Encoding = Literal["pcm_s16le", "pcm_f32le"]
BYTES_PER_SAMPLE: dict[str, int] = {"pcm_s16le": 2, "pcm_f32le": 4}


class ResultSink(Protocol):
    """Where a session's outputs go, in step order (called on the event loop)."""

    def on_result(self, index: int, time: float, scores: list[float], events: list[Event] | None) -> None:
        """``scores`` holds one float per label: the model's float32 values, exactly."""

    def on_error(self, index: int, error: LookbackError) -> None: ...


class StreamSession:
    def __init__(
        self,
        handle: ModelHandle,
        sink: ResultSink,
        *,
        encoding: Encoding = "pcm_s16le",
        max_pending_steps: int = 64,
    ) -> None:
        if encoding not in BYTES_PER_SAMPLE:
            raise BadAudio(f"unknown encoding {encoding!r}", code="bad_encoding")
        spec = handle.spec
        self.handle = handle
        self.sink = sink
        self.encoding = encoding
        self.max_pending = max_pending_steps
        self.frame_bytes = spec.frame_samples * BYTES_PER_SAMPLE[encoding]
        self.hop = spec.hop_samples
        self.hop_bytes = spec.hop_samples * BYTES_PER_SAMPLE[encoding]
        self._hop_seconds = spec.hop_samples / spec.sample_rate
        self._is_f32 = encoding == "pcm_f32le"
        self._buf = bytearray()
        self._queue: deque[Step] = deque()  # ready, not yet submitted
        self._in_flight: Step | None = None
        self._batcher = handle.batcher
        self._enqueue_ready = handle.batcher.enqueue
        # Messages of exactly one int16 hop take push()'s fast path (-1: never, for f32).
        self._fast_bytes = -1 if encoding == "pcm_f32le" else self.hop_bytes
        self._frames_per_hop = spec.frames_per_hop
        self._rate = spec.sample_rate
        self._thr = spec.events.threshold
        self._idle: asyncio.Future[None] | None = None
        self._room: asyncio.Future[None] | None = None  # set while the transport waits
        self._resume_at = 0  # ... for pending_steps to fall to this
        labels = spec.labels
        self._event_col = labels.index(spec.event_label)
        self.detector = EventDetector(
            spec.events, spec.event_label, sample_rate=spec.sample_rate, hop=spec.hop_samples
        )
        self.events: list[Event] = []
        self.frames = 0
        self.steps_made = 0
        self.steps_done = 0
        self.steps_failed = 0
        self.padded_samples = 0
        self.closed = False
        self.slot = handle.table.acquire()

    # -- input ---------------------------------------------------------------------------
    def push(self, data: bytes, t_arrival: float | None = None) -> int:
        """Accept whole frames; returns the number of new steps. Refuses, whole, on error."""
        n = len(data)
        if n == self._fast_bytes and not self._buf and not self.closed:
            # The hot path: one int16 message holding exactly one hop, no partial hop kept.
            if self._in_flight is None:
                step = Step(
                    self.slot,
                    self.steps_made,
                    data,
                    self,
                    time.perf_counter() if t_arrival is None else t_arrival,
                )
                self._in_flight = step
                self._enqueue_ready(step)
            else:
                if len(self._queue) + 2 > self.max_pending:
                    raise BackpressureError(
                        f"{len(self._queue) + 1} steps already waiting; audio arrives faster "
                        "than it is scored"
                    )
                self._queue.append(
                    Step(
                        self.slot,
                        self.steps_made,
                        data,
                        self,
                        time.perf_counter() if t_arrival is None else t_arrival,
                    )
                )
            self.steps_made += 1
            self.frames += self._frames_per_hop
            return 1
        if self.closed:
            raise SessionClosed("session is closed")
        if n == 0:
            raise BadAudio("empty audio message", code="empty_message")
        if n % self.frame_bytes:
            raise BadAudio(
                f"message of {n} bytes is not a whole number of {self.frame_bytes}-byte frames",
                code="bad_frame_size",
            )
        buffered = len(self._buf) + n
        new_steps = buffered // self.hop_bytes
        pending = len(self._queue) + (self._in_flight is not None)
        if new_steps and pending + new_steps > self.max_pending:
            raise BackpressureError(
                f"{pending} steps already waiting; audio arrives faster than it is scored"
            )
        if self._is_f32 and not np.isfinite(np.frombuffer(data, "<f4")).all():
            raise BadAudio("pcm_f32le message holds NaN or Inf samples", code="non_finite_audio")
        if t_arrival is None:
            t_arrival = time.perf_counter()
        self.frames += n // self.frame_bytes
        self._buf += data
        for _ in range(new_steps):
            chunk = bytes(self._buf[: self.hop_bytes])
            del self._buf[: self.hop_bytes]
            self._enqueue(chunk, t_arrival)
        return new_steps

    def flush(self) -> int:
        """Zero-pad a partial hop into a step so no accepted audio is left unscored."""
        if self.closed or not self._buf:
            return 0
        missing = self.hop_bytes - len(self._buf)
        self.padded_samples += missing // (self.hop_bytes // self.hop)
        self._buf += bytes(missing)
        chunk = bytes(self._buf)
        self._buf.clear()
        self._enqueue(chunk, time.perf_counter())
        return 1

    def _enqueue(self, data: bytes, t_arrival: float) -> None:
        payload: bytes | np.ndarray = np.frombuffer(data, "<f4").copy() if self._is_f32 else data
        step = Step(self.slot, self.steps_made, payload, self, t_arrival)
        self.steps_made += 1
        if self._in_flight is None:
            self._in_flight = step
            self._enqueue_ready(step)
        else:
            self._queue.append(step)

    @property
    def pending_steps(self) -> int:
        return len(self._queue) + (self._in_flight is not None)

    @property
    def buffered_samples(self) -> int:
        return len(self._buf) // (self.hop_bytes // self.hop)

    @property
    def samples(self) -> int:
        """Audio samples this session has scored or will score, padding included."""
        return self.steps_made * self.hop

    # -- completion (called by the batcher on the event loop) ----------------------------
    def set_result(self, row: list[float]) -> None:
        step = self._in_flight
        assert step is not None
        if self._room is None and self._idle is None and not self.closed:
            if self._queue:  # _advance's common cases, inlined (hot path)
                self._in_flight = nxt = self._queue.popleft()
                self._enqueue_ready(nxt)
            else:
                self._in_flight = None
        else:
            self._advance()
            if self.closed:
                return
        self.steps_done += 1
        end_sample = (step.index + 1) * self.hop
        score = row[self._event_col]
        events = None
        if score >= self._thr or self.detector.triggered:  # otherwise nothing can change
            events = self.detector.update(score, end_sample)
            if events:
                self.events.extend(events)
        self.sink.on_result(step.index, end_sample / self._rate, row, events)

    def set_exception(self, exc: BaseException) -> None:
        step = self._in_flight
        assert step is not None
        self._advance()
        if self.closed:
            return
        self.steps_failed += 1
        err = exc if isinstance(exc, LookbackError) else LookbackError(str(exc))
        self.sink.on_error(step.index, err)

    def _advance(self) -> None:
        if self.closed:
            self._in_flight = None
            self._release()
            self._wake_room()
            return
        if self._queue:
            self._in_flight = self._queue.popleft()
            self._enqueue_ready(self._in_flight)
        else:
            self._in_flight = None
            if self._idle is not None:
                if not self._idle.done():
                    self._idle.set_result(None)
                self._idle = None
        if self._room is not None and self.pending_steps <= self._resume_at:
            self._wake_room()

    def _wake_room(self) -> None:
        room, self._room = self._room, None
        if room is not None and not room.done():
            room.set_result(None)

    def steps_for(self, nbytes: int) -> int:
        return (len(self._buf) + nbytes) // self.hop_bytes

    async def wait_for_room(self, nbytes: int) -> None:
        """Wait until a message of ``nbytes`` fits the step bound (transport backpressure).

        The transport calls this instead of dropping audio from a client that sends
        faster than real time: while it waits it reads nothing, so TCP slows the client.
        Once full, it waits for the queue to drain to half the bound (or to room for
        ``nbytes``, if less), not for one free place: resuming at every completed step
        cost a refused push, a future and a task switch per message, so an overloaded
        server spent more per message than a loaded one and fell further behind.
        """
        need = self.steps_for(nbytes)
        if need > self.max_pending:
            raise BackpressureError(
                f"one message makes {need} steps; max_pending_steps is {self.max_pending}"
            )
        if self.pending_steps + need <= self.max_pending:
            return
        self._resume_at = min(self.max_pending - need, self.max_pending // 2)
        while not self.closed and self.pending_steps > self._resume_at:
            self._room = asyncio.get_running_loop().create_future()
            await self._room

    # -- snapshots (lookback.engine.snapshot) --------------------------------------------
    @property
    def idle(self) -> bool:
        """No step queued or in flight: the slab rows are the state after ``steps_done``."""
        return self._in_flight is None and not self._queue

    def snapshot(self, options: dict[str, str] | None = None) -> bytes:
        """This session's complete state as bytes (it must be idle)."""
        from lookback.engine import snapshot

        return snapshot.take(self, options).encode()

    @classmethod
    def restore(
        cls, handle: ModelHandle, sink: ResultSink, data: bytes | Snapshot, *, max_pending_steps: int = 64
    ) -> StreamSession:
        """A session in a fresh slot that continues ``data`` bit-identically."""
        from lookback.engine import snapshot

        return snapshot.restore(handle, sink, data, max_pending_steps=max_pending_steps)

    # -- end of stream -------------------------------------------------------------------
    async def wait_idle(self) -> None:
        """Wait until every accepted step has a result (or an error)."""
        while self._in_flight is not None and not self.closed:
            self._idle = asyncio.get_running_loop().create_future()
            await self._idle

    def finish(self) -> list[Event]:
        """Close an open event segment at end of stream (call after flush + wait_idle)."""
        tail = self.detector.finish(self.samples)
        self.events.extend(tail)
        return tail

    def close(self) -> None:
        """Drop unrun steps and free the slot (after the in-flight step, if any, returns)."""
        if self.closed:
            return
        self.closed = True
        self._queue.clear()
        if self._in_flight is not None and self._batcher.cancel(self._in_flight):
            self._in_flight = None
        if self._in_flight is None:
            self._release()
        for fut in (self._idle, self._room):
            if fut is not None and not fut.done():
                fut.set_result(None)

    def _release(self) -> None:
        if self.slot >= 0:
            self.handle.table.release(self.slot)
            self.slot = -1
