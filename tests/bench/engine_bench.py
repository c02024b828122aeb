"""Engine-only benchmark (no network): frames/s through the engine vs the ORT ceiling.

For N concurrent sessions that always have a step ready, measures steps per second
through StreamSession -> MicroBatcher -> ServedModel.compute, against
(a) the ORT ceiling: raw ``session.run`` at the same batch size with no engine around it,
(b) the same engine with ``max_batch_size=1`` (one model call per step).
Pinned to one core (``os.sched_setaffinity``), ORT with one thread.

    python -m tests.bench.engine_bench [--model lookback-vad] [--seconds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
import time
from typing import Any

import numpy as np

from lookback.engine.engine import Engine
from lookback.engine.events import Event
from lookback.engine.store import discover
from lookback.errors import LookbackError
from lookback.settings import Settings

SESSIONS = (1, 64, 512, 2048)


class _Refill:
    """Sink that pushes the next frame as soon as a result arrives: always ready."""

    def __init__(self, frame: bytes) -> None:
        self.frame = frame
        self.session: Any = None
        self.done = 0

    def on_result(self, index: int, time: float, scores: list[float], events: list[Event] | None) -> None:
        self.done += 1
        self.session.push(self.frame)

    def on_error(self, index: int, error: LookbackError) -> None:
        raise error


def _settings(model: str, max_batch: int, sessions: int) -> Settings:
    return Settings(
        _env_file=None,
        models=[model],
        default_model=model,
        max_batch_size=max_batch,
        max_sessions=max(sessions, 16),
        warmup_batch_sizes=[1, min(max_batch, sessions)],
        initial_slots=8,
        max_pending_steps=64,
        max_frames_per_message=64,
    )


async def engine_rate(model: str, sessions: int, max_batch: int, seconds: float) -> float:
    """Steps/s with ``sessions`` always-ready sessions through the engine."""
    eng = Engine(_settings(model, max_batch, sessions))
    await eng.start()
    try:
        handle = eng.resolve(model)
        hop = handle.spec.hop_samples
        rng = np.random.default_rng(0)
        sinks = []
        for _ in range(sessions):
            frame = (rng.standard_normal(hop) * 3000).astype("<i2").tobytes()
            sink = _Refill(frame)
            sink.session = eng.open_session(handle, sink)
            sinks.append(sink)
        for sink in sinks:
            sink.session.push(sink.frame)
        await asyncio.sleep(min(0.5, seconds / 4))  # warm-up: let batches reach steady state
        start_count = sum(s.done for s in sinks)
        t0 = time.perf_counter()
        await asyncio.sleep(seconds)  # measurement window
        done = sum(s.done for s in sinks) - start_count
        rate = done / (time.perf_counter() - t0)
        for s in sinks:
            s.session.close()
        return rate
    finally:
        await eng.stop()


def ort_ceiling(model: str, batch: int, seconds: float) -> float:
    """Steps/s of the raw step graph at ``batch`` with states fed back, no engine."""
    eng = Engine(_settings(model, batch, batch))
    handle = eng._load(next(sm for sm in discover(eng.settings.model_store) if sm.spec.name == model))
    feeds = handle.step_compute.step_feeds(batch)
    rng = np.random.default_rng(0)
    feeds[handle.spec.audio_input.name] = (
        rng.standard_normal(feeds[handle.spec.audio_input.name].shape) * 0.1
    ).astype(np.float32)
    rt = handle.step_compute.step
    names = rt.output_names
    state_map = [(st.input, names.index(st.output)) for st in handle.spec.states]
    for _ in range(3):
        rt.run(feeds)
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        outs = rt.run(feeds)
        for name, idx in state_map:
            feeds[name] = outs[idx]
        n += 1
    return n * batch / (time.perf_counter() - t0)


def memory_per_session(model: str) -> dict[str, float]:
    """Bytes of state + buffers per session: slab rows plus the session object's heap."""
    import tracemalloc

    async def run() -> dict[str, float]:
        eng = Engine(_settings(model, 64, 1024))
        await eng.start()
        handle = eng.resolve(model)
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.take_snapshot()
        sessions = [eng.open_session(handle, _Refill(b"")) for _ in range(1000)]
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
        heap = sum(s.size_diff for s in after.compare_to(before, "filename"))
        out = {
            "state_bytes_per_session": float(handle.table.bytes_per_slot),
            "heap_bytes_per_session_incl_slab_growth": heap / 1000,
        }
        for s in sessions:
            s.close()
        await eng.stop()
        return out

    return asyncio.run(run())


def main(
    json_out: str | None = None,
    *,
    model: str = "lookback-vad",
    seconds: float = 3.0,
    sessions: tuple[int, ...] = SESSIONS,
) -> dict[str, Any]:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    rows = []
    for n in sessions:
        ceiling = ort_ceiling(model, n, seconds)
        batched = asyncio.run(engine_rate(model, n, n, seconds))
        naive = asyncio.run(engine_rate(model, n, 1, seconds))
        rows.append(
            {
                "sessions": n,
                "ort_ceiling_fps": ceiling,
                "engine_fps": batched,
                "engine_bs1_fps": naive,
                "vs_ceiling": batched / ceiling,
                "vs_unbatched": batched / naive,
            }
        )
        print(
            f"  {n:5d} sessions: ORT {ceiling:10.0f}/s  engine {batched:10.0f}/s "
            f"({batched / ceiling:.2f}x ceiling)  bs=1 {naive:8.0f}/s "
            f"({batched / naive:.1f}x)",
            file=sys.stderr,
            flush=True,
        )
    result = {"model": model, "seconds_per_point": seconds, "rows": rows, "memory": memory_per_session(model)}
    result["markdown"] = to_markdown(result)
    if json_out:
        with open(json_out, "w") as f:
            json.dump(result, f, indent=2)
    return result


def to_markdown(result: dict[str, Any]) -> str:
    lines = [
        f"Engine only, one core, model `{result['model']}` (frames/s = steps/s x hop/128)",
        "",
        "| sessions | ORT ceiling steps/s | engine steps/s | engine / ceiling | "
        "engine bs=1 steps/s | batched / bs=1 |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['sessions']} | {r['ort_ceiling_fps']:.0f} | {r['engine_fps']:.0f} | "
            f"{r['vs_ceiling']:.2f} | {r['engine_bs1_fps']:.0f} | "
            f"{r['vs_unbatched']:.1f}x |"
        )
    mem = result["memory"]
    lines += [
        "",
        f"State per session: {mem['state_bytes_per_session']:.0f} bytes in slabs; "
        f"Python heap per open session: {mem['heap_bytes_per_session_incl_slab_growth']:.0f} "
        "bytes (incl. slab growth).",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="lookback-vad")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--sessions", default=",".join(map(str, SESSIONS)))
    ap.add_argument("--json")
    a = ap.parse_args()
    res = main(
        a.json, model=a.model, seconds=a.seconds, sessions=tuple(int(x) for x in a.sessions.split(","))
    )
    print(res["markdown"])
