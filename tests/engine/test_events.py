"""Scores -> events: the semantics of Silero's VADIterator, plus min_speech_ms and finish."""

from __future__ import annotations

import random

import numpy as np
import pytest

from lookback.engine.contract import EventSpec
from lookback.engine.events import Event, EventDetector, EventLog

SR = 16000
HOP = 512
PAD = 480  # 30 ms
MIN_SIL = 1600  # 100 ms


def detector(**kw: float) -> EventDetector:
    spec = EventSpec(
        **{
            "threshold": 0.5,
            "neg_threshold": 0.35,
            "min_silence_ms": 100,
            "speech_pad_ms": 30,
            "min_speech_ms": 0,
            **kw,
        }
    )
    return EventDetector(spec, "speech", sample_rate=SR, hop=HOP)


def run(
    det: EventDetector, scores: list[float], *, finish: bool = True, hop: int = HOP
) -> list[tuple[str, int, int]]:
    """(kind, sample, step index at which it was emitted); finish marked as step -1."""
    out = []
    for i, s in enumerate(scores):
        for ev in det.update(s, (i + 1) * hop) or []:
            out.append((ev.event, ev.sample, i))
    if finish:
        out += [(ev.event, ev.sample, -1) for ev in det.finish(len(scores) * hop)]
    return out


class ReferenceVADIterator:
    """Silero's ``VADIterator.__call__`` logic (silero-vad 6.x), fed scores instead of audio."""

    def __init__(
        self,
        threshold: float,
        sampling_rate: int,
        min_silence_duration_ms: float,
        speech_pad_ms: float,
        neg_threshold: float,
    ) -> None:
        self.threshold = threshold
        self.neg_threshold = neg_threshold
        self.min_silence_samples = sampling_rate * min_silence_duration_ms / 1000
        self.speech_pad_samples = sampling_rate * speech_pad_ms / 1000
        self.triggered = False
        self.temp_end = 0
        self.current_sample = 0

    def __call__(self, speech_prob: float, window_size_samples: int) -> dict[str, int] | None:
        self.current_sample += window_size_samples
        if speech_prob >= self.threshold and self.temp_end:
            self.temp_end = 0
        if speech_prob >= self.threshold and not self.triggered:
            self.triggered = True
            speech_start = max(0, self.current_sample - self.speech_pad_samples - window_size_samples)
            return {"start": int(speech_start)}
        if speech_prob < self.neg_threshold and self.triggered:
            if not self.temp_end:
                self.temp_end = self.current_sample
            if self.current_sample - self.temp_end < self.min_silence_samples:
                return None
            speech_end = self.temp_end + self.speech_pad_samples - window_size_samples
            self.temp_end = 0
            self.triggered = False
            return {"end": int(speech_end)}
        return None


def reference_events(
    scores: list[float],
    hop: int = HOP,
    *,
    threshold: float = 0.5,
    neg: float = 0.35,
    min_silence_ms: float = 100,
    pad_ms: float = 30,
) -> list[tuple[str, int, int]]:
    it = ReferenceVADIterator(threshold, SR, min_silence_ms, pad_ms, neg)
    out = []
    for i, s in enumerate(scores):
        d = it(s, hop)
        if d:
            ((kind, sample),) = d.items()
            out.append((kind, sample, i))
    return out


def test_start_at_threshold_backdated_by_pad_and_hop() -> None:
    det = detector()
    assert det.update(0.49, 512) is None
    assert det.update(0.2, 1024) is None
    evs = det.update(0.5, 1536)  # exactly the threshold starts
    assert evs == [Event("start", "speech", (1536 - PAD - HOP) / SR, 1536 - PAD - HOP)]
    assert det.triggered
    assert det.update(0.99, 2048) is None  # already triggered: no second start


def test_start_time_never_negative() -> None:
    assert run(detector(), [0.9], finish=False) == [("start", 0, 0)]


def test_end_after_min_silence_below_neg_threshold() -> None:
    # speech for 3 steps, then silence: the first silent step ends at 4*512 = 2048
    scores = [0.9, 0.9, 0.9] + [0.1] * 6
    evs = run(detector(), scores, finish=False)
    temp_end = 4 * HOP
    # 100 ms = 1600 samples: needs end_sample - temp_end >= 1600, i.e. 4 hops later (step 7)
    assert evs == [("start", 0, 0), ("end", temp_end + PAD - HOP, 7)]
    assert not any(ev for ev in run(detector(), [0.9] + [0.1] * 3, finish=False) if ev[0] == "end")


