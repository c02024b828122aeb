"""Real brokers for the source tests: redis-server, mosquitto and librdkafka's mock Kafka
cluster on free loopback ports.

Each broker runs from a temp dir and is ready when it answers (PING / a CONNACK), never
after a fixed sleep. ``Consumer`` runs ``lookback consume`` as a subprocess so a test can
SIGKILL or restart it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fixtures_services import need, redis_server, wait_tcp
from tests.support import REPO, STORE, free_port


@dataclass
class Broker:
    port: int
    url: str


@pytest.fixture
def redis_broker(tmp_path: Path) -> Iterator[Broker]:
    port = free_port()
    with redis_server(tmp_path, port) as url:
        yield Broker(port, url)


@pytest.fixture
def mqtt_broker(tmp_path: Path) -> Iterator[Broker]:
    exe = need("mosquitto")
    port = free_port()
    d = tmp_path / "mosquitto"
    d.mkdir()
    log = d / "mosquitto.log"
    conf = d / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        "max_queued_messages 0\nmax_inflight_messages 0\nlog_dest stderr\n"
    )
    with log.open("wb") as out:
        proc = subprocess.Popen([exe, "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_tcp(port, proc, "mosquitto", log)
        yield Broker(port, f"mqtt://127.0.0.1:{port}")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@contextlib.contextmanager
def kafka_mock_cluster(tmp_path: Path, brokers: int = 1) -> Iterator[str]:
    """librdkafka's mock cluster, owned by a child process; yields its bootstrap servers.

    Ready when the child has listed the brokers' metadata (it prints them); stopped by
    closing its stdin, killed if it does not exit.
    """
    log = tmp_path / f"kafka-mock-{time.monotonic_ns()}.log"
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.sources.kafka_mock", str(brokers)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            cwd=REPO,
        )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()  # blocks until the brokers answer (or it dies)
        if not line.startswith("bootstrap "):
            raise RuntimeError(f"kafka mock cluster did not start:\n{log.read_text(errors='replace')}")
        yield line.split()[1]
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
def kafka_broker(tmp_path: Path) -> Iterator[Broker]:
    with kafka_mock_cluster(tmp_path) as bootstrap:
        yield Broker(int(bootstrap.split(",")[0].rsplit(":", 1)[1]), f"kafka://{bootstrap}")


class Consumer:
    """``lookback consume URL`` in a subprocess; ready when it prints its ready line."""

    def __init__(self, url: str, log: Path, **env: str) -> None:
        self.url, self.log, self.env = url, log, env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Consumer:
        full_env = {
            **os.environ,
            "LOOKBACK_MODEL_STORE": str(STORE),
            "LOOKBACK_MODELS": "lookback-vad",
            "LOOKBACK_WARMUP_BATCH_SIZES": "1",
            "LOOKBACK_LOG_LEVEL": "warning",
            "LOOKBACK_GC_FREEZE": "false",
            **self.env,
        }
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "lookback.cli", "consume", self.url],
                env=full_env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )
        deadline = time.monotonic() + 60
        while b"lookback consume: ready" not in self.log.read_bytes().split(b"stopped")[-1]:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"consumer did not start:\n{self.log.read_text(errors='replace')}")
            time.sleep(0.05)  # readiness poll, bounded by the deadline
        return self

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


@pytest.fixture
def consumers(tmp_path: Path) -> Iterator[list[Consumer]]:
    made: list[Consumer] = []
    yield made
    for c in made:
        c.close()
