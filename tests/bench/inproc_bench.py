"""The data plane's Python without sockets: old code against new, CPU per result.

A ramp measures the kernel's socket work too, and this VM moves 30% from minute to
minute; this bench isolates what Lookback's own Python costs per result, where a change
to it shows. Each measurement runs in a fresh interpreter pinned to one CPU, with the
tree under test first on the path, old and new alternating ``--rounds`` times (the median
of each is reported):

- ``rows``: one session's input (``Connection.on_binary`` -> ``push`` -> ``submit``) and
  result (``set_result`` -> ``on_result`` -> JSON -> the transport's write) per hop,
  no model call;
- ``loop``: ``--sessions`` always-ready sessions through the real engine, batcher and
  model, 1 frame/msg (``results=all``) and 10 frames/msg (``results=batch``), the next
  message handed to the connection on a later loop turn, as a socket read would;
- ``call``: one model call as the batcher makes it (``StepCompute``: windows, state
  gathers, the run, the guard, scatters) for batches of 1, 18 (what 150 real-time
  sessions form on one core) and 64 one-hop steps, and 28 steps of 10 hops: the fixed
  cost a call pays whatever its rows.

The transport is a stand-in that counts writes (the connection's writes end there, not in
a kernel). ``python -m tests.bench.inproc_bench [--old REV] [--rounds 5]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
# the second round of the data-plane work started here; the code before the direct path
# (0189e1e) has no connection this harness can drive: ab_bench compares against that one
ROUND_START = "4a5914e"


class _Transport:
    """What a connection writes to on the direct path; the next message on a later turn."""

    write_paused = False
    close_sent = False
    disconnected = False

    def __init__(self, loop: Any = None, message: bytes = b"") -> None:
        self.loop, self.message, self.writes = loop, message, 0
        self.conn: Any = None

    def attach(self, sink: Any) -> None:
        self.conn = sink

    def write_frames(self, frames: bytes) -> None:
        self.writes += 1
        if self.loop is not None:
            self.loop.call_soon(self.conn.on_binary, self.message)

    def write_text(self, data: bytes) -> None:
        pass

    def close(self, code: int, reason: str = "") -> None:
        pass

    def hold(self) -> None:
        pass

    def release(self) -> None:
        pass


class _WS:
    def __init__(self, transport: _Transport) -> None:
        from lookback.websocket import DIRECT

        self.query_params: dict[str, str] = {}
        self.scope = {"extensions": {DIRECT: transport}}
        self.send = None


def _engine(sessions: int, max_batch: int) -> tuple[Any, Any, Any]:
    from prometheus_client import CollectorRegistry

    from lookback.engine.engine import Engine
    from lookback.metrics import Metrics
    from lookback.settings import Settings

    s = Settings(
        _env_file=None,
        models=["lookback-vad"],
        default_model="lookback-vad",
        max_sessions=max(16, sessions),
        max_batch_size=max_batch,
        warmup_batch_sizes=[1, min(max_batch, sessions)],
        model_calls="inline",
    )
    metrics = Metrics(CollectorRegistry())
    return s, metrics, Engine(s, metrics=metrics)


async def _rows(n: int) -> dict[str, float]:
    from lookback.api.connection import Connection

    s, metrics, eng = _engine(1, 8)
    await eng.start()
    h = eng.resolve("lookback-vad")
    await h.batcher.stop()  # completions by hand: no model call
    ready = h.batcher._ready
    t = _Transport()
    conn = Connection(_WS(t), s, metrics, h, "all", "bench")  # type: ignore[arg-type]
    conn.session = session = eng.open_session(h, conn)
    conn._bind()
    frame = bytes(2 * h.spec.hop_samples)
    best_in = best_both = float("inf")
    for _ in range(5):
        t0 = time.process_time()
        for _ in range(n):
            conn.on_binary(frame)
            ready.clear()
            session._in_flight = None
        t1 = time.process_time()
        for _ in range(n):
            conn.on_binary(frame)
            ready.clear()
            session._in_flight.taken = True
            session.set_result([[0.25]])
        t2 = time.process_time()
        best_in, best_both = min(best_in, (t1 - t0) / n), min(best_both, (t2 - t1) / n)
    return {"input_us": best_in * 1e6, "result_us": (best_both - best_in) * 1e6}


async def _loop(sessions: int, fpm: int, results: str, seconds: float) -> dict[str, float]:
    import numpy as np

    from lookback.api.connection import Connection

    s, metrics, eng = _engine(sessions, 256)
    await eng.start()
    h = eng.resolve("lookback-vad")
    loop = asyncio.get_running_loop()
    rng = np.random.default_rng(0)
    transports = []
    for i in range(sessions):
        message = (rng.standard_normal(h.spec.hop_samples * fpm) * 3000).astype("<i2").tobytes()
        t = _Transport(loop, message)
        conn = Connection(_WS(t), s, metrics, h, results, f"s{i}")  # type: ignore[arg-type]
        conn.session = eng.open_session(h, conn)
        conn._bind()
        t.attach(conn)
        transports.append(t)
    for t in transports:
        t.conn.on_binary(t.message)
    await asyncio.sleep(0.5)
    w0, c0 = sum(t.writes for t in transports), time.process_time()
    await asyncio.sleep(seconds)
    w1, c1 = sum(t.writes for t in transports), time.process_time()
    return {"us_per_message": (c1 - c0) / (w1 - w0) * 1e6}


CALLS = ((1, 1), (18, 1), (64, 1), (28, 10))  # (steps, hops each)


async def _call() -> dict[str, float]:
    import numpy as np

    from lookback.engine.step import Step

    _, _, eng = _engine(128, 256)
    await eng.start()
    h = eng.resolve("lookback-vad")
    await h.batcher.stop()  # calls by hand
    compute = h.batcher.compute
    slots = [h.table.acquire() for _ in range(64)]
    rng = np.random.default_rng(0)
    out = {}
    for n, k in CALLS:
        pcm = (rng.standard_normal(h.spec.hop_samples * k) * 3000).astype("<i2").tobytes()
        batch = [Step(slots[i], 0, pcm, None, 0.0, count=k) for i in range(n)]  # type: ignore[arg-type]
        reps, best = max(20, 3000 // (n * k)), float("inf")
        for _ in range(7):
            t0 = time.process_time()
            for _ in range(reps):
                compute(batch)
            best = min(best, (time.process_time() - t0) / reps)
        out[f"{n}x{k}_us"] = best * 1e6
    return out


def _child(kind: str, args: argparse.Namespace) -> None:
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    if kind == "rows":
        out = asyncio.run(_rows(args.n))
    elif kind == "call":
        out = asyncio.run(_call())
    else:
        fpm, results = (1, "all") if kind == "loop1" else (10, "batch")
        out = asyncio.run(_loop(args.sessions, fpm, results, args.seconds))
    print(json.dumps(out), flush=True)
    os._exit(0)  # the engine's threads need no orderly stop here


def _run(tree: Path, kind: str, args: argparse.Namespace) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=f"{tree / 'service'}{os.pathsep}{REPO}")
    argv = [sys.executable, "-m", "tests.bench.inproc_bench", "--child", kind]
    argv += ["--sessions", str(args.sessions), "--seconds", str(args.seconds), "--n", str(args.n)]
    done = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=300, check=True)
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--old", default=ROUND_START, help="git revision of the old code (direct path needed)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--sessions", type=int, default=150)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--n", type=int, default=50000, help="rows: hops per timing")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if args.child:
        _child(args.child, args)
        return 0
    from tests.bench.ab_bench import old_tree

    trees = {"old": old_tree(args.old), "new": REPO}
    got: dict[str, dict[str, list[float]]] = {"old": {}, "new": {}}
    for _ in range(args.rounds):
        for name, tree in trees.items():
            for kind in ("rows", "loop1", "loop10", "call"):
                for key, value in _run(tree, kind, args).items():
                    got[name].setdefault(f"{kind}.{key}", []).append(value)
    res = {name: {k: statistics.median(v) for k, v in d.items()} for name, d in got.items()}
    for key in res["new"]:
        old, new = res["old"].get(key), res["new"][key]
        ratio = f"{new / old:.2f}" if old else "–"
        print(f"{key:28s} old {old if old is None else round(old, 2)!s:>8}  new {new:8.2f}  new/old {ratio}")
    if args.json:
        Path(args.json).write_text(json.dumps({"old_rev": args.old, **res}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