def test_hysteresis_scores_between_thresholds_never_end() -> None:
    scores = [0.9] + [0.4] * 50 + [0.36, 0.49]
    evs = run(detector(), scores, finish=False)
    assert evs == [("start", 0, 0)]
    # ... and closing at end of stream puts the end at the end of the stream
    det = detector()
    assert run(det, scores)[-1] == ("end", len(scores) * HOP, -1)


def test_in_between_scores_do_not_reset_the_silence_timer_but_speech_does() -> None:
    # silence starts at step 1 (temp_end = 1024); in-between scores keep the timer running
    evs = run(detector(), [0.9, 0.2, 0.4, 0.4, 0.4, 0.2], finish=False)
    assert evs == [("start", 0, 0), ("end", 2 * HOP + PAD - HOP, 5)]
    # a score at the threshold resets it: the silence must start over
    evs = run(detector(), [0.9, 0.2, 0.4, 0.5, 0.2, 0.2, 0.2, 0.2], finish=False)
    assert evs == [("start", 0, 0)]  # 3 hops of silence since step 4: not yet 100 ms
    evs = run(detector(), [0.9, 0.2, 0.4, 0.5, 0.2, 0.2, 0.2, 0.2, 0.2], finish=False)
    assert evs == [("start", 0, 0), ("end", 5 * HOP + PAD - HOP, 8)]


def test_default_neg_threshold_is_threshold_minus_015() -> None:
    det = EventDetector(
        EventSpec(threshold=0.6, min_silence_ms=0, speech_pad_ms=0), "speech", sample_rate=SR, hop=HOP
    )
    assert run(det, [0.7, 0.46, 0.44], finish=False) == [("start", 0, 0), ("end", 2 * HOP, 2)]


def test_min_speech_drops_short_blips_and_backdates_long_speech() -> None:
    # 200 ms = 3200 samples = 6.25 hops
    det = detector(min_speech_ms=200)
    blip = [0.1, 0.9, 0.9, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]
    assert run(det, blip) == []
    assert not det.triggered
    det = detector(min_speech_ms=200)
    speech = [0.1, 0.1] + [0.9] * 10 + [0.1] * 6
    evs = run(det, speech)
    start = 3 * HOP - PAD - HOP  # backdated to the first speech step, not the confirmation
    # confirmed once end_sample - start - pad - hop >= 3200, i.e. end_sample >= 3*512 + 3200:
    # step 9 (end_sample 5120); step 8 ends at 4608
    assert evs[0] == ("start", start, 9)
    assert evs[1] == ("end", 13 * HOP + PAD - HOP, 16)
    assert len(evs) == 2


def test_min_speech_pending_at_end_of_stream_emits_nothing() -> None:
    det = detector(min_speech_ms=200)
    assert run(det, [0.1, 0.9, 0.9]) == []


def test_finish_closes_open_segment() -> None:
    det = detector()
    evs = run(det, [0.1, 0.9, 0.9, 0.9])
    assert evs == [("start", 2 * HOP - PAD - HOP, 1), ("end", 4 * HOP, -1)]
    assert not det.triggered
    assert det.finish(10_000) == []  # idempotent


def test_finish_during_silence_uses_the_silence_start() -> None:
    # silence started (temp_end = 3*512) but min_silence not yet reached
    evs = run(detector(), [0.9, 0.9, 0.1, 0.1])
    assert evs == [("start", 0, 0), ("end", 3 * HOP + PAD - HOP, -1)]


def test_finish_end_never_past_the_stream() -> None:
    det = EventDetector(EventSpec(threshold=0.5, speech_pad_ms=500), "speech", sample_rate=SR, hop=HOP)
    evs = run(det, [0.9, 0.9, 0.1])
    assert evs[-1] == ("end", 3 * HOP, -1)


