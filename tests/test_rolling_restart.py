"""Rolling restart under load: Redis, three replicas behind nginx, 50 real-time sessions.

Each replica in turn gets SIGTERM (its sessions are snapshotted and closed with 4100),
exits, and is started again on the same port, while 50 ``LookbackClient`` sessions stream
the same clip in real time through nginx and resume by themselves. Every session must end
with exactly the uninterrupted run's results and events; the longest gap a client saw
between two results is printed (and bounded loosely: this machine is shared).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from lookback.client import LookbackClient, frames_of
from tests.fixtures_services import nginx_proxy, redis_server, start_lookback
from tests.support import free_port, read_clip

SESSIONS = 50
CLIP = read_clip("silero_ref_speech.wav")


def norm(msgs: list[dict[str, Any]]) -> list[bytes]:
    drop = ("session_id", "resume_token")
    return [orjson.dumps({k: v for k, v in m.items() if k not in drop}) for m in msgs[1:]]


async def test_rolling_restart_with_50_realtime_sessions(tmp_path: Path, silero_model: str) -> None:
    audio = np.concatenate([CLIP, CLIP])  # ~20 s: outlasts three restarts
    messages = frames_of(audio, 4)
    env = {
        "LOOKBACK_MODELS": "silero-vad",
        "LOOKBACK_DEFAULT_MODEL": "silero-vad",
        "LOOKBACK_SNAPSHOT_INTERVAL_S": "0.25",
        "LOOKBACK_RESUME_LEASE_S": "1.0",
        "LOOKBACK_DRAIN_GRACE_S": "10",
    }
    ports = [free_port() for _ in range(3)]
    procs: list[Any] = []
    with contextlib.ExitStack() as stack:
        env["LOOKBACK_STATE_STORE"] = stack.enter_context(redis_server(tmp_path))
        stack.callback(lambda: [p.kill() for p in procs if p.poll() is None])
        for port in ports:
            procs.append(await asyncio.to_thread(start_lookback, tmp_path, port, env))
        base = stack.enter_context(nginx_proxy(tmp_path, ports))
        ref = [m async for m in LookbackClient(base).stream(messages, model="silero-vad")]
        assert ref[-1]["type"] == "summary"

        gaps: list[float] = []

        async def one(i: int) -> tuple[list[dict[str, Any]], int]:
            client = LookbackClient(base)
            await asyncio.sleep(i * 0.01)  # stagger the starts over half a second
            out, last = [], time.monotonic()
            async for m in client.stream(messages, model="silero-vad", realtime=True):
                if m["type"] == "result":
                    now = time.monotonic()
                    gaps.append(now - last)
                    last = now
                out.append(m)
            return out, client.resumes

        runs = asyncio.gather(*(one(i) for i in range(SESSIONS)))
        await asyncio.sleep(2.0)  # let every session stream a while before the first restart
        for k, port in enumerate(ports):
            procs[k].send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(procs[k].wait, 30) == 0
            procs[k] = await asyncio.to_thread(start_lookback, tmp_path, port, env)
        results = await runs
    want = norm(ref)
    for out, _ in results:
        assert norm(out) == want
    resumes = sum(r for _, r in results)
    assert resumes >= SESSIONS // 3, "the restarts must have moved sessions"
    print(f"\n{SESSIONS} sessions, {resumes} resumes, longest gap between results {max(gaps):.2f}s")
    assert max(gaps) < 15
