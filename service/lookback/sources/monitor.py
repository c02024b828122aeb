"""``/metrics``, ``/healthz`` and ``/readyz`` for ``lookback consume`` (no FastAPI there).

A few lines of HTTP/1.0 over asyncio streams on the consumer's event loop: a scrape reads
the same injectable registry the sources count on, and an answer also proves the loop is
not stuck. ``/healthz`` fails once a source's background work has died (restart the pod);
``/readyz`` is 200 only between "every source started" and the start of a shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from lookback.metrics import Metrics

if TYPE_CHECKING:
    from lookback.sources import Source

log = logging.getLogger("lookback.sources")

_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


class MonitorServer:
    def __init__(self, metrics: Metrics, sources: Sequence[Source], host: str, port: int) -> None:
        self.metrics, self.sources, self.host, self.port = metrics, sources, host, port
        self.ready = False
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    def _dead(self) -> list[str]:
        return [s.name for s in self.sources if not s.alive()]

    def _answer(self, path: str) -> tuple[int, str, bytes]:
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.metrics.registry)
        if path == "/healthz":
            dead = self._dead()
            if dead:
                return 503, "text/plain", f"source stopped: {', '.join(dead)}\n".encode()
            return 200, "text/plain", b"ok\n"
        if path == "/readyz":
            if not self.ready:
                return 503, "text/plain", b"not ready (starting or stopping)\n"
            dead = self._dead()
            if dead:
                return 503, "text/plain", f"source stopped: {', '.join(dead)}\n".encode()
            return 200, "text/plain", b"ready\n"
        return 404, "text/plain", b"not found\n"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            method, target, *_ = [*head.split(b"\r\n", 1)[0].split(b" "), b"", b""]
            if method not in (b"GET", b"HEAD"):
                status, ctype, body = 405, "text/plain", b"GET only\n"
            else:
                status, ctype, body = self._answer(target.split(b"?", 1)[0].decode(errors="replace"))
            writer.write(
                f"HTTP/1.0 {status} {_REASONS[status]}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + (body if method != b"HEAD" else b"")
            )
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
