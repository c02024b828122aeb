"""Multi-step execution benchmark (no network), pinned to one core, ORT with one thread.

1. Graph: cost per hop of the multi-step graph at k hops per call (B = 1 and 64), the
   step graph's k = 1 for reference: what sizes the ``max_steps_per_call`` default.
2. Engine: CPU seconds per step with N sessions that always have their next message
   ready, at 1 and 10 frames per message, with one hop per call
   (``max_steps_per_call=1``, the old behaviour) and with the default.
3. Offline Silero: x real time of a long clip, the old path (a session fed through the
   batcher, one hop per call) against ``Engine.score`` (the multi-step graph).

    python -m tests.bench.multistep_bench [--sessions 100] [--seconds 3] [--offline-seconds 600]
        [--json out.json]

Figures taken on a shared, loaded machine are indicative only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np

from lookback.engine.engine import Engine
from lookback.engine.events import Event
from lookback.engine.multistep import AUDIO, state_in, state_out
from lookback.engine.session import StreamSession
from lookback.engine.store import discover
from lookback.errors import LookbackError
from lookback.settings import Settings

FRAME = 128


def _settings(model: str, **kw: Any) -> Settings:
    base: dict[str, Any] = dict(
        _env_file=None,
        models=[model],
        default_model=model,
        max_sessions=1024,
        warmup_batch_sizes=[1, 64],
        initial_slots=8,
        max_pending_steps=64,
        max_frames_per_message=64,
    )
    base.update(kw)
    return Settings(**base)


# --- 1. graph cost per hop --------------------------------------------------------------------


def graph_cost(model: str, batch: int, ks: list[int], seconds: float) -> dict[int, float]:
    """CPU microseconds per hop per row: step graph for k=1, multi-step graph for k>1."""
    eng = Engine(_settings(model))
    handle = eng._load(next(s for s in discover(eng.settings.model_store) if s.spec.name == model))
    spec, comp = handle.spec, handle.step_compute
    rng = np.random.default_rng(0)
    out: dict[int, float] = {}
    for k in ks:
        if k == 1:
            feeds = comp.step_feeds(batch)
            name = spec.audio_input.name
            feeds[name] = (rng.standard_normal(feeds[name].shape) * 0.1).astype(np.float32)
            rt, pairs = handle.step, [(s.input, s.output) for s in spec.states]
        else:
            feeds = comp.multistep_feeds(batch, k)
            feeds[AUDIO] = (rng.standard_normal(feeds[AUDIO].shape) * 0.1).astype(np.float32)
            assert handle.multistep is not None
            rt = handle.multistep
            pairs = [(state_in(s.input), state_out(s.output)) for s in spec.states]
        names = rt.output_names
        n, t0, c0 = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - t0 < seconds or n < 3:
            outs = rt.run(feeds)
            for feed, o in pairs:
                feeds[feed] = outs[names.index(o)]
            n += 1
        out[k] = (time.process_time() - c0) / (n * k * batch) * 1e6  # CPU, not wall: shared cores
    return out


# --- 2. engine CPU per step -------------------------------------------------------------------


class _Next:
    """Sink that pushes the session's next message once the last one is fully scored."""

    def __init__(self, message: bytes) -> None:
        self.message = message
        self.session: Any = None
        self.owed = 0
        self.done = 0

    def push(self) -> None:
        self.owed += self.session.push(self.message)

    def on_result(self, index: int, time: float, scores: list[float], events: list[Event] | None) -> None:
        self.done += 1
        self.owed -= 1
        while self.owed == 0:  # a message shorter than a hop makes no step: send the next
            self.push()

    def on_error(self, index: int, error: LookbackError) -> None:
        raise error


async def engine_cpu_per_step(
    model: str, sessions: int, frames: int, max_steps: int, seconds: float
) -> dict[str, float]:
    eng = Engine(_settings(model, max_steps_per_call=max_steps, model_calls="inline"))
    await eng.start()
    try:
        handle = eng.resolve(model)
        rng = np.random.default_rng(1)
        sinks = []
        for _ in range(sessions):
            sink = _Next((rng.standard_normal(frames * FRAME) * 3000).astype("<i2").tobytes())
            sink.session = eng.open_session(handle, sink)
            sinks.append(sink)
        for sink in sinks:
            while sink.owed == 0:
                sink.push()
        await asyncio.sleep(min(0.5, seconds / 4))
        done0, cpu0, t0 = sum(s.done for s in sinks), time.process_time(), time.perf_counter()
        await asyncio.sleep(seconds)
        done = sum(s.done for s in sinks) - done0
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
        for s in sinks:
            s.session.close()
        return {"steps_per_s": done / wall, "cpu_us_per_step": cpu / max(done, 1) * 1e6}
    finally:
        await eng.stop()


