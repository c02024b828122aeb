"""Broker sources benchmark: devices per core at real time, Redis Streams vs WebSockets.

For each device count N, the same audio is streamed at real time in messages of
``--frames-per-message`` frames (a) as N devices publishing to Redis Streams, scored by a
``lookback consume`` process, and (b) as N WebSocket sessions (``lookback loadtest``'s
client) to a ``lookback serve`` process. Both servers are pinned to one CPU and run model
calls inline; the clients run on the other CPUs. A run "keeps up" when its p99 latency is
within ``--p99-ms`` and every message was scored. Latency: for Redis, from the
producer's timestamp in the entry to the result entry's id (Redis server clock, ms);
for WebSockets, from sending a frame to receiving its result.

Figures from a shared, loaded machine are indicative only.

    python -m tests.bench.sources_bench [--devices 50,100,200,400] [--seconds 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
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
import redis.asyncio as aioredis

from lookback.loadtest.config import LoadConfig
from lookback.loadtest.fanout import run_load
from lookback.sources.redis_streams import partition_of, stream_key

REPO = Path(__file__).resolve().parents[2]
STORE = REPO / "model_store"
PARTITIONS = 16
STREAM = "bench:audio"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pin(cpu: int) -> Any:
    return lambda: os.sched_setaffinity(0, {cpu})


def _env(**extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(REPO / "service"),
        "LOOKBACK_MODEL_STORE": str(STORE),
        "LOOKBACK_MODELS": "lookback-vad",
        "LOOKBACK_MODEL_CALLS": "inline",
        "LOOKBACK_LOG_LEVEL": "warning",
        "LOOKBACK_MAX_SESSIONS": "4096",
        **extra,
    }


def _wait(cond: Any, what: str, limit: float = 60.0) -> None:
    deadline = time.monotonic() + limit
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not become ready")
        time.sleep(0.05)  # readiness poll


@contextlib.contextmanager
def redis_server(tmp: Path) -> Iterator[str]:
    port = _free_port()
    proc = subprocess.Popen(
        [
            shutil.which("redis-server") or "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(tmp),
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
        preexec_fn=_pin(1 % (os.cpu_count() or 1)),
    )

    def up() -> bool:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
        return False

    try:
        _wait(up, "redis-server")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@contextlib.contextmanager
def lookback(
    args: list[str], env: dict[str, str], log: Path, ready: Any
) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lookback.cli", *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            preexec_fn=_pin(0),
        )
    try:
        _wait(lambda: proc.poll() is None and ready(), f"lookback {args[0]}")
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def clip() -> np.ndarray:
    import soundfile as sf

    data, _ = sf.read(str(REPO / "tests/fixtures/audio/lookback_speech_noise.wav"), dtype="int16")
    return np.asarray(data, "<i2")


def drain_settings(n: int) -> Any:
    """Settings of a one-core engine for ``n`` devices draining a backlog (calls inline)."""
    from lookback.settings import Settings

    return Settings(
        _env_file=None,
        model_store=STORE,
        models=["lookback-vad"],
        model_calls="inline",
        warmup_batch_sizes=[1, 64],
        max_sessions=max(n, 16),
        gc_freeze=False,
    )


async def redis_run(
    url: str, n: int, seconds: float, fpm: int, run: str, audio: np.ndarray
) -> dict[str, Any]:
    """N devices at real time for ``seconds``; publish->result latency of every message."""
    r = aioredis.from_url(url)
    period = fpm * 128 / 16000
    ticks = int(seconds / period)
    devices = [f"{run}-{i:05d}" for i in range(n)]
    keys = {d: stream_key(STREAM, partition_of(d, PARTITIONS)) for d in devices}
    sent: dict[tuple[str, int], float] = {}
    step = fpm * 128
    out_key = "bench:results"
    start_id = (await r.xinfo_stream(out_key))["last-generated-id"] if await r.exists(out_key) else b"0-0"
    t0 = time.monotonic() + 0.2
    slip = []
    for k in range(ticks):
        at = t0 + k * period
        now = time.monotonic()
        if at > now:
            await asyncio.sleep(at - now)  # the real-time schedule
        slip.append(time.monotonic() - at)
        pipe = r.pipeline(transaction=False)
        ts = time.time()
        for i, d in enumerate(devices):
            off = ((i * 7919 + k) * step) % (len(audio) - step)
            pipe.xadd(
                keys[d], {"device": d, "seq": k, "audio": audio[off : off + step].tobytes(), "ts": repr(ts)}
            )
            sent[(d, k)] = ts
        await pipe.execute()
    expected = n * ticks
    got: dict[tuple[str, int], float] = {}
    deadline = time.monotonic() + 15
    last = start_id
    while len(got) < expected and time.monotonic() < deadline:
        res: Any = await r.xread({out_key: last}, count=5000, block=200)
        for _, entries in res or ():
            for eid, f in entries:
                last = eid
                d = f[b"device"].decode()
                if d.startswith(run + "-") and f[b"seq"]:  # (an idle close's summary has no seq)
                    got[(d, int(f[b"seq"]))] = int(eid.split(b"-")[0]) / 1000.0
    await r.aclose()
    lat = np.array([(got[key] - sent[key]) * 1e3 for key in got])
    return {
        "devices": n,
        "messages": expected,
        "scored": len(got),
        "p50_ms": float(np.percentile(lat, 50)) if lat.size else None,
        "p99_ms": float(np.percentile(lat, 99)) if lat.size else None,
        "producer_slip_p99_ms": float(np.percentile(slip, 99) * 1e3) if slip else None,
    }


async def drain_run(url: str, n: int, msgs: int, fpm: int, audio: np.ndarray) -> dict[str, Any]:
    """CPU cost of the consumer: drain a pre-filled backlog in this process (one core).

    CPU seconds, unlike wall-clock latency, say little about the other tenants of a
    shared machine, so this is the steadier figure: devices per core ~= 1 / (CPU seconds
    per device-second of audio).
    """
    from lookback.engine.engine import Engine
    from lookback.metrics import Metrics
    from lookback.sources.core import SourceOptions
    from lookback.sources.redis_streams import RedisStreamsSource

    r = aioredis.from_url(url)
    stream = f"drain{fpm}:audio"
    step = fpm * 128
    pipe = r.pipeline(transaction=False)
    for k in range(msgs):
        for i in range(n):
            d = f"d{fpm}-{i:05d}"
            off = ((i * 7919 + k) * step) % (len(audio) - step)
            pipe.xadd(
                stream_key(stream, partition_of(d, 4)),
                {"device": d, "seq": k, "audio": audio[off : off + step].tobytes()},
            )
    await pipe.execute()
    await r.aclose()
    settings = drain_settings(n)
    metrics = Metrics()
    engine = Engine(settings, metrics)
    await engine.start()
    src = RedisStreamsSource(
        f"{url}?stream={stream}&partitions=4&group=g&consumer=c&output=drain:results",
        engine,
        SourceOptions.from_settings(settings),
        metrics,
        lease_s=5,
        checkpoint_ttl_s=60,
    )
    want = n * msgs
    labels = {"source": f"redis:{stream}", "outcome": "scored", "reason": ""}
    t0, c0 = time.perf_counter(), time.process_time()
    await src.start()
    while (metrics.registry.get_sample_value("lookback_source_messages_total", labels) or 0) < want:  # noqa: ASYNC110
        await asyncio.sleep(0.02)  # poll the counter
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    await src.stop()
    await engine.stop()
    audio_s = want * step / 16000
    return {
        "devices": n,
        "frames_per_message": fpm,
        "messages": want,
        "wall_s": wall,
        "cpu_s": cpu,
        "cpu_us_per_message": cpu / want * 1e6,
        "cpu_us_per_step": cpu / (want * fpm) * 1e6,
        "devices_per_core_cpu": audio_s / cpu,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", default="50,100,200,400")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--frames-per-message", type=int, default=8)
    ap.add_argument("--p99-ms", type=float, default=100.0)
    ap.add_argument("--skip-ws", action="store_true")
    ap.add_argument("--skip-realtime", action="store_true", help="only the CPU drain figures")
    ap.add_argument("--json")
    args = ap.parse_args()
    counts = [int(x) for x in args.devices.split(",")]
    fpm = args.frames_per_message
    audio = clip()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmpd:
        tmp = Path(tmpd)
        with redis_server(tmp) as url:
            for dfpm in sorted({fpm, 32}):
                rows.append(
                    {"transport": "redis-streams-drain", **asyncio.run(drain_run(url, 100, 20, dfpm, audio))}
                )
                print(json.dumps(rows[-1]), flush=True)
            if args.skip_realtime:
                counts = []
            src = f"{url}?stream={STREAM}&partitions={PARTITIONS}&group=bench&consumer=c&output=bench:results"
            log = tmp / "consume.log"
            env = _env(LOOKBACK_SOURCE_IDLE_TIMEOUT_S="2")
            with lookback(["consume", src], env, log, lambda: b"ready" in log.read_bytes()):
                for n in counts:
                    res = asyncio.run(redis_run(url, n, args.seconds, fpm, f"r{n}", audio))
                    res["keeps_up"] = (
                        res["scored"] == res["messages"] and (res["p99_ms"] or 1e9) <= args.p99_ms
                    )
                    rows.append({"transport": "redis-streams", **res})
                    print(json.dumps(rows[-1]), flush=True)
                    time.sleep(2.5)  # let the idle devices of this run close before the next
        if not args.skip_ws and counts:
            port = _free_port()
            base = f"http://127.0.0.1:{port}"

            def ready() -> bool:
                with contextlib.suppress(httpx.HTTPError):
                    return httpx.get(base + "/readyz", timeout=1).status_code == 200
                return False

            env = _env(LOOKBACK_PORT=str(port), LOOKBACK_SHED_BACKLOG_STEPS="1000000")
            with lookback(["serve"], env, tmp / "serve.log", ready):
                for n in counts:
                    cfg = LoadConfig(
                        urls=[base.replace("http", "ws")],
                        sessions=n,
                        duration=args.seconds,
                        warmup=1.0,
                        frames_per_message=fpm,
                        p99_ms=args.p99_ms,
                        cpus=[c for c in range(1, os.cpu_count() or 2)] or None,
                        quiet=True,
                    )
                    rep = run_load(cfg)
                    lat = rep["latency_ms"]
                    rows.append(
                        {
                            "transport": "websocket",
                            "devices": n,
                            "p50_ms": lat["p50"],
                            "p99_ms": lat["p99"],
                            "keeps_up": bool(rep["passed"]),
                            "client_bottleneck": rep["client"]["bottleneck"],
                        }
                    )
                    print(json.dumps(rows[-1]), flush=True)
    best = {
        t: max((r["devices"] for r in rows if r["transport"] == t and r["keeps_up"]), default=0)
        for t in ("redis-streams", "websocket")
    }
    summary = {"frames_per_message": fpm, "p99_bound_ms": args.p99_ms, "devices_per_core": best, "rows": rows}
    print(f"devices per core at real time (p99 <= {args.p99_ms:g} ms): {best}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
