"""Sessions that survive: snapshot size, snapshot cost, failover time.

1. Snapshot size per session for each shipped model (engine state alone, and with the
   API's tail of recent results that a snapshot also carries).
2. Snapshot cost: taking + encoding one idle session's snapshot (on the event loop), and
   one pipelined checkpoint round of N sessions to a real redis-server.
3. Failover: Redis + two ``lookback serve`` replicas; a session streams in real time to
   replica A; A is SIGKILLed; the client resumes on B (retrying while the dead owner's
   lease runs out). Time from SIGKILL to the first result from B, p50 and max.

    python -m tests.bench.sessions_bench [--trials 20] [--sessions 1000] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from lookback.engine.engine import Engine
from lookback.state_store import Put
from lookback.state_store.redis import RedisStore
from tests.api.ws_util import ws_connect
from tests.conftest import spawn_server, test_settings
from tests.engine.engine_support import Collect
from tests.fixtures_services import redis_server
from tests.support import read_clip

CLIP = read_clip("silero_ref_speech.wav")


async def snapshot_figures(n_sessions: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    engine = Engine(test_settings(models=[], max_sessions=n_sessions + 8))
    await engine.start()
    try:
        for key, handle in engine.models.items():
            sessions = [engine.open_session(handle, Collect()) for _ in range(n_sessions)]
            pcm = CLIP[: 2 * 16000 // 512 * 512].astype("<i2").tobytes()
            for s in sessions[:50]:
                for i in range(0, len(pcm), 1024):
                    await s.wait_for_room(1024)
                    s.push(pcm[i : i + 1024])
            for s in sessions:
                await s.wait_idle()
            blobs = [s.snapshot({"results": "all"}) for s in sessions[:1]]
            t0 = time.perf_counter()
            for s in sessions:
                s.snapshot({"results": "all"})
            per = (time.perf_counter() - t0) / n_sessions
            # the API adds the results of the last two checkpoint intervals (0.25 s each), as
            # on_result's (step, time, scores, events) tuples
            n_tail = int(0.5 * handle.spec.sample_rate / handle.spec.hop_samples)
            row = (123, 1.504, [0.1234567890123] * len(handle.spec.labels), None)
            tail = len(orjson.dumps([row] * n_tail))
            out[key] = {
                "snapshot_bytes": len(blobs[0]),
                "with_result_tail_bytes": len(blobs[0]) + tail,
                "take_encode_us": round(per * 1e6, 1),
            }
            for s in sessions:
                s.close()
    finally:
        await engine.stop()
    return out


async def redis_round(url: str, n: int, size: int) -> dict[str, float]:
    store = RedisStore(url, window_s=120, lease_s=2, tomb_s=3600)
    await store.start()
    data = b"x" * size
    times = []
    for r in range(10):
        puts = [Put(f"bench{r % 2}-{i}", "owner", data) for i in range(n)]
        t0 = time.perf_counter()
        await store.sync(puts)
        times.append(time.perf_counter() - t0)
    await store.stop()
    return {"sessions": n, "bytes_each": size, "round_ms_p50": round(statistics.median(times) * 1e3, 2)}


async def failover_trial(url_a: str, url_b: str, kill: Any) -> float:
    pcm = CLIP.astype("<i2").tobytes()
    got: list[dict[str, Any]] = []
    ws = await ws_connect(f"{url_a}/v1/stream?model=silero-vad&resumable=1")
    ready = orjson.loads(await ws.recv())
    token = ready["resume_token"]

    async def read() -> None:
        nonlocal token
        with contextlib.suppress(Exception):
            async for m in ws:
                msg = orjson.loads(m)
                got.append(msg)
                token = msg.get("resume_token") or token

    reader = asyncio.create_task(read())
    for i in range(0, 16000 * 2, 1024):  # 1 s of audio in real time
        await ws.send(pcm[i : i + 1024])
        await asyncio.sleep(512 / 16000 / 2)
    t_kill = time.perf_counter()
    kill()
    await reader
    steps = [m["step"] for m in got if m["type"] == "result"]
    while True:
        ws2 = await ws_connect(
            f"{url_b}/v1/stream?model=silero-vad&resume={token}&next_step={max(steps) + 1}"
        )
        first = orjson.loads(await ws2.recv())
        if first["type"] == "ready":
            break
        await ws2.close()
        if first["code"] != "resume_conflict":
            raise RuntimeError(f"resume refused: {first}")
        await asyncio.sleep(0.05)  # client backoff while the dead owner's lease runs out
    n = first["replay_from_sample"]
    await ws2.send(pcm[n * 2 : n * 2 + 4096])
    while orjson.loads(await ws2.recv())["type"] != "result":
        pass
    dt = time.perf_counter() - t_kill
    await ws2.close()
    return dt


async def failover_figures(trials: int, tmp: Path) -> dict[str, Any]:
    env = {
        "LOOKBACK_MODELS": "silero-vad",
        "LOOKBACK_DEFAULT_MODEL": "silero-vad",
        "LOOKBACK_RESUME_LEASE_S": "1.0",
    }
    times = []
    with redis_server(tmp) as url:
        env["LOOKBACK_STATE_STORE"] = url
        with spawn_server(tmp, **env) as b:
            for _ in range(trials):
                with spawn_server(tmp, **env) as a:
                    times.append(
                        await failover_trial(a.ws, b.ws, lambda a=a: a.proc.send_signal(signal.SIGKILL))
                    )
    return {
        "trials": trials,
        "lease_s": 1.0,
        "sigkill_to_first_result_s_p50": round(statistics.median(times), 3),
        "max_s": round(max(times), 3),
    }


def capacity_figures(tmp: Path, redis_url: str, sessions: int, seconds: float) -> dict[str, Any]:
    """The same real-time load with and without checkpoints to Redis every 250 ms."""
    from lookback.loadtest.config import LoadConfig
    from lookback.loadtest.fanout import run_load
    from tests.support import AUDIO

    env = {
        "LOOKBACK_MODELS": "silero-vad",
        "LOOKBACK_DEFAULT_MODEL": "silero-vad",
        "LOOKBACK_STATE_STORE": redis_url,
        "LOOKBACK_SNAPSHOT_INTERVAL_S": "0.25",
        "LOOKBACK_MAX_SESSIONS": str(sessions + 16),
    }
    out: dict[str, Any] = {}
    with spawn_server(tmp, **env) as srv:
        order = (("with_snapshots", True), ("without", False), ("with_snapshots_again", True))
        for label, resumable in order:
            cfg = LoadConfig(
                urls=[srv.ws],
                sessions=sessions,
                duration=seconds,
                warmup=2.0,
                wav=str(AUDIO / "silero_ref_speech.wav"),
                model="silero-vad",
                frames_per_message=4,
                resumable=resumable,
                quiet=True,
            )
            r = run_load(cfg)
            lat = r["latency_ms"]
            out[label] = {
                "p50_ms": lat["p50"],
                "p99_ms": lat["p99"],
                "results_per_s": round(r["results_per_s"]),
                "lost_results": r["lost_results"],
                "errors": r["errors"],
                "client_bottleneck": r["client"]["bottleneck"],
            }
    return out


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--sessions", type=int, default=1000)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--load-sessions", type=int, default=200, help="real-time sessions for the latency A/B")
    ap.add_argument("--load-seconds", type=float, default=8.0)
    args = ap.parse_args()
    report: dict[str, Any] = {"snapshot": await snapshot_figures(args.sessions)}
    print(json.dumps(report, indent=1), flush=True)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        with redis_server(tmp) as url:
            size = int(np.mean([v["snapshot_bytes"] for v in report["snapshot"].values()]))
            report["redis_checkpoint_round"] = await redis_round(url, args.sessions, size)
            print(json.dumps(report["redis_checkpoint_round"]), flush=True)
            report["load_ab"] = await asyncio.to_thread(
                capacity_figures, tmp, url, args.load_sessions, args.load_seconds
            )
            print(json.dumps(report["load_ab"]), flush=True)
        report["failover"] = await failover_figures(args.trials, tmp)
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    asyncio.run(main())
