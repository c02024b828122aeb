"""uvicorn's HTTP and WebSocket protocols with the limits a public server needs.

uvicorn bounds neither how long a client may take to send its request head nor how
large that head may be, its ``limit_concurrency`` answers a plain-text 503 to every
path (``/healthz`` included) once idle sockets fill it, and a WebSocket whose client
stops reading holds its socket for ever (``transport.close()`` waits for a flush that
never comes). These subclasses add, at the protocol level, before any route runs:

- a head timeout from the first byte (or the connection) to the end of the headers:
  408 ``header_timeout``, so idle and slow-loris connections are closed;
- a request-line bound (414 ``request_line_too_long``) and header bounds, in all and
  per line and by count (431 ``headers_too_large``), counted as bytes arrive, so a
  huge head is refused before it is buffered;
- a connection limit that never applies to ``/healthz``, ``/readyz`` and ``/metrics``
  and answers 503 ``server_busy`` with ``Retry-After`` and the JSON error body; it counts
  only connections past their request head: the others live in a budget of their own
  (``lookback.api.admission.HeadBudget``), so idle sockets lock no work out;
- the WebSocket protocol (``lookback.websocket``): a send timeout, a bounded close, and
  framing of its own after the handshake with a direct path for the streaming route.

Only the httptools HTTP implementation is wrapped (what ``uvicorn[standard]`` runs).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, ClassVar

import httptools
import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.utils import ClientDisconnected

from lookback.api.admission import HeadBudget
from lookback.metrics import Metrics
from lookback.protocol import error_body, spec_for
from lookback.settings import Settings
from lookback.websocket import DirectWebSocketProtocol

log = logging.getLogger("lookback.transport")

EXEMPT_PATHS = frozenset({b"/healthz", b"/readyz", b"/metrics"})
RETRY_AFTER_S = 1
# method, spaces, "HTTP/1.1" and CRLF around the URL: the limit is on the whole line, as
# the WebSocket handshake parser (websockets, 8 KiB lines) counts it
_LINE_OVERHEAD = 24


class _Refuse(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def http_refusal(code: str, message: str, *, retry_after: int | None = None) -> bytes:
    """A complete ``Connection: close`` answer with the documented JSON error body."""
    status = spec_for(code).http
    body = orjson.dumps(error_body(code, message))
    lines = [
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
    ]
    if retry_after is not None:
        lines.append(f"retry-after: {retry_after}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


_REASONS = {
    408: "Request Timeout",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}


class GuardedHttpProtocol(HttpToolsProtocol):
    """HttpToolsProtocol with a head timeout, head-size bounds and a health-exempt limit."""

    settings: Settings
    metrics: Metrics | None = None
    heads: ClassVar[HeadBudget]  # connections before their head; one per server, made below

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limit_concurrency = None  # replaced by the exempting limit below
        cls = type(self)  # ``protocols`` makes one class per server
        if "heads" not in cls.__dict__:
            cls.heads = HeadBudget(self.settings.max_pending_connections, self.loop)
        self._head_timer: asyncio.TimerHandle | None = None
        self._in_head = False
        self._head_bytes = 0
        self._header_count = 0
        self._url_bytes = 0
        self._refused = False
        self._abort_timer: asyncio.TimerHandle | None = None

    # -- the head timer ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._in_head = True
        self._arm()
        self._wait_for_head()

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.settings.header_timeout_s, self._head_timeout)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self._refuse(
                _Refuse("header_timeout", f"request head not complete in {self.settings.header_timeout_s:g}s")
            )

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.heads.discard(self)
        if self._abort_timer is not None:  # a timer would keep this protocol alive until it fires
            self._abort_timer.cancel()
            self._abort_timer = None
        super().connection_lost(exc)

    # -- parsing with bounds -------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # answered and half-closed: discard until the client closes too
        self._unset_keepalive_if_required()
        try:
            if self._in_head:
                room = self.settings.max_header_bytes - self._head_bytes
                if len(data) > room:  # feed what the head may hold; the rest only if it ended
                    self._head_bytes += room
                    self.parser.feed_data(data[:room])
                    if self._in_head:
                        raise _Refuse("headers_too_large", "request head too large")
                    data = data[room:]
                else:
                    self._head_bytes += len(data)
            self.parser.feed_data(data)
        except _Refuse as refusal:
            self._refuse(refusal)
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _Refuse):
                self._refuse(exc.__context__)
            else:
                self.logger.warning("Invalid HTTP request received.")
                self.send_400_response("Invalid HTTP request received.")
        except httptools.HttpParserError:
            self.logger.warning("Invalid HTTP request received.")
            self.send_400_response("Invalid HTTP request received.")
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._header_count = 0
        self._url_bytes = 0
        self._arm()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True  # what arrives next is the next request's head
        self._head_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._url_bytes += len(url)
        if self._url_bytes + _LINE_OVERHEAD > self.settings.max_request_line_bytes:
            raise _Refuse(
                "request_line_too_long",
                f"request line above max_request_line_bytes={self.settings.max_request_line_bytes}",
            )
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self.settings.max_headers:
            raise _Refuse("headers_too_large", f"more than max_headers={self.settings.max_headers} headers")
        if len(name) + len(value) + 4 > self.settings.max_request_line_bytes:
            raise _Refuse(
                "headers_too_large",
                f"a header line above max_request_line_bytes={self.settings.max_request_line_bytes}",
            )
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._disarm()
        self.heads.discard(self)
        limit = self.settings.connection_limit
        busy = len(self.connections) - len(self.heads)  # those still in their head do not count
        if busy > limit and self.url.split(b"?", 1)[0] not in EXEMPT_PATHS:
            raise _Refuse("server_busy", f"more than {limit} open connections; retry later")
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and not (self.parser.should_upgrade() and self._should_upgrade()):
            cycle.send = self._timed_send(cycle)  # type: ignore[method-assign]

    def _timed_send(self, cycle: Any) -> Any:
        """The cycle's send, but a client that reads nothing for response_send_timeout_s
        is dropped (its answer, e.g. an ndjson stream, holds a scoring place)."""
        send, flow, timeout = cycle.send, self.flow, self.settings.response_send_timeout_s

        async def timed_send(message: Any) -> None:
            if flow.write_paused and not cycle.disconnected:
                try:
                    await asyncio.wait_for(flow.drain(), timeout)
                except TimeoutError:
                    if self.metrics is not None:
                        self.metrics.error("send_timeout")
                    log.info("dropped an HTTP client that read nothing for %gs", timeout)
                    self.transport.abort()
                    raise ClientDisconnected() from None
            await send(message)

        return timed_send

    def _wait_for_head(self) -> None:
        self.heads.add(self, self.client[0] if self.client else "")

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.timeout_keep_alive_task is not None:  # idle until the next request's head
            self._wait_for_head()

    def evict(self) -> None:
        """Closed to keep the pre-head budget (``HeadBudget``): at once, not after a timer."""
        if self.transport.is_closing() or self._refused:
            self.transport.abort()
        elif self.cycle is not None and self._head_bytes == 0:  # idle between requests
            if self.transport.get_write_buffer_size():
                self.transport.abort()
            else:
                self.transport.close()
        else:
            budget = self.settings.max_pending_connections
            message = f"request head not complete; over max_pending_connections={budget}"
            self._refuse(_Refuse("header_timeout", message), linger=False)
            self.transport.abort()

    def _refuse(self, refusal: _Refuse, *, linger: bool = True) -> None:
        self._disarm()
        if self.metrics is not None:
            self.metrics.error(refusal.code)
        log.info("refused %s: %s", refusal.code, refusal.message)
        retry = RETRY_AFTER_S if spec_for(refusal.code).http == 503 else None
        if not self.transport.is_closing():
            self.transport.write(http_refusal(refusal.code, refusal.message, retry_after=retry))
            # Half-close and discard what still comes: closing with unread input would
            # send a reset that can destroy the answer before the client reads it.
            self._refused = True
            if self.transport.can_write_eof():
                self.transport.write_eof()
            else:
                self.transport.close()
        if linger:
            # a client that neither reads nor closes is cut after a bounded time, or sooner
            # by the budget of connections that are not served
            self._abort_timer = self.loop.call_later(self.settings.header_timeout_s, self._abort_if_open)
            self._wait_for_head()

    def _abort_if_open(self) -> None:
        if self.parser is not None:  # connection_lost clears it
            self.transport.abort()


def protocols(settings: Settings, metrics: Metrics | None = None) -> tuple[type, type]:
    """The (HTTP, WebSocket) protocol classes bound to ``settings``."""
    http = type("LookbackHttpProtocol", (GuardedHttpProtocol,), {"settings": settings, "metrics": metrics})
    ws = type(
        "LookbackWebSocketProtocol", (DirectWebSocketProtocol,), {"settings": settings, "metrics": metrics}
    )
    return http, ws
