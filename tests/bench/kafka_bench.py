"""Kafka source benchmark on librdkafka's mock cluster: devices per core, publish-to-result.

Two figures:

- **drain** (CPU cost): a backlog of ``--drain-devices`` devices x ``--drain-messages``
  messages is produced first, then a ``KafkaSource`` in this process (one core, model
  calls inline) consumes it; devices per core ~= audio seconds / CPU seconds.
- **real time**: N devices publish at real time for ``--seconds`` (messages of
  ``--frames-per-message`` frames) to a ``lookback consume`` process pinned to CPU 0; the
  latency of a message is from the producer's ``ts`` header to the CreateTime of its
  results record (both this machine's clock), read live by a tailing consumer.

The mock cluster (tests/sources/kafka_mock.py, pinned to CPU 1) is not a broker on its
own machine and keeps only the last few MB of each partition, so the figures say what the
consumer costs, not what a Kafka deployment achieves; on a shared machine they are
indicative only. Not part of ``run_all.py``.

    python -m tests.bench.kafka_bench [--devices 50,100,200] [--seconds 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from lookback.sources.kafka import publish
from tests.bench.sources_bench import _env, _free_port, _pin, clip, drain_settings, lookback

REPO = Path(__file__).resolve().parents[2]
STORE = REPO / "model_store"
PARTITIONS = 4  # the mock cluster's auto-created topics


@contextlib.contextmanager
def mock_cluster() -> Iterator[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.sources.kafka_mock"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=REPO,
        env=_env(),
        preexec_fn=_pin(1 % (os.cpu_count() or 1)),
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        if not line.startswith("bootstrap "):
            raise RuntimeError("the mock cluster did not start")
        yield line.split()[1]
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        proc.wait(timeout=30)


def _producer(bootstrap: str) -> Producer:
    return Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "enable.idempotence": True})


class Tail:
    """Reads a results topic live (the mock trims old records): (device, seq) -> CreateTime."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.got: dict[tuple[str, int], float] = {}
        self._stop = threading.Event()
        self._c = Consumer(
            {"bootstrap.servers": bootstrap, "group.id": "bench-tail", "enable.auto.commit": False}
        )
        self._c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(PARTITIONS)])
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for m in self._c.consume(1000, 0.1):
                value = m.value()
                if m.error() is None and value:
                    r = orjson.loads(value)
                    if r.get("seq") is not None:
                        self.got[(r["device"], r["seq"])] = m.timestamp()[1] / 1000.0

    def close(self) -> None:
        self._stop.set()
        self._t.join()
        self._c.close()


async def realtime_run(
    bootstrap: str, topic: str, n: int, seconds: float, fpm: int, run: str, audio: Any
) -> dict:
    prod = _producer(bootstrap)
    tail = Tail(bootstrap, f"{topic}.results")
    period = fpm * 128 / 16000
    ticks = int(seconds / period)
    step = fpm * 128
    devices = [f"{run}-{i:05d}" for i in range(n)]
    sent: dict[tuple[str, int], float] = {}
    slip = []
    t0 = time.monotonic() + 0.2
    for k in range(ticks):
        at = t0 + k * period
        now = time.monotonic()
        if at > now:
            await asyncio.sleep(at - now)  # the real-time schedule
        slip.append(time.monotonic() - at)
        ts = time.time()
        for i, d in enumerate(devices):
            off = ((i * 7919 + k) * step) % (len(audio) - step)
            publish(prod, topic, d, k, audio[off : off + step].tobytes())
            sent[(d, k)] = ts
        prod.poll(0)
    prod.flush(30)
    deadline = time.monotonic() + 15
    while len([k for k in sent if k in tail.got]) < len(sent) and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.1)  # poll the tail
    tail.close()
    lat = np.array([(tail.got[k] - sent[k]) * 1e3 for k in sent if k in tail.got])
    return {
        "devices": n,
        "messages": len(sent),
        "scored": int(lat.size),
        "p50_ms": float(np.percentile(lat, 50)) if lat.size else None,
        "p99_ms": float(np.percentile(lat, 99)) if lat.size else None,
        "producer_slip_p99_ms": float(np.percentile(slip, 99) * 1e3) if slip else None,
    }