def test_event_dict_and_label() -> None:
    det = EventDetector(EventSpec(), "music", sample_rate=SR, hop=128)
    (ev,) = det.update(0.9, 16000) or []
    assert ev.label == "music"
    assert ev.as_dict() == {"event": "start", "label": "music", "time": (16000 - 480 - 128) / SR}


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("hop", [128, 512])
def test_matches_silero_vaditerator_on_random_scores(seed: int, hop: int) -> None:
    rng = random.Random(seed)
    scores, level = [], 0.1
    for _ in range(600):  # sticky regimes: speech, silence, in-between, and noise
        if rng.random() < 0.08:
            level = rng.choice([0.05, 0.2, 0.36, 0.45, 0.5, 0.7, 0.95])
        scores.append(min(1.0, max(0.0, level + rng.uniform(-0.12, 0.12))))
    det = EventDetector(
        EventSpec(threshold=0.5, neg_threshold=0.35, min_silence_ms=100, speech_pad_ms=30),
        "speech",
        sample_rate=SR,
        hop=hop,
    )
    got = run(det, scores, finish=False, hop=hop)
    want = reference_events(scores, hop)
    assert got == want
    assert len(want) >= 4  # the sequence really exercises starts and ends


# --- scan: the offline fast path -----------------------------------------------------------


def runs_of_scores(rng: random.Random, n: int) -> list[float]:
    """Bimodal scores in runs (speech, silence, hovering near the thresholds), float32."""
    out: list[float] = []
    while len(out) < n:
        kind = rng.choice(["hi", "lo", "mid", "edge"])
        length = rng.choice([1, 2, 3, 5, 8, 20, 60])
        for _ in range(length):
            if kind == "hi":
                v = rng.uniform(0.5, 1.0)
            elif kind == "lo":
                v = rng.uniform(0.0, 0.35)
            elif kind == "mid":
                v = rng.uniform(0.3, 0.55)
            else:
                v = rng.choice([0.5, 0.35, 0.49999, 0.34999])
            out.append(float(np.float32(v)))
    return out[:n]


@pytest.mark.parametrize(
    "spec",
    [
        {},
        {"min_silence_ms": 0},
        {"min_speech_ms": 250},
        {"min_speech_ms": 40, "min_silence_ms": 30, "speech_pad_ms": 0},
        {"neg_threshold": 0.5},
    ],
)
@pytest.mark.parametrize("hop", [128, 512])
def test_scan_gives_exactly_the_events_of_update(spec: dict[str, float], hop: int) -> None:
    """Chunk by chunk, ``scan`` emits what ``update`` step by step emits: same events,
    same samples, same state left for the next chunk and for ``finish``."""
    for seed in range(40):
        rng = random.Random(seed)
        scores = runs_of_scores(rng, rng.randint(1, 1500))
        ref, fast = make_pair(spec, hop)
        want = [ev for i, s in enumerate(scores) for ev in ref.update(s, (i + 1) * hop) or []]
        got: list[Event] = []
        pos = 0
        while pos < len(scores):
            k = rng.choice([1, 2, 7, 64, 2048])
            got += fast.scan(np.asarray(scores[pos : pos + k], np.float32), pos)
            pos += k
        assert got == want, f"seed {seed}"
        total = len(scores) * hop
        assert fast.finish(total) == ref.finish(total), f"seed {seed}"


def make_pair(spec: dict[str, float], hop: int) -> tuple[EventDetector, EventDetector]:
    full = EventSpec(
        **{
            "threshold": 0.5,
            "neg_threshold": 0.35,
            "min_silence_ms": 100,
            "speech_pad_ms": 30,
            "min_speech_ms": 0,
            **spec,
        }
    )
    return (
        EventDetector(full, "speech", sample_rate=SR, hop=hop),
        EventDetector(full, "speech", sample_rate=SR, hop=hop),
    )


def test_event_log_keeps_the_last_events_and_counts_the_rest() -> None:
    """Memory per session is bounded however long the stream: 100,000 events, 5 kept."""
    log = EventLog(5)
    for i in range(100_000):
        log.extend([Event("start" if i % 2 == 0 else "end", "speech", i / SR, i)])
    assert len(log) == 5 and log.truncated == 99_995 and log.total == 100_000
    assert [e.sample for e in log] == list(range(99_995, 100_000))
    again = EventLog(3, log, log.truncated)  # restored with a smaller bound: older ones counted
    assert [e.sample for e in again] == [99_997, 99_998, 99_999] and again.total == 100_000
    assert len(EventLog(0, log)) == 0 and EventLog(0, log).truncated == 5
