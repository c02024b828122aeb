"""Scale-out as in a cluster: Redis, three ``lookback serve`` processes, nginx in front.

nginx balances round-robin with no stickiness. A client streams a clip through it; the
test SIGKILLs whichever replica holds the session mid-stream; the client resumes through
nginx on another replica, replays from ``replay_from_sample`` and drops duplicate
results; the merged transcript equals the uninterrupted run's bit for bit, with the same
events. Then SIGTERM drains a replica holding a session: the session is snapshotted and
closed with 4100, and resumes elsewhere with nothing lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import redis.asyncio as aioredis
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from lookback.state_store import NEEDS_SNAPSHOT, WRITTEN, Put
from lookback.state_store.memory import MemoryStore
from lookback.state_store.redis import SECRET_KEY, RedisStore
from tests.api.resume_util import Inbox
from tests.api.ws_util import ws_connect
from tests.conftest import Spawned, spawn_server
from tests.fixtures_services import nginx_proxy, redis_server
from tests.support import free_port, read_clip

CLIP = read_clip("silero_ref_speech.wav")
PCM = CLIP[: len(CLIP) // 512 * 512].astype("<i2").tobytes()
MSG = 4 * 256


async def collect(ws: Any, into: list[dict[str, Any]]) -> None:
    with contextlib.suppress(ConnectionClosed):
        async for m in ws:
            into.append(orjson.loads(m))


async def send_pcm(ws: Any, pcm: bytes, end: bool = True) -> None:
    with contextlib.suppress(ConnectionClosed):
        for i in range(0, len(pcm), MSG):
            await ws.send(pcm[i : i + MSG])
        if end:
            await ws.send('{"type":"end"}')


def split(msgs: list[dict[str, Any]]) -> tuple[dict[int, str], list[dict[str, Any]]]:
    results = {m["step"]: orjson.dumps(m).decode() for m in msgs if m["type"] == "result"}
    return results, [m for m in msgs if m["type"] == "event"]


async def resume(url: str) -> tuple[Any, dict[str, Any]]:
    """What a client does: retry through the balancer until a replica takes the session."""
    deadline = time.monotonic() + 30
    while True:
        with contextlib.suppress(OSError, InvalidHandshake, ConnectionClosed):  # a replica or worker dying
            ws = await ws_connect(url)
            first = orjson.loads(await ws.recv())
            if first["type"] == "ready":
                return ws, first
            await ws.close()
            assert first["code"] == "resume_conflict", first  # the dead owner's lease
        assert time.monotonic() < deadline, "no replica resumed the session"
        await asyncio.sleep(0.1)  # client backoff between attempts


async def holder(replicas: list[Spawned]) -> Spawned:
    busy = []
    async with httpx.AsyncClient() as http:
        for r in replicas:
            if r.proc.poll() is None and (await http.get(r.url + "/readyz")).json()["sessions"]:
                busy.append(r)
    assert len(busy) == 1, "exactly one replica must hold the session"
    return busy[0]


async def run_with_fault(base: str, replicas: list[Spawned], cut: int, sig: signal.Signals) -> list[Any]:
    inbox = Inbox()
    got = inbox.msgs
    ws = await ws_connect(f"{base}?model=silero-vad&resumable=1")
    reader = asyncio.create_task(inbox.run(ws))
    await send_pcm(ws, PCM[: cut * MSG], end=False)
    durable = cut * MSG // 2
    await inbox.wait_for(lambda ms: any(m["type"] == "checkpoint" and m["samples"] == durable for m in ms))
    victim = await holder(replicas)
    # more audio right before the fault: not yet in a snapshot, so the client must replay it
    await send_pcm(ws, PCM[cut * MSG : (cut + 40) * MSG], end=False)
    victim.proc.send_signal(sig)
    await reader
    if sig == signal.SIGKILL:
        assert ws.close_code != 4100
    else:
        assert ws.close_code == 4100 and got[-1]["type"] == "checkpoint"
    token = next(m["resume_token"] for m in reversed(got) if m.get("resume_token"))
    results, events = split(got)
    nxt = max(results) + 1
    sent = (cut + 40) * MSG // 2
    ws2, ready = await resume(f"{base}?resume={token}&next_step={nxt}&sent={sent}")
    assert ready["resumed"] is True and ready["replay_from_sample"] <= sent
    more: list[dict[str, Any]] = [ready]
    reader = asyncio.create_task(collect(ws2, more))
    await send_pcm(ws2, PCM[ready["replay_from_sample"] * 2 :])
    await reader
    victim.proc.wait(timeout=30)
    r2, e2 = split(more)
    for step, text in r2.items():
        assert results.setdefault(step, text) == text, f"step {step} re-sent differently"
    dup = len(events) - ready["events_sent"]
    return [results, events + e2[dup:], more[-1]]


async def test_sigkill_and_drain_failover_through_nginx(tmp_path: Path, silero_model: str) -> None:
    env = {
        "LOOKBACK_MODELS": "silero-vad",
        "LOOKBACK_DEFAULT_MODEL": "silero-vad",
        "LOOKBACK_SNAPSHOT_INTERVAL_S": "0.1",
        "LOOKBACK_RESUME_LEASE_S": "1.0",
        "LOOKBACK_DRAIN_GRACE_S": "10",
    }
    with contextlib.ExitStack() as stack:
        redis_url = stack.enter_context(redis_server(tmp_path))
        env["LOOKBACK_STATE_STORE"] = redis_url
        replicas = [stack.enter_context(spawn_server(tmp_path, **env)) for _ in range(3)]
        async with httpx.AsyncClient() as http:
            for r in replicas:
                ready = (await http.get(r.url + "/readyz")).json()
                assert ready["resume"] == {"store": "redis", "available": True}
        base = stack.enter_context(nginx_proxy(tmp_path, [int(r.url.rsplit(":", 1)[1]) for r in replicas]))
        base = base.replace("http://", "ws://") + "/v1/stream"

        ref: list[dict[str, Any]] = []
        async with ws_connect(f"{base}?model=silero-vad&resumable=1") as ws:
            reader = asyncio.create_task(collect(ws, ref))
            await send_pcm(ws, PCM)
            await reader
        ref_results, ref_events = split(ref)
        ref_summary = {k: v for k, v in ref[-1].items() if k != "session_id"}
        assert ref_events and ref_summary["steps"] == len(PCM) // 1024

        for sig, cut in ((signal.SIGKILL, 150), (signal.SIGTERM, 90)):
            results, events, summary = await run_with_fault(base, replicas, cut, sig)
            assert results == ref_results, f"{sig.name}: results differ"
            assert events == ref_events, f"{sig.name}: events differ"
            assert {k: v for k, v in summary.items() if k != "session_id"} == ref_summary
            alive = [r for r in replicas if r.proc.poll() is None]
            assert len(alive) == len(replicas) - 1
            replicas = alive


async def test_redis_store_semantics(tmp_path: Path) -> None:
    with redis_server(tmp_path) as url:
        store = RedisStore(url, window_s=0.3, lease_s=5, tomb_s=60)
        await store.start()
        assert store.available
        assert await store.claim("nope", "a") == ("unknown", None)
        assert await store.sync([Put("s1", "a", b"snap")]) == [True]
        assert await store.sync([Put("s1", "b", b"other")]) == [False]  # a's lease
        assert await store.claim("s1", "b") == ("conflict", None)
        assert await store.sync([Put("s1", "a", None, release=True)]) == [True]
        assert await store.claim("s1", "b") == ("ok", b"snap")
        assert await store.consume("s1", "s2", "b", b"snap2")
        assert await store.claim("s1", "c") == ("used", None)
        assert await store.sync([Put("s1", "a", b"stale")]) == [False]  # used: never revived
        assert await store.sync([Put("s3", "a", b"x", release=True)]) == [True]
        await asyncio.sleep(0.4)  # the resume window itself is what is under test
        assert await store.claim("s3", "b") == ("expired", None)
        await store.stop()


async def test_redis_down_at_start_then_back_then_lost_mid_stream(tmp_path: Path, silero_model: str) -> None:
    """No Redis at start: the server serves without resume and says so (readyz, metric).
    Redis comes: the open session gets its token in a checkpoint. Redis dies mid-stream:
    the session keeps streaming to a correct summary."""
    port = free_port()
    env = {
        "LOOKBACK_MODELS": "silero-vad",
        "LOOKBACK_DEFAULT_MODEL": "silero-vad",
        "LOOKBACK_STATE_STORE": f"redis://127.0.0.1:{port}/0",
        "LOOKBACK_SNAPSHOT_INTERVAL_S": "0.1",
    }
    with spawn_server(tmp_path, **env) as srv:
        async with httpx.AsyncClient(base_url=srv.url) as http:
            r = await http.get("/readyz")
            assert r.status_code == 200 and r.json()["resume"] == {"store": "redis", "available": False}
            assert 'lookback_state_store_up{kind="redis"} 0.0' in (await http.get("/metrics")).text
            inbox = Inbox()
            async with ws_connect(f"{srv.ws}/v1/stream?model=silero-vad&resumable=1") as ws:
                reader = asyncio.create_task(inbox.run(ws))
                await send_pcm(ws, PCM[: 20 * MSG], end=False)
                await inbox.wait_for(lambda ms: len(ms) >= 21)
                assert inbox.msgs[0]["resume_token"] is None
                with redis_server(tmp_path, port=port):
                    await send_pcm(ws, PCM[20 * MSG : 40 * MSG], end=False)
                    await inbox.wait_for(lambda ms: any(m.get("resume_token") for m in ms[1:]), within=30)
                    assert (await http.get("/readyz")).json()["resume"]["available"] is True
                # Redis gone: streaming goes on
                await send_pcm(ws, PCM[40 * MSG : 80 * MSG])
                await reader
            assert inbox.msgs[-1]["type"] == "summary" and inbox.msgs[-1]["steps"] == 80 * MSG // 1024
            steps = [m["step"] for m in inbox.msgs if m["type"] == "result"]
            assert steps == list(range(80 * MSG // 1024))
            deadline = time.monotonic() + 10
            while (await http.get("/readyz")).json()["resume"]["available"]:
                # readiness poll: the server notices the lost store within about a second
                assert time.monotonic() < deadline, "readyz never reported the lost store"
                await asyncio.sleep(0.05)
            assert 'lookback_state_store_up{kind="redis"} 0.0' in (await http.get("/metrics")).text


async def resume_on(replica: Spawned, token: str, **q: int) -> tuple[Any, dict[str, Any]]:
    """Resume on one replica, retrying what a client retries: the old owner's lease, a
    store not reached yet, a secret the replicas have not re-offered yet."""
    extra = "".join(f"&{k}={v}" for k, v in q.items())
    deadline = time.monotonic() + 30
    while True:
        ws = await ws_connect(f"{replica.ws}/v1/stream?resume={token}{extra}")
        first = orjson.loads(await ws.recv())
        if first["type"] == "ready":
            return ws, first
        await ws.close()
        assert first["code"] in ("resume_conflict", "resume_unavailable", "resume_secret_rotated"), first
        assert time.monotonic() < deadline, f"{replica.url} never resumed the session: {first}"
        await asyncio.sleep(0.1)  # client backoff between attempts


async def durable_then_dropped(ws: Any, inbox: Inbox, reader: Any, pcm: bytes, samples: int) -> None:
    await send_pcm(ws, pcm, end=False)
    await inbox.wait_for(lambda ms: any(m["type"] == "checkpoint" and m["samples"] == samples for m in ms))
    ws.transport.abort()
    await reader


async def test_resumes_across_replicas_survive_an_empty_redis_restart(
    tmp_path: Path, silero_model: str
) -> None:
    """Redis without persistence restarts empty mid-run and a replica born in the gap
    sets a new shared secret. Tokens issued before still resume on every replica (the
    replicas re-offer their secrets), and tokens issued after resume across replicas too."""
    port = free_port()
    env = {
        "LOOKBACK_MODELS": "silero-vad",
        "LOOKBACK_DEFAULT_MODEL": "silero-vad",
        "LOOKBACK_SNAPSHOT_INTERVAL_S": "0.1",
        "LOOKBACK_RESUME_LEASE_S": "1.0",
        "LOOKBACK_STATE_STORE": f"redis://127.0.0.1:{port}/0",
    }
    with contextlib.ExitStack() as stack:
        first_redis = redis_server(tmp_path, port=port)
        first_redis.__enter__()
        a, b = (stack.enter_context(spawn_server(tmp_path, **env)) for _ in range(2))
        inbox = Inbox()
        ws = await ws_connect(f"{a.ws}/v1/stream?model=silero-vad&resumable=1")
        reader = asyncio.create_task(inbox.run(ws))
        await send_pcm(ws, PCM[: 30 * MSG], end=False)
        await inbox.wait_for(
            lambda ms: any(m["type"] == "checkpoint" and m["samples"] == 30 * MSG // 2 for m in ms)
        )
        token = inbox.msgs[0]["resume_token"]
        assert token

        first_redis.__exit__(None, None, None)  # Redis gone, and back empty on the same port
        (tmp_path / "again").mkdir()
        stack.enter_context(redis_server(tmp_path / "again", port=port))
        newborn = aioredis.from_url(env["LOOKBACK_STATE_STORE"])
        assert await newborn.set(SECRET_KEY, b"n" * 32, nx=True)  # what a replica starting now does
        await newborn.aclose()
        c = stack.enter_context(spawn_server(tmp_path, **env))

        await durable_then_dropped(ws, inbox, reader, PCM[30 * MSG : 40 * MSG], 40 * MSG // 2)

        # a token of before the restart, on the replica that never saw the old store
        ws, ready = await resume_on(c, token, sent=40 * MSG // 2)
        assert ready["resumed"] is True and ready["replay_from_sample"] == 40 * MSG // 2
        inbox = Inbox([ready])
        reader = asyncio.create_task(inbox.run(ws))
        await durable_then_dropped(ws, inbox, reader, PCM[40 * MSG : 60 * MSG], 60 * MSG // 2)
        # a token issued after it (the new shared secret), on another replica
        ws, ready = await resume_on(b, ready["resume_token"])
        assert ready["replay_from_sample"] == 60 * MSG // 2
        more: list[dict[str, Any]] = []
        reader = asyncio.create_task(collect(ws, more))
        await send_pcm(ws, PCM[60 * MSG : 80 * MSG])
        await reader
        assert more[-1]["type"] == "summary" and more[-1]["steps"] == 80 * MSG // 1024


async def test_a_lease_renewal_asks_for_the_snapshot_a_store_lost(tmp_path: Path) -> None:
    """An idle session only renews its lease; if the store lost its snapshot (restarted
    empty, or the window passed) the renewal says so, and the next turn writes one."""
    with redis_server(tmp_path) as url:
        store = RedisStore(url, window_s=60, lease_s=5, tomb_s=60)
        await store.start()
        assert await store.sync([Put("s1", "a", b"snap")]) == [WRITTEN]
        assert await store.sync([Put("s1", "a", None)]) == [WRITTEN]
        await store._r.flushall()  # what a restart without persistence leaves
        assert await store.sync([Put("s1", "a", None)]) == [NEEDS_SNAPSHOT]
        assert await store.sync([Put("s1", "a", b"snap")]) == [WRITTEN]
        assert await store.claim("s1", "a") == ("ok", b"snap")
        await store.stop()
    memory = MemoryStore(window_s=0.05, lease_s=5, tomb_s=60)
    assert await memory.sync([Put("s1", "a", b"snap")]) == [WRITTEN]
    await asyncio.sleep(0.1)  # the resume window itself is what is under test
    assert await memory.sync([Put("s1", "a", None)]) == [NEEDS_SNAPSHOT]
