"""The ingestion core: checkpoints, idle close, backpressure (through a real Redis)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
import pytest
import redis.asyncio as aioredis

from lookback.engine.engine import Engine
from lookback.errors import SnapshotError
from lookback.metrics import Metrics
from lookback.sources.core import Checkpoint, SourceOptions, validate_audio
from lookback.sources.redis_streams import RedisStreamsSource, publish
from tests import conftest
from tests.sources.conftest import Broker
from tests.sources.support import device_audio, messages, solo_reference


def test_checkpoint_round_trip_and_damage() -> None:
    ck = Checkpoint(41, 2, b"LBSS-snapshot-bytes")
    assert Checkpoint.decode(ck.encode()) == ck
    assert Checkpoint.decode(Checkpoint(3, 0, None).encode()) == Checkpoint(3, 0, None)
    for bad in (b"", b"LBDC", b"XXXX\x05\x00\x00\x00{}abc", ck.encode()[:10]):
        with pytest.raises(SnapshotError):
            Checkpoint.decode(bad)


def test_validate_audio_reasons() -> None:
    frame = bytes(256)
    assert validate_audio(frame, "pcm_s16le", 4) is None
    assert validate_audio(frame * 5, "pcm_s16le", 4) == (
        "too_many_frames",
        "more than max_frames_per_message=4 frames",
    )
    assert validate_audio(frame[:100], "pcm_s16le", 4)[0] == "bad_frame_size"  # type: ignore[index]
    assert validate_audio(b"", "pcm_s16le", 4)[0] == "empty_message"  # type: ignore[index]
    assert validate_audio(frame, "pcm_u8", 4)[0] == "bad_encoding"  # type: ignore[index]
    # G.711 and other rates: any whole number of samples, up to max_frames frames' duration
    assert validate_audio(bytes(160), "mulaw", 4) is None
    assert validate_audio(bytes(160), "alaw", 3, sample_rate=8000) is None
    assert validate_audio(bytes(65), "mulaw", 1, sample_rate=8000)[0] == "too_many_frames"  # type: ignore[index]
    assert validate_audio(bytes(3), "pcm_s16le", 4, sample_rate=8000)[0] == "partial_sample"  # type: ignore[index]
    assert validate_audio(bytes(2 * 384), "pcm_s16le", 1, sample_rate=48000) is None
    assert validate_audio(bytes(100), "pcm_s16le", 4, sample_rate=16000)[0] == "bad_frame_size"  # type: ignore[index]
    nan = np.full(128, np.nan, "<f4").tobytes()
    assert validate_audio(nan, "pcm_f32le", 4)[0] == "non_finite_audio"  # type: ignore[index]


async def _source(url: str, metrics: Metrics, opts: SourceOptions) -> tuple[Engine, RedisStreamsSource]:
    engine = Engine(conftest.test_settings(models=["lookback-vad"]), metrics)
    await engine.start()
    src = RedisStreamsSource(url, engine, opts, metrics, lease_s=1.0, checkpoint_ttl_s=60)
    await src.start()
    return engine, src


async def _records(r: aioredis.Redis, device: str) -> list[dict]:
    import orjson

    out: list[dict] = []
    entries: Any = await r.xrange("lookback:results")
    for _, f in entries:
        if f[b"device"].decode() == device:
            out.extend(orjson.loads(f[b"records"]))
    return out


async def test_idle_device_closes_with_summary_and_continues_in_a_new_epoch(redis_broker: Broker) -> None:
    ((dev, audio),) = device_audio(1, 32).items()
    m = messages(audio, 8)
    ref = await solo_reference({"a": m[0] + m[1], "b": m[2] + m[3]})
    metrics = Metrics()
    url = f"{redis_broker.url}?stream=i:audio&partitions=1&group=g&consumer=c&idle_timeout_s=0.3"
    engine, src = await _source(url, metrics, SourceOptions())
    r = aioredis.from_url(redis_broker.url)
    try:
        for seq in (0, 1):
            await publish(r, dev, seq, m[seq], stream="i:audio", partitions=1)
        deadline = time.monotonic() + 20
        while not any(x["type"] == "summary" for x in await _records(r, dev)):
            assert time.monotonic() < deadline, "no idle summary"
            await asyncio.sleep(0.05)  # poll the output stream
        for seq in (2, 3):  # the device speaks again: same sequence, a new session
            await publish(r, dev, seq, m[seq], stream="i:audio", partitions=1, end=seq == 3)
        while sum(x["type"] == "summary" for x in await _records(r, dev)) < 2:
            assert time.monotonic() < deadline, "no end summary"
            await asyncio.sleep(0.05)  # poll the output stream
        recs = await _records(r, dev)
        summaries = [(x["epoch"], x["reason"], x["steps"]) for x in recs if x["type"] == "summary"]
        assert summaries == [(0, "idle", len(ref["a"])), (1, "end", len(ref["b"]))]
        for epoch, key in ((0, "a"), (1, "b")):
            assert [x["scores"] for x in recs if x["type"] == "result" and x["epoch"] == epoch] == ref[key]
        assert await r.xlen("lookback:errors") == 0
    finally:
        await src.stop()
        await engine.stop()
        await r.aclose()


async def test_backpressure_bounds_what_is_read_and_drops_nothing(redis_broker: Broker) -> None:
    """A backlog far above the bounds: the consumer holds at most max_inflight messages."""
    audios = device_audio(20, 80)
    r = aioredis.from_url(redis_broker.url)
    n_msgs = 10
    async with r.pipeline(transaction=False) as pipe:
        for i in range(n_msgs):
            for d, a in audios.items():
                await publish(pipe, d, i, messages(a, 8)[i], stream="b:audio", partitions=1)
        await pipe.execute()
    metrics = Metrics()
    opts = SourceOptions(max_inflight=8, device_queue=2)
    url = f"{redis_broker.url}?stream=b:audio&partitions=1&group=g&consumer=c&count=50"
    engine, src = await _source(url, metrics, opts)
    peak_inflight = peak_queue = 0
    labels = {"source": "redis:b:audio", "outcome": "scored", "reason": ""}
    try:
        deadline = time.monotonic() + 60
        while (metrics.registry.get_sample_value("lookback_source_messages_total", labels) or 0) < 200:
            hub = src.hub
            peak_inflight = max(peak_inflight, hub.inflight)
            peak_queue = max([peak_queue, *(d.queue.qsize() for d in hub.devices.values())])
            assert time.monotonic() < deadline, "backlog not drained"
            await asyncio.sleep(0)  # sample the bounds at every turn of the event loop
        ref = await solo_reference(audios)
        for d in audios:
            got = [x["scores"] for x in await _records(r, d) if x["type"] == "result"]
            assert got == ref[d][: len(got)] and len(got) == n_msgs * 8
        assert 1 <= peak_inflight <= 8  # reading stopped at the bound, nothing was dropped
        assert peak_queue <= 2
        assert (await r.xpending("b:audio:0", "g"))["pending"] == 0
    finally:
        await src.stop()
        await engine.stop()
        await r.aclose()


async def test_a_message_whose_processing_raises_is_skipped_not_replayed_for_ever(
    redis_broker: Broker,
) -> None:
    """Defence behind the field checks: a message the core cannot process (here one that
    bypassed the adapter's checks) is published as internal_error and consumed; the device
    goes on from its checkpoint and the partition is never replayed."""
    from lookback.sources.core import Message

    ((dev, audio),) = device_audio(1, 24).items()
    m = messages(audio, 8)
    ref = await solo_reference({"first": m[0], "second": m[2]})
    metrics = Metrics()
    url = f"{redis_broker.url}?stream=p:audio&partitions=1&group=g&consumer=c"
    engine, src = await _source(url, metrics, SourceOptions())
    r = aioredis.from_url(redis_broker.url)
    try:
        await publish(r, dev, 0, m[0], stream="p:audio", partitions=1, end=True)
        deadline = time.monotonic() + 20
        while not await _records(r, dev):
            assert time.monotonic() < deadline, "no results of seq 0"
            await asyncio.sleep(0.05)  # poll the output stream
        # opens the device's next session with an encoding no session takes: raises
        await src.hub.submit(Message(dev, 1, m[1], encoding="pcm_nonsense", partition="0"))
        await publish(r, dev, 2, m[2], stream="p:audio", partitions=1, end=True)
        while sum(x["type"] == "summary" for x in await _records(r, dev)) < 2:
            assert time.monotonic() < deadline, "no summary"
            await asyncio.sleep(0.05)  # poll the output stream
        import orjson

        entries: Any = await r.xrange("lookback:errors")
        errors = [orjson.loads(f[b"error"]) for _, f in entries]
        assert [(e["device"], e["seq"], e["reason"]) for e in errors] == [(dev, 1, "internal_error")]
        recs = await _records(r, dev)
        for epoch, key in ((0, "first"), (1, "second")):
            assert [x["scores"] for x in recs if x["type"] == "result" and x["epoch"] == epoch] == ref[key]
        labels = {"source": "redis:p:audio", "outcome": "redelivery", "reason": "commit_failed"}
        assert metrics.registry.get_sample_value("lookback_source_messages_total", labels) is None
        assert (await r.xpending("p:audio:0", "g"))["pending"] == 0
    finally:
        await src.stop()
        await engine.stop()
        await r.aclose()


async def test_a_flooding_device_does_not_hold_back_its_neighbours(redis_broker: Broker) -> None:
    """400 queued messages of one device, then one message of each of five neighbours on the
    same partition: the neighbours are read past the flood and scored while it drains (their
    results come before the flood's 100th message), and the flood still loses nothing."""
    pool = device_audio(6, 400)
    flood, *neighbours = pool
    flood_msgs = messages(pool[flood], 1)  # 400 one-frame messages
    near = {d: messages(pool[d], 8)[0] for d in neighbours}
    r = aioredis.from_url(redis_broker.url)
    async with r.pipeline(transaction=False) as pipe:
        for i, msg in enumerate(flood_msgs):
            await publish(pipe, flood, i, msg, stream="n:audio", partitions=1, end=i == len(flood_msgs) - 1)
        for d, msg in near.items():
            await publish(pipe, d, 0, msg, stream="n:audio", partitions=1, end=True)
        await pipe.execute()
    metrics = Metrics()
    url = f"{redis_broker.url}?stream=n:audio&partitions=1&group=g&consumer=c"
    engine, src = await _source(url, metrics, SourceOptions(device_queue=8))
    try:
        deadline = time.monotonic() + 60
        while not any(x["type"] == "summary" for x in await _records(r, flood)):
            assert time.monotonic() < deadline, "the flood did not finish"
            await asyncio.sleep(0.05)  # poll the output stream
        entries: Any = await r.xrange("lookback:results")
        order = [(f[b"device"].decode(), int(f[b"seq"])) for _, f in entries]
        hundredth = next(i for i, (d, seq) in enumerate(order) if d == flood and seq >= 100)
        for d in neighbours:
            first = next(i for i, (dev, _) in enumerate(order) if dev == d)
            assert first < hundredth, f"{d} waited for the flood: {first} >= {hundredth}"
        ref = await solo_reference({flood: pool[flood], **near})
        for d, want in ref.items():
            assert [x["scores"] for x in await _records(r, d) if x["type"] == "result"] == want, d
        assert (await r.xpending("n:audio:0", "g"))["pending"] == 0
    finally:
        await src.stop()
        await engine.stop()
        await r.aclose()


async def test_devices_at_other_rates_and_in_g711_score_as_a_solo_session(redis_broker: Broker) -> None:
    """A telephony device (8 kHz µ-law, 20 ms messages) and a browser one (48 kHz int16)
    through Redis: results equal one session fed the same bytes (the decoder is chunking-
    invariant); a message in another rate than its device's session is refused."""
    from tests.engine.engine_support import Collect
    from tests.engine.rate_support import at_rate, encode

    clip = np.frombuffer(device_audio(1, 125)["dev-0000"], "<i2")
    devices = {
        "phone": ("mulaw", 8000, encode(at_rate(clip, 8000), "mulaw"), 160),
        "browser": ("pcm_s16le", 48000, encode(at_rate(clip, 48000), "pcm_s16le"), 2 * 960),
    }
    engine = Engine(conftest.test_settings(models=["lookback-vad"]))
    await engine.start()
    ref: dict[str, list[list[float]]] = {}
    try:
        handle = engine.resolve("lookback-vad")
        for dev, (enc, rate, audio, _) in devices.items():
            audio = audio + audio[:2]  # what the `end` message adds
            sink = Collect()
            sess = engine.open_session(handle, sink, encoding=enc, sample_rate=rate)  # type: ignore[arg-type]
            for i in range(0, len(audio), 4000):
                sess.push(audio[i : i + 4000])
                await sess.wait_idle()
            sess.flush()
            await sess.wait_idle()
            sess.close()
            ref[dev] = [list(map(float, row)) for row in sink.rows]
    finally:
        await engine.stop()
    metrics = Metrics()
    url = f"{redis_broker.url}?stream=t:audio&partitions=1&group=g&consumer=c"
    engine, src = await _source(url, metrics, SourceOptions())
    r = aioredis.from_url(redis_broker.url)
    try:
        for dev, (enc, rate, audio, size) in devices.items():
            parts = [audio[i : i + size] for i in range(0, len(audio), size)]
            for seq, part in enumerate(parts):
                await publish(
                    r, dev, seq, part, stream="t:audio", partitions=1, encoding=enc, sample_rate=str(rate)
                )
            wrong = parts[0][:512]  # whole frames at 16 kHz: refused for its rate, not its size
            await publish(r, dev, len(parts), wrong, stream="t:audio", partitions=1, encoding=enc)
            await publish(
                r,
                dev,
                len(parts) + 1,
                parts[0][:2],
                stream="t:audio",
                partitions=1,
                encoding=enc,
                sample_rate=str(rate),
                end=True,
            )
        deadline = time.monotonic() + 60
        for dev in devices:
            while not any(x["type"] == "summary" for x in await _records(r, dev)):
                assert time.monotonic() < deadline, f"no summary for {dev}"
                await asyncio.sleep(0.05)  # poll the output stream
        import orjson

        errors: Any = await r.xrange("lookback:errors")
        got_errors = sorted(
            (orjson.loads(f[b"error"])["device"], orjson.loads(f[b"error"])["reason"]) for _, f in errors
        )
        assert got_errors == [("browser", "bad_sample_rate"), ("phone", "bad_sample_rate")]
        for dev in devices:
            got = [x["scores"] for x in await _records(r, dev) if x["type"] == "result"]
            assert got == ref[dev] and len(got) > 100
    finally:
        await src.stop()
        await engine.stop()
        await r.aclose()
