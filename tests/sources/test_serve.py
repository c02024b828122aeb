"""``lookback serve`` with ``LOOKBACK_SOURCES``: device streams beside WebSocket sessions."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import redis.asyncio as aioredis
import websockets

from lookback.sources.redis_streams import publish
from tests.conftest import spawn_server
from tests.sources.conftest import Broker
from tests.sources.support import device_audio, messages, solo_reference


async def test_serve_consumes_a_source_next_to_websockets(redis_broker: Broker, tmp_path: Path) -> None:
    audios = device_audio(3, 64)
    reference = await solo_reference(audios)
    url = f"{redis_broker.url}?stream=s:audio&partitions=2&group=g&consumer=srv"
    with spawn_server(tmp_path, LOOKBACK_SOURCES=url, LOOKBACK_MODELS="lookback-vad") as srv:
        r = aioredis.from_url(redis_broker.url)
        try:
            async with websockets.connect(srv.ws + "/v1/stream?results=all") as ws:
                ready = orjson.loads(await ws.recv())
                assert ready["type"] == "ready"
                for d, a in audios.items():
                    msgs = messages(a, 16)
                    for i, msg in enumerate(msgs):
                        await publish(r, d, i, msg, stream="s:audio", partitions=2, end=i == len(msgs) - 1)
                await ws.send(np.zeros(128 * 4, "<i2").tobytes())
                got = [orjson.loads(await ws.recv()) for _ in range(4)]
                assert [m["type"] for m in got] == ["result"] * 4  # the WebSocket session is served too
            deadline = time.monotonic() + 30
            while True:
                entries: Any = await r.xrange("lookback:results")
                recs: dict[str, list[dict]] = {}
                for _, f in entries:
                    recs.setdefault(f[b"device"].decode(), []).extend(orjson.loads(f[b"records"]))
                if all(any(x["type"] == "summary" for x in recs.get(d, [])) for d in audios):
                    break
                assert time.monotonic() < deadline, "device summaries not published"
                await asyncio.sleep(0.05)  # poll the output stream
            for d, ref in reference.items():
                assert [x["scores"] for x in recs[d] if x["type"] == "result"] == ref
            metrics = await asyncio.to_thread(_metrics, srv.url)
            assert (
                'lookback_source_messages_total{outcome="scored",reason="",source="redis:s:audio"} 12.0'
                in metrics
            )
        finally:
            await r.aclose()


def _metrics(url: str) -> str:
    return httpx.get(url + "/metrics", timeout=10).text
