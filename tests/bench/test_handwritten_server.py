"""The hand-written baseline serves a session and scores what Lookback scores.

Were its numbers different, "x times hand-written" would compare servers doing different
work; were its messages different, the load generator could not measure it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import uvicorn
from websockets.asyncio.client import connect

from tests.bench.handwritten_server import create_app, model_dir
from tests.conftest import DEFAULT_MODEL, running_server, uvicorn_in_thread
from tests.support import free_port


async def _stream(
    url: str, pcm: np.ndarray, sizes: list[int]
) -> tuple[dict[str, Any], list[Any], Any, list[str]]:
    """Send ``pcm`` in messages of ``sizes`` frames, then ``end``: (ready, results, summary,
    the results' raw text)."""
    async with connect(f"{url}/v1/stream?model={DEFAULT_MODEL}", compression=None) as ws:
        ready = orjson.loads(await ws.recv())
        pos = 0
        for n in sizes:
            await ws.send(pcm[pos : pos + n * 128].tobytes())
            pos += n * 128
        await ws.send(orjson.dumps({"type": "end"}).decode())
        results, summary, texts = [], None, []
        async for raw in ws:
            msg = orjson.loads(raw)
            if msg["type"] == "result":
                results.append(msg)
                texts.append(str(raw))
            elif msg["type"] == "summary":
                summary = msg
        return ready, results, summary, texts


async def test_one_session_scores_equal_lookbacks(speech_clip: np.ndarray) -> None:
    rng = np.random.default_rng(0)
    sizes = [int(n) for n in rng.integers(1, 13, 60)]  # 1 to 12 frames a message
    pcm = speech_clip[: sum(sizes) * 128]
    port = free_port()
    config = uvicorn.Config(create_app(model_dir(DEFAULT_MODEL)), port=port, log_level="warning")
    with uvicorn_in_thread(config):
        ready, mine, summary, texts = await _stream(f"ws://127.0.0.1:{port}", pcm, sizes)
    with running_server() as srv:
        ready_lb, theirs, summary_lb, _ = await _stream(srv.ws, pcm, sizes)
    assert (ready["hop_samples"], ready["labels"]) == (ready_lb["hop_samples"], ready_lb["labels"])
    assert len(mine) == len(theirs) == sum(sizes) == summary["steps"] == summary_lb["steps"]
    assert [r["step"] for r in mine] == list(range(len(mine)))
    assert [r["time"] for r in mine] == [r["time"] for r in theirs]
    ours = np.array([r["scores"]["speech"] for r in mine])
    np.testing.assert_allclose(ours, [r["scores"]["speech"] for r in theirs], rtol=0, atol=1e-6)
    assert ours.std() > 0.05  # speech and pauses: the comparison covers varied scores
    # The load generator's fast path reads results by this exact prefix.
    assert texts[0].startswith('{"type":"result","step":0,')
