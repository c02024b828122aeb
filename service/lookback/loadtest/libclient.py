"""The same session over the ``websockets`` library: a cross-check of ``RawSession`` (costs more)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from lookback.loadtest.config import split_url
from lookback.loadtest.rawclient import Proc, SessionBase, WireTimed


class LibSession(SessionBase):
    """The same session over the ``websockets`` library (cross-check; costs more)."""

    def __init__(self, proc: Proc, msgs: list[bytes], start_msg: int) -> None:
        super().__init__(proc, msgs, start_msg)
        self.ws: Any = None
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.tasks: list[asyncio.Task[None]] = []

    async def _reader(self) -> None:
        import websockets

        try:
            async for raw in self.ws:
                now = time.monotonic()
                if isinstance(raw, str):
                    self.on_text(raw.encode(), now)
                else:
                    self.on_binary(raw, now)
        except websockets.ConnectionClosed:
            pass
        finally:
            rcvd = getattr(self.ws, "close_code", None)
            self.close_code = rcvd if rcvd is not None else 1006
            self.finish("closed")

    async def _writer(self) -> None:
        with contextlib.suppress(Exception):
            while True:
                item = await self.queue.get()
                if item is None:
                    await self.ws.send('{"type":"end"}')
                    continue
                await self.ws.send(item)
                self.send_times.append(time.monotonic())
                self.frames_sent += self.proc.k

    def send_next(self) -> None:
        if self.closed:
            return
        if self.queue.qsize() > 64:
            self.skipped += 1
            return
        self.queue.put_nowait(self.msgs[self.pos])
        self.pos = (self.pos + 1) % len(self.msgs)

    def send_end(self) -> None:
        if not self.closed:
            self.queue.put_nowait(None)

    def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        self.finish()

    @classmethod
    async def open(
        cls,
        proc: Proc,
        msgs: list[bytes],
        start_msg: int,
        url: str,
        query: str,
        headers: dict[str, str],
        wait_s: float,
    ) -> LibSession:
        import websockets

        host, port, path = split_url(url)
        s = cls(proc, msgs, start_msg)
        h = f"[{host}]" if ":" in host else host
        try:
            s.ws = await websockets.connect(
                f"ws://{h}:{port}{path}?{query}",
                additional_headers=headers or None,
                compression=None,
                max_size=2**24,
                open_timeout=wait_s,
                ping_interval=None,
            )
            s.tasks = [asyncio.create_task(s._reader()), asyncio.create_task(s._writer())]
            await asyncio.wait_for(asyncio.shield(s.ready_fut), wait_s)
        except Exception as exc:
            status = getattr(getattr(exc, "response", None), "status_code", None)
            s.failure = f"http_{status}" if status else type(exc).__name__
            s.close()
        if not s.ready and s.failure is None:
            s.failure = f"closed_{s.close_code}" if s.close_code else "no_ready"
        return s


class LibWireSession(WireTimed, LibSession):
    """``LibSession`` sending another wire form (G.711, another rate)."""
