"""Redis Streams source against a real redis-server and real ``lookback consume`` processes."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import redis.asyncio as aioredis

from lookback.engine.engine import Engine
from lookback.metrics import Metrics
from lookback.sources.core import SourceOptions
from lookback.sources.redis_streams import RedisStreamsSource, publish
from tests import conftest
from tests.sources.conftest import Broker, Consumer
from tests.sources.support import by_device, device_audio, messages, parse_records, solo_reference

PARTITIONS = 8


async def _read_all(r: aioredis.Redis, key: str) -> list[tuple[bytes, dict[bytes, bytes]]]:
    out: list[tuple[bytes, dict[bytes, bytes]]] = []
    start = "-"
    while True:
        chunk: Any = await r.xrange(key, min=start, count=2000)
        if start != "-":
            chunk = chunk[1:]
        if not chunk:
            return out
        out.extend(chunk)
        start = chunk[-1][0].decode()


async def _results(r: aioredis.Redis) -> dict[str, list[dict]]:
    entries = await _read_all(r, "lookback:results")
    return by_device([(f[b"device"].decode(), parse_records(f[b"records"])) for _, f in entries])


async def _all_summaries(r: aioredis.Redis, devices: Any) -> bool:
    """Every device has its summary in the results stream."""
    res = await _results(r)
    return all(any(x["type"] == "summary" for x in res.get(d, [])) for d in devices)


def _assert_like_reference(res: dict[str, list[dict]], reference: dict[str, list[Any]]) -> None:
    """Each device's results: every step once, in order, the reference's scores exactly."""
    for dev, ref in reference.items():
        steps = [x for x in res[dev] if x["type"] == "result"]
        assert [x["step"] for x in steps] == list(range(len(ref))), dev
        assert [x["scores"] for x in steps] == ref, dev


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


# -- bad input: each rejection counted, published, nothing else touched ---------------------


async def _run_source(url: str, metrics: Metrics, body: Any) -> None:
    engine = Engine(conftest.test_settings(models=["lookback-vad"]), metrics)
    await engine.start()
    src = RedisStreamsSource(
        url, engine, SourceOptions(max_frames=64), metrics, lease_s=1.0, checkpoint_ttl_s=60
    )
    await src.start()
    try:
        await body(src)
    finally:
        await src.stop()
        await engine.stop()


async def _wait_for(cond: Any, what: str, limit_s: float = 30) -> None:
    deadline = time.monotonic() + limit_s
    while not await cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)  # poll the broker's output


async def test_duplicated_reordered_malformed_gapped(redis_broker: Broker) -> None:
    audios = device_audio(4, 48)
    m = {d: messages(a, 8) for d, a in audios.items()}  # 6 messages of 8 frames each
    ok, dup, reord, bad = list(m)
    zeros = bytes(len(m[reord][2]))
    reference = await solo_reference(
        {
            ok: audios[ok],
            dup: audios[dup],
            reord: m[reord][0] + zeros + b"".join(m[reord][2:]),  # seq 1 lost, then late
            bad: m[bad][0] + m[bad][5],
        }
    )
    metrics = Metrics()
    url = f"{redis_broker.url}?stream=q:audio&partitions=1&group=g&consumer=solo"
    r = aioredis.from_url(redis_broker.url)
    key = "q:audio:0"

    async def send(device: str | None, seq: Any, audio: bytes | None, **extra: Any) -> None:
        fields: dict[Any, Any] = {
            k: v for k, v in (("device", device), ("seq", seq), ("audio", audio)) if v is not None
        }
        fields.update(extra)
        await r.xadd(key, fields)

    async def body(src: RedisStreamsSource) -> None:
        nan = np.full(128, np.nan, "<f4").tobytes()
        for i in range(6):  # interleaved, so bad input lands between good messages of others
            await send(ok, i, m[ok][i], **({"end": 1} if i == 5 else {}))
            await send(dup, i, m[dup][i], **({"end": 1} if i == 5 else {}))
            if i == 2:
                await send(dup, 2, m[dup][2])  # a repeat
            if i == 0:
                await send(reord, 0, m[reord][0])
                await send(reord, 2, m[reord][2])  # seq 1 missing: a gap, zero-filled
                await send(reord, 1, m[reord][1])  # ... which then arrives late
            if i >= 3:
                await send(reord, i, m[reord][i], **({"end": 1} if i == 5 else {}))
        await send(bad, 0, m[bad][0])
        await send(bad, 1, m[bad][1][:100])  # not whole frames
        await send(bad, 2, m[bad][2], encoding="mulaw")
        await send(bad, 3, None)  # no audio
        await send(bad, 4, nan, encoding="pcm_f32le")
        await send(bad, 5, m[bad][5], end=1)
        await send(None, 7, m[ok][0])  # no device
        await send("x-1", "abc", m[ok][0])  # seq not a number
        await send("nomodel", 0, m[ok][0], model="no-such-model", end=1)

        async def finished() -> bool:
            res = await _results(r)
            return all(
                any(x["type"] == "summary" for x in res.get(d, [])) for d in (ok, dup, reord, bad)
            ) and (await r.xlen("lookback:errors") >= 9)

        await _wait_for(finished, "all devices' summaries and 9 errors")
        assert all(not t.done() for t in src._tasks), "a consumer task ended"

    await _run_source(url, metrics, body)
    try:
        res = await _results(r)
        _assert_like_reference(res, reference)
        gaps = [x for x in res[reord] if x["type"] == "gap"]
        assert len(gaps) == 1
        assert (gaps[0]["missing"], gaps[0]["policy"]) == (1, "zero_fill")
        assert gaps[0]["fill_samples"] == len(zeros) // 2
        errors = [orjson.loads(f[b"error"]) for _, f in await _read_all(r, "lookback:errors")]
        got = sorted((str(e["device"]), str(e["seq"]), e["reason"]) for e in errors)
        assert got == sorted(
            [
                (dup, "2", "duplicate_message"),
                (reord, "1", "late_message"),
                (bad, "1", "bad_frame_size"),
                (bad, "2", "bad_encoding"),
                (bad, "3", "missing_field"),
                (bad, "4", "non_finite_audio"),
                ("None", "7", "missing_field"),
                ("x-1", "None", "missing_field"),
                ("nomodel", "0", "unknown_model"),
            ]
        )
        assert all(e["detail"] for e in errors)
        value = metrics.registry.get_sample_value
        for reason, n in [
            ("duplicate_message", 1),
            ("late_message", 1),
            ("bad_frame_size", 1),
            ("bad_encoding", 1),
            ("missing_field", 3),
            ("non_finite_audio", 1),
            ("unknown_model", 1),
        ]:
            labels = {"source": "redis:q:audio", "outcome": "rejected", "reason": reason}
            assert value("lookback_source_messages_total", labels) == n, reason
        assert value("lookback_source_gaps_total", {"source": "redis:q:audio", "policy": "zero_fill"}) == 1
        assert (await r.xpending(key, "g"))["pending"] == 0  # rejected entries acknowledged too
    finally:
        await r.aclose()


async def test_gap_reset_policy_starts_a_new_session(redis_broker: Broker) -> None:
    audio = device_audio(1, 32)
    ((dev, a),) = audio.items()
    m = messages(a, 8)
    reference = await solo_reference({"first": m[0], "second": m[2] + m[3]})
    metrics = Metrics()
    url = f"{redis_broker.url}?stream=z:audio&partitions=1&group=g&consumer=solo&gap_policy=reset"
    r = aioredis.from_url(redis_broker.url)

    async def body(src: RedisStreamsSource) -> None:
        for seq in (0, 2, 3):
            await publish(r, dev, seq, m[seq], stream="z:audio", partitions=1, end=seq == 3)

        async def finished() -> bool:
            return sum(x["type"] == "summary" for x in (await _results(r)).get(dev, [])) == 2

        await _wait_for(finished, "two summaries")

    await _run_source(url, metrics, body)
    try:
        recs = (await _results(r))[dev]
        by_epoch = {
            e: [x["scores"] for x in recs if x["type"] == "result" and x["epoch"] == e] for e in (0, 1)
        }
        assert by_epoch == {0: reference["first"], 1: reference["second"]}
        gap = next(x for x in recs if x["type"] == "gap")
        assert (gap["missing"], gap["policy"], gap["after_seq"], gap["seq"]) == (1, "reset", 0, 2)
        summaries = [x for x in recs if x["type"] == "summary"]
        assert [(s["epoch"], s["reason"]) for s in summaries] == [(0, "gap"), (1, "end")]
    finally:
        await r.aclose()


async def test_stolen_lease_fences_commits_and_replays_exactly_once(redis_broker: Broker) -> None:
    """A consumer that lost its partition (a zombie) publishes nothing; the replay is exact."""
    audios = device_audio(3, 48)
    reference = await solo_reference(audios)
    m = {d: messages(a, 8) for d, a in audios.items()}
    metrics = Metrics()
    url = f"{redis_broker.url}?stream=f:audio&partitions=1&group=g&consumer=solo"
    r = aioredis.from_url(redis_broker.url)

    async def send(i: int) -> None:
        for d, msgs in m.items():
            await publish(r, d, i, msgs[i], stream="f:audio", partitions=1, end=i == len(msgs) - 1)

    async def body(src: RedisStreamsSource) -> None:
        for i in range(3):
            await send(i)

        async def first_half() -> bool:
            res = await _results(r)
            return all(any(x["seq"] == 2 for x in res.get(d, [])) for d in m)

        await _wait_for(first_half, "results of the first three messages")
        await r.set("f:audio:0:owner", "zombie", px=1500)  # another consumer took the partition
        for i in range(3, 6):
            await send(i)

        await _wait_for(lambda: _all_summaries(r, m), "every device's summary after the lease came back")

    await _run_source(url, metrics, body)
    try:
        res = await _results(r)
        _assert_like_reference(res, reference)
        restores = metrics.registry.get_sample_value(
            "lookback_source_restores_total", {"source": "redis:f:audio"}
        )
        assert restores is not None and restores >= len(m)  # every device continued from its checkpoint
        refused = metrics.registry.get_sample_value(
            "lookback_source_messages_total",
            {"source": "redis:f:audio", "outcome": "redelivery", "reason": "commit_failed"},
        )
        assert refused is not None and refused >= 1  # the zombie's commits were fenced off
        assert await r.xlen("lookback:errors") == 0
    finally:
        await r.aclose()


async def test_consumer_joining_mid_run_takes_partitions_over_exactly_once(
    redis_broker: Broker, consumers: list[Consumer], tmp_path: Path
) -> None:
    """Rebalance: the first consumer hands half its partitions to a newcomer mid-stream."""
    n_devices, frames, fpm = 40, 160, 16
    audios = device_audio(n_devices, frames)
    reference = await solo_reference(audios)
    url = f"{redis_broker.url}?stream=j:audio&partitions={PARTITIONS}&group=g"
    env = {"LOOKBACK_SOURCE_LEASE_S": "1.0"}
    a = Consumer(url + "&consumer=a", tmp_path / "a.log", **env).start()
    consumers.append(a)
    r = aioredis.from_url(redis_broker.url)
    per_dev = {d: messages(x, fpm) for d, x in audios.items()}
    n_msgs = len(next(iter(per_dev.values())))

    async def send(i: int) -> None:
        async with r.pipeline(transaction=False) as pipe:
            for d, msgs in per_dev.items():
                await publish(
                    pipe, d, i, msgs[i], stream="j:audio", partitions=PARTITIONS, end=i == n_msgs - 1
                )
            await pipe.execute()

    async def owners() -> set[Any]:
        return {await r.get(f"j:audio:{p}:owner") for p in range(PARTITIONS)}

    try:
        await _wait_for(lambda: _eq(owners(), {b"a"}), "a owning every partition")
        for i in range(n_msgs // 2):
            await send(i)
        b = Consumer(url + "&consumer=b", tmp_path / "b.log", **env).start()
        consumers.append(b)
        await _wait_for(lambda: _eq(owners(), {b"a", b"b"}), "partitions shared with b")
        for i in range(n_msgs // 2, n_msgs):
            await send(i)

        async def finished() -> bool:
            res = await _results(r)
            return all(any(x["type"] == "summary" for x in res.get(d, [])) for d in audios)

        await _wait_for(finished, "every device's summary", 60)
        res = await _results(r)
        _assert_like_reference(res, reference)
        moved = [d for d, w in (await _writers(r)).items() if w == {"a", "b"}]
        assert moved, "no device continued on the newcomer"
        assert await r.xlen("lookback:errors") == 0
        assert a.stop() == 0 and b.stop() == 0
    finally:
        await r.aclose()


async def _eq(value: Any, want: Any) -> bool:
    return bool(await value == want)


# every malformed field of the documented format: rejected with its code, acknowledged, and the
# partition goes on (a seq of 2^64 once failed every commit and jammed its partition for ever)
_F32_LOUD = np.full(128, 1e20, "<f4").tobytes()
_F32_NAN = np.full(128, np.nan, "<f4").tobytes()
_FRAME = bytes(256)
_MALFORMED: list[tuple[str, dict[str, Any], str]] = [
    # (device, fields beyond device/seq 0/audio one frame, expected reason); None drops a field
    ("seq-2^64", {"seq": str(2**64)}, "missing_field"),
    ("seq-2^63", {"seq": str(2**63)}, "missing_field"),
    ("seq-negative", {"seq": "-1"}, "missing_field"),
    ("seq-fraction", {"seq": "1.5"}, "missing_field"),
    ("seq-text", {"seq": "abc"}, "missing_field"),
    ("seq-spaced", {"seq": " 1"}, "missing_field"),
    ("seq-underscored", {"seq": "1_0"}, "missing_field"),
    ("seq-missing", {"seq": None}, "missing_field"),
    ("audio-missing", {"audio": None}, "missing_field"),
    ("audio-empty", {"audio": b""}, "empty_message"),
    ("audio-odd", {"audio": _FRAME[:100]}, "bad_frame_size"),
    ("audio-huge", {"audio": _FRAME * 65}, "too_many_frames"),
    ("audio-loud", {"audio": _F32_LOUD, "encoding": "pcm_f32le"}, "audio_out_of_range"),
    ("audio-nan", {"audio": _F32_NAN, "encoding": "pcm_f32le"}, "non_finite_audio"),
    ("encoding-unknown", {"encoding": "pcm_u8"}, "bad_encoding"),
    ("encoding-binary", {"encoding": b"\xff\xfe"}, "bad_encoding"),
    ("rate-unknown", {"sample_rate": "11025"}, "bad_sample_rate"),
    ("rate-text", {"sample_rate": "8k"}, "bad_sample_rate"),
    ("rate-partial-sample", {"sample_rate": "8000", "audio": _FRAME[:101]}, "partial_sample"),
    ("model-huge", {"model": "m" * 300}, "invalid_field"),
    ("model-binary", {"model": b"\xff"}, "invalid_field"),
    ("version-huge", {"version": "v" * 300}, "invalid_field"),
    ("end-word", {"end": "yes"}, "invalid_field"),
    ("end-two", {"end": "2"}, "invalid_field"),
    ("ts-text", {"ts": "now"}, "invalid_field"),
    ("ts-nan", {"ts": "nan"}, "invalid_field"),
    ("ts-inf", {"ts": "inf"}, "invalid_field"),
]


async def test_every_malformed_field_is_rejected_and_never_jams_the_partition(redis_broker: Broker) -> None:
    ((good, audio),) = device_audio(1, 48).items()
    m = messages(audio, 8)
    metrics = Metrics()
    url = f"{redis_broker.url}?stream=v:audio&partitions=1&group=g&consumer=solo"
    r = aioredis.from_url(redis_broker.url)
    reference = await solo_reference({good: audio})
    expected: list[tuple[Any, Any, str]] = []

    async def body(src: RedisStreamsSource) -> None:
        for i, (device, over, reason) in enumerate(_MALFORMED):
            fields: dict[str, Any] = {"device": device, "seq": 0, "audio": _FRAME, **over}
            await r.xadd("v:audio:0", {k: v for k, v in fields.items() if v is not None})
            expected.append((device, None if "seq" in over else 0, reason))
            if i < len(m):  # a neighbour on the same partition, between the bad ones
                await publish(r, good, i, m[i], stream="v:audio", partitions=1, end=i == len(m) - 1)
        bad_devices: list[str | bytes] = ["d" * 300, b"\xff\xfe", ""]  # too long, not UTF-8, empty
        for bad_device in bad_devices:
            await r.xadd("v:audio:0", {"device": bad_device, "seq": 0, "audio": _FRAME})
            expected.append((None, 0, "missing_field"))
        # the device whose seq was 2^64 goes on with valid messages
        await publish(r, "seq-2^64", 0, m[0], stream="v:audio", partitions=1)
        await publish(r, "seq-2^64", 1, m[1], stream="v:audio", partitions=1, end=True)

        async def finished() -> bool:
            res = await _results(r)
            done = all(any(x["type"] == "summary" for x in res.get(d, [])) for d in (good, "seq-2^64"))
            return done and await r.xlen("lookback:errors") >= len(expected)

        await _wait_for(finished, "summaries and every rejection")

    await _run_source(url, metrics, body)
    try:
        errors = [orjson.loads(f[b"error"]) for _, f in await _read_all(r, "lookback:errors")]
        got = sorted((str(e["device"]), str(e["seq"]), e["reason"]) for e in errors)
        assert got == sorted((str(d), str(s), why) for d, s, why in expected)
        res = await _results(r)
        assert [x["scores"] for x in res[good] if x["type"] == "result"] == reference[good]
        ref2 = await solo_reference({"seq-2^64": m[0] + m[1]})
        assert [x["scores"] for x in res["seq-2^64"] if x["type"] == "result"] == ref2["seq-2^64"]
        assert (await r.xpending("v:audio:0", "g"))["pending"] == 0  # every entry acknowledged
        value = metrics.registry.get_sample_value
        redelivered = value(
            "lookback_source_messages_total",
            {"source": "redis:v:audio", "outcome": "redelivery", "reason": "commit_failed"},
        )
        assert redelivered is None  # nothing failed a commit, nothing was replayed
    finally:
        await r.aclose()


async def test_deleted_stream_or_group_is_recreated_and_reading_goes_on(redis_broker: Broker) -> None:
    """``DEL`` of a partition stream takes its consumer group along, ``XGROUP DESTROY`` too:
    the consumer makes the group again (counted) and every device carries on exactly once."""
    from lookback.sources.redis_streams import partition_of

    pool = device_audio(12, 32)
    first = next(d for d in pool if partition_of(d, 2) == 0)
    second = next(d for d in pool if partition_of(d, 2) == 1)
    audios = {first: pool[first], second: pool[second]}
    reference = await solo_reference(audios)
    m = {d: messages(a, 8) for d, a in audios.items()}  # 4 messages each
    metrics = Metrics()
    url = f"{redis_broker.url}?stream=g:audio&partitions=2&group=g&consumer=solo"
    r = aioredis.from_url(redis_broker.url)

    async def send(i: int) -> None:
        for d, msgs in m.items():
            await publish(r, d, i, msgs[i], stream="g:audio", partitions=2, end=i == len(msgs) - 1)

    async def body(src: RedisStreamsSource) -> None:
        for i in (0, 1):
            await send(i)

        async def consumed(n: int) -> bool:
            res = await _results(r)
            return all(any(x["seq"] == n - 1 for x in res.get(d, [])) for d in m)

        await _wait_for(lambda: consumed(2), "results of the first two messages")
        await r.delete("g:audio:0")  # the stream, and its group with it
        await r.xgroup_destroy("g:audio:1", "g")  # the group only; its entries stay
        for i in (2, 3):
            await send(i)

        await _wait_for(lambda: _all_summaries(r, m), "every device's summary after the groups were deleted")

    await _run_source(url, metrics, body)
    try:
        res = await _results(r)
        _assert_like_reference(res, reference)
        recreated = metrics.registry.get_sample_value(
            "lookback_source_groups_recreated_total", {"source": "redis:g:audio"}
        )
        assert recreated == 2
        assert await r.xlen("lookback:errors") == 0  # the kept entries were not read again
        for p in (0, 1):
            assert (await r.xpending(f"g:audio:{p}", "g"))["pending"] == 0
    finally:
        await r.aclose()
