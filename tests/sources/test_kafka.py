"""Kafka source against librdkafka's mock cluster (a real Kafka protocol server on loopback)
and real ``lookback consume`` processes."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lookback.engine.engine import Engine
from lookback.metrics import Metrics
from lookback.sources.core import SourceOptions
from lookback.sources.kafka import CKPT_HEADER, KafkaSource, publish
from tests import conftest
from tests.sources.conftest import Broker
from tests.sources.conftest import Consumer as ConsumerProc
from tests.sources.kafka_support import FAST_GROUP, errors, kafka_producer, read_topic, results, writers
from tests.sources.support import device_audio, messages, solo_reference
from tests.support import free_port

PARTITIONS = 4  # what the mock cluster gives an auto-created topic


def _assert_like_reference(res: dict[str, list[dict]], reference: dict[str, list[Any]]) -> None:
    for dev, ref in reference.items():
        steps = [x for x in res[dev] if x["type"] == "result"]
        assert [x["step"] for x in steps] == list(range(len(ref))), dev  # each step once, in order
        assert [x["scores"] for x in steps] == ref, dev  # bit for bit (float32 -> JSON -> float)


async def _wait_for(cond: Any, what: str, limit_s: float = 60) -> None:
    deadline = time.monotonic() + limit_s
    while not await asyncio.to_thread(cond):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)  # poll the output topic


def _summaries(broker: Broker, topic: str, devices: Any) -> bool:
    res = results(broker, topic)
    return all(any(x["type"] == "summary" for x in res.get(d, [])) for d in devices)


async def _run_source(url: str, metrics: Metrics, body: Any, model_calls: str = "auto", **over: Any) -> None:
    settings = conftest.test_settings(models=["lookback-vad"], model_calls=model_calls)
    engine = Engine(settings, metrics)
    await engine.start()
    src = KafkaSource(url, engine, SourceOptions(max_frames=64, **over), metrics, settings=settings)
    await src.start()
    try:
        await body(src)
    finally:
        await src.stop()
        await engine.stop()


async def test_devices_scored_like_solo_runs_with_bad_input_rejected(kafka_broker: Broker) -> None:
    audios = device_audio(4, 48)
    m = {d: messages(a, 8) for d, a in audios.items()}  # 6 messages of 8 frames each
    ok, dup, gapped, bad = list(m)
    zeros = bytes(len(m[gapped][2]))
    reference = await solo_reference(
        {
            ok: audios[ok],
            dup: audios[dup],
            gapped: m[gapped][0] + zeros + b"".join(m[gapped][2:]),  # seq 1 never sent
            bad: m[bad][0] + m[bad][5],
        }
    )
    metrics = Metrics()
    url = f"{kafka_broker.url}/k.audio?group=g&consumer=solo"
    prod = kafka_producer(kafka_broker)

    async def body(src: KafkaSource) -> None:
        for i in range(6):
            for d in (ok, dup):
                publish(prod, "k.audio", d, i, m[d][i], end=i == 5)
            if i == 2:
                publish(prod, "k.audio", dup, 2, m[dup][2])  # a repeat
            if i != 1:
                publish(prod, "k.audio", gapped, i, m[gapped][i], end=i == 5)
        nan = np.full(128, np.nan, "<f4").tobytes()
        publish(prod, "k.audio", bad, 0, m[bad][0])
        publish(prod, "k.audio", bad, 1, m[bad][1][:100])  # not whole frames
        publish(prod, "k.audio", bad, 2, m[bad][2], encoding="mulaw-x")
        prod.produce("k.audio", value=m[bad][3], key=bad.encode())  # no seq header
        publish(prod, "k.audio", bad, 4, nan, encoding="pcm_f32le")
        publish(prod, "k.audio", bad, 5, m[bad][5], end=True)
        prod.produce("k.audio", value=m[ok][0], headers=[("seq", b"7")])  # no key: no device
        prod.produce("k.audio", value=m[ok][0], key=b"\xff\xfe", headers=[("seq", b"8")])  # not UTF-8
        prod.flush(10)
        await _wait_for(
            lambda: (
                _summaries(kafka_broker, "k.audio.results", m)
                and len(errors(kafka_broker, "k.audio.errors")) >= 7
            ),
            "every device's summary and 7 errors",
        )
        assert src.alive()

    await _run_source(url, metrics, body)
    res = results(kafka_broker, "k.audio.results")
    _assert_like_reference(res, reference)
    gaps = [x for x in res[gapped] if x["type"] == "gap"]
    assert [(g["missing"], g["policy"], g["fill_samples"]) for g in gaps] == [
        (1, "zero_fill", len(zeros) // 2)
    ]
    got = sorted(
        (str(e["device"]), str(e["seq"]), e["reason"]) for e in errors(kafka_broker, "k.audio.errors")
    )
    assert got == sorted(
        [
            (dup, "2", "duplicate_message"),
            (bad, "1", "bad_frame_size"),
            (bad, "2", "bad_encoding"),
            (bad, "None", "missing_field"),
            (bad, "4", "non_finite_audio"),
            ("None", "7", "missing_field"),
            ("None", "8", "missing_field"),
        ]
    )
    # every results record sits on its input partition and carries the device checkpoint
    for rec in read_topic(kafka_broker, "k.audio.results"):
        assert CKPT_HEADER in dict(rec.headers())
    value = metrics.registry.get_sample_value
    src_label = {"source": "kafka:k.audio"}
    n_steps = sum(len(r) for r in reference.values())
    assert value("lookback_source_steps_total", src_label) == n_steps
    assert (value("lookback_source_bytes_total", src_label) or 0) > 0
    assert value("lookback_source_rebalances_total", {**src_label, "change": "assigned"}) == PARTITIONS
    assert value("lookback_source_gaps_total", {**src_label, "policy": "zero_fill"}) == 1


@pytest.mark.slow
async def test_restart_resumes_from_the_results_topic_exactly_once(kafka_broker: Broker) -> None:
    """A second consumer (a restart) restores every device from its results partition."""
    audios = device_audio(3, 64)
    reference = await solo_reference(audios)
    m = {d: messages(a, 8) for d, a in audios.items()}  # 8 messages each
    url = f"{kafka_broker.url}/r.audio?group=g&consumer=first&{FAST_GROUP}"
    prod = kafka_producer(kafka_broker)

    def send(rng: range) -> None:
        for i in rng:
            for d, msgs in m.items():
                publish(prod, "r.audio", d, i, msgs[i], end=i == len(msgs) - 1)
        prod.flush(10)

    def consumed(seq: int) -> bool:
        res = results(kafka_broker, "r.audio.results")
        return all(any(x.get("type") == "result" for x in res.get(d, [])) for d in m) and all(
            max((r["seq"] for r in map(orjson.loads, _values(kafka_broker)) if r["device"] == d), default=-1)
            >= seq
            for d in m
        )

    async def first(src: KafkaSource) -> None:
        send(range(4))
        await _wait_for(lambda: consumed(3), "the first four messages")

    await _run_source(url, Metrics(), first)
    metrics = Metrics()

    async def second(src: KafkaSource) -> None:
        send(range(4, 8))
        await _wait_for(lambda: _summaries(kafka_broker, "r.audio.results", m), "every summary")

    await _run_source(url.replace("consumer=first", "consumer=second"), metrics, second)
    _assert_like_reference(results(kafka_broker, "r.audio.results"), reference)
    assert (
        metrics.registry.get_sample_value("lookback_source_restores_total", {"source": "kafka:r.audio"}) == 3
    )
    assert errors(kafka_broker, "r.audio.errors") == []
    assert {w for ws in writers(kafka_broker, "r.audio.results").values() for w in ws} == {"first", "second"}


def _values(broker: Broker) -> list[bytes]:
    return [m.value() for m in read_topic(broker, "r.audio.results")]


@pytest.mark.slow
async def test_many_devices_two_consumers_one_killed_exactly_once(
    kafka_broker: Broker, consumers: list[ConsumerProc], tmp_path: Path
) -> None:
    n_devices, frames, fpm = 200, 200, 20  # 1.6 s of audio per device, 10 messages each
    audios = device_audio(n_devices, frames)
    reference = await solo_reference(audios)
    url = f"{kafka_broker.url}/t.audio?group=g&{FAST_GROUP}"
    env = {"LOOKBACK_SOURCE_IDLE_TIMEOUT_S": "600"}
    prod = kafka_producer(kafka_broker)
    # the topics exist (4 partitions each) before the consumers join
    prod.list_topics("t.audio", timeout=10)
    prod.list_topics("t.audio.results", timeout=10)
    port = free_port()  # the survivor's /metrics tells what it took over
    a = ConsumerProc(url + "&consumer=a", tmp_path / "a.log", **env)
    b = ConsumerProc(
        url + "&consumer=b",
        tmp_path / "b.log",
        **env,
        LOOKBACK_CONSUME_METRICS_PORT=str(port),
        LOOKBACK_CONSUME_METRICS_HOST="127.0.0.1",
    )
    consumers += [a, b]
    a.start()
    b.start()
    per_dev = {d: messages(x, fpm) for d, x in audios.items()}
    n_msgs = len(next(iter(per_dev.values())))
    killed = False
    for i in range(n_msgs):  # interleaved: message i of every device, then i + 1
        for d, msgs in per_dev.items():
            publish(prod, "t.audio", d, i, msgs[i], end=i == n_msgs - 1)
        prod.flush(10)
        if i == n_msgs // 2 and not killed:
            # wait until both consumers have published results, then kill a mid-stream
            await _wait_for(
                lambda: (
                    {w for ws in writers(kafka_broker, "t.audio.results").values() for w in ws} == {"a", "b"}
                ),
                "both consumers publishing",
            )
            a.kill()
            killed = True
    deadline = time.monotonic() + 120
    while True:
        res = await asyncio.to_thread(results, kafka_broker, "t.audio.results")
        done = sum(1 for recs in res.values() if any(x["type"] == "summary" for x in recs))
        if done == n_devices:
            break
        assert time.monotonic() < deadline, f"only {done}/{n_devices} devices finished"
        assert b.proc is not None and b.proc.poll() is None, "surviving consumer died"
        await asyncio.sleep(0.5)  # poll the output topic
    assert "Traceback" not in (tmp_path / "b.log").read_text()
    for dev, ref in reference.items():
        recs = res[dev]
        steps = [x for x in recs if x["type"] == "result"]
        assert [x["step"] for x in steps] == list(range(len(ref))), dev  # each step once, in order
        assert [x["scores"] for x in steps] == ref, dev
        summaries = [x for x in recs if x["type"] == "summary"]
        assert len(summaries) == 1 and summaries[0]["steps"] == len(ref)
        assert {x["epoch"] for x in recs} == {0}
    assert errors(kafka_broker, "t.audio.errors") == []
    handed_over = [d for d, w in writers(kafka_broker, "t.audio.results").items() if w == {"a", "b"}]
    assert handed_over, "no device moved from the killed consumer to the survivor"
    scrape = (await asyncio.to_thread(httpx.get, f"http://127.0.0.1:{port}/metrics", timeout=10)).text
    value = {
        (f.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(scrape)
        for s in f.samples
    }
    src = ("source", "kafka:t.audio")
    # b held its share, then every partition once a's session expired
    assert value[("lookback_source_rebalances", (("change", "assigned"), src))] >= PARTITIONS + 1
    # and continued a's devices from the checkpoints a left in the results topic
    assert value[("lookback_source_restores", (src,))] >= len(handed_over)
    assert b.stop() == 0


async def test_backpressure_pauses_fetching_and_loses_nothing(kafka_broker: Broker) -> None:
    """A backlog far beyond ``max_inflight``: partitions paused, at most 4 messages in flight.

    The model is held (its calls wait on a gate, in the executor thread) until the consumer
    has paused: otherwise a fast machine could score as fast as it fetches.
    """
    audios = device_audio(10, 96)
    reference = await solo_reference(audios)
    m = {d: messages(a, 8) for d, a in audios.items()}  # 12 messages each, 120 in all
    prod = kafka_producer(kafka_broker)
    for i in range(12):
        for d, msgs in m.items():
            publish(prod, "b.audio", d, i, msgs[i], end=i == 11)
    prod.flush(10)
    metrics = Metrics()
    most = 0

    gate = threading.Event()

    def paused() -> bool:
        n = metrics.registry.get_sample_value(
            "lookback_source_fetch_pauses_total", {"source": "kafka:b.audio"}
        )
        return bool(n)

    async def body(src: KafkaSource) -> None:
        nonlocal most
        batcher = src.hub.engine.resolve("lookback-vad").batcher
        real = batcher.compute

        def held(batch: Any) -> Any:
            gate.wait(60)
            return real(batch)

        batcher.compute = held
        try:
            await _wait_for(paused, "the consumer to pause its partitions")
            most = src.hub.inflight
        finally:
            gate.set()
        done = asyncio.create_task(
            _wait_for(lambda: _summaries(kafka_broker, "b.audio.results", m), "every device's summary")
        )
        while not done.done():
            most = max(most, src.hub.inflight)
            await asyncio.sleep(0.001)  # sample the consumer while it drains
        await done

    await _run_source(
        f"{kafka_broker.url}/b.audio?group=g&consumer=solo",
        metrics,
        body,
        model_calls="thread",  # the gate blocks the executor thread, never the event loop
        max_inflight=4,
        device_queue=2,
    )
    pauses = metrics.registry.get_sample_value(
        "lookback_source_fetch_pauses_total", {"source": "kafka:b.audio"}
    )
    assert pauses is not None and pauses >= 1, "the consumer never paused its partitions"
    assert 0 < most <= 4
    _assert_like_reference(results(kafka_broker, "b.audio.results"), reference)
    scored = metrics.registry.get_sample_value(
        "lookback_source_messages_total", {"source": "kafka:b.audio", "outcome": "scored", "reason": ""}
    )
    assert scored == 120


@pytest.mark.slow
@pytest.mark.parametrize("assignor", ["range", "cooperative-sticky"])
async def test_consumer_joining_mid_run_takes_partitions_over_exactly_once(
    kafka_broker: Broker, consumers: list[ConsumerProc], tmp_path: Path, assignor: str
) -> None:
    """Rebalance: the first consumer finishes and hands over partitions to a newcomer
    (eager: everything revoked, then reassigned; cooperative: only what moves)."""
    n_devices, frames, fpm = 40, 160, 16
    audios = device_audio(n_devices, frames)
    reference = await solo_reference(audios)
    url = f"{kafka_broker.url}/j.audio?group=g&{FAST_GROUP}&partition.assignment.strategy={assignor}"
    prod = kafka_producer(kafka_broker)
    prod.list_topics("j.audio", timeout=10)
    a = ConsumerProc(url + "&consumer=a", tmp_path / "a.log").start()
    consumers.append(a)
    per_dev = {d: messages(x, fpm) for d, x in audios.items()}
    n_msgs = len(next(iter(per_dev.values())))

    def send(i: int) -> None:
        for d, msgs in per_dev.items():
            publish(prod, "j.audio", d, i, msgs[i], end=i == n_msgs - 1)
        prod.flush(10)

    for i in range(n_msgs // 2):
        send(i)
    await _wait_for(
        lambda: "a" in {w for ws in writers(kafka_broker, "j.audio.results").values() for w in ws}, "a"
    )
    port = free_port()
    b = ConsumerProc(
        url + "&consumer=b",
        tmp_path / "b.log",
        LOOKBACK_CONSUME_METRICS_PORT=str(port),
        LOOKBACK_CONSUME_METRICS_HOST="127.0.0.1",
    ).start()
    consumers.append(b)

    def b_assigned() -> bool:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        return 'lookback_source_rebalances_total{change="assigned",source="kafka:j.audio"}' in text

    await _wait_for(b_assigned, "partitions moved to b")  # the rest of the stream goes to both
    for i in range(n_msgs // 2, n_msgs):
        send(i)
    await _wait_for(lambda: _summaries(kafka_broker, "j.audio.results", audios), "every device's summary", 90)
    _assert_like_reference(results(kafka_broker, "j.audio.results"), reference)
    moved = [d for d, w in writers(kafka_broker, "j.audio.results").items() if w == {"a", "b"}]
    assert moved, "no device continued on the newcomer"
    assert errors(kafka_broker, "j.audio.errors") == []
    assert a.stop() == 0 and b.stop() == 0
    for log in ("a.log", "b.log"):
        assert "Traceback" not in (tmp_path / log).read_text()


@pytest.mark.slow
async def test_serve_consumes_kafka_next_to_its_api(kafka_broker: Broker, tmp_path: Path) -> None:
    """``lookback serve`` with a kafka:// source: devices scored, source metrics on its /metrics."""
    from tests.conftest import spawn_server

    audios = device_audio(3, 64)
    reference = await solo_reference(audios)
    prod = kafka_producer(kafka_broker)
    url = f"{kafka_broker.url}/s.audio?group=g&consumer=srv&{FAST_GROUP}"
    with spawn_server(tmp_path, LOOKBACK_SOURCES=url, LOOKBACK_MODELS="lookback-vad") as srv:
        for d, a in audios.items():
            msgs = messages(a, 16)
            for i, msg in enumerate(msgs):
                publish(prod, "s.audio", d, i, msg, end=i == len(msgs) - 1)
        prod.flush(10)
        await _wait_for(lambda: _summaries(kafka_broker, "s.audio.results", audios), "every summary")
        _assert_like_reference(results(kafka_broker, "s.audio.results"), reference)
        text = (await asyncio.to_thread(httpx.get, srv.url + "/metrics", timeout=10)).text
        steps = sum(len(r) for r in reference.values())
        assert f'lookback_source_steps_total{{source="kafka:s.audio"}} {steps}.0' in text
        assert (await asyncio.to_thread(httpx.get, srv.url + "/readyz", timeout=10)).status_code == 200
