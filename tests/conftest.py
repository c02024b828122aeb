"""Shared fixtures: clips, and real uvicorn servers on free ports.

``running_server`` runs uvicorn in a thread of this process (so a test can inject an
engine, e.g. one whose model call fails); ``spawn_server`` runs ``lookback serve`` as a
subprocess (for signals). Both wait for readiness by asking the server (uvicorn's
``started`` flag, or ``/readyz``), never by sleeping a fixed time.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn

from lookback.app import create_app
from lookback.engine.engine import Engine
from lookback.metrics import Metrics
from lookback.server import uvicorn_config
from lookback.settings import Settings
from tests.support import AUDIO, FIXTURES, REPO, STORE, free_port, read_clip, start_server

__all__ = [
    "AUDIO",
    "FIXTURES",
    "REPO",
    "STORE",
    "free_port",
    "read_clip",
]  # importers predating tests.support

DEFAULT_MODEL = "lookback-vad"
SILERO = "silero-vad"


@pytest.fixture(scope="session")
def speech_clip() -> np.ndarray:
    """~10 s of generated speech with pauses (int16, 16 kHz)."""
    return read_clip("silero_ref_speech.wav")


def silero_available() -> bool:
    return (STORE / SILERO / "6.2.3" / "silero_vad.onnx").is_file()


@pytest.fixture(scope="session")
def silero_model() -> str:
    """Ensure Silero is imported (``make test`` runs ``make silero`` first); fail loudly if not."""
    if not silero_available():
        from lookback.engine.importer import import_model

        try:
            import_model(SILERO, STORE)
        except Exception as exc:  # pragma: no cover - only without PyPI
            pytest.fail(f"Silero VAD could not be imported (run `make silero`): {exc}")
    return SILERO


def test_settings(**overrides: object) -> Settings:
    """Settings for tests: the repo store, small warm-up, no .env influence.

    Model calls in the executor thread whatever the CPU count, so tests that hold a batch
    in the model call behave the same under ``taskset -c 0``; inline is tested by name.
    No GC freeze: the test process starts many apps (tests/test_app.py covers it).
    """
    base: dict[str, Any] = dict(
        model_store=STORE,
        warmup_batch_sizes=[1],
        port=0,
        initial_slots=8,
        log_level="warning",
        drain_grace_s=5.0,
        model_calls="thread",
        gc_freeze=False,
    )
    base.update(overrides)
    return Settings(_env_file=None, **base)


@dataclass
class Server:
    url: str
    port: int
    app: object
    settings: Settings
    metrics: Metrics

    @property
    def ws(self) -> str:
        return self.url.replace("http://", "ws://")

    def get(self, path: str, **kw: object) -> httpx.Response:
        return httpx.get(self.url + path, timeout=30, **kw)  # type: ignore[arg-type]


@contextlib.contextmanager
def uvicorn_in_thread(config: uvicorn.Config) -> Iterator[uvicorn.Server]:
    """Run a uvicorn server in a daemon thread; ready when uvicorn says it started."""
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("test server did not start")
        time.sleep(0.01)  # polls uvicorn's started flag; bounded by the deadline
    try:
        yield server
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@contextlib.contextmanager
def running_server(
    settings: Settings | None = None, *, engine: Engine | None = None, metrics: Metrics | None = None
) -> Iterator[Server]:
    """A real uvicorn server (sansio WebSockets, as in production) in a background thread."""
    settings = settings or test_settings()
    metrics = metrics or (engine.metrics if engine else Metrics())
    app = create_app(settings, metrics=metrics, engine=engine)
    port = free_port()
    # production's protocols (lookback.transport, lookback.websocket), so every API test
    # exercises the WebSocket direct path
    config = uvicorn_config(
        app,
        settings.model_copy(update={"host": "127.0.0.1", "log_level": "warning"}),
        port=port,
        metrics=metrics,
    )
    with uvicorn_in_thread(config):
        yield Server(f"http://127.0.0.1:{port}", port, app, settings, metrics)


@dataclass
class Spawned:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    @property
    def ws(self) -> str:
        return self.url.replace("http://", "ws://")

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)


@contextlib.contextmanager
def spawn_server(tmp_path: Path, **env: str) -> Iterator[Spawned]:
    """``lookback serve`` in a subprocess, ready when ``/readyz`` answers 200."""
    port = free_port()
    log = tmp_path / f"server-{port}.log"
    proc = start_server(log, port, env)
    try:
        yield Spawned(proc, f"http://127.0.0.1:{port}", log)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(silero_model: str) -> Iterator[Server]:
    """A shared server with every model in the store (default model + Silero)."""
    with running_server() as srv:
        yield srv


# --- marks -----------------------------------------------------------------------------------
# A test's marks follow from where it lives and what it uses, so nobody has to remember them
# (`make check` runs -m "not slow"; pyproject lists the markers).
FOLDER_MARKS = {"web": ("browser", "slow"), "deploy": ("deploy", "slow")}
FIXTURE_MARKS = {"silero_model": ("silero",)}
# Slow tests of the folders the engine and API seam branches own: move these into the files
# (@pytest.mark.slow) once those branches are merged.
SLOW_ELSEWHERE = (
    "tests/api/test_fuzz.py::",
    "tests/api/test_security.py::test_keys_origins_and_logs_on_a_real_server",
    "tests/engine/test_offline.py::test_a_long_clip_through_the_batcher_in_bounded_pieces",
    "tests/engine/test_parity.py::test_batched_equals_solo[silero-vad-inline-wait]",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        rel = item.path.relative_to(REPO / "tests").parts
        marks = set(FOLDER_MARKS.get(rel[0], ())) if len(rel) > 1 else set()
        for fixture, extra in FIXTURE_MARKS.items():
            if fixture in getattr(item, "fixturenames", ()):
                marks.update(extra)
        if item.nodeid.startswith(SLOW_ELSEWHERE):
            marks.add("slow")
        for mark in sorted(marks):
            item.add_marker(mark)
