"""Kafka helpers of the source tests: a producer, and reading topics of the mock cluster."""

from __future__ import annotations

import time
from typing import Any

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from tests.sources.conftest import Broker
from tests.sources.support import by_device

# the mock drops a member that left only when its session times out: keep that short
FAST_GROUP = "session.timeout.ms=6000&heartbeat.interval.ms=500"


def _bootstrap(broker: Broker) -> str:
    return broker.url.removeprefix("kafka://")


def kafka_producer(broker: Broker) -> Producer:
    return Producer({"bootstrap.servers": _bootstrap(broker), "linger.ms": 2, "enable.idempotence": True})


def read_topic(broker: Broker, topic: str) -> list[Any]:
    """Every record of ``topic`` (all partitions, to their current end), as committed."""
    c = Consumer(
        {
            "bootstrap.servers": _bootstrap(broker),
            "group.id": "test-reader",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    try:
        md = c.list_topics(topic, timeout=10)
        if topic not in md.topics or md.topics[topic].error is not None:
            return []
        ends = {}
        for p in md.topics[topic].partitions:
            lo, hi = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            if hi > lo:
                ends[p] = hi
        if not ends:
            return []
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
        out = []
        deadline = time.monotonic() + 30
        while ends:
            assert time.monotonic() < deadline, f"reading {topic} timed out"
            for m in c.consume(1000, 0.2):
                if m.error() is not None:
                    continue
                out.append(m)
                if (m.offset() or 0) >= ends.get(m.partition() or 0, 1 << 62) - 1:
                    ends.pop(m.partition(), None)
        return out
    finally:
        c.close()


def results(broker: Broker, topic: str) -> dict[str, list[dict[str, Any]]]:
    recs = [orjson.loads(m.value()) for m in read_topic(broker, topic)]
    return by_device([(r["device"], r["records"]) for r in recs])


def errors(broker: Broker, topic: str) -> list[dict[str, Any]]:
    return [orjson.loads(m.value()) for m in read_topic(broker, topic)]


def writers(broker: Broker, topic: str) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for m in read_topic(broker, topic):
        r = orjson.loads(m.value())
        out.setdefault(r["device"], set()).add(r["by"])
    return out
