"""Echo ceiling: Lookback's WebSocket stack with the model call replaced by an instant reply.

Same FastAPI app type, same uvicorn settings as ``service/lookback/server.py`` (from the same
``LOOKBACK_*`` settings: websockets-sansio, no permessage-deflate, same size and queue
limits), same raw ASGI receive/send calls as ``service/lookback/api/ws.py``. Each completed hop is
answered at once with a result message of the same shape and size as Lookback's; with
``?results=batch`` the hops a message completes get one ``results`` message instead, as
Lookback sends per model call (so the batch ceiling is comparable). ``end`` gets a summary
and a 1000 close. ``/readyz`` reports open sessions like Lookback's.

With ``--direct`` the handler takes the WebSocket protocol's direct path
(``lookback.websocket``) as Lookback's connections do: each message is a call, each reply
a ``write_text``; without it, the ASGI ``receive``/``send`` calls of any ASGI app.

    python -m tests.bench.echo_server --port 8001 [--hop 128] [--direct]
"""

from __future__ import annotations

import argparse
import asyncio
import uuid
from typing import Any

import orjson
import uvicorn
from fastapi import FastAPI, WebSocket

from lookback.server import uvicorn_config
from lookback.settings import Settings
from lookback.websocket import DIRECT

SCORE = 0.12345679104328156  # a float32 score written as a double, as Lookback writes it


def summary_bytes(frames: int, steps: int, hop_seconds: float) -> bytes:
    """The echo's summary, shaped as Lookback's."""
    body = {
        "type": "summary",
        "frames": frames,
        "steps": steps,
        "failed_steps": 0,
        "padded_samples": 0,
        "duration": steps * hop_seconds,
        "events": [],
    }
    return orjson.dumps(body)


class DirectEcho:
    """The echo as a FrameSink: each message a call, each reply written at once."""

    def __init__(
        self, proto: Any, hop_frames: int, frame_bytes: int, hop_seconds: float, batch: bool
    ) -> None:
        self.proto, self.hop_frames, self.frame_bytes = proto, hop_frames, frame_bytes
        self.hop_seconds, self.batch = hop_seconds, batch
        self.frames = self.steps = 0
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_binary(self, data: bytes) -> None:
        self.frames += len(data) // self.frame_bytes
        n = self.frames // self.hop_frames - self.steps
        if n <= 0:
            return
        write, hs = self.proto.write_text, self.hop_seconds
        if self.batch:
            times = [(self.steps + i + 1) * hs for i in range(n)]
            body = {"type": "results", "step": self.steps, "times": times, "scores": {"speech": [SCORE] * n}}
            write(orjson.dumps(body))
            self.steps += n
            return
        for _ in range(n):
            step = self.steps
            write(
                orjson.dumps(
                    {"type": "result", "step": step, "time": (step + 1) * hs, "scores": {"speech": SCORE}}
                )
            )
            self.steps += 1

    def on_text(self, text: str) -> None:
        body = orjson.loads(text or "{}")
        if isinstance(body, dict) and body.get("type") == "end":
            self.proto.write_text(summary_bytes(self.frames, self.steps, self.hop_seconds))
            self.proto.close(1000, "normal")

    def on_disconnect(self, code: int) -> None:
        if not self.done.done():
            self.done.set_result(None)


def create_echo_app(hop_samples: int = 128, frame_samples: int = 128, direct: bool = False) -> FastAPI:
    app = FastAPI(title="Lookback echo ceiling")
    state = {"sessions": 0}
    hop_frames = max(1, hop_samples // frame_samples)
    frame_bytes = frame_samples * 2
    hop_seconds = hop_samples / 16000

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> dict[str, object]:
        return {"ready": True, "draining": False, "models": ["echo"], "sessions": state["sessions"]}

    @app.websocket("/v1/stream")
    async def stream(ws: WebSocket) -> None:
        await ws.accept()
        state["sessions"] += 1
        receive, send = ws.receive, ws.send
        dumps = orjson.dumps
        batch = ws.query_params.get("results") == "batch"
        try:
            await send(
                {
                    "type": "websocket.send",
                    "text": dumps(
                        {
                            "type": "ready",
                            "session_id": uuid.uuid4().hex[:16],
                            "model": "echo",
                            "version": "1",
                            "sample_rate": 16000,
                            "frame_samples": frame_samples,
                            "hop_samples": hop_samples,
                            "labels": ["speech"],
                            "encoding": "pcm_s16le",
                            "threshold": 0.5,
                        }
                    ).decode(),
                }
            )
            proto = ws.scope.get("extensions", {}).get(DIRECT)
            if direct and proto is not None:
                sink = DirectEcho(proto, hop_frames, frame_bytes, hop_seconds, batch)
                proto.attach(sink)
                await sink.done
                return
            frames = 0
            steps = 0
            while True:
                msg = await receive()
                if msg["type"] == "websocket.disconnect":
                    return
                data = msg.get("bytes")
                if data is not None:
                    frames += len(data) // frame_bytes
                    if batch:
                        n = frames // hop_frames - steps
                        if n > 0:
                            await send(
                                {
                                    "type": "websocket.send",
                                    "text": dumps(
                                        {
                                            "type": "results",
                                            "step": steps,
                                            "times": [(steps + i + 1) * hop_seconds for i in range(n)],
                                            "scores": {"speech": [SCORE] * n},
                                        }
                                    ).decode(),
                                }
                            )
                            steps += n
                        continue
                    while (steps + 1) * hop_frames <= frames:
                        await send(
                            {
                                "type": "websocket.send",
                                "text": dumps(
                                    {
                                        "type": "result",
                                        "step": steps,
                                        "time": (steps + 1) * hop_seconds,
                                        "scores": {"speech": SCORE},
                                    }
                                ).decode(),
                            }
                        )
                        steps += 1
                    continue
                body = orjson.loads(msg.get("text") or "{}")
                if isinstance(body, dict) and body.get("type") == "end":
                    if frames > steps * hop_frames:  # flush: a padded last step
                        await send(
                            {
                                "type": "websocket.send",
                                "text": dumps(
                                    {
                                        "type": "result",
                                        "step": steps,
                                        "time": (steps + 1) * hop_seconds,
                                        "scores": {"speech": SCORE},
                                    }
                                ).decode(),
                            }
                        )
                        steps += 1
                    await send(
                        {"type": "websocket.send", "text": summary_bytes(frames, steps, hop_seconds).decode()}
                    )
                    await ws.close(1000, "normal")
                    return
        finally:
            state["sessions"] -= 1

    return app


def serve(port: int, hop: int, settings: Settings | None = None, direct: bool = False) -> None:
    """uvicorn exactly as ``lookback.server.serve`` configures it (minus the drain)."""
    s = settings or Settings()
    uvicorn.Server(uvicorn_config(create_echo_app(hop, direct=direct), s, port=port)).run()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=8001)
    ap.add_argument("--hop", type=int, default=128)
    ap.add_argument("--direct", action="store_true", help="the WebSocket direct path, as Lookback")
    a = ap.parse_args()
    serve(a.port, a.hop, direct=a.direct)
