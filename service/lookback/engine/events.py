"""Scores -> start/end events: threshold, hysteresis and minimum durations.

Semantics follow Silero's ``VADIterator`` so users get the events they already know:
speech starts when a score reaches ``threshold`` (time moved back by the padding and
one hop), and ends once scores stay below ``neg_threshold`` for ``min_silence_ms``
(time: first silent step + padding - one hop). ``min_speech_ms`` > 0 holds a start back
until the speech has lasted that long, dropping shorter blips. At end of stream an open
segment is closed, so streaming and offline scoring report the same segments.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from lookback.engine.contract import EventSpec


@dataclass(frozen=True, slots=True)
class Event:
    event: str  # "start" | "end"
    label: str
    time: float  # seconds from the start of the stream
    sample: int

    def as_dict(self) -> dict[str, object]:
        return {"event": self.event, "label": self.label, "time": self.time}


class EventLog:
    """A stream's events, only the last ``keep`` of them, and how many older ones were dropped.

    A session lives as long as its client streams: an unbounded list would grow memory
    and every snapshot (rewritten each checkpoint) with the length of the stream. The
    summary reports ``events_truncated``; the client has seen every event as it came.
    """

    __slots__ = ("_items", "truncated")

    def __init__(self, keep: int, items: Iterable[Event] = (), truncated: int = 0) -> None:
        self._items: deque[Event] = deque(maxlen=max(0, keep))
        self.truncated = truncated
        self.extend(items)

    def extend(self, events: Iterable[Event]) -> None:
        before = len(self._items)
        new = list(events)
        self._items.extend(new)
        self.truncated += before + len(new) - len(self._items)

    def __iter__(self) -> Iterator[Event]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    @property
    def total(self) -> int:
        """Every event of the stream, kept or dropped."""
        return self.truncated + len(self._items)


class EventDetector:
    __slots__ = (
        "_end_thr",
        "_hop",
        "_label",
        "_min_silence",
        "_min_speech",
        "_pad",
        "_pending",
        "_sr",
        "_start",
        "_temp_end",
        "_thr",
        "triggered",
    )

    def __init__(self, spec: EventSpec, label: str, *, sample_rate: int, hop: int) -> None:
        self._label = label
        self._sr = sample_rate
        self._hop = hop
        self._thr = spec.threshold
        self._end_thr = spec.end_threshold
        self._min_silence = int(sample_rate * spec.min_silence_ms / 1000)
        self._pad = int(sample_rate * spec.speech_pad_ms / 1000)
        self._min_speech = int(sample_rate * spec.min_speech_ms / 1000)
        self.triggered = False
        self._pending = False
        self._temp_end = 0
        self._start = 0

    def _event(self, kind: str, sample: int) -> Event:
        return Event(kind, self._label, sample / self._sr, sample)

    def update(self, score: float, end_sample: int) -> list[Event] | None:
        """Feed the score of the step that ended at ``end_sample``; returns new events."""
        out: list[Event] | None = None
        if score >= self._thr:
            self._temp_end = 0
            if not self.triggered:
                self.triggered = True
                self._start = max(0, end_sample - self._pad - self._hop)
                self._pending = self._min_speech > 0
                if not self._pending:
                    out = [self._event("start", self._start)]
            if self._pending and end_sample - self._start - self._pad - self._hop >= self._min_speech:
                self._pending = False
                out = [self._event("start", self._start)]
        elif score < self._end_thr and self.triggered:
            if not self._temp_end:
                self._temp_end = end_sample
            if end_sample - self._temp_end >= self._min_silence:
                end = max(self._start, self._temp_end + self._pad - self._hop)
                self._temp_end = 0
                self.triggered = False
                if self._pending:
                    self._pending = False  # too short to count: neither start nor end
                else:
                    out = [self._event("end", end)]
        return out

    def scan(self, scores: np.ndarray, first_step: int) -> list[Event]:
        """``update`` over a whole chunk (step ``first_step`` onwards), the same events.

        Offline scoring runs hundreds of thousands of steps a second, so instead of a
        Python call per step this jumps, by binary search in index arrays, to the next
        step that can change the state: outside a segment the next score at or above
        the threshold; inside one the next below ``neg_threshold``, or, once a silence
        has begun, whichever comes first of the next score above the threshold and the
        next below ``neg_threshold`` late enough to end the segment. Steps in between
        would leave the detector unchanged.
        """
        x = np.asarray(scores, dtype=np.float64)  # compare as update() does, in doubles
        hi = np.flatnonzero(x >= self._thr)
        lo = np.flatnonzero(x < self._end_thr)
        either = np.union1d(hi, lo)
        n, hop = len(x), self._hop
        out: list[Event] = []

        def after(idx: np.ndarray, i: int) -> int:
            k = int(np.searchsorted(idx, i))
            return int(idx[k]) if k < len(idx) else n

        i = 0
        while i < n:
            if not self.triggered:
                j = after(hi, i)
            elif self._pending:
                j = after(either, i)
            elif not self._temp_end:
                j = after(lo, i)
            else:
                # first step whose end sample is min_silence past the silence's start
                due = -(-(self._temp_end + self._min_silence) // hop) - first_step - 1
                j = min(after(hi, i), after(lo, max(i, due)))
            if j >= n:
                break
            ev = self.update(float(x[j]), (first_step + j + 1) * hop)
            if ev:
                out.extend(ev)
            i = j + 1
        return out

    def finish(self, total_samples: int) -> list[Event]:
        """Close an open segment at end of stream."""
        if not self.triggered:
            return []
        self.triggered = False
        if self._pending:
            self._pending = False
            return []
        end = total_samples
        if self._temp_end:
            end = min(total_samples, max(self._start, self._temp_end + self._pad - self._hop))
        self._temp_end = 0
        return [self._event("end", end)]
