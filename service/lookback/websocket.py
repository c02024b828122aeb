"""The WebSocket protocol: uvicorn's handshake, then framing of our own with a direct path.

The handshake (and a refusal before it) runs exactly as uvicorn's sansio protocol runs it,
through the ASGI app, so auth, admission, query checks and close codes stay FastAPI code.
After the accept, frames are parsed and written here (RFC 6455, server side, no
extensions) instead of by ``websockets``' generic machinery:

- by default every message still goes to the ASGI ``receive`` queue (any route works);
- a handler that attaches a ``FrameSink`` (``scope["extensions"][DIRECT]`` holds the
  protocol) gets each message as a plain call, on the loop turn that read it, and writes
  its answers with ``write_text``: no queue, no task switch, no coroutine and no
  per-message ``pause_reading``/``resume_reading`` (two ``epoll_ctl`` calls) on the
  streaming hot path. A sink that cannot take more calls ``hold()``; ``release()`` goes on
  with what is buffered.

The limits of a public server hold on both paths: a send timeout (a client that reads
nothing for ``ws_send_timeout_s`` while the server has something to send is dropped), a
close frame written even to a client that reads nothing and a bounded wait for its answer,
``max_size`` checked from the frame header before a payload is buffered. With
``ws_per_message_deflate`` on, the whole connection is uvicorn's (compressed frames are
``websockets``' job).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.frames import Frame, Opcode
from websockets.speedups import apply_mask

from lookback.metrics import Metrics
from lookback.settings import Settings

log = logging.getLogger("lookback.transport")

#: The ASGI scope extension under which the protocol offers its direct path.
DIRECT = "lookback.direct"

_OP_CONT, _OP_TEXT, _OP_BINARY, _OP_CLOSE, _OP_PING, _OP_PONG = 0, 1, 2, 8, 9, 10
# close codes a peer may send (RFC 6455 7.4, as websockets accepts them)
_VALID_CLOSE = frozenset({1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014})


class FrameSink(Protocol):
    """Who takes a connection's messages once attached (called on the event loop)."""

    def on_binary(self, data: bytes) -> None: ...
    def on_text(self, text: str) -> None: ...
    def on_disconnect(self, code: int) -> None: ...


def frame_header(opcode: int, n: int) -> bytes:
    """An unmasked server frame header with FIN set."""
    if n < 126:
        return bytes((0x80 | opcode, n))
    if n < 65536:
        return bytes((0x80 | opcode, 126)) + n.to_bytes(2, "big")
    return bytes((0x80 | opcode, 127)) + n.to_bytes(8, "big")


_TEXT_HEADS = [bytes((0x81, n)) for n in range(126)]


def text_frame(data: bytes) -> bytes:
    """A whole text message as one frame (header and payload)."""
    n = len(data)
    return (_TEXT_HEADS[n] if n < 126 else frame_header(_OP_TEXT, n)) + data


def binary_frame(data: bytes) -> bytes:
    return frame_header(_OP_BINARY, len(data)) + data


def close_payload(code: int, reason: str) -> bytes:
    return code.to_bytes(2, "big") + reason.encode()[:123]


