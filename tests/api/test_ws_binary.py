"""result_format=binary: float32 rows in binary messages, the same floats as JSON.

Through a real server (the WebSocket direct path) and through ASGI (TestClient: the writer
task path), with results=all and results=batch, and through the Python client.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import struct
from typing import Any

import numpy as np
import orjson
from fastapi.testclient import TestClient
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from lookback.app import create_app
from lookback.client import LookbackClient
from lookback.metrics import Metrics
from lookback.protocol import (
    BINARY_RESULTS,
    decode_results_binary,
    results_binary,
    split_results,
)
from tests.api.ws_util import END, RATE, frames, run_session, stream_url
from tests.conftest import Server
from tests.conftest import test_settings as make_settings


async def binary_session(base_ws: str, messages: list[Any], **query: Any) -> list[Any]:
    """Every message as received: dicts for text, bytes for binary."""
    got: list[Any] = []
    async with connect(stream_url(base_ws, **query), compression=None) as ws:

        async def send() -> None:
            for m in messages:
                await ws.send(m)

        sender = asyncio.create_task(send())
        with contextlib.suppress(ConnectionClosed):
            async for raw in ws:
                got.append(orjson.loads(raw) if isinstance(raw, str) else raw)
        await sender
    return got


def flat(msgs: list[Any], ready: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for m in msgs:
        if isinstance(m, bytes):
            m = decode_results_binary(m, ready)
        out.extend(split_results(m) if m["type"] == "results" else [m])
    return out


async def test_binary_results_are_the_json_floats(
    server: Server, model: str, speech_clip: np.ndarray
) -> None:
    clip = speech_clip[: RATE * 3]
    rng = random.Random(3)
    msgs: list[Any] = []
    pos = 0
    data = clip.astype("<i2").tobytes()
    while pos < len(data):
        n = rng.choice((1, 3, 7, 10)) * 256
        msgs.append(data[pos : pos + n])
        pos += n
    msgs.append(END)
    ref = await run_session(server.ws, msgs, model=model, results="all")
    for mode in ("all", "batch"):
        got = await binary_session(server.ws, msgs, model=model, results=mode, result_format="binary")
        ready = got[0]
        assert ready["type"] == "ready"
        binary = [m for m in got if isinstance(m, bytes)]
        assert binary and not any(isinstance(m, dict) and m["type"] in ("result", "results") for m in got)
        for b in binary:
            kind, labels, rows, _ = BINARY_RESULTS.unpack_from(b)
            assert (kind, labels) == (1, len(ready["labels"]))
            assert len(b) == BINARY_RESULTS.size + 4 * rows * labels
            if mode == "all":
                assert rows == 1
        results = [m for m in flat(got, ready) if m["type"] == "result"]
        assert results == ref.results  # every step, time and float, exactly
        assert [m for m in got if isinstance(m, dict) and m["type"] == "event"] == ref.events
        assert got[-1]["type"] == "summary"


async def test_the_client_reads_binary_results(server: Server, model: str, speech_clip: np.ndarray) -> None:
    clip = speech_clip[: RATE * 2]
    client = LookbackClient(server.url)
    runs = []
    for fmt in ("json", "binary"):
        runs.append(
            [
                m
                async for m in client.stream(frames(clip, 4), model=model, result_format=fmt, resume=False)
                if m["type"] == "result"
            ]
        )
    assert runs[0] == runs[1] and runs[0]


async def test_bad_result_format_is_refused(server: Server) -> None:
    s = await run_session(server.ws, [], result_format="f16")
    assert s.errors[0]["code"] == "bad_query" and s.close_code == 4400


def test_binary_results_over_asgi(speech_clip: np.ndarray) -> None:
    """The writer-task path (any ASGI server) sends the same binary messages."""
    app = create_app(make_settings(), metrics=Metrics())
    data = speech_clip[: 64 * 128].astype("<i2").tobytes()
    with TestClient(app) as tc:
        got = []
        for fmt in ("json", "binary"):
            with tc.websocket_connect(f"/v1/stream?result_format={fmt}") as ws:
                ready = ws.receive_json()
                ws.send_bytes(data)
                ws.send_text('{"type":"end"}')
                msgs = []
                while True:
                    m = ws.receive()
                    if m["type"] == "websocket.close":
                        break
                    if m.get("bytes") is not None:
                        msgs.append(decode_results_binary(m["bytes"], ready))
                    else:
                        msgs.append(orjson.loads(m["text"]))
                    if msgs[-1]["type"] == "summary":
                        break
            got.append([r for m in msgs for r in (split_results(m) if m["type"] == "results" else [m])])
        json_results = [m for m in got[0] if m["type"] == "result"]
        assert json_results and [m for m in got[1] if m["type"] == "result"] == json_results


def test_layout_is_documented_bytes() -> None:
    b = results_binary(7, [[0.5, 0.25], [1.0, -2.0]], 2)
    assert b == struct.pack("<BBHQ4f", 1, 2, 2, 7, 0.5, 0.25, 1.0, -2.0)
    ready = {"labels": ["a", "b"], "hop_samples": 128, "sample_rate": 16000}
    assert decode_results_binary(b, ready) == {
        "type": "results",
        "step": 7,
        "times": [8 * 128 / 16000, 9 * 128 / 16000],
        "scores": {"a": [0.5, 1.0], "b": [0.25, -2.0]},
    }
