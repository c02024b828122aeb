"""Real brokers for the source tests: redis-server and mosquitto on free loopback ports.

Each broker runs from a temp dir and is ready when it answers (PING / a CONNACK), never
after a fixed sleep. ``Consumer`` runs ``lookback consume`` as a subprocess so a test can
SIGKILL or restart it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import REPO, STORE, free_port


def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str, log: Path) -> None:
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited early:\n{log.read_text(errors='replace')}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not listen on {port}")
        time.sleep(0.02)  # readiness poll, bounded by the deadline


@dataclass
class Broker:
    port: int
    proc: subprocess.Popen[bytes]
    dir: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


@pytest.fixture
def redis_broker(tmp_path: Path) -> Iterator[Broker]:
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail("redis-server is not installed (make system-deps)")
    port = free_port()
    d = tmp_path / "redis"
    d.mkdir()
    log = d / "redis.log"
    proc = subprocess.Popen(
        [
            exe,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(d),
            "--save",
            "",
            "--appendonly",
            "no",
            "--logfile",
            str(log),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        _wait_port(port, proc, "redis-server", log)
        yield Broker(port, proc, d)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture
def mqtt_broker(tmp_path: Path) -> Iterator[Broker]:
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(exe).exists():
        pytest.fail("mosquitto is not installed (make system-deps)")
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
        _wait_port(port, proc, "mosquitto", log)
        yield Broker(port, proc, d)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


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
