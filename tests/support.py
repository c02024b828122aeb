"""Plain helpers every test folder shares: paths, a free port, a fixture clip, a metric value.

One definition each (``tests/conftest.py`` holds the fixtures and servers and imports these).
No pytest fixtures here, so bench scripts run as ``python -m tests.bench...`` can import it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TypeAlias

import httpx
import numpy as np
import soundfile as sf
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
AUDIO = FIXTURES / "audio"
STORE = REPO / "model_store"
SAMPLE_RATE = 16000

Samples: TypeAlias = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def free_port() -> int:
    """A loopback port free now (the OS picks it; a server binds it right after)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def read_clip(name: str) -> np.ndarray:
    """A clip of ``tests/fixtures/audio`` as int16 mono samples at 16 kHz."""
    data, rate = sf.read(str(AUDIO / name), dtype="int16")
    assert rate == SAMPLE_RATE and data.ndim == 1
    return data


def parse_metrics(text: str) -> Samples:
    """Prometheus exposition text as {(sample name, sorted labels): value}."""
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def scrape(url: str, headers: dict[str, str] | None = None) -> Samples:
    """A server's ``/metrics`` (``url`` is its base ``http://host:port``)."""
    r = httpx.get(f"{url}/metrics", headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    return parse_metrics(r.text)


def metric(source: Samples | str | CollectorRegistry, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels`` (0 when none).

    ``source`` is what a test has at hand: scraped samples, exposition text, or the
    in-process registry (``Metrics().registry``); all three read the same way.
    """
    if isinstance(source, str):
        samples = parse_metrics(source)
    elif isinstance(source, CollectorRegistry):
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in source.collect()
            for s in fam.samples
        }
    else:
        samples = source
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= set(lab))


def start_server(log: Path, port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """``lookback serve`` on ``port`` in a subprocess, returned once ``/readyz`` answers 200.

    ``env`` is laid over the test defaults (this repository's model store, loopback,
    one warm-up batch size); output goes to ``log``.
    """
    full_env = {
        **os.environ,
        "LOOKBACK_MODEL_STORE": str(STORE),
        "LOOKBACK_HOST": "127.0.0.1",
        "LOOKBACK_WARMUP_BATCH_SIZES": "1",
        **env,
        "LOOKBACK_PORT": str(port),
    }
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lookback.cli", "serve"],
            env=full_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early:\n{log.read_text()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait(timeout=30)
            raise RuntimeError(f"server not ready:\n{log.read_text()}")
        time.sleep(0.05)  # readiness poll interval, bounded by the deadline
