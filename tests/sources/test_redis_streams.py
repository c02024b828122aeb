"""Redis Streams source against a real redis-server and real ``lookback consume`` processes."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import redis.asyncio as aioredis

from lookback.sources.redis_streams import publish
from tests.sources.conftest import Broker, Consumer
from tests.sources.support import by_device, device_audio, messages, parse_records, solo_reference

PARTITIONS = 8


async def _read_all(r: aioredis.Redis, key: str) -> list[tuple[bytes, dict[bytes, bytes]]]:
    out: list[tuple[bytes, dict[bytes, bytes]]] = []
    start = "-"
    while True:
        chunk = await r.xrange(key, min=start, count=2000)
        if start != "-":
            chunk = chunk[1:]
        if not chunk:
            return out
        out.extend(chunk)
        start = chunk[-1][0].decode()


async def _results(r: aioredis.Redis) -> dict[str, list[dict]]:
    entries = await _read_all(r, "lookback:results")
    return by_device([(f[b"device"].decode(), parse_records(f[b"records"])) for _, f in entries])


async def _writers(r: aioredis.Redis) -> dict[str, set[str]]:
    """Which consumers published each device's results."""
    out: dict[str, set[str]] = {}
    for _, f in await _read_all(r, "lookback:results"):
        out.setdefault(f[b"device"].decode(), set()).add(f[b"by"].decode())
    return out


async def test_many_devices_two_consumers_one_killed_exactly_once(
    redis_broker: Broker, consumers: list[Consumer], tmp_path: Path
) -> None:
    n_devices, frames, fpm = 200, 200, 20  # 1.6 s of audio per device, 10 messages each
    audios = device_audio(n_devices, frames)
    reference = await solo_reference(audios)
    url = f"{redis_broker.url}?stream=t:audio&partitions={PARTITIONS}&group=g"
    env = {"LOOKBACK_SOURCE_LEASE_S": "1.0"}
    a = Consumer(url + "&consumer=a", tmp_path / "a.log", **env)
    b = Consumer(url + "&consumer=b", tmp_path / "b.log", **env)
    consumers += [a, b]
    a.start()
    b.start()
    r = aioredis.from_url(redis_broker.url)
    try:
        # both consumers hold partitions before audio flows, so the kill hits live work
        deadline = time.monotonic() + 30
        while True:
            owners = {await r.get(f"t:audio:{p}:owner") for p in range(PARTITIONS)}
            if owners == {b"a", b"b"}:
                break
            assert time.monotonic() < deadline, f"partitions not shared: {owners}"
            await asyncio.sleep(0.05)  # poll the partition owners
        per_dev = {d: messages(a_, fpm) for d, a_ in audios.items()}
        n_msgs = len(next(iter(per_dev.values())))
        killed = False
        for i in range(n_msgs):  # interleaved: message i of every device, then i + 1
            async with r.pipeline(transaction=False) as pipe:
                for d, msgs in per_dev.items():
                    await publish(
                        pipe, d, i, msgs[i], stream="t:audio", partitions=PARTITIONS, end=i == n_msgs - 1
                    )
                await pipe.execute()
            if i == n_msgs // 2 and not killed:
                # wait until a is mid-stream (has committed results), then kill it
                while not any("a" in w for w in (await _writers(r)).values()):
                    assert time.monotonic() < deadline + 60, "consumer a published nothing"
                    await asyncio.sleep(0.02)  # poll the output stream
                a.kill()
                killed = True
        deadline = time.monotonic() + 90
        while True:
            res = await _results(r)
            done = sum(1 for recs in res.values() if any(x["type"] == "summary" for x in recs))
            if done == n_devices:
                break
            assert time.monotonic() < deadline, f"only {done}/{n_devices} devices finished"
            assert b.proc is not None and b.proc.poll() is None, "surviving consumer died"
            await asyncio.sleep(0.2)  # poll the output stream
        claimed = (tmp_path / "b.log").read_text()
        assert "Traceback" not in claimed
        for dev, ref in reference.items():
            recs = res[dev]
            steps = [x for x in recs if x["type"] == "result"]
            assert [x["step"] for x in steps] == list(range(len(ref))), dev  # each step once, in order
            assert [x["scores"] for x in steps] == ref, dev  # bit for bit (float32 -> JSON -> float)
            summaries = [x for x in recs if x["type"] == "summary"]
            assert len(summaries) == 1 and summaries[0]["steps"] == len(ref)
            assert {x["epoch"] for x in recs} == {0}
        assert await r.xlen("lookback:errors") == 0
        # the kill landed mid-stream: devices that a began were finished by b from a's checkpoints
        handed_over = [d for d, w in (await _writers(r)).items() if w == {"a", "b"}]
        assert handed_over, "no device moved from the killed consumer to the survivor"
        # every input entry acknowledged once its results were published
        for p in range(PARTITIONS):
            pend = await r.xpending(f"t:audio:{p}", "g")
            assert pend["pending"] == 0
    finally:
        await r.aclose()
