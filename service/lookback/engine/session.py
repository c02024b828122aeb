"""StreamSession: one client's stream of frames turned into ordered model steps.

Frames accumulate to the model's hop; each full hop is a ready step. A session keeps at
most one step in flight (its next step needs the state this one produces) and a bounded
queue of the rest, so a runaway client is refused instead of growing memory. The step in
flight carries up to ``max_steps_per_call`` ready hops: those ready when it is submitted,
and those that become ready while it still waits for a batch. A hop is never held back
for audio that has not arrived. Results reach the transport through a
``ResultSink`` in step order, on the event loop. ``flush`` zero-pads a partial hop so no
accepted audio goes unscored; times keep counting the padded samples.

The session is the waiter of its own in-flight step (Future interface), which keeps the
per-step cost on the hot path to a few attribute writes.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

import numpy as np

from lookback.engine.decoder import WireDecoder
from lookback.engine.events import Event, EventDetector, EventLog
from lookback.engine.pcm import BYTES_PER_SAMPLE, F32, Encoding, check_encoding, refuse_non_finite
from lookback.engine.served import ServedModel
from lookback.engine.slabs import CONTEXT
from lookback.engine.snapshot import Snapshot, check_compatible, decode
from lookback.engine.step import Step
from lookback.errors import (
    BackpressureError,
    BadAudio,
    LookbackError,
    NonFiniteState,
    SessionClosed,
    SnapshotError,
)

_NON_FINITE = "the model produced NaN or Inf for this step; the session's state was reset"


class ResultSink(Protocol):
    """Where a session's outputs go, in step order (called on the event loop)."""

    def on_result(self, index: int, time: float, scores: list[float], events: list[Event] | None) -> None:
        """``scores`` holds one float per label: the model's float32 values, exactly."""

    def on_error(self, index: int, error: LookbackError) -> None: ...


class GroupedSink(ResultSink, Protocol):
    """A sink that also learns where each model call's results end (``results=batch``),
    and may take a call's consecutive results in one pass.

    Optional: the session looks ``on_group_end``, ``on_group_begin`` and ``on_rows`` up
    once, so sinks without them (offline, sources, tests) are unchanged and pay nothing.
    Any may be None to opt out per instance.
    """

    on_group_end: Callable[[], None] | None
    #: called before the results of a step of several hops (whose end ``on_group_end``
    #: marks): a one-hop step's only result needs no gathering
    on_group_begin: Callable[[], None] | None
    #: ``on_rows(first, rows)``: steps ``first, first + 1, ...`` with scores ``rows``
    #: (float32 ``[n, labels]``, n > 1, every value finite), none of them with an event;
    #: called instead of ``on_result`` per step, where those conditions hold.
    on_rows: Callable[[int, np.ndarray], None] | None


