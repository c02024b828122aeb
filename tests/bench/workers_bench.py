"""``--workers 2`` against ``--workers 1``, side by side in one run (indicative on a shared VM).

1. spread: bursts of concurrent sessions on a 2-worker server, counted per worker from
   each ``ready``'s ``"worker"``, for ``worker_socket=reuseport`` (the default) and
   ``shared`` (one socket every worker accepts from);
2. offline: two concurrent 10-minute clips through ``POST /v1/score``: audio seconds
   scored per wall second, and the 2-worker / 1-worker ratio (target >= 1.8x on 2 cores);
   also one clip alone and the server's CPU while the pairs score, since one worker
   already scores two clips on two threads. The kernel places each upload; the offline
   limits are server-wide counters, so two uploads on one worker still score at once;
3. streaming: N real-time sessions from ``lookback.loadtest``: the server's CPU seconds
   (supervisor and workers) per real-time session-second, 1 worker against 2 (target:
   within 10%), with the load generator's p99. On 2 cores the generator shares the CPUs,
   so the absolute capacity is client-bound here;
4. ``--ramp``: capacity at p99 <= 20 ms with 1 and 2 workers (slow; not in ``--quick``).

    python -m tests.bench.workers_bench [--quick] [--ramp] [--sessions 100] [--pairs 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import psutil
import soundfile as sf
from websockets.asyncio.client import connect

from lookback.loadtest.config import LoadConfig
from lookback.loadtest.fanout import run_load
from lookback.loadtest.ramp import ramp

REPO = Path(__file__).resolve().parents[2]
STORE = REPO / "model_store"
FIXTURE = REPO / "tests" / "fixtures" / "audio" / "silero_ref_speech.wav"


def log(text: str) -> None:
    print(f"[workers-bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def server(workers: int, **env: str) -> Iterator[tuple[str, psutil.Process]]:
    """``lookback serve --workers N`` on a free port; ready when ``/readyz`` says so."""
    port = free_port()
    full = {
        **os.environ,
        "LOOKBACK_MODEL_STORE": str(STORE),
        "LOOKBACK_PORT": str(port),
        "LOOKBACK_WORKERS": str(workers),
        "LOOKBACK_LOG_LEVEL": "warning",
        "LOOKBACK_MAX_SESSIONS": "4000",
        **env,
    }
    logf = tempfile.NamedTemporaryFile(prefix="workers-bench-", suffix=".log", delete=False)  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "lookback.cli", "serve"], env=full, stdout=logf, stderr=logf
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {Path(logf.name).read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("server not ready")
            time.sleep(0.05)  # readiness poll interval
        yield url, psutil.Process(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        logf.close()
        os.unlink(logf.name)


def tree_cpu(proc: psutil.Process) -> float:
    """CPU seconds of a process and its live children (the workers)."""
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


# -- 1. spread ---------------------------------------------------------------------------------


async def _burst(ws_url: str, n: int) -> list[int]:
    async def one() -> int:
        async with connect(f"{ws_url}/v1/stream?model=silero-vad", compression=None, proxy=None) as ws:
            ready = orjson.loads(await ws.recv())
            await ws.send('{"type":"end"}')
            async for _ in ws:
                pass
            return int(ready["worker"])

    return list(await asyncio.gather(*(one() for _ in range(n))))


def spread(bursts: int, size: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode in ("reuseport", "shared"):
        with server(2, LOOKBACK_WORKER_SOCKET=mode) as (url, _):
            rows = []
            for _ in range(bursts):
                placed = asyncio.run(_burst(url.replace("http", "ws"), size))
                rows.append([placed.count(0), placed.count(1)])
        out[mode] = rows
        log(f"spread {mode}: sessions per worker in each burst of {size}: {rows}")
    return out


# -- 2. offline --------------------------------------------------------------------------------


def clip_wav(seconds: float) -> bytes:
    data, rate = sf.read(str(FIXTURE), dtype="int16")
    n = int(seconds * rate)
    pcm = np.resize(data, n)
    buf = io.BytesIO()
    sf.write(buf, pcm, rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


async def _post_clip(port: int, body: bytes) -> float:
    """One ``POST /v1/score`` written by hand: an HTTP client library would spend more of
    the two shared CPUs than the upload is worth. Returns the request's wall seconds."""
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (
        "POST /v1/score HTTP/1.1\r\nHost: bench\r\nContent-Type: audio/wav\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    writer.write(head.encode() + body)
    await writer.drain()
    answer = await reader.read()
    writer.close()
    status = answer.split(b"\r\n", 1)[0]
    if b" 200 " not in status:
        raise RuntimeError(f"score failed: {answer[:300]!r}")
    return time.perf_counter() - t0


async def _score_at_once(port: int, body: bytes, n: int) -> tuple[float, list[float]]:
    t0 = time.perf_counter()
    each = await asyncio.gather(*(_post_clip(port, body) for _ in range(n)))
    return time.perf_counter() - t0, list(each)


def offline(seconds: float, rounds: int) -> dict[str, Any]:
    """Two concurrent clips per round, and one clip alone, on 1 and on 2 workers, with the
    server's CPU (supervisor and workers) while the pairs score: one worker scores two
    clips on two threads already, so "2 clips / 1 clip" says whether every core is used."""
    body = clip_wav(seconds)
    out: dict[str, Any] = {"clip_s": seconds, "rounds": rounds}
    for workers in (1, 2):
        with server(workers) as (url, proc):
            port = int(url.rsplit(":", 1)[1])
            asyncio.run(_score_at_once(port, clip_wav(2.0), 2))
            single = min(asyncio.run(_score_at_once(port, body, 1))[0] for _ in range(rounds))
            runs: list[dict[str, Any]] = []
            cpu0, t0 = tree_cpu(proc), time.perf_counter()
            for _ in range(rounds):
                wall, each = asyncio.run(_score_at_once(port, body, 2))
                runs.append({"wall_s": wall, "each_s": each, "x_realtime": 2 * seconds / wall})
                log(
                    f"offline workers={workers}: 2 x {seconds:.0f} s in {wall:.2f} s "
                    f"({2 * seconds / wall:.0f}x real time; one clip alone {seconds / single:.0f}x)"
                )
            cores = (tree_cpu(proc) - cpu0) / (time.perf_counter() - t0)
        best = max(r["x_realtime"] for r in runs)
        out[f"workers_{workers}"] = runs
        out[f"workers_{workers}_single_x_realtime"] = seconds / single
        out[f"workers_{workers}_pair_over_single"] = best / (seconds / single)
        out[f"workers_{workers}_server_cores"] = cores
    best = {w: max(r["x_realtime"] for r in out[f"workers_{w}"]) for w in (1, 2)}
    med = {w: float(np.median([r["x_realtime"] for r in out[f"workers_{w}"]])) for w in (1, 2)}
    out["ratio_best"] = best[2] / best[1]
    out["ratio_median"] = med[2] / med[1]
    return out


# -- 3. streaming CPU per session-second ---------------------------------------------------------


def _stream_once(workers: int, sessions: int, duration: float, warmup: float, model: str) -> dict[str, Any]:
    with server(workers) as (url, proc):
        cfg = LoadConfig(
            urls=[url.replace("http", "ws")],
            sessions=sessions,
            duration=duration,
            warmup=warmup,
            model=model,
            quiet=True,
        )
        c0, t0 = tree_cpu(proc), time.perf_counter()
        report = run_load(cfg)
        cpu, wall = tree_cpu(proc) - c0, time.perf_counter() - t0
    streamed = report["connected"] * (warmup + duration)
    row = {
        "workers": workers,
        "server_cpu_s": cpu,
        "wall_s": wall,
        "session_seconds": streamed,
        "cpu_per_session_s": cpu / streamed if streamed else None,
        "p99_ms": report["latency_ms"]["p99"],
        "lost_results": report["lost_results"],
        "client_cpu_total": report["client"]["cpu_total"],
    }
    log(
        f"streaming workers={workers}: {sessions} sessions, server {cpu:.2f} CPU-s for "
        f"{streamed:.0f} session-s = {cpu / max(streamed, 1e-9) * 1e3:.2f} ms CPU per session-s; "
        f"p99 {row['p99_ms']:.1f} ms"
    )
    return row


def streaming(sessions: int, duration: float, warmup: float, model: str, pairs: int) -> dict[str, Any]:
    """Alternating 1-worker and 2-worker runs (1,2 then 2,1 ...): the ratio is the median of pairs."""
    out: dict[str, Any] = {"sessions": sessions, "duration_s": duration, "model": model, "runs": []}
    ratios = []
    for i in range(pairs):
        order = (1, 2) if i % 2 == 0 else (2, 1)
        rows = {w: _stream_once(w, sessions, duration, warmup, model) for w in order}
        out["runs"] += [rows[1], rows[2]]
        a, b = rows[1]["cpu_per_session_s"], rows[2]["cpu_per_session_s"]
        if a and b:
            ratios.append(b / a)
    out["cpu_ratio_2_over_1_each"] = ratios
    out["cpu_ratio_2_over_1"] = float(np.median(ratios)) if ratios else None
    return out


def capacity(model: str, max_time: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for workers in (1, 2):
        with server(workers) as (url, _):
            cfg = LoadConfig(
                urls=[url.replace("http", "ws")], duration=4.0, warmup=1.0, model=model, quiet=True
            )
            res = ramp(cfg, start=64, max_time=max_time, max_trials=6)
            out[f"workers_{workers}"] = res.get("best")
            log(f"capacity workers={workers}: {res.get('best')} sessions at p99 <= 20 ms")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short clips and runs (a smoke test)")
    p.add_argument("--ramp", action="store_true", help="also the capacity ramps (minutes)")
    p.add_argument("--sessions", type=int, default=100)
    p.add_argument("--model", default="lookback-vad")
    p.add_argument("--pairs", type=int, default=3, help="streaming: 1-vs-2-worker pairs (median)")
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    report: dict[str, Any] = {"cpus": len(os.sched_getaffinity(0)), "note": "shared machine: indicative only"}
    report["spread"] = spread(bursts=2 if a.quick else 4, size=16 if a.quick else 40)
    report["offline"] = offline(60.0 if a.quick else 600.0, rounds=1 if a.quick else 3)
    off = report["offline"]
    log(
        f"offline 2 workers / 1 worker: best {off['ratio_best']:.2f}x, median {off['ratio_median']:.2f}x; "
        f"2 clips / 1 clip: {off['workers_1_pair_over_single']:.2f}x on 1 worker "
        f"({off['workers_1_server_cores']:.2f} cores), {off['workers_2_pair_over_single']:.2f}x on 2 "
        f"({off['workers_2_server_cores']:.2f} cores)"
    )
    report["streaming"] = streaming(
        a.sessions if not a.quick else 40,
        3.0 if a.quick else 10.0,
        1.0 if a.quick else 2.0,
        a.model,
        pairs=1 if a.quick else a.pairs,
    )
    log(f"streaming CPU per session-second, 2 workers / 1: {report['streaming']['cpu_ratio_2_over_1']:.3f}")
    if a.ramp:
        report["capacity"] = capacity(a.model, 120.0)
    text = json.dumps(report, indent=2, default=float)
    if a.json:
        a.json.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
