"""``lookback.loadtest.rawclient``: framing and the minimal client's parser; ``audio``: messages."""

from __future__ import annotations

import base64
import hashlib
import struct

import orjson
import pytest

from lookback.loadtest.audio import build_messages, load_audio
from lookback.loadtest.config import FRAME, LoadConfig
from lookback.loadtest.rawclient import WS_GUID, Proc, RawSession, WireTiming, ws_frame


def _unframe(data: bytes) -> tuple[int, bytes, int]:
    """(opcode, unmasked payload, frame length) of one masked client frame."""
    b0, b1 = data[0], data[1]
    assert b1 & 0x80, "client frames must be masked"
    n, pos = b1 & 0x7F, 2
    if n == 126:
        (n,) = struct.unpack("!H", data[2:4])
        pos = 4
    elif n == 127:
        (n,) = struct.unpack("!Q", data[2:10])
        pos = 10
    mask = data[pos : pos + 4]
    body = data[pos + 4 : pos + 4 + n]
    return b0 & 0x0F, bytes(c ^ mask[i % 4] for i, c in enumerate(body)), pos + 4 + n


def _server_frame(opcode: int, payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        return bytes([0x80 | opcode, n]) + payload
    if n < 1 << 16:
        return bytes([0x80 | opcode, 126]) + struct.pack("!H", n) + payload
    return bytes([0x80 | opcode, 127]) + struct.pack("!Q", n) + payload


@pytest.mark.parametrize("size", [0, 14, 125, 126, 256, 2560, 70000])
def test_ws_frame_masks_and_encodes_lengths(size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    frame = ws_frame(0x2, payload, b"\x01\x02\x03\x04")
    op, body, length = _unframe(frame)
    assert (op, body, length) == (0x2, payload, len(frame))


def test_messages_are_whole_frames_and_loop() -> None:
    samples = load_audio(None)
    msgs = build_messages(samples, 3, seed=1, framed=False)
    assert all(len(m) == 3 * 128 * 2 for m in msgs)
    framed = build_messages(samples, 3, seed=1)
    assert _unframe(framed[5])[1] == msgs[5]


def test_messages_in_another_wire_form() -> None:
    """8 kHz µ-law in 20 ms packets, 44.1 kHz float: the clip at that rate, whole, encoded."""
    import numpy as np

    from lookback.engine.pcm import G711

    pcm = load_audio(None, rate=8000)
    assert len(pcm) == 10 * 8000
    mu = build_messages(pcm, 1, seed=1, framed=False, encoding="mulaw", message_samples=160)
    assert len(mu) == 500 and all(len(m) == 160 for m in mu)
    decoded = G711["mulaw"][np.frombuffer(b"".join(mu), np.uint8)].astype(np.int32)
    assert np.abs(decoded - pcm).max() <= 1024  # G.711's largest step, near full scale
    f32 = build_messages(
        load_audio(None, rate=44100), 1, seed=1, framed=False, encoding="pcm_f32le", message_samples=882
    )
    assert len(f32[0]) == 882 * 4
    assert np.frombuffer(f32[0], "<f4").max() < 1.0


class _FakeTransport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    abort = close

    def get_write_buffer_size(self) -> int:
        return 0


def _open_session(proc: Proc, msgs: list[bytes]) -> tuple[RawSession, _FakeTransport, str]:
    s = RawSession(proc, msgs, 0, "127.0.0.1", 8000, "/v1/stream?model=m", {})
    tr = _FakeTransport()
    s.connection_made(tr)  # type: ignore[arg-type]
    request = tr.written[0].decode()
    assert request.startswith("GET /v1/stream?model=m HTTP/1.1\r\n")
    assert "Sec-WebSocket-Extensions" not in request  # no permessage-deflate
    key = next(line.split(": ")[1] for line in request.split("\r\n") if line.startswith("Sec-WebSocket-Key"))
    accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
    return s, tr, accept


async def test_raw_client_parses_split_and_coalesced_frames() -> None:
    cfg = LoadConfig(frames_per_message=2)
    proc = Proc(cfg)
    proc.meas_start, proc.meas_end = 0.0, float("inf")
    s, tr, accept = _open_session(proc, [b"m0", b"m1"])
    ready = orjson.dumps({"type": "ready", "hop_samples": 512})
    stream = (
        f"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    ).encode()
    stream += _server_frame(1, ready)
    for _ in range(4):  # messages hold 2 frames, hop is 4 frames: step i <- message 2i + 1
        s.send_next()
        s.send_next()
    big = orjson.dumps({"type": "event", "pad": "x" * 300})  # a 16-bit length
    stream += _server_frame(1, b'{"type":"result","step":0,"time":0.032,"scores":{"s":0.5}}')
    stream += _server_frame(9, b"hi")  # ping: answered with a masked pong
    stream += _server_frame(1, big)
    stream += _server_frame(1, b'{"type":"result","step":1,"time":0.064,"scores":{"s":0.5}}')
    stream += _server_frame(1, orjson.dumps({"type": "error", "code": "bad_json"}))
    stream += _server_frame(1, orjson.dumps({"type": "summary", "steps": 2, "frames": 16}))
    stream += _server_frame(8, struct.pack("!H", 1000) + b"normal")
    for i in range(0, len(stream), 7):  # arbitrary TCP segmentation
        s.data_received(stream[i : i + 7])
    assert s.ready and s.hop_frames == 4
    assert s.results == 2 and s.events == 1 and s.errors == {"bad_json": 1}
    assert s.summary == {"type": "summary", "steps": 2, "frames": 16}
    assert s.close_code == 1000 and s.done_fut.done()
    assert len(proc.latencies) == 2  # steps 0 and 1 map to messages 1 and 3
    ops = [_unframe(w)[0] for w in tr.written[1:] if w[0] & 0x0F in (0x8, 0xA)]
    assert ops == [0xA, 0x8]
    assert s.expected_steps() == 2


async def test_raw_client_reports_refused_upgrade() -> None:
    proc = Proc(LoadConfig())
    s, _, _ = _open_session(proc, [b"m"])
    body = b'{"error":{"code":"server_busy","message":"cap"}}'
    s.data_received(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    assert s.failure == "http_503:server_busy" and not s.ready


@pytest.mark.parametrize(("rate", "per"), [(8000, 160), (44100, 882), (48000, 960), (16000, 160)])
@pytest.mark.parametrize("hop", [128, 512])
def test_wire_timing_names_the_message_the_server_completes_a_step_with(
    rate: int, per: int, hop: int
) -> None:
    """Against the server's own decoder: the message after which the model-rate samples of
    step ``i`` are all out of the resampler (whole frames) is ``message_of(i)``."""
    import numpy as np

    from lookback.engine.decoder import WireDecoder

    dec = WireDecoder("pcm_f32le", rate, 16000, FRAME)
    timing = WireTiming(rate, per)
    out = 0
    step = 0
    rng = np.random.default_rng(1)
    for m in range(300):
        out += dec.feed(rng.uniform(-0.5, 0.5, per).astype(np.float32)).size
        while (step + 1) * hop <= out:
            assert timing.message_of(step, hop) == m, (step, m)
            step += 1
    assert step > 20