class StreamSession:
    def __init__(
        self,
        model: ServedModel,
        sink: ResultSink,
        *,
        encoding: Encoding = "pcm_s16le",
        max_pending_steps: int = 64,
        decoder: WireDecoder | None = None,
    ) -> None:
        check_encoding(encoding)
        spec = model.spec
        self.model = model
        self.sink = sink
        self.encoding = encoding  # on the wire; with a decoder, frames below are its float32 output
        self.decoder = decoder
        if decoder is not None:
            encoding = "pcm_f32le"
        self.max_pending = max_pending_steps
        self.frame_bytes = spec.frame_samples * BYTES_PER_SAMPLE[encoding]
        self.hop = spec.hop_samples
        self.hop_bytes = spec.hop_samples * BYTES_PER_SAMPLE[encoding]
        self._hop_seconds = spec.hop_samples / spec.sample_rate
        self._is_f32 = encoding == "pcm_f32le"
        self._buf = bytearray()
        self._queue: deque[Step] = deque()  # ready hops, not yet submitted
        self._queued = 0  # hops in _queue
        self._in_flight: Step | None = None
        self._max_steps = model.max_steps_per_call
        self._batcher = model.batcher
        self._table = model.table
        self._enqueue_ready = model.batcher.submit
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
        # called after the last on_result of each step group (one model call of this session)
        self._group_end: Callable[[], None] | None = getattr(sink, "on_group_end", None)
        self._on_rows: Callable[[int, np.ndarray], None] | None = getattr(sink, "on_rows", None)
        self._group_begin: Callable[[], None] | None = getattr(sink, "on_group_begin", None)
        self.detector = EventDetector(
            spec.events, spec.event_label, sample_rate=spec.sample_rate, hop=spec.hop_samples
        )
        self.events = EventLog(model.keep_events)  # the last keep_events: bounded per session
        self.frames = 0
        self.steps_made = 0
        self.steps_done = 0
        self.steps_failed = 0
        self.padded_samples = 0
        self.closed = False
        self.slot = self._table.acquire()

    # -- input ---------------------------------------------------------------------------
    def push(self, data: bytes, t_arrival: float | None = None) -> int:
        """Accept whole frames; returns the number of new steps. Refuses, whole, on error."""
        n = len(data)
        if n == self._fast_bytes and not self._buf and not self.closed:
            # The hot path: one int16 message holding exactly one hop, no partial hop kept.
            step = self._in_flight
            if step is None:
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
                pending = self._queued + step.count
                if pending + 1 > self.max_pending:
                    raise BackpressureError(
                        f"{pending} steps already waiting; audio arrives faster than it is scored"
                    )
                if not step.taken and step.count < self._max_steps and not self._queued:
                    step.extend(data)  # joins the step still waiting for a batch
                else:
                    self._queue.append(
                        Step(
                            self.slot,
                            self.steps_made,
                            data,
                            self,
                            time.perf_counter() if t_arrival is None else t_arrival,
                        )
                    )
                    self._queued += 1
            self.steps_made += 1
            self.frames += self._frames_per_hop
            return 1
        if self.closed:
            raise SessionClosed("session is closed")
        if n == 0:
            raise BadAudio("empty audio message", code="empty_message")
        if self.decoder is not None:
            return self._push_decoded(data, t_arrival)
        if n % self.frame_bytes:
            raise BadAudio(
                f"message of {n} bytes is not a whole number of {self.frame_bytes}-byte frames",
                code="bad_frame_size",
            )
        self._refuse_if_full(self.steps_for(n))
        if self._is_f32:
            refuse_non_finite(np.frombuffer(data, F32), "message")
        return self._accept(data, time.perf_counter() if t_arrival is None else t_arrival)

    def _refuse_if_full(self, new_steps: int) -> None:
        pending = self.pending_steps
        if new_steps and pending + new_steps > self.max_pending:
            raise BackpressureError(
                f"{pending} steps already waiting; audio arrives faster than it is scored"
            )

    def _accept(self, data: bytes, t_arrival: float) -> int:
        """Checked whole frames (the session's own encoding) into the partial hop and steps."""
        n = len(data)
        self.frames += n // self.frame_bytes
        new_steps = (len(self._buf) + n) // self.hop_bytes
        whole = new_steps * self.hop_bytes
        if self._buf:
            self._buf += data
            hops = bytes(self._buf[:whole])
            del self._buf[:whole]
        else:
            hops = data[:whole] if whole != n else data
            if whole != n:
                self._buf += data[whole:]
        if new_steps:
            self._add_hops(hops, new_steps, t_arrival)
        return new_steps

    def _push_decoded(self, data: bytes, t_arrival: float | None) -> int:
        """Wire audio through the decoder, its whole frames into steps; refused whole."""
        dec = self.decoder
        assert dec is not None
        audio = dec.check(data)
        self._refuse_if_full(self.steps_for(len(data)))
        frames = dec.feed(audio)  # float32 at the model's rate, finite: the session's encoding
        if not frames.size:
            return 0
        return self._accept(frames.tobytes(), time.perf_counter() if t_arrival is None else t_arrival)

    def flush(self) -> int:
        """Zero-pad a partial hop into a step so no accepted audio is left unscored."""
        if self.decoder is not None and not self.closed:  # the decoder's tail first
            tail = self.decoder.flush()
            if tail.size:
                self._accept(tail.tobytes(), time.perf_counter())
        if self.closed or not self._buf:
            return 0
        missing = self.hop_bytes - len(self._buf)
        self.padded_samples += missing // (self.hop_bytes // self.hop)
        self._buf += bytes(missing)
        chunk = bytes(self._buf)
        self._buf.clear()
        self._add_hops(chunk, 1, time.perf_counter())
        return 1

    def _add_hops(self, data: bytes, count: int, t_arrival: float) -> None:
        """``count`` whole hops of PCM into steps of at most ``max_steps_per_call`` hops: the
        step in flight grows while no batch has taken it, the rest queue behind it."""
        hb, cap = self.hop_bytes, self._max_steps
        pos = 0
        while count:
            step = self._in_flight
            if step is not None and not step.taken and not self._queued and step.count < cap:
                take = min(count, cap - step.count)
                step.extend(self._payload(data, pos, take), take)
            else:
                take = min(count, cap)
                new = Step(self.slot, self.steps_made, self._payload(data, pos, take), self, t_arrival, take)
                if step is None:
                    self._in_flight = new
                    self._enqueue_ready(new)
                else:
                    self._queue.append(new)
                    self._queued += take
            self.steps_made += take
            pos += take * hb
            count -= take

    def _payload(self, data: bytes, pos: int, hops: int) -> bytes | np.ndarray:
        end = pos + hops * self.hop_bytes
        if self._is_f32:
            return np.frombuffer(data, F32, count=(end - pos) // 4, offset=pos).copy()
        return data if pos == 0 and end == len(data) else data[pos:end]

    def _next_step(self) -> Step:
        """The queued hops (up to ``max_steps_per_call``) as one step."""
        queue = self._queue
        first = queue.popleft()
        self._queued -= first.count
        while queue and first.count + queue[0].count <= self._max_steps:
            nxt = queue.popleft()
            self._queued -= nxt.count
            first.extend(nxt.payload, nxt.count)
        return first

    @property
    def pending_steps(self) -> int:
        step = self._in_flight
        return self._queued + (0 if step is None else step.count)

    @property
    def buffered_samples(self) -> int:
        return len(self._buf) // (self.hop_bytes // self.hop)

    @property
    def samples(self) -> int:
        """Audio samples this session has scored or will score, padding included."""
        return self.steps_made * self.hop

    # -- completion (called by the batcher on the event loop) ----------------------------
    def set_result(self, rows: list[list[float]] | np.ndarray) -> None:
        """The in-flight step's rows (see ``step.py``): one list row, or an array of several."""
        step = self._in_flight
        assert step is not None
        if self._room is None and self._idle is None and not self.closed:
            if self._queue:  # _advance's common cases, inlined (hot path)
                self._in_flight = nxt = self._next_step()
                self._enqueue_ready(nxt)
            else:
                self._in_flight = None
        else:
            self._advance()
            if self.closed:
                return
        index = step.index
        if isinstance(rows, np.ndarray):  # several hops: in one pass when no row needs a look
            if (
                self._on_rows is not None
                and not self.detector.triggered
                # False on NaN too: the state guard makes a failed hop's whole row NaN
                and rows[:, self._event_col].max() < self._thr
            ):
                self.steps_done += len(rows)
                if self._group_begin is not None:
                    self._group_begin()
                self._on_rows(index, rows)
                if not self.closed and self._group_end is not None:
                    self._group_end()
                return
            rows = rows.tolist()
        if len(rows) > 1 and self._group_begin is not None:
            self._group_begin()
        for row in rows:
            if row[0] != row[0]:  # NaN: the state guard reset this session (engine/guard.py)
                self.steps_failed += 1
                self.sink.on_error(index, NonFiniteState(_NON_FINITE))
                if self.closed:
                    return
                index += 1
                continue
            self.steps_done += 1
            end_sample = (index + 1) * self.hop
            score = row[self._event_col]
            events = None
            if score >= self._thr or self.detector.triggered:  # otherwise nothing can change
                events = self.detector.update(score, end_sample)
                if events:
                    self.events.extend(events)
            self.sink.on_result(index, end_sample / self._rate, row, events)
            if self.closed:  # the sink closed the session: nothing more reaches it
                return
            index += 1
        if self._group_end is not None:
            self._group_end()

    def set_exception(self, exc: BaseException) -> None:
        step = self._in_flight
        assert step is not None
        self._advance()
        if self.closed:
            return
        self.steps_failed += step.count
        err = exc if isinstance(exc, LookbackError) else LookbackError(str(exc))
        for index in range(step.index, step.index + step.count):  # one error per step, in order
            self.sink.on_error(index, err)
            if self.closed:
                return

    def _advance(self) -> None:
        if self.closed:
            self._in_flight = None
            self._release()
            self._wake_room()
            return
        if self._queue:
            self._in_flight = self._next_step()
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
        if self.decoder is not None:
            nbytes = self.decoder.output_samples(nbytes) * 4
        return (len(self._buf) + nbytes) // self.hop_bytes

    def wire_bytes(self, frames: int) -> int:
        """Client bytes of ``frames`` model frames' duration (what message bounds count)."""
        if self.decoder is not None:
            return self.decoder.wire_bytes(frames * self.model.spec.frame_samples)
        return frames * self.frame_bytes

    @property
    def client_samples(self) -> int:
        """Samples the client has sent (at its rate) that this session has taken."""
        if self.decoder is not None:
            return self.decoder.received
        return self.frames * self.model.spec.frame_samples

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
        """No step in flight and no hop queued: the slab rows are the state after ``steps_done``.

        Multi-step: the step in flight may carry several hops and ``_queued`` counts the
        hops behind it; a partial hop in ``_buf`` is audio, not pending work.
        """
        return self._in_flight is None and not self._queued

    def snapshot_value(self, options: dict[str, str] | None = None) -> Snapshot:
        """This session's complete state (it must be idle: ``wait_idle`` first, or check ``idle``).

        Everything carried from one step to the next: the state and context rows, the
        partial hop, the detector, the counters (``lookback.engine.snapshot``).
        """
        if self.closed or self.slot < 0:
            raise SessionClosed("session is closed")
        if not self.idle:  # an internal misuse, never sent to a client
            raise SnapshotError("session has steps in flight; snapshot it when idle")
        spec = self.model.spec
        table = self._table
        rows = {st.input: table.row(st.input, self.slot) for st in spec.states}
        if spec.context_samples:
            rows[CONTEXT] = table.row(CONTEXT, self.slot)[: spec.context_samples]
        d = self.detector
        return Snapshot(
            model=spec.name,
            version=spec.version,
            graph_sha256=spec.graph.sha256,
            encoding=self.encoding if self.decoder is None else "pcm_f32le",
            steps=self.steps_done,
            frames=self.frames,
            frame_samples=spec.frame_samples,
            padded_samples=self.padded_samples,
            failed_steps=self.steps_failed,
            detector=(d.triggered, d._pending, d._temp_end, d._start),
            events=[(e.event, e.label, e.sample) for e in self.events],
            events_truncated=self.events.truncated,
            partial=bytes(self._buf),
            rows=rows,
            options=dict(options or {}),
            decoder=None if self.decoder is None else self.decoder.get_state(),
        )

    def snapshot(self, options: dict[str, str] | None = None) -> bytes:
        """This session's complete state as bytes (it must be idle)."""
        return self.snapshot_value(options).encode()

    @classmethod
    def restore(
        cls,
        model: ServedModel,
        sink: ResultSink,
        data: bytes | Snapshot,
        *,
        max_pending_steps: int = 64,
        max_amplitude: float = 4.0,
    ) -> StreamSession:
        """A session in a fresh slot that continues ``data`` bit-identically (``max_amplitude``:
        the float audio bound of its decoder, a setting rather than part of the snapshot)."""
        snap = data if isinstance(data, Snapshot) else decode(data)
        check_compatible(snap, model)
        spec = model.spec
        decoder = None
        if snap.decoder is not None:
            decoder = WireDecoder.from_state(
                snap.decoder, spec.sample_rate, spec.frame_samples, max_amplitude=max_amplitude
            )
        session = cls(
            model,
            sink,
            encoding=snap.encoding if decoder is None else decoder.encoding,  # type: ignore[arg-type]
            max_pending_steps=max_pending_steps,
            decoder=decoder,
        )
        try:
            for name, arr in snap.rows.items():
                if name == CONTEXT:
                    row = np.zeros(spec.window_samples, np.float32)
                    row[: spec.context_samples] = arr
                    arr = row
                model.table.set_row(name, session.slot, arr)
        except Exception:
            session.close()
            raise
        session.steps_made = session.steps_done = snap.steps
        session.steps_failed = snap.failed_steps
        session.frames = snap.frames
        session.padded_samples = snap.padded_samples
        session._buf = bytearray(snap.partial)
        d = session.detector
        d.triggered, d._pending, d._temp_end, d._start = snap.detector
        rate = spec.sample_rate
        kept = (Event(k, lab, s / rate, s) for k, lab, s in snap.events)
        session.events = EventLog(model.keep_events, kept, snap.events_truncated)
        return session

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
        self._queued = 0
        if self._in_flight is not None and self._batcher.cancel(self._in_flight):
            self._in_flight = None
        if self._in_flight is None:
            self._release()
        for fut in (self._idle, self._room):
            if fut is not None and not fut.done():
                fut.set_result(None)

    def _release(self) -> None:
        if self.slot >= 0:
            self._table.release(self.slot)
            self.slot = -1