# --- 3. offline Silero --------------------------------------------------------------------------


async def _clip(seconds: float, chunk: int) -> AsyncIterator[np.ndarray]:
    rng = np.random.default_rng(2)
    total = int(seconds * 16000)
    t = np.arange(chunk, dtype=np.float32) / np.float32(16000)
    pos = 0
    while pos < total:
        n = min(chunk, total - pos)
        x = rng.normal(0, 0.02, n).astype(np.float32)
        x += (np.float32(0.3) * np.sin(np.float32(2 * np.pi * 220) * t[:n])) * ((pos // 80000) % 2)
        pos += n
        yield x.astype(np.float32)


class _Rows:
    def __init__(self) -> None:
        self.n = 0

    def on_result(self, index: int, time: float, scores: list[float], events: list[Event] | None) -> None:
        self.n += 1

    def on_error(self, index: int, error: LookbackError) -> None:
        raise error


async def offline_x_realtime(model: str, seconds: float) -> dict[str, float]:
    out: dict[str, float] = {}
    # before: what offline scoring without a sequence graph did, a session fed through
    # the batcher in pieces of offline_chunk_steps hops, one hop per model call
    eng = Engine(_settings(model, max_steps_per_call=1, model_calls="inline"))
    await eng.start()
    try:
        handle = eng.resolve(model)
        sink = _Rows()
        session = StreamSession(handle, sink, encoding="pcm_f32le", max_pending_steps=2048)
        piece = 2048 * handle.spec.hop_samples
        t0 = time.perf_counter()
        async for chunk in _clip(seconds, 16000):
            whole = chunk.size // FRAME * FRAME
            for start in range(0, whole, piece):
                session.push(chunk[start : min(whole, start + piece)].tobytes())
                await session.wait_idle()
        out["before_x_realtime"] = seconds / (time.perf_counter() - t0)
        session.close()
    finally:
        await eng.stop()
    eng = Engine(_settings(model))
    await eng.start()
    try:
        handle = eng.resolve(model)
        t0 = time.perf_counter()
        n = 0
        async for part in eng.score(handle, _clip(seconds, 16000)):
            n += len(part.scores)
        out["after_x_realtime"] = seconds / (time.perf_counter() - t0)
        out["steps"] = n
    finally:
        await eng.stop()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["lookback-vad", "silero-vad"])
    ap.add_argument("--sessions", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--offline-seconds", type=float, default=600.0)
    ap.add_argument("--skip", nargs="*", default=[], choices=["graph", "engine", "offline"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    report: dict[str, Any] = {"note": "shared, loaded machine: indicative only"}
    default_steps = Settings(_env_file=None).max_steps_per_call
    for model in args.models:
        r: dict[str, Any] = report.setdefault(model, {})
        if "graph" not in args.skip:
            for b in (1, 64):
                r[f"graph_us_per_hop_B{b}"] = cost = graph_cost(
                    model, b, [1, 2, 4, 8, 16, 32], args.seconds / 3
                )
                print(model, f"B={b} CPU us/hop by k:", {k: round(v, 1) for k, v in cost.items()}, flush=True)
        if "engine" not in args.skip:
            for frames in (1, 10):
                for steps in (1, default_steps):
                    res = asyncio.run(engine_cpu_per_step(model, args.sessions, frames, steps, args.seconds))
                    r[f"engine_{frames}fpm_steps{steps}"] = res
                    print(
                        model,
                        f"{frames} frames/msg, max_steps_per_call={steps}:",
                        f"{res['steps_per_s']:.0f} steps/s, {res['cpu_us_per_step']:.1f} CPU us/step",
                        flush=True,
                    )
        if "offline" not in args.skip and model == "silero-vad":
            res = asyncio.run(offline_x_realtime(model, args.offline_seconds))
            r["offline"] = res
            print(
                model,
                f"offline {args.offline_seconds:.0f} s clip: before {res['before_x_realtime']:.0f}x "
                f"real time, after {res['after_x_realtime']:.0f}x",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
