"""confluent-kafka against aiokafka on librdkafka's mock cluster: CPU per record.

Why the Kafka source is built on confluent-kafka (docs/sources.md#kafka): the adapter
consumes one record and produces one results record per message, so both directions'
per-record CPU count. Each client produces ``N`` 2 KB records (8 frames, keyed by device,
with a header), then consumes them from the start in batches of 500; CPU is this process's
(librdkafka's threads included). aiokafka is not a dependency: ``pip install aiokafka``.

    python -m tests.bench.kafka_clients_bench [N]    # N <= 8000: the mock keeps ~5 MB a partition
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

from confluent_kafka import Consumer, Producer

from tests.bench.kafka_bench import mock_cluster

AUDIO = os.urandom(2048)


def confluent(bootstrap: str, n: int) -> None:
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "enable.idempotence": True})
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(n):
        while True:
            try:
                p.produce(
                    "cb", value=AUDIO, key=f"dev-{i % 200}".encode(), headers=[("seq", str(i).encode())]
                )
                break
            except BufferError:
                p.poll(0.01)
    p.flush(60)
    print(
        f"confluent-kafka produce: {1e6 * (time.process_time() - c0) / n:.1f} us CPU/record, "
        f"{n / (time.perf_counter() - t0):.0f} records/s",
        flush=True,
    )
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "cb", "auto.offset.reset": "earliest"})
    c.subscribe(["cb"])
    got, c0, t0 = 0, 0.0, 0.0
    while got < n:
        ms = c.consume(500, 0.5)
        if ms and not c0:
            t0, c0 = time.perf_counter(), time.process_time()
        for m in ms:
            if m.error() is None:
                got += 1
                _ = (m.key(), m.value(), m.headers(), m.partition(), m.offset())
    print(
        f"confluent-kafka consume: {1e6 * (time.process_time() - c0) / n:.1f} us CPU/record, "
        f"{n / (time.perf_counter() - t0):.0f} records/s",
        flush=True,
    )
    c.close()


async def aio(bootstrap: str, n: int) -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    pr = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, enable_idempotence=True)
    await pr.start()
    t0, c0 = time.perf_counter(), time.process_time()
    futs = []
    for i in range(n):
        futs.append(
            await pr.send(
                "ab", value=AUDIO, key=f"dev-{i % 200}".encode(), headers=[("seq", str(i).encode())]
            )
        )
        if len(futs) >= 1000:
            await asyncio.gather(*futs)
            futs = []
    await asyncio.gather(*futs)
    print(
        f"aiokafka produce: {1e6 * (time.process_time() - c0) / n:.1f} us CPU/record, "
        f"{n / (time.perf_counter() - t0):.0f} records/s",
        flush=True,
    )
    await pr.stop()
    c = AIOKafkaConsumer("ab", bootstrap_servers=bootstrap, group_id="ab", auto_offset_reset="earliest")
    await c.start()
    got, c0, t0 = 0, 0.0, 0.0
    while got < n:
        batch = await c.getmany(timeout_ms=500, max_records=500)
        if batch and not c0:
            t0, c0 = time.perf_counter(), time.process_time()
        for ms in batch.values():
            for m in ms:
                got += 1
                _ = (m.key, m.value, m.headers, m.partition, m.offset)
    print(
        f"aiokafka consume: {1e6 * (time.process_time() - c0) / n:.1f} us CPU/record, "
        f"{n / (time.perf_counter() - t0):.0f} records/s",
        flush=True,
    )
    await c.stop()


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 8000
    with mock_cluster() as bootstrap:
        confluent(bootstrap, n)
        try:
            asyncio.run(aio(bootstrap, n))
        except ImportError:
            print("aiokafka not installed (pip install aiokafka): skipped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
