"""``lookback consume`` you can monitor: /metrics, /healthz and /readyz over real HTTP."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from lookback.engine.engine import Engine
from lookback.metrics import Metrics
from lookback.sources.core import SourceOptions
from lookback.sources.kafka import publish as kafka_publish
from lookback.sources.monitor import MonitorServer
from lookback.sources.redis_streams import RedisStreamsSource, publish
from tests import conftest
from tests.sources.conftest import Broker, Consumer
from tests.sources.kafka_support import FAST_GROUP, kafka_producer, results
from tests.sources.support import device_audio, messages, solo_reference
from tests.support import free_port


def _samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def _get(port: int, path: str) -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=10)


async def _until(cond: Any, what: str, limit_s: float = 60) -> None:
    deadline = time.monotonic() + limit_s
    while not await cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)  # poll


def _monitored(url: str, log: Path, port: int) -> Consumer:
    return Consumer(
        url, log, LOOKBACK_CONSUME_METRICS_PORT=str(port), LOOKBACK_CONSUME_METRICS_HOST="127.0.0.1"
    )


async def test_redis_consumer_serves_metrics_health_and_readiness(
    redis_broker: Broker, consumers: list[Consumer], tmp_path: Path
) -> None:
    audios = device_audio(3, 64)
    reference = await solo_reference(audios)
    port = free_port()
    c = _monitored(
        f"{redis_broker.url}?stream=m:audio&partitions=2&group=g&consumer=mon", tmp_path / "c.log", port
    )
    consumers.append(c)
    c.start()
    assert f"/metrics on port {port}" in (tmp_path / "c.log").read_text()
    health = await asyncio.to_thread(_get, port, "/healthz")
    assert (health.status_code, health.text) == (200, "ok\n")
    assert (await asyncio.to_thread(_get, port, "/readyz")).status_code == 200
    assert (await asyncio.to_thread(_get, port, "/nope")).status_code == 404
    r = aioredis.from_url(redis_broker.url)
    sent = 0
    try:
        for d, a in audios.items():
            msgs = messages(a, 16)
            for i, msg in enumerate(msgs):
                await publish(r, d, i, msg, stream="m:audio", partitions=2, end=i == len(msgs) - 1)
                sent += len(msg)

        async def scraped() -> bool:
            text = (await asyncio.to_thread(_get, port, "/metrics")).text
            steps = _samples(text, "lookback_source_steps_total")
            return sum(steps.values()) == sum(len(x) for x in reference.values())

        await _until(scraped, "every step counted on /metrics")
        resp = await asyncio.to_thread(_get, port, "/metrics")
        assert resp.headers["content-type"].startswith("text/plain; version=")
        text = resp.text
        src = ("source", "redis:m:audio")
        assert _samples(text, "lookback_source_bytes_total") == {(src,): sent}
        scored = _samples(text, "lookback_source_messages_total")
        assert scored[(("outcome", "scored"), ("reason", ""), src)] == 12
        rebalances = _samples(text, "lookback_source_rebalances_total")
        assert rebalances[(("change", "assigned"), src)] == 2  # both partitions, one consumer

        async def lag_zero() -> bool:
            lag = _samples(
                (await asyncio.to_thread(_get, port, "/metrics")).text, "lookback_source_lag_messages"
            )
            return lag == {(("partition", "0"), src): 0.0, (("partition", "1"), src): 0.0}

        await _until(lag_zero, "a lag gauge of 0 per partition")
    finally:
        await r.aclose()
    assert c.stop() == 0


async def test_kafka_consumer_reports_lag_per_partition_and_rebalances(
    kafka_broker: Broker, consumers: list[Consumer], tmp_path: Path
) -> None:
    audios = device_audio(6, 32)
    port = free_port()
    url = f"{kafka_broker.url}/mon.audio?group=g&consumer=mon&{FAST_GROUP}"
    prod = kafka_producer(kafka_broker)
    prod.list_topics("mon.audio", timeout=10)
    c = _monitored(url, tmp_path / "c.log", port)
    consumers.append(c)
    c.start()
    src = ("source", "kafka:mon.audio")

    async def assigned() -> bool:
        text = (await asyncio.to_thread(_get, port, "/metrics")).text
        return _samples(text, "lookback_source_rebalances_total").get((("change", "assigned"), src)) == 4

    await _until(assigned, "the four partitions assigned")
    assert (await asyncio.to_thread(_get, port, "/readyz")).status_code == 200
    for d, a in audios.items():
        msgs = messages(a, 8)
        for i, msg in enumerate(msgs):
            kafka_publish(prod, "mon.audio", d, i, msg, end=i == len(msgs) - 1)
    prod.flush(10)

    async def finished() -> bool:
        res = await asyncio.to_thread(results, kafka_broker, "mon.audio.results")
        return all(any(x["type"] == "summary" for x in res.get(d, [])) for d in audios)

    await _until(finished, "every device's summary")

    async def caught_up() -> bool:
        text = (await asyncio.to_thread(_get, port, "/metrics")).text
        lag = _samples(text, "lookback_source_lag_messages")
        return lag == {(("partition", str(p)), src): 0.0 for p in range(4)}

    await _until(caught_up, "lag 0 on every partition")
    text = (await asyncio.to_thread(_get, port, "/metrics")).text
    scored = _samples(text, "lookback_source_messages_total")
    assert scored[(("outcome", "scored"), ("reason", ""), src)] == 6 * 4
    assert c.stop() == 0


async def test_health_and_readiness_follow_the_sources(redis_broker: Broker) -> None:
    """/readyz says no until the sources started; /healthz fails once a source's work died."""
    metrics = Metrics()
    engine = Engine(conftest.test_settings(models=["lookback-vad"]), metrics)
    await engine.start()
    url = f"{redis_broker.url}?stream=h:audio&partitions=1&group=g&consumer=h"
    src = RedisStreamsSource(url, engine, SourceOptions(), metrics, lease_s=1.0, checkpoint_ttl_s=60)
    mon = MonitorServer(metrics, [src], "127.0.0.1", 0)
    await mon.start()
    try:
        assert mon.port != 0
        assert (await asyncio.to_thread(_get, mon.port, "/readyz")).status_code == 503
        await src.start()
        mon.ready = True
        assert (await asyncio.to_thread(_get, mon.port, "/readyz")).status_code == 200
        assert (await asyncio.to_thread(_get, mon.port, "/healthz")).status_code == 200
        reader = src._tasks[1]
        reader.cancel()  # the source's reading died
        await asyncio.gather(reader, return_exceptions=True)
        health = await asyncio.to_thread(_get, mon.port, "/healthz")
        assert health.status_code == 503 and "redis:h:audio" in health.text
        assert (await asyncio.to_thread(_get, mon.port, "/readyz")).status_code == 503
        post = await asyncio.to_thread(lambda: httpx.post(f"http://127.0.0.1:{mon.port}/metrics", timeout=10))
        assert post.status_code == 405
    finally:
        await mon.stop()
        await src.stop()
        await engine.stop()
