"""The direct path writes one model call's results for a session in one transport write.

A 10-frame message is one step of 10 hops for the default model: its 10 result messages
(and any event among them) go out in one ``write_frames`` call, one ``send()``, whether the
step's rows took the one-pass path (no event possible) or the per-hop one (an event). A
one-frame message's result is one write too. Counted on the real server's protocol object,
which still does the writing.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
from websockets.asyncio.client import connect

from tests.api.ws_util import frames, stream_url
from tests.conftest import DEFAULT_MODEL, running_server


async def _results(ws: Any, n: int) -> list[dict[str, Any]]:
    """Messages until ``n`` results have arrived (events included)."""
    got: list[dict[str, Any]] = []
    while sum(m["type"] == "result" for m in got) < n:
        got.append(orjson.loads(await ws.recv()))
    return got


async def test_each_model_call_is_one_write(speech_clip: np.ndarray) -> None:
    with running_server() as srv:
        async with connect(stream_url(srv.ws, model=DEFAULT_MODEL), compression=None) as ws:
            assert orjson.loads(await ws.recv())["type"] == "ready"
            (conn,) = srv.app.state.connections  # type: ignore[attr-defined]
            direct = conn.direct
            assert direct is not None, "the server runs the direct path"
            writes: list[bytes] = []
            real = direct.write_frames

            def spy(data: bytes) -> None:
                writes.append(data)
                real(data)

            direct.write_frames = spy
            kinds: list[str] = []
            for msg in frames(speech_clip, per_message=10)[:-1]:  # whole 10-frame messages
                before = len(writes)
                await ws.send(msg)
                got = await _results(ws, 10)
                assert len(writes) == before + 1, f"{len(writes) - before} writes for one model call"
                kinds.append("events" if any(m["type"] == "event" for m in got) else "plain")
            assert "events" in kinds and "plain" in kinds  # both paths of the session ran
            for msg in frames(np.zeros(3 * 128, np.int16), per_message=1):
                before = len(writes)
                await ws.send(msg)
                await _results(ws, 1)
                assert len(writes) == before + 1
