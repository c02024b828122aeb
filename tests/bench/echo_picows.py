"""Echo ceiling on picows (Cython WebSocket, not ASGI): the same replies as ``echo_server``.

A transport considered for ``/v1/stream``: the bench compares its echo ceiling with
uvicorn's sansio protocol and with Lookback's own framing (``lookback.websocket``). picows
owns its HTTP upgrade, so it cannot share one port with FastAPI without reaching into its
internals; it answers only WebSockets (the bench waits for its port, not ``/readyz``).

    python -m tests.bench.echo_picows --port 8002 [--hop 128]
"""

from __future__ import annotations

import argparse
import asyncio
import uuid

import orjson
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_create_server

from tests.bench.echo_server import SCORE, summary_bytes


class Echo(WSListener):
    def __init__(self, hop: int) -> None:
        self.hop_frames = max(1, hop // 128)
        self.hop_seconds = hop / 16000
        self.frames = self.steps = 0
        self.batch = False

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.batch = b"results=batch" in (transport.request.path or b"")
        ready = {
            "type": "ready",
            "session_id": uuid.uuid4().hex[:16],
            "model": "echo",
            "version": "1",
            "sample_rate": 16000,
            "frame_samples": 128,
            "hop_samples": self.hop_frames * 128,
            "labels": ["speech"],
            "encoding": "pcm_s16le",
            "threshold": 0.5,
        }
        transport.send(WSMsgType.TEXT, orjson.dumps(ready))

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if kind == WSMsgType.BINARY:
            self.frames += frame.payload_size // 256
            n = self.frames // self.hop_frames - self.steps
            hs = self.hop_seconds
            if n > 0 and self.batch:
                times = [(self.steps + i + 1) * hs for i in range(n)]
                body = {
                    "type": "results",
                    "step": self.steps,
                    "times": times,
                    "scores": {"speech": [SCORE] * n},
                }
                transport.send(WSMsgType.TEXT, orjson.dumps(body))
                self.steps += n
                return
            for _ in range(max(0, n)):
                step = self.steps
                body = {"type": "result", "step": step, "time": (step + 1) * hs, "scores": {"speech": SCORE}}
                transport.send(WSMsgType.TEXT, orjson.dumps(body))
                self.steps += 1
        elif kind == WSMsgType.TEXT:
            if orjson.loads(frame.get_payload_as_bytes()).get("type") == "end":
                transport.send(WSMsgType.TEXT, summary_bytes(self.frames, self.steps, self.hop_seconds))
                transport.send_close(WSCloseCode.OK)
        elif kind == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code(), frame.get_close_message())
            transport.disconnect()
        elif kind == WSMsgType.PING:
            transport.send_pong(frame.get_payload_as_bytes())


async def main(port: int, hop: int) -> None:
    server = await ws_create_server(lambda _request: Echo(hop), "127.0.0.1", port)
    await server.serve_forever()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=8002)
    ap.add_argument("--hop", type=int, default=128)
    a = ap.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main(a.port, a.hop))
