"""One client process's schedule, and the spread of a run's sessions over processes.

One scheduler per process wakes once per 1 ms phase slot and sends for every session in it
(no timer per session); each process reports its CPU use and how late its sends ran, so the
report can say when the client itself was the limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import os
import random
import resource
import time
from array import array
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from lookback.loadtest import verify
from lookback.loadtest.audio import build_messages, frame_messages, load_audio
from lookback.loadtest.config import (
    FRAME,
    SAMPLE_RATE,
    LoadConfig,
    auth_headers,
    check_urls,
    log,
    message_samples,
    message_seconds,
    proc_count,
    query_string,
    whole_frames,
    wire_rate,
)
from lookback.loadtest.libclient import LibSession, LibWireSession
from lookback.loadtest.rawclient import Proc, RawSession, RawWireSession, SessionBase
from lookback.loadtest.report import merge


def raise_fd_limit(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = need + 256
    if soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(hard, max(want, soft))
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def proc_run(
    cfg: LoadConfig,
    n: int,
    offset: int,
    seed: int,
    recv_start: Callable[[], float],
    report: Callable[[Any], None],
) -> dict[str, Any]:
    """One process: open ``n`` sessions, wait for the common start, stream, end, count."""
    import numpy as np

    rng = random.Random(seed)
    samples = load_audio(cfg.wav, cfg.seed, wire_rate(cfg))
    proc = Proc(cfg)
    raw = build_messages(
        samples,
        cfg.frames_per_message,
        seed,
        framed=False,
        encoding=cfg.encoding,
        message_samples=None if whole_frames(cfg) else message_samples(cfg),
    )
    msgs = frame_messages(raw, seed) if cfg.client == "raw" else raw
    query, headers = query_string(cfg), auth_headers(cfg)
    if proc.timing is None:
        cls: Any = RawSession if cfg.client == "raw" else LibSession
    else:
        cls = RawWireSession if cfg.client == "raw" else LibWireSession
    sem = asyncio.Semaphore(cfg.connect_concurrency)

    async def open_one(i: int) -> SessionBase:
        url = cfg.urls[(offset + i) % len(cfg.urls)]
        async with sem:
            s: SessionBase = await cls.open(
                proc, msgs, rng.randrange(len(msgs)), url, query, headers, cfg.connect_timeout
            )
            return s

    t_c = time.monotonic()
    sessions = list(await asyncio.gather(*(open_one(i) for i in range(n))))
    connect_s = time.monotonic() - t_c
    live = [s for s in sessions if s.ready and not s.closed]
    # the first process's first sessions keep their scores for the REST cross-check
    verified = sessions[: cfg.verify] if offset == 0 and cfg.results != "events" else []
    for s in verified:
        s.keep_scores()
    report(("connected", len(live)))
    t0 = await asyncio.get_running_loop().run_in_executor(None, recv_start)

    # Phase slots: each session gets a random phase in the message period, quantized to 1 ms.
    period = message_seconds(cfg)
    gran = 0.001
    n_slots = max(1, round(period / gran))
    slots: list[list[SessionBase]] = [[] for _ in range(n_slots)]
    for s in live:
        slots[rng.randrange(n_slots)].append(s)
    plan = [(i * period / n_slots, g) for i, g in enumerate(slots) if g]
    proc.meas_start = t0 + cfg.warmup
    proc.meas_end = proc.meas_start + cfg.duration
    t_end = proc.meas_end
    slips = array("d")
    cpu0 = wall0 = None
    sends_in_window = 0
    mono = time.monotonic
    cycle = 0
    while plan:
        base = t0 + cycle * period
        if base >= t_end:
            break
        for off, group in plan:
            target = base + off
            if target >= t_end:
                break
            delay = target - mono()
            # Behind schedule: still yield once, so results are read while catching up.
            await asyncio.sleep(delay if delay > 0 else 0)
            now = mono()
            if now >= proc.meas_start:
                if cpu0 is None:
                    cpu0, wall0 = cpu_seconds(), now
                slips.append(now - target)
                sends_in_window += len(group)
            for s in group:
                s.send_next()
        cycle += 1
    wall1 = mono()
    cpu1 = cpu_seconds()
    for s in live:
        s.send_end()
    end_timeout = cfg.end_timeout
    early = False
    if cfg.fail_fast:
        # Has this trial failed already? Results still missing whose frame went out more
        # than the bound ago are late too; past 1% late, p99 is over the bound: do not wait
        # out a backlog the server cannot clear in time.
        now = mono()
        bound = cfg.p99_ms / 1e3
        lat = np.array(proc.latencies, np.float64)  # a copy: the array keeps growing
        late, total = int((lat > bound).sum()), len(lat)
        for s in live:
            d_late, d_total = s.overdue(now, bound)
            late += d_late
            total += d_total
        if total and late > 0.01 * total:
            early, end_timeout = True, min(end_timeout, 1.0)
    pending = [s.done_fut for s in live if not s.done_fut.done()]
    if pending:
        await asyncio.wait(pending, timeout=end_timeout)
    end_wait = mono() - wall1
    for s in live:
        if not s.done_fut.done():
            s.aborted = True
    for s in sessions:
        s.close()
    await asyncio.sleep(0)
    checked = None
    if verified:
        pairs = [(cfg.urls[i % len(cfg.urls)], s) for i, s in enumerate(verified)]
        checked = await asyncio.get_running_loop().run_in_executor(None, verify.check, cfg, pairs, raw)

    failures: Counter[str] = Counter(s.failure for s in sessions if s.failure and not s.ready)
    errors: Counter[str] = Counter()
    closes: Counter[str] = Counter()
    lost = no_summary = skipped = frames = results = events = 0
    for s in live:
        errors.update(s.errors)
        closes["aborted_by_client" if s.aborted else str(s.close_code)] += 1
        if s.summary is None:
            no_summary += 1
        lost += max(0, s.expected_steps() - s.results)
        skipped += s.skipped
        frames += s.frames_sent
        results += s.results
        events += s.events
    if proc.timing is not None:  # messages sent -> model-rate frames they carry
        frames = int(frames * message_samples(cfg) * SAMPLE_RATE / wire_rate(cfg) / FRAME)
    window = (wall1 - wall0) if wall0 is not None else 0.0
    cpu = (cpu1 - cpu0) / window if cpu0 is not None and window > 0 else 0.0
    sl = np.frombuffer(slips, np.float64) if len(slips) else np.zeros(1)
    n_msgs = sends_in_window + len(proc.latencies)  # messages each way in the window
    cpu_s = (cpu1 - cpu0) if cpu0 is not None else 0.0
    return {
        "sessions": n,
        "connected": len(live),
        "connect_s": connect_s,
        "connect_failures": dict(failures),
        "errors": dict(errors),
        "close_codes": dict(closes),
        "lost_results": lost,
        "no_summary": no_summary,
        "send_skipped": skipped,
        "frames_sent": frames,
        "results": results,
        "events": events,
        "latencies": proc.latencies.tobytes(),
        "cpu": cpu,
        "window_s": window,
        "cpu_s": cpu_s,
        "messages": n_msgs,
        "end_wait_s": end_wait,
        "ended_early": early,
        "slip_p50_ms": float(np.percentile(sl, 50) * 1e3),
        "slip_p99_ms": float(np.percentile(sl, 99) * 1e3),
        "slip_max_ms": float(sl.max() * 1e3),
        "pid": os.getpid(),
        "verify": checked,
    }


def proc_entry(cfg_dict: dict[str, Any], n: int, offset: int, seed: int, conn: Any) -> None:
    """Client process entry point (spawned)."""
    cfg = LoadConfig(**cfg_dict)
    if cfg.cpus and hasattr(os, "sched_setaffinity"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, set(cfg.cpus))
    raise_fd_limit(n)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvicorn[standard] brings it
        pass

    def recv_start() -> float:
        msg = conn.recv()
        return float(msg[1])

    try:
        out = asyncio.run(proc_run(cfg, n, offset, seed, recv_start, conn.send))
        conn.send(("done", out))
    except Exception as exc:  # report, never hang the parent
        with contextlib.suppress(Exception):
            conn.send(("failed", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


# ------------------------------------------------------------------------------------------
# One run: spread sessions over processes, merge


def run_load(cfg: LoadConfig) -> dict[str, Any]:
    """N sessions for warm-up + duration seconds; the merged report (see ``format_report``)."""
    check_urls(cfg)
    nprocs = proc_count(cfg)
    ctx = mp.get_context("spawn")
    shares = [cfg.sessions // nprocs + (i < cfg.sessions % nprocs) for i in range(nprocs)]
    cfg_dict = asdict(cfg)
    procs = []
    conns = []
    offset = 0
    for i, share in enumerate(shares):
        parent, child = ctx.Pipe()
        p = ctx.Process(
            target=proc_entry,
            name=f"loadtest-{i}",
            daemon=True,
            args=(cfg_dict, share, offset, cfg.seed * 1000 + i, child),
        )
        p.start()
        child.close()
        procs.append(p)
        conns.append(parent)
        offset += share
    outs: list[dict[str, Any]] = []
    failures: list[str] = []
    try:
        # Connect phase: bounded by the handshakes each process has to do.
        deadline = time.monotonic() + 30 + cfg.connect_timeout * (1 + max(shares) / cfg.connect_concurrency)
        connected = 0
        for c in conns:
            msg = recv_until(c, deadline)
            if msg is None or msg[0] != "connected":
                failures.append(f"client process did not connect: {msg!r}"[:300])
                continue
            connected += msg[1]
        t0 = time.monotonic() + 0.2
        for c in conns:
            with contextlib.suppress(OSError):
                c.send(("start", t0))
        log(
            cfg,
            f"loadtest: {connected}/{cfg.sessions} sessions connected over {nprocs} "
            f"process(es); streaming {cfg.warmup:g} s warm-up + {cfg.duration:g} s",
        )
        deadline = t0 + cfg.warmup + cfg.duration + cfg.end_timeout + 30
        for c in conns:
            msg = recv_until(c, deadline)
            if msg is not None and msg[0] == "done":
                outs.append(msg[1])
            else:
                failures.append(f"client process failed: {msg!r}"[:300])
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    return merge(cfg, outs, failures)


def recv_until(conn: Any, deadline: float) -> Any:
    try:
        if conn.poll(max(0.0, deadline - time.monotonic())):
            return conn.recv()
    except (EOFError, OSError):
        return None
    return None