class _Fail(Exception):
    """A protocol violation by the peer: close with ``code``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class DirectWebSocketProtocol(WebSocketsSansIOProtocol):
    settings: Settings
    metrics: Metrics | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.close_timeout = self.settings.ws_send_timeout_s
        self.max_size: int = self.config.ws_max_size
        self.own_framing = not self.config.ws_per_message_deflate
        self.sink: FrameSink | None = None
        self.write_paused = False
        self._buf = b""  # bytes after the handshake not parsed yet
        self._held = False  # the sink asked for no more messages for now
        self._frag: list[bytes] | None = None  # a fragmented message being gathered
        self._frag_op = 0
        self._frag_len = 0
        self._send_timer: asyncio.TimerHandle | None = None
        self._abort_timer: asyncio.TimerHandle | None = None
        self._told_sink = False

    # -- handshake: uvicorn's, plus the direct-path offer ---------------------------------
    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        if self.own_framing and self.response.status_code == 101:
            extensions: dict[str, Any] = self.scope["extensions"]
            extensions[DIRECT] = self

    # -- reading ---------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if not self.own_framing or not self.handshake_initiated:
            super().data_received(data)  # the request head
            return
        if self._buf:
            data = self._buf + data
            self._buf = b""
        if self._held or not self.handshake_complete or self.initial_response is not None:
            if self.initial_response is None and not self.disconnected:
                self._buf = data  # frames before the accept (or while held) wait for it
            return
        self._parse(data)

    def _parse(self, data: bytes) -> None:
        n = len(data)
        sink = self.sink
        # The hot path: the read is exactly one whole masked binary frame of 126..65535
        # bytes (one message of audio) and the sink takes it; anything else, the loop below.
        if n > 8 and data[0] == 0x82 and data[1] == 0xFE and sink is not None and not self._held:
            ln = (data[2] << 8) | data[3]
            if ln + 8 == n and ln <= self.max_size and self._frag is None and not self.close_sent:
                sink.on_binary(apply_mask(data[8:], data[4:8]))
                return
        pos = 0
        try:
            while n - pos >= 2 and not self._held:
                b0, b1 = data[pos], data[pos + 1]
                if not b1 & 0x80:
                    raise _Fail(1002, "incorrect masking")
                if b0 & 0x70:
                    raise _Fail(1002, "reserved bits must be 0")
                ln = b1 & 0x7F
                head = pos + 6
                if ln == 126:
                    if n - pos < 4:
                        break
                    ln = int.from_bytes(data[pos + 2 : pos + 4], "big")
                    head += 2
                elif ln == 127:
                    if n - pos < 10:
                        break
                    ln = int.from_bytes(data[pos + 2 : pos + 10], "big")
                    head += 8
                # a control frame between fragments is no part of the message being gathered
                if ln > self.max_size or (not b0 & 0x08 and self._frag_len + ln > self.max_size):
                    raise _Fail(1009, f"frame exceeds limit of {self.max_size} bytes")
                end = head + ln
                if end > n:
                    break
                payload = apply_mask(data[head:end], data[head - 4 : head])
                pos = end
                sink = self.sink
                if b0 == 0x82 and sink is not None and self._frag is None and not self.close_sent:
                    sink.on_binary(payload)  # a whole binary message to the sink: the hot path
                else:
                    self._frame(b0 & 0x80, b0 & 0x0F, payload)
        except _Fail as exc:
            self._fail(exc.code, exc.reason)
            return
        if pos < n and not self.disconnected and not self.transport.is_closing():
            self._buf = data[pos:] if pos else data

    def _frame(self, fin: int, op: int, payload: bytes) -> None:
        if op >= 8:
            if not fin:
                raise _Fail(1002, "fragmented control frame")
            if len(payload) > 125:
                raise _Fail(1002, "control frame too long")
            if op == _OP_CLOSE:
                self._on_close(payload)
            elif op == _OP_PING:
                if not self.close_sent:
                    self.transport.write(frame_header(_OP_PONG, len(payload)) + payload)
            elif op == _OP_PONG:
                self.handle_pong(Frame(Opcode.PONG, payload))
            else:
                raise _Fail(1002, f"invalid opcode {op}")
            return
        if op == _OP_CONT:
            if self._frag is None:
                raise _Fail(1002, "unexpected continuation frame")
            self._frag.append(payload)
            self._frag_len += len(payload)
            if not fin:
                return
            payload, op = b"".join(self._frag), self._frag_op
            self._frag, self._frag_len = None, 0
        elif op in (_OP_TEXT, _OP_BINARY):
            if self._frag is not None:
                raise _Fail(1002, "expected a continuation frame")
            if not fin:
                self._frag, self._frag_op, self._frag_len = [payload], op, len(payload)
                return
        else:
            raise _Fail(1002, f"invalid opcode {op}")
        if self.close_sent:
            return  # past our close: discard, keep reading until the peer's close arrives
        sink = self.sink
        if op == _OP_BINARY:
            if sink is not None:
                sink.on_binary(payload)
            else:
                self._queue({"type": "websocket.receive", "bytes": payload})
            return
        try:
            text = payload.decode()
        except UnicodeDecodeError:
            raise _Fail(1007, "invalid UTF-8 in a text message") from None
        if sink is not None:
            sink.on_text(text)
        else:
            self._queue({"type": "websocket.receive", "text": text})

    def _queue(self, message: dict[str, Any]) -> None:
        """ASGI delivery, with the parent's flow control: stop reading until it is taken."""
        self.queue.put_nowait(message)  # type: ignore[arg-type]
        if not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()

    def _on_close(self, payload: bytes) -> None:
        if len(payload) == 1:
            raise _Fail(1002, "close frame too short")
        code, reason = 1005, ""
        if payload:
            code = int.from_bytes(payload[:2], "big")
            if code not in _VALID_CLOSE and not 3000 <= code < 5000:
                raise _Fail(1002, f"invalid close code {code}")
            try:
                reason = payload[2:].decode()
            except UnicodeDecodeError:
                raise _Fail(1007, "invalid UTF-8 in the close reason") from None
        if self.close_sent:  # the peer answered our close: the closing handshake is done
            if self.close_timer is not None:
                self.close_timer.cancel()
                self.close_timer = None
            self.transport.close()
            return
        if self.transport.is_closing():
            return
        self.close_sent = True
        self._write_close(payload)  # echo it
        self._disconnect(code, reason)
        self.transport.close()

    def _fail(self, code: int, reason: str) -> None:
        log.info("closing a WebSocket that broke the protocol: %s", reason)
        if not self.close_sent and not self.transport.is_closing():
            self._write_close(close_payload(code, reason))
        self.close_sent = True
        self._buf = b""
        self._disconnect(code, reason)
        self.transport.close()

    def _write_close(self, payload: bytes) -> None:
        self.transport.write(frame_header(_OP_CLOSE, len(payload)) + payload)

    def _disconnect(self, code: int, reason: str = "") -> None:
        if self.sink is not None:
            if not self._told_sink:
                self._told_sink = True
                self.sink.on_disconnect(code)
        else:
            self.queue.put_nowait({"type": "websocket.disconnect", "code": code, "reason": reason})

    # -- the direct path -------------------------------------------------------------------
    def attach(self, sink: FrameSink) -> None:
        """Deliver every message from now on to ``sink``, starting with those queued."""
        self.sink = sink
        self._drain_queue()
        if self.read_paused:
            self.read_paused = False
            if not self._held:
                self.transport.resume_reading()
        if self._buf and not self._held:
            self._parse_buffered()

    def _drain_queue(self) -> None:
        """What arrived before ``attach``, in order; stops where the sink holds."""
        sink = self.sink
        assert sink is not None
        while not self._held and not self.queue.empty():
            msg: dict[str, Any] = self.queue.get_nowait()  # type: ignore[assignment]
            kind = msg["type"]
            if kind == "websocket.receive":
                data = msg.get("bytes")
                if data is not None:
                    sink.on_binary(data)
                else:
                    sink.on_text(msg.get("text") or "")
            elif kind == "websocket.disconnect":
                self._disconnect(int(msg.get("code", 1005)))

    def hold(self) -> None:
        """Deliver nothing more until ``release``; the socket is not read meanwhile."""
        if not self._held:
            self._held = True
            self.transport.pause_reading()

    def release(self) -> None:
        if self._held:
            self._held = False
            if not self.disconnected:
                self._drain_queue()
                if self._held:
                    return
                self.transport.resume_reading()
                self._parse_buffered()

    def _parse_buffered(self) -> None:
        data, self._buf = self._buf, b""
        if data:
            self._parse(data)

    def write_text(self, data: bytes) -> None:
        """One text message (UTF-8 bytes), written now; the transport buffers what the
        client has not read (the caller bounds it: ``write_paused``)."""
        if not self.close_sent and not self.disconnected:
            self.transport.write(text_frame(data))

    def write_frames(self, frames: bytes) -> None:
        """Whole frames (``text_frame``/``binary_frame``), several messages in one write."""
        if not self.close_sent and not self.disconnected:
            self.transport.write(frames)

    def close(self, code: int, reason: str = "") -> None:
        """Our close frame, written even if the client reads nothing, then a bounded wait
        for its answer."""
        if self.close_sent or self.disconnected:
            return
        self.close_sent = True
        self._write_close(close_payload(code, reason))
        self._held = False
        self.read_paused = False
        self.transport.resume_reading()  # to read the peer's answer
        self.close_timer = self.loop.call_later(self.close_timeout, self.transport.abort)
        if self._buf:
            self._parse_buffered()

    # -- writing flow control and the send timeout ---------------------------------------
    def pause_writing(self) -> None:
        self.write_paused = True
        super().pause_writing()
        if self._send_timer is None and self.handshake_complete:
            self._send_timer = self.loop.call_later(self.settings.ws_send_timeout_s, self._send_timeout)

    def resume_writing(self) -> None:
        self.write_paused = False
        super().resume_writing()
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def _send_timeout(self) -> None:
        self._send_timer = None
        if self.write_paused and not self.disconnected:
            self._drop("send_timeout")

    def _drop(self, code: str) -> None:
        if self.metrics is not None:
            self.metrics.error(code)
        log.info("dropped a WebSocket whose client read nothing for %gs", self.settings.ws_send_timeout_s)
        self.transport.abort()

    # -- the ASGI path ---------------------------------------------------------------------
    async def send(self, message: Any) -> None:
        kind = message["type"]
        if not self.own_framing or not self.handshake_complete or self.initial_response is not None:
            await self._guarded_send(message)
            return
        if self.disconnected:
            raise ClientDisconnected()
        if kind == "websocket.close":
            self.close(message.get("code", 1000), message.get("reason") or "")
            if not self._told_sink:
                self.queue.put_nowait(
                    {"type": "websocket.disconnect", "code": message.get("code", 1000), "reason": ""}
                )
            return
        if kind != "websocket.send":
            raise RuntimeError(f"Expected ASGI message 'websocket.send' or 'websocket.close', not {kind!r}")
        if self.close_sent:
            raise ClientDisconnected()
        if self.write_paused:
            try:
                await asyncio.wait_for(self.writable.wait(), self.settings.ws_send_timeout_s)
            except TimeoutError:
                self._drop("send_timeout")
                raise ClientDisconnected() from None
            if self.disconnected:
                raise ClientDisconnected()
        data = message.get("bytes")
        if data is not None:
            self.transport.write(frame_header(_OP_BINARY, len(data)) + data)
        else:
            self.write_text(message.get("text", "").encode())

    async def _guarded_send(self, message: Any) -> None:
        """uvicorn's send (handshake, refusals, deflate) with the send timeout and a
        bounded close."""
        if not self.writable.is_set():
            if message["type"] == "websocket.close" and self.handshake_complete:
                # One small frame past the buffer bound: a client that reads later sees why.
                self.writable.set()
                try:
                    await super().send(message)
                finally:
                    if self.write_paused and not self.disconnected:
                        self.writable.clear()
                self._bound_close()
                return
            try:
                await asyncio.wait_for(self.writable.wait(), self.settings.ws_send_timeout_s)
            except TimeoutError:
                self._drop("send_timeout")
                raise ClientDisconnected() from None
        await super().send(message)
        if message["type"] == "websocket.close":
            self._bound_close()

    def _bound_close(self) -> None:
        """uvicorn's close timer calls ``transport.close()``, which waits for a flush."""
        if self.close_timer is not None:
            self.close_timer.cancel()
            self.close_timer = self.loop.call_later(self.close_timeout, self.transport.abort)

    # -- end of the connection -------------------------------------------------------------
    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._abort_timer, self._send_timer):  # a timer keeps the protocol alive
            if timer is not None:
                timer.cancel()
        self._abort_timer = self._send_timer = None
        self._buf = b""
        super().connection_lost(exc)  # queues a disconnect for the ASGI path
        if self.sink is not None:
            self._disconnect(1005 if self.handshake_complete else 1006)

    async def run_asgi(self) -> None:
        await super().run_asgi()
        if not self.disconnected:  # closed or closing: do not wait for ever on a flush
            self._abort_timer = self.loop.call_later(self.close_timeout, self._abort_if_open)

    def shutdown(self) -> None:
        """Server exit (after the drain): what the client has not read by now never will be."""
        if self.own_framing and self.handshake_complete and self.initial_response is None:
            self.stop_keepalive()
            if not self.close_sent and not self.disconnected:
                self._disconnect(1012, "")
                self.close(1012)
        else:
            super().shutdown()
        if not self.disconnected and self.transport.get_write_buffer_size():
            self.transport.abort()
        elif not self.disconnected:
            self.loop.call_later(min(1.0, self.close_timeout), self._abort_if_open)

    def _abort_if_open(self) -> None:
        if not self.disconnected:
            self.transport.abort()