async def drain_run(bootstrap: str, n: int, msgs: int, fpm: int, audio: Any) -> dict[str, Any]:
    """CPU seconds of a ``KafkaSource`` in this process draining a backlog."""
    from lookback.engine.engine import Engine
    from lookback.metrics import Metrics
    from lookback.sources.core import SourceOptions
    from lookback.sources.kafka import KafkaSource

    topic = f"drain{fpm}"
    step = fpm * 128
    prod = _producer(bootstrap)
    for k in range(msgs):
        for i in range(n):
            off = ((i * 7919 + k) * step) % (len(audio) - step)
            publish(prod, topic, f"d{fpm}-{i:05d}", k, audio[off : off + step].tobytes())
        prod.poll(0)
    prod.flush(30)
    settings = drain_settings(n)
    metrics = Metrics()
    engine = Engine(settings, metrics)
    await engine.start()
    src = KafkaSource(
        f"kafka://{bootstrap}/{topic}?group=drain&consumer=c",
        engine,
        SourceOptions.from_settings(settings),
        metrics,
        settings=settings,
    )
    want = n * msgs
    labels = {"source": f"kafka:{topic}", "outcome": "scored", "reason": ""}
    t0, c0 = time.perf_counter(), time.process_time()
    await src.start()
    while (metrics.registry.get_sample_value("lookback_source_messages_total", labels) or 0) < want:  # noqa: ASYNC110
        await asyncio.sleep(0.02)  # poll the counter
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    await src.stop()
    await engine.stop()
    audio_s = want * step / 16000
    return {
        "devices": n,
        "frames_per_message": fpm,
        "messages": want,
        "wall_s": wall,
        "cpu_s": cpu,
        "cpu_us_per_message": cpu / want * 1e6,
        "devices_per_core_cpu": audio_s / cpu,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", default="50,100,200")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--frames-per-message", type=int, default=8)
    ap.add_argument("--drain-devices", type=int, default=100)
    ap.add_argument("--drain-messages", type=int, default=20)
    ap.add_argument("--p99-ms", type=float, default=100.0)
    ap.add_argument("--json")
    args = ap.parse_args()
    fpm = args.frames_per_message
    audio = clip()
    rows: list[dict[str, Any]] = []
    with mock_cluster() as bootstrap:
        rows.append(
            {
                "transport": "kafka-drain",
                **asyncio.run(drain_run(bootstrap, args.drain_devices, args.drain_messages, fpm, audio)),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        counts = [int(x) for x in args.devices.split(",") if x]
        with tempfile.TemporaryDirectory() as tmpd:
            log = Path(tmpd) / "consume.log"
            port = _free_port()
            env = _env(LOOKBACK_SOURCE_IDLE_TIMEOUT_S="2", LOOKBACK_CONSUME_METRICS_PORT=str(port))
            # the mock answers a fetch only when fetch.wait.max.ms is up (a broker answers as
            # soon as data arrives): a short wait keeps that out of the latency
            url = f"kafka://{bootstrap}/bench.audio?group=bench&consumer=c&fetch.wait.max.ms=5"
            Producer({"bootstrap.servers": bootstrap}).list_topics("bench.audio", timeout=10)

            def assigned() -> bool:
                """Ready, and the partitions assigned (the group's first join takes seconds)."""
                with contextlib.suppress(httpx.HTTPError):
                    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=1).text
                    return 'change="assigned"' in text
                return False

            with lookback(["consume", url], env, log, assigned):
                for n in counts:
                    res = asyncio.run(
                        realtime_run(bootstrap, "bench.audio", n, args.seconds, fpm, f"r{n}", audio)
                    )
                    res["keeps_up"] = (
                        res["scored"] == res["messages"] and (res["p99_ms"] or 1e9) <= args.p99_ms
                    )
                    rows.append({"transport": "kafka", **res})
                    print(json.dumps(rows[-1]), flush=True)
                    time.sleep(2.5)  # let the idle devices of this run close before the next
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
