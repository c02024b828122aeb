"""``lookback.websocket``: RFC 6455 framing of our own after uvicorn's handshake.

Every test runs a real server (``running_server``: production's protocols, so the
streaming route takes the direct path of ``lookback.api.connection``) and talks to it
through ``RawWs``, a client written here on a plain socket: the HTTP upgrade, then masked
frames built by hand, so a test can send what no client library would (unmasked frames,
reserved bits, broken fragmentation, a header announcing more than ``ws_max_size``, bad
close payloads) and split or join frames across TCP writes at will.

Scoring is checked against a transcript of the same audio streamed by the ``websockets``
library (``stream_clip``: every text message, the session id cut out): however the raw
client frames that audio, the server must answer with the same texts. Every socket read
has a timeout, waits on the server's bookkeeping are bounded polls, nothing sleeps.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import orjson
import pytest

from lookback.websocket import DirectWebSocketProtocol
from tests.api.ws_util import (
    ErrorLog,
    Transcript,
    metric,
    metrics_text,
    poll,
    server_side_protocol,
    stream_clip,
    strip_sid,
)
from tests.conftest import DEFAULT_MODEL, Server, read_clip, running_server
from tests.conftest import test_settings as make_settings

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
READ_TIMEOUT = 10.0  # every socket read; the servers' close timeout is longer (see srv)
QUERY = f"model={DEFAULT_MODEL}"
FRAME_BYTES = 128 * 2  # one 128-sample pcm_s16le frame, one step of lookback-vad
FRAMES_PER_MSG = 3
MSG_BYTES = FRAMES_PER_MSG * FRAME_BYTES  # 768: a 16-bit extended length
N_MSGS = 30  # 90 steps, more than max_pending_steps (64): a burst makes the session hold
CLIP = read_clip("silero_ref_speech.wav")
PCM = CLIP[16000 : 16000 + N_MSGS * FRAMES_PER_MSG * 128].tobytes()
MSGS = tuple(PCM[i : i + MSG_BYTES] for i in range(0, len(PCM), MSG_BYTES))
END = b'{"type":"end"}'


# -- a hand-written client --------------------------------------------------------------------


def masked(payload: bytes, key: bytes) -> bytes:
    """RFC 6455 5.3 masking in plain Python (not the server's ``apply_mask``)."""
    n = len(payload)
    if not n:
        return b""
    stream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")


def frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bool = True,
    length: int | None = None,
) -> bytes:
    """One client frame. ``length`` announces a size other than the payload's: with an
    empty payload, a header alone."""
    n = len(payload) if length is None else length
    b0 = (0x80 if fin else 0) | rsv | opcode
    bit = 0x80 if mask else 0
    if n < 126:
        head = bytes((b0, bit | n))
    elif n < 65536:
        head = bytes((b0, bit | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((b0, bit | 127)) + n.to_bytes(8, "big")
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + masked(payload, key)


def close_frame(code: int, reason: bytes = b"") -> bytes:
    return frame(OP_CLOSE, code.to_bytes(2, "big") + reason)


@dataclass
class Ended:
    """What a session sent from after ``ready`` up to its close frame."""

    texts: list[str]
    code: int | None  # None: a close frame without a payload
    reason: str


class RawWs:
    """A WebSocket client on a blocking socket: the upgrade, then frames by hand."""

    def __init__(self, port: int, query: str = QUERY) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.port = self.sock.getsockname()[1]
        self.buf = b""
        self.pongs: list[bytes] = []
        key = base64.b64encode(os.urandom(16))
        self.sock.sendall(
            b"GET /v1/stream?" + query.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: " + key + b"\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        assert lines[0].startswith("HTTP/1.1 101 "), head
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        assert headers["sec-websocket-accept"] == base64.b64encode(hashlib.sha1(key + GUID).digest()).decode()
        assert "sec-websocket-extensions" not in headers
        self.ready = self.text()
        assert orjson.loads(self.ready)["type"] == "ready", self.ready

    def send(self, *frames: bytes) -> None:
        """Frames in one TCP write."""
        self.sock.sendall(b"".join(frames))

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)  # bounded by the socket's timeout
        if not chunk:
            raise EOFError("the server closed the connection")
        self.buf += chunk

    def _take(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def frame(self) -> tuple[int, bytes]:
        """The next server frame: (opcode, payload). The server never fragments nor masks."""
        b0, b1 = self._take(2)
        assert b0 & 0xF0 == 0x80, f"FIN and no reserved bits expected, got {b0:#04x}"
        assert not b1 & 0x80, "a server frame must not be masked"
        n = b1 & 0x7F
        if n == 126:
            n = int.from_bytes(self._take(2), "big")
        elif n == 127:
            n = int.from_bytes(self._take(8), "big")
        return b0 & 0x0F, self._take(n)

    def _other(self, op: int, payload: bytes) -> None:
        """A frame that is not what the caller waits for: pongs are kept, the server's
        keep-alive pings skipped, anything else fails."""
        if op == OP_PONG:
            self.pongs.append(payload)
        elif op != OP_PING:
            raise AssertionError(f"unexpected frame, opcode {op}: {payload[:80]!r}")

    def text(self) -> str:
        """The next text message."""
        while True:
            op, payload = self.frame()
            if op == OP_TEXT:
                return strip_sid(payload.decode())
            self._other(op, payload)

    def wait_pongs(self, n: int) -> list[bytes]:
        while len(self.pongs) < n:
            self._other(*self.frame())
        return self.pongs

    def until_close(self) -> Ended:
        """Every text up to the server's close frame, answered as a client should; then
        the server must close TCP with nothing more sent."""
        texts: list[str] = []
        while True:
            op, payload = self.frame()
            if op == OP_CLOSE:
                break
            if op == OP_TEXT:
                texts.append(strip_sid(payload.decode()))
            else:
                self._other(op, payload)
        assert len(payload) != 1, payload
        with contextlib.suppress(OSError):  # it may have closed already (it started the close)
            self.send(frame(OP_CLOSE, payload))
        assert self.rest() == b"", "the server sent more after its close frame"
        code = int.from_bytes(payload[:2], "big") if payload else None
        return Ended(texts, code, payload[2:].decode())

    def echo(self) -> bytes:
        """The payload of the server's answer to our close (texts written before it are
        skipped); then the server must close TCP with nothing more sent."""
        while (got := self.frame())[0] != OP_CLOSE:
            if got[0] != OP_TEXT:
                self._other(*got)
        assert self.rest() == b"", "the server sent more after its close frame"
        return got[1]

    def rest(self) -> bytes:
        """What arrives until the server closes TCP (a timeout fails)."""
        out, self.buf = self.buf, b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := self.sock.recv(65536):
                out += chunk
        return out

    def close(self) -> None:
        self.sock.close()


@contextlib.contextmanager
def session(port: int, query: str = QUERY) -> Iterator[RawWs]:
    ws = RawWs(port, query)
    try:
        yield ws
    finally:
        ws.close()


# -- servers, the reference transcript, bookkeeping -------------------------------------------


@pytest.fixture(scope="module")
def srv() -> Iterator[Server]:
    """The default model; a close timeout (ws_send_timeout_s) well past READ_TIMEOUT, so a
    socket that closes within a read closed because the closing handshake completed."""
    with running_server(make_settings(ws_send_timeout_s=30.0)) as server:
        yield server


def reference(server: Server, pcm: bytes) -> Transcript:
    """``pcm`` as a well-behaved client streams it: 3-frame messages, then ``end``."""
    got = asyncio.run(stream_clip(server.ws, pcm, query=QUERY, frames_per_msg=FRAMES_PER_MSG))
    assert got.close_code == 1000 and got.parsed()[-1]["type"] == "summary", got.messages[-2:]
    poll(lambda: sessions(server) == 0)  # released: the tests count sessions
    return got


@pytest.fixture(scope="module")
def baseline(srv: Server) -> Transcript:
    got = reference(srv, PCM)
    assert got.results == N_MSGS * FRAMES_PER_MSG
    return got


def sessions(server: Server) -> int:
    return int(server.get("/readyz").json()["sessions"])


def sessions_ended(server: Server) -> float:
    return metric(metrics_text(server.url), "lookback_sessions_ended_total")


@pytest.fixture(autouse=True)
def clean(srv: Server) -> Iterator[None]:
    """Every test leaves no session open and nothing logged at WARNING or above by the
    server's loggers, asyncio's included (a protocol callback that raised)."""
    loop_log = logging.getLogger("asyncio")
    with ErrorLog() as log:
        loop_log.addHandler(log)
        try:
            yield
            poll(lambda: sessions(srv) == 0, timeout=15)
        finally:
            loop_log.removeHandler(log)
    assert log.problems() == []


def expect_baseline(ws: RawWs, baseline: Transcript) -> None:
    ended = ws.until_close()
    assert ws.ready == baseline.messages[0]
    assert ended.texts == baseline.messages[1:]
    assert (ended.code, ended.reason) == (baseline.close_code, baseline.close_reason)


def audio(msgs: Sequence[bytes] = MSGS) -> list[bytes]:
    return [frame(OP_BINARY, m) for m in msgs]


# -- fragmentation ------------------------------------------------------------------------------


def in_thirds_with_a_ping(i: int, msg: bytes) -> list[bytes]:
    """Uneven cuts, one inside a sample; a ping between the first and second fragment."""
    return [
        frame(OP_BINARY, msg[:1], fin=False),
        frame(OP_PING, b"ping %d" % i),
        frame(OP_CONT, msg[1:501], fin=False),
        frame(OP_CONT, msg[501:]),
    ]


def with_empty_fragments(i: int, msg: bytes) -> list[bytes]:
    """An empty first and last fragment around the whole payload."""
    return [
        frame(OP_BINARY, b"", fin=False),
        frame(OP_CONT, msg, fin=False),
        frame(OP_PING, b"ping %d" % i),
        frame(OP_CONT, b""),
    ]


@pytest.mark.parametrize("split", [in_thirds_with_a_ping, with_empty_fragments])
def test_fragmented_audio_is_scored_like_whole_messages(
    srv: Server, baseline: Transcript, split: Callable[[int, bytes], list[bytes]]
) -> None:
    with session(srv.port) as ws:
        proto = server_side_protocol(ws.port)
        assert isinstance(proto, DirectWebSocketProtocol)
        poll(lambda: proto.sink is not None)  # the direct path: the connection attached
        for i, msg in enumerate(MSGS):
            for part in split(i, msg):  # each fragment its own TCP write
                ws.send(part)
        ws.send(frame(OP_TEXT, END))
        expect_baseline(ws, baseline)
        assert ws.pongs == [b"ping %d" % i for i in range(N_MSGS)]


def test_a_fragmented_text_message_is_one_message(srv: Server, baseline: Transcript) -> None:
    with session(srv.port) as ws:
        ws.send(*audio())
        ws.send(frame(OP_TEXT, END[:8], fin=False))
        ws.send(frame(OP_CONT, END[8:]))
        expect_baseline(ws, baseline)


def test_a_character_split_across_fragments_is_decoded_whole(srv: Server) -> None:
    """UTF-8 is checked on the whole message: a fragment may end inside a character."""
    text = '{"type":"\u00e9"}'.encode()
    cut = text.index(b"\xc3") + 1
    with session(srv.port) as ws:
        ws.send(frame(OP_TEXT, text[:cut], fin=False), frame(OP_CONT, text[cut:]))
        error = orjson.loads(ws.text())
        assert (error["type"], error["code"]) == ("error", "unknown_type")
        assert "'\u00e9'" in error["message"]
        ws.send(frame(OP_TEXT, END))
        ended = ws.until_close()
        assert ended.code == 1000 and orjson.loads(ended.texts[-1])["type"] == "summary"


# -- ping and pong ------------------------------------------------------------------------------


def test_a_ping_gets_its_payload_back_and_a_pong_is_ignored(srv: Server, baseline: Transcript) -> None:
    payloads = [b"", b"lookback", bytes(range(125))]  # up to the 125 bytes of a control frame
    with session(srv.port) as ws:
        ws.send(*(frame(OP_PING, p) for p in payloads))
        assert ws.wait_pongs(len(payloads)) == payloads
        ws.send(frame(OP_PONG, b"unsolicited"), frame(OP_PONG))
        ws.send(*audio(), frame(OP_TEXT, END))
        expect_baseline(ws, baseline)
        assert ws.pongs == payloads  # nothing answered the pongs


# -- protocol violations ----------------------------------------------------------------------

# (build(ws_max_size) -> the bytes, in one write, of a session that breaks the protocol; close code)
VIOLATIONS: dict[str, tuple[Callable[[int], bytes], int]] = {
    "unmasked": (lambda _: frame(OP_BINARY, MSGS[0], mask=False), 1002),
    "rsv1": (lambda _: frame(OP_BINARY, MSGS[0], rsv=0x40), 1002),
    "rsv2": (lambda _: frame(OP_TEXT, END, rsv=0x20), 1002),
    "rsv3-on-ping": (lambda _: frame(OP_PING, b"x", rsv=0x10), 1002),
    "data-opcode-3": (lambda _: frame(0x3, b"x"), 1002),
    "control-opcode-11": (lambda _: frame(0xB, b"x"), 1002),
    "continuation-first": (lambda _: frame(OP_CONT, MSGS[0]), 1002),
    "binary-inside-fragmented": (
        lambda _: frame(OP_BINARY, MSGS[0][:100], fin=False) + frame(OP_BINARY, MSGS[0][100:]),
        1002,
    ),
    "text-inside-fragmented": (
        lambda _: frame(OP_BINARY, MSGS[0][:100], fin=False) + frame(OP_TEXT, END),
        1002,
    ),
    "ping-of-126-bytes": (lambda _: frame(OP_PING, b"p" * 126), 1002),
    "fragmented-ping": (lambda _: frame(OP_PING, b"p", fin=False) + frame(OP_CONT, b"q"), 1002),
    "fragmented-close": (lambda _: frame(OP_CLOSE, b"\x03\xe8", fin=False) + frame(OP_CONT, b"bye"), 1002),
    "invalid-utf8-text": (lambda _: frame(OP_TEXT, b'{"type":"\xff"}'), 1007),
    "surrogate-in-text": (lambda _: frame(OP_TEXT, b'{"type":"\xed\xa0\x80"}'), 1007),
    "text-ends-inside-a-character": (
        lambda _: frame(OP_TEXT, b'{"type":"end"}\xc3', fin=False) + frame(OP_CONT, b""),
        1007,
    ),
    "header-over-ws-max-size": (lambda size: frame(OP_BINARY, length=size + 1), 1009),
    "huge-64-bit-header": (lambda _: frame(OP_BINARY, length=2**63 - 1), 1009),
    "fragments-over-ws-max-size": (
        lambda size: frame(OP_BINARY, bytes(256), fin=False) + frame(OP_CONT, length=size - 255),
        1009,
    ),
    "close-code-1005": (lambda _: close_frame(1005), 1002),
    "close-code-1006": (lambda _: close_frame(1006), 1002),
    "close-code-999": (lambda _: close_frame(999), 1002),
    "close-code-2999": (lambda _: close_frame(2999), 1002),
    "close-code-5000": (lambda _: close_frame(5000), 1002),
    "close-of-1-byte": (lambda _: frame(OP_CLOSE, b"\x03"), 1002),
    "close-reason-not-utf8": (lambda _: close_frame(1000, b"\xff"), 1007),
}


@pytest.mark.parametrize(("build", "code"), VIOLATIONS.values(), ids=VIOLATIONS.keys())
def test_a_protocol_violation_closes_with_its_code(
    srv: Server, baseline: Transcript, build: Callable[[int], bytes], code: int
) -> None:
    """The violating session gets a close frame with ``code`` and nothing else, and is
    released at once, while a healthy session streaming meanwhile is scored as usual.
    A header over ws_max_size is refused from the header alone: no payload is sent."""
    half = N_MSGS // 2
    ended_before = sessions_ended(srv)
    with session(srv.port) as healthy:
        healthy.send(*audio(MSGS[:half]))
        with session(srv.port) as bad:
            bad.send(build(srv.settings.max_message_bytes * 4))
            ended = bad.until_close()
        assert (ended.code, ended.texts) == (code, []), ended
        assert ended.reason, "a close reason says what was wrong"
        poll(lambda: sessions(srv) == 1)  # released while the healthy one goes on
        poll(lambda: sessions_ended(srv) == ended_before + 1)
        healthy.send(*audio(MSGS[half:]), frame(OP_TEXT, END))
        expect_baseline(healthy, baseline)


# -- the client's close -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [b"\x03\xe8bye", b"\x03\xe9", b"\x0f\xa0app-defined \xc3\xa9", b""],
    ids=["1000-with-reason", "1001", "4000", "no-payload"],
)
def test_a_client_close_is_echoed_and_ends_the_session(srv: Server, payload: bytes) -> None:
    ended_before = sessions_ended(srv)
    with session(srv.port) as ws:
        ws.send(*audio(MSGS[:2]))
        results = 0
        while results < 2 * FRAMES_PER_MSG:  # every step scored: the session is live, idle
            results += orjson.loads(ws.text())["type"] == "result"
        assert sessions(srv) == 1
        ws.send(frame(OP_CLOSE, payload))
        assert ws.echo() == payload
    poll(lambda: sessions(srv) == 0)
    poll(lambda: sessions_ended(srv) == ended_before + 1)


def test_a_close_inside_a_fragmented_message_is_echoed(srv: Server) -> None:
    """A control frame may come between fragments, a close too: the message is dropped."""
    with session(srv.port) as ws:
        ws.send(frame(OP_BINARY, MSGS[0][:10], fin=False), close_frame(1000, b"done"))
        assert ws.echo() == b"\x03\xe8done"


# -- frames and TCP writes --------------------------------------------------------------------


def test_many_frames_in_one_write_are_scored_in_order(srv: Server, baseline: Transcript) -> None:
    with session(srv.port) as ws:
        for i in range(0, N_MSGS, 10):  # 10 frames a write
            ws.send(*audio(MSGS[i : i + 10]))
        ws.send(frame(OP_TEXT, END))
        expect_baseline(ws, baseline)


def test_a_burst_past_the_session_limit_is_held_and_resumed(srv: Server, baseline: Transcript) -> None:
    """All the audio and the end in one write: more steps than max_pending_steps, so the
    session holds with frames still buffered, and release goes on from the same byte."""
    assert srv.settings.max_pending_steps < N_MSGS * FRAMES_PER_MSG
    with session(srv.port) as ws:
        ws.send(*audio(), frame(OP_TEXT, END))
        expect_baseline(ws, baseline)


def buffered(proto: DirectWebSocketProtocol, n: int) -> None:
    """Wait until the server has read and kept exactly ``n`` bytes of a partial frame."""
    poll(lambda: len(proto._buf) == n, interval=0.0005)


def test_frames_split_across_writes_are_reassembled(srv: Server, baseline: Transcript) -> None:
    """The first frame a byte at a time through its header (the 16-bit length and the mask
    key cut) and 3 bytes at a time through its payload, each piece read by the server
    before the next is sent; then every other frame in 3-byte writes."""
    with session(srv.port) as ws:
        proto = server_side_protocol(ws.port)
        first = frame(OP_BINARY, MSGS[0])
        pieces = [first[i : i + 1] for i in range(8)] + [first[i : i + 3] for i in range(8, len(first), 3)]
        sent = 0
        for piece in pieces[:-1]:
            ws.send(piece)
            sent += len(piece)
            buffered(proto, sent)
        ws.send(pieces[-1])
        rest = b"".join([*audio(MSGS[1:]), frame(OP_TEXT, END)])
        for i in range(0, len(rest), 3):
            ws.send(rest[i : i + 3])
        expect_baseline(ws, baseline)


# -- payload lengths --------------------------------------------------------------------------


def test_payload_lengths_of_each_header_form(srv: Server, baseline: Transcript) -> None:
    """7-bit (the end), 16-bit (200 bytes: not whole frames) and 64-bit (70 000 bytes, and
    exactly ws_max_size) lengths parse; what the framing accepts past max_message_bytes is
    the application's documented ``message_too_large``, and the session goes on."""
    ws_max_size = srv.settings.max_message_bytes * 4
    assert srv.settings.max_message_bytes < 70_000 < ws_max_size
    with session(srv.port) as ws:
        ws.send(frame(OP_BINARY, bytes(200)))
        ws.send(frame(OP_BINARY, bytes(70_000)))
        ws.send(frame(OP_BINARY, bytes(ws_max_size)))
        errors = [orjson.loads(ws.text()) for _ in range(3)]
        assert [(e["type"], e["code"]) for e in errors] == [
            ("error", "bad_frame_size"),
            ("error", "message_too_large"),
            ("error", "message_too_large"),
        ]
        assert "70000 bytes" in errors[1]["message"] and f"{ws_max_size} bytes" in errors[2]["message"]
        ws.send(*audio(), frame(OP_TEXT, END))
        expect_baseline(ws, baseline)


def test_a_64_bit_length_message_is_scored() -> None:
    """With limits that admit it, one message of 280 frames (71 680 bytes: a 64-bit length,
    its header sent a byte at a time) is scored like the same audio in 3-frame messages."""
    n = 280
    settings = make_settings(
        ws_send_timeout_s=30.0, max_message_bytes=96 * 1024, max_frames_per_message=n, max_pending_steps=n
    )
    pcm = CLIP[16000 : 16000 + n * 128].tobytes()
    assert len(pcm) > 65535
    with running_server(settings) as server:
        expected = reference(server, pcm)
        assert expected.results == n
        with session(server.port) as ws:
            proto = server_side_protocol(ws.port)
            big = frame(OP_BINARY, pcm)
            assert big[1] & 0x7F == 127
            for i in range(14):  # 2 + 8 length bytes + 4 mask key bytes
                ws.send(big[i : i + 1])
                buffered(proto, i + 1)
            ws.send(big[14:], frame(OP_TEXT, END))
            expect_baseline(ws, expected)
        poll(lambda: sessions(server) == 0)


def test_a_ping_inside_a_large_fragmented_message_is_no_part_of_it(srv: Server, baseline: Transcript) -> None:
    """Control frames between fragments do not count toward the message's size: a message
    of exactly ws_max_size with a 125-byte ping inside is one (too large) message."""
    size = srv.settings.max_message_bytes * 4
    with session(srv.port) as ws:
        ws.send(
            frame(OP_BINARY, bytes(size - 10), fin=False),
            frame(OP_PING, bytes(125)),
            frame(OP_CONT, bytes(10)),
        )
        error = orjson.loads(ws.text())
        assert (error["type"], error["code"]) == ("error", "message_too_large")
        assert f"{size} bytes" in error["message"]
        assert ws.pongs == [bytes(125)]
        ws.send(*audio(), frame(OP_TEXT, END))
        expect_baseline(ws, baseline)
