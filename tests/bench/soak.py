"""Soak: session churn against one ``lookback serve`` process; does anything leak?

Many short sessions open, stream a few frames (some ending mid-hop, some float32) and
leave in one of three ways: ``end`` and the summary (checked: frames and steps), a
client close frame without ``end``, or a dropped TCP connection without any close frame.
The server's RSS and open file descriptors (psutil on the process) are read after a
first warm batch, at checkpoints, and once the server is idle again, with the slot table
(``lookback_state_slots{kind="used"}``) and open sessions from ``/metrics``.

    python -m tests.bench.soak [--sessions 20000] [--warm 500] [--concurrency 32]

prints the figures as JSON. ``tests/test_soak.py`` runs a short variant in ``make test``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.conftest import spawn_server
from tests.support import read_clip

SPEECH = read_clip("silero_ref_speech.wav")
SPEECH_F32 = (SPEECH.astype(np.float32) / 32768).astype("<f4")
HOP_FRAMES = 4  # Silero VAD: 512-sample hop


def _metrics(base: str) -> dict[str, float]:
    text = httpx.get(base + "/metrics", timeout=30).text
    out: defaultdict[str, float] = defaultdict(float)
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "lookback_state_slots":
                out[f"slots_{s.labels['kind']}"] += s.value
            elif s.name == "lookback_sessions_active":
                out["sessions_active"] += s.value
            elif s.name == "lookback_sessions_ended_total":
                out[f"ended_{s.labels['reason']}"] += s.value
            elif s.name == "lookback_errors_total":
                out[f"error_{s.labels['code']}"] += s.value
    return dict(out)


async def _one(base_ws: str, i: int, seed: int, stats: Counter[str]) -> None:
    rng = random.Random(seed * 1_000_003 + i)
    f32 = rng.random() < 0.25
    frames = rng.randint(1, 12)
    how = rng.choices(["end", "close", "drop"], weights=[6, 2, 2])[0]
    start = rng.randrange(0, len(SPEECH) - 128 * frames)
    pcm = (SPEECH_F32 if f32 else SPEECH)[start : start + 128 * frames].tobytes()
    per = rng.choice([1, 2, 3, 64])
    step = len(pcm) // frames * per
    q = "model=silero-vad" + ("&encoding=pcm_f32le" if f32 else "")
    try:
        async with connect(
            f"{base_ws}/v1/stream?{q}",
            compression=None,
            proxy=None,
            ping_interval=None,
            open_timeout=30,
            close_timeout=5,
        ) as ws:
            ready = json.loads(await ws.recv())
            assert ready["type"] == "ready", ready
            for k in range(0, len(pcm), step):
                await ws.send(pcm[k : k + step])
            if how == "drop":
                ws.transport.abort()  # no close frame, the TCP connection just goes
                stats["dropped"] += 1
                return
            if how == "close":
                await ws.close()
                stats["closed"] += 1
                return
            await ws.send('{"type":"end"}')
            summary = None
            async for msg in ws:
                body = json.loads(msg)
                if body["type"] == "summary":
                    summary = body
                elif body["type"] == "error":
                    stats[f"error_{body['code']}"] += 1
            assert summary is not None and ws.close_code == 1000, (summary, ws.close_code)
            steps = -(-frames // HOP_FRAMES)
            if (summary["frames"], summary["steps"]) != (frames, steps):
                stats["wrong_summary"] += 1
            stats["ended"] += 1
    except (ConnectionClosed, InvalidStatus, OSError, TimeoutError) as exc:
        stats[f"client_failure_{type(exc).__name__}"] += 1


async def churn(
    base_ws: str, first: int, count: int, *, concurrency: int, seed: int, stats: Counter[str]
) -> None:
    """Sessions ``first .. first+count-1``, ``concurrency`` at a time."""
    it = iter(range(first, first + count))

    async def worker() -> None:
        for i in it:
            await _one(base_ws, i, seed, stats)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


def _wait_idle(base: str, within: float = 60.0) -> dict[str, float]:
    """Poll /metrics until no slot is used and no session is open (drops are reaped)."""
    deadline = time.monotonic() + within
    while True:
        m = _metrics(base)
        if m.get("slots_used", 0) == 0 and m.get("sessions_active", 0) == 0:
            return m
        if time.monotonic() > deadline:
            raise RuntimeError(f"server not idle after {within}s: {m}")
        time.sleep(0.05)  # readiness-style poll interval, bounded by the deadline


def _mib(n: int) -> float:
    return round(n / 2**20, 2)


def run_soak(
    sessions: int,
    *,
    warm: int = 200,
    concurrency: int = 32,
    seed: int = 6,
    checkpoint_every: int = 1000,
    workdir: Path | None = None,
) -> dict[str, Any]:
    """Churn ``sessions`` sessions (the first ``warm`` of them a warm-up batch) against a
    fresh server and return the figures; raises if the server is not idle at the end."""
    env = {
        "LOOKBACK_MODELS": "silero-vad",
        "LOOKBACK_DEFAULT_MODEL": "silero-vad",
        "LOOKBACK_LOG_LEVEL": "warning",
        "LOOKBACK_MAX_SESSIONS": str(4 * concurrency + 64),
    }
    stats: Counter[str] = Counter()
    out: dict[str, Any] = {"sessions": sessions, "warm": warm, "concurrency": concurrency}
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        srv = stack.enter_context(spawn_server(workdir, **env))
        proc = psutil.Process(srv.proc.pid)
        t0 = time.perf_counter()
        asyncio.run(churn(srv.ws, 0, warm, concurrency=concurrency, seed=seed, stats=stats))
        _wait_idle(srv.url)
        base_rss, base_fds = proc.memory_info().rss, proc.num_fds()
        out.update(rss_warm_mib=_mib(base_rss), fds_warm=base_fds)
        checkpoints: dict[str, float] = {}
        done = warm
        while done < sessions:
            n = min(checkpoint_every - done % checkpoint_every, sessions - done)
            asyncio.run(churn(srv.ws, done, n, concurrency=concurrency, seed=seed, stats=stats))
            done += n
            if done % checkpoint_every == 0 or done == sessions:
                checkpoints[str(done)] = _mib(proc.memory_info().rss)
        elapsed = time.perf_counter() - t0
        final = _wait_idle(srv.url)
        rss, fds = proc.memory_info().rss, proc.num_fds()
        t_term = time.perf_counter()
        srv.terminate()
        exit_code = srv.proc.wait(60)
        shutdown = time.perf_counter() - t_term
        log = srv.log.read_text()
    out.update(
        seconds=round(elapsed, 1),
        sessions_per_s=round(sessions / elapsed, 1),
        rss_checkpoints_mib=checkpoints,
        rss_end_mib=_mib(rss),
        rss_change_pct=round(100 * (rss - base_rss) / base_rss, 2),
        fds_end=fds,
        fds_change=fds - base_fds,
        slots_used=final.get("slots_used", 0),
        slots_capacity=final.get("slots_capacity", 0),
        sessions_active=final.get("sessions_active", 0),
        ended_by_reason={k[6:]: v for k, v in final.items() if k.startswith("ended_")},
        server_errors={k[6:]: v for k, v in final.items() if k.startswith("error_")},
        client=dict(stats),
        tracebacks=log.count("Traceback"),
        exit_code=exit_code,
        shutdown_s=round(shutdown, 2),
    )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=20_000)
    ap.add_argument("--warm", type=int, default=500)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--seed", type=int, default=6)
    args = ap.parse_args(argv)
    figures = run_soak(args.sessions, warm=args.warm, concurrency=args.concurrency, seed=args.seed)
    print(json.dumps(figures, indent=2))
    ok = (
        figures["slots_used"] == 0
        and figures["sessions_active"] == 0
        and abs(figures["rss_change_pct"]) <= 5
        and abs(figures["fds_change"]) <= 4
        and figures["tracebacks"] == 0
        and figures["exit_code"] == 0
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
