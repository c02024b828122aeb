"""Helpers for the protocol-surface tests: real ``websockets`` sessions and REST calls.

A session is driven by a sender task and a reader that collects every server message
until the server closes, so a long stream never stalls on an unread socket (the
server's own send queue is bounded and would close a non-reading client with 4429).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.conftest import DEFAULT_MODEL, SILERO, STORE

FRAME = 128
RATE = 16000
SESSION_TIMEOUT = 30.0

#: Expected hop of each model under test (the brief's contract).
HOPS = {SILERO: 512, DEFAULT_MODEL: 128}


def require_model(name: str) -> str:
    """Fail (never skip) when a model the tests need is not in the store."""
    versions = sorted(p.parent.name for p in (STORE / name).glob("*/model.json"))
    if not versions:
        pytest.fail(
            f"model {name!r} is not in {STORE}: its protocol tests cannot run "
            "(the default model is trained by model_store/recipes; Silero is imported "
            "by `make silero`)",
            pytrace=False,
        )
    return name


def manifest(name: str) -> dict[str, Any]:
    paths = sorted((STORE / name).glob("*/model.json"))
    assert paths, f"no {name} in {STORE}"
    data: dict[str, Any] = json.loads(Path(paths[-1]).read_text())
    return data


def stream_url(base_ws: str, **query: object) -> str:
    q = {k: v for k, v in query.items() if v is not None}
    return f"{base_ws}/v1/stream" + (f"?{urlencode(q)}" if q else "")


def frames(samples: np.ndarray, per_message: int = 1) -> list[bytes]:
    """Whole 128-sample frames (the tail zero-padded), ``per_message`` frames a message."""
    pad = (-len(samples)) % FRAME
    if pad:
        samples = np.concatenate([samples, np.zeros(pad, samples.dtype)])
    step = FRAME * per_message
    return [samples[i : i + step].tobytes() for i in range(0, len(samples), step)]


END = json.dumps({"type": "end"})
FLUSH = json.dumps({"type": "flush"})


@dataclass
class Session:
    messages: list[dict[str, Any]]
    close_code: int | None
    close_reason: str

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.messages if m.get("type") == kind]

    @property
    def ready(self) -> dict[str, Any]:
        assert self.messages and self.messages[0]["type"] == "ready", self.messages[:3]
        return self.messages[0]

    @property
    def results(self) -> list[dict[str, Any]]:
        return self.of("result")

    @property
    def events(self) -> list[dict[str, Any]]:
        return self.of("event")

    @property
    def errors(self) -> list[dict[str, Any]]:
        return self.of("error")

    @property
    def summary(self) -> dict[str, Any]:
        found = self.of("summary")
        assert len(found) == 1, f"expected one summary, got {found} (close {self.close_code})"
        return found[0]

    def scores(self, label: str) -> list[float]:
        return [r["scores"][label] for r in self.results]


async def read_all(ws: ClientConnection, into: list[dict[str, Any]]) -> None:
    """Collect JSON messages until the server closes the connection."""
    with contextlib.suppress(ConnectionClosed):
        while True:
            raw = await ws.recv()
            assert isinstance(raw, str), "the server sends text messages only"
            into.append(json.loads(raw))


async def _send_all(ws: ClientConnection, messages: Iterable[bytes | str]) -> None:
    with contextlib.suppress(ConnectionClosed):
        for m in messages:
            await ws.send(m)


async def run_session(
    base_ws: str,
    messages: Sequence[bytes | str] = (),
    *,
    headers: dict[str, str] | None = None,
    **query: object,
) -> Session:
    """Open a session, send ``messages`` while reading, and collect up to the close."""

    async def go() -> Session:
        got: list[dict[str, Any]] = []
        async with connect(
            stream_url(base_ws, **query), compression=None, max_size=2**24, additional_headers=headers
        ) as ws:
            sender = asyncio.create_task(_send_all(ws, messages))
            await read_all(ws, got)
            await sender
            return Session(got, ws.close_code, ws.close_reason)

    return await asyncio.wait_for(go(), SESSION_TIMEOUT)


async def recv_json(ws: ClientConnection, wait: float = 10.0) -> dict[str, Any]:
    raw = await asyncio.wait_for(ws.recv(), wait)
    assert isinstance(raw, str)
    msg: dict[str, Any] = json.loads(raw)
    return msg


async def recv_until(ws: ClientConnection, kind: str, wait: float = 10.0) -> list[dict[str, Any]]:
    """Messages up to and including the first of type ``kind``."""
    out: list[dict[str, Any]] = []
    while not out or out[-1].get("type") != kind:
        out.append(await recv_json(ws, wait))
    return out


async def expect_refusal(base_ws: str, **query: object) -> Session:
    """A query-level refusal: the upgrade succeeds, then one error and a 44xx close."""
    s = await run_session(base_ws, **query)
    assert len(s.messages) == 1 and s.messages[0]["type"] == "error", s.messages
    return s


# -- REST -------------------------------------------------------------------------------------


def score(
    url: str,
    body: bytes | Iterable[bytes],
    content_type: str = "audio/wav",
    headers: dict[str, str] | None = None,
    **params: object,
) -> httpx.Response:
    q = {k: v for k, v in params.items() if v is not None}
    return httpx.post(
        f"{url}/v1/score",
        params=q,
        content=body,
        timeout=60,
        headers={"content-type": content_type, **(headers or {})},
    )


def error_code(r: httpx.Response) -> str:
    body = r.json()
    assert set(body) == {"error"}, body
    code: str = body["error"]["code"]
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return code


# -- metrics ----------------------------------------------------------------------------------

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str, headers: dict[str, str] | None = None) -> Samples:
    """``/metrics`` as {(sample name, sorted labels): value}."""
    r = httpx.get(f"{url}/metrics", headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    out: Samples = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (0 when none)."""
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= set(lab))


def poll(check: Any, timeout: float = 10.0, interval: float = 0.02) -> Any:
    """Poll ``check()`` until it returns a truthy value (server-side bookkeeping after a close)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: last value {value!r}")
        time.sleep(interval)  # a bounded poll of the server's state, not a fixed wait
