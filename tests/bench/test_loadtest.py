"""``lookback.loadtest``: the minimal WebSocket client, the step -> frame mapping, the ramp
search, and short end-to-end runs against the echo server and Lookback itself."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import struct
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import uvicorn

from lookback import loadtest
from lookback.loadtest import (
    WS_GUID,
    LoadConfig,
    LoadtestError,
    _Proc,
    _RawSession,
    build_messages,
    check_urls,
    load_audio,
    ramp,
    run_load,
    ws_frame,
)
from tests.bench.echo_server import create_echo_app
from tests.conftest import STORE, free_port, running_server, uvicorn_in_thread
from tests.conftest import test_settings as make_settings


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


def test_only_loopback_unless_allowed() -> None:
    check_urls(LoadConfig(urls=["ws://127.0.0.1:1"]))
    check_urls(LoadConfig(urls=["ws://localhost:1"]))
    with pytest.raises(LoadtestError, match="loopback"):
        check_urls(LoadConfig(urls=["ws://192.0.2.1:8000"]))
    check_urls(LoadConfig(urls=["ws://192.0.2.1:8000"], allow_remote=True))
    with pytest.raises(LoadtestError):
        check_urls(LoadConfig(sessions=0))


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


def _open_session(proc: _Proc, msgs: list[bytes]) -> tuple[_RawSession, _FakeTransport, str]:
    s = _RawSession(proc, msgs, 0, "127.0.0.1", 8000, "/v1/stream?model=m", {})
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
    proc = _Proc(cfg)
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
    proc = _Proc(LoadConfig())
    s, _, _ = _open_session(proc, [b"m"])
    body = b'{"error":{"code":"server_busy","message":"cap"}}'
    s.data_received(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    assert s.failure == "http_503:server_busy" and not s.ready


def test_ramp_brackets_and_bisects(monkeypatch: pytest.MonkeyPatch) -> None:
    capacity = 300
    seen: list[int] = []

    def fake_run(cfg: LoadConfig) -> dict[str, Any]:
        seen.append(cfg.sessions)
        ok = cfg.sessions <= capacity
        return {
            "sessions": cfg.sessions,
            "passed": ok,
            "lost_results": 0,
            "errors": {},
            "latency_ms": {"p50": 1.0, "p99": 5.0 if ok else 50.0, "p99.9": 9.0},
            "results_per_s": 1.0,
            "connected": cfg.sessions,
            "client": {"cpu_total": 0.1, "bottleneck": False, "slip_p99_ms": 0.1},
        }

    monkeypatch.setattr(loadtest, "run_load", fake_run)
    monkeypatch.setattr(loadtest, "wait_server_idle", lambda url, timeout=0: None)
    cfg = LoadConfig(quiet=True, warmup=0, duration=0.01)
    res = ramp(cfg, start=32, max_trials=20)
    assert seen[:5] == [32, 64, 128, 256, 512]
    assert res["stop"] == "converged" and res["max_sessions"] <= capacity < res["first_fail"]
    assert res["first_fail"] - res["max_sessions"] <= max(2, 0.05 * capacity + 1)
    seen.clear()
    res = ramp(cfg, start=1000, max_trials=20)  # start above capacity: halve first
    assert seen[:3] == [1000, 500, 250] and res["max_sessions"] <= capacity


def test_ramp_retries_a_failure_once_when_the_client_slipped(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def fake_run(cfg: LoadConfig) -> dict[str, Any]:
        calls.append(cfg.sessions)
        noisy = calls.count(cfg.sessions) == 1 and cfg.sessions == 64  # first try at 64: noise
        ok = cfg.sessions <= 100 and not noisy
        return {
            "sessions": cfg.sessions,
            "passed": ok,
            "lost_results": 0,
            "errors": {},
            "latency_ms": {"p50": 1.0, "p99": 5.0 if ok else 50.0, "p99.9": 9.0},
            "results_per_s": 1.0,
            "connected": cfg.sessions,
            "client": {"cpu_total": 0.1, "bottleneck": noisy or cfg.sessions == 128, "slip_p99_ms": 5.0},
        }

    monkeypatch.setattr(loadtest, "run_load", fake_run)
    monkeypatch.setattr(loadtest, "wait_server_idle", lambda url, timeout=0: None)
    res = ramp(LoadConfig(quiet=True, warmup=0, duration=0.01), start=32, max_trials=20)
    assert calls[:5] == [32, 64, 64, 128, 128]  # each slipped failure runs once more
    assert 96 <= res["max_sessions"] <= 100
    assert [t["retried"] for t in res["trials"][:5]] == [False, True, False, True, False]


@contextlib.contextmanager
def _echo(hop: int) -> Iterator[str]:
    port = free_port()
    config = uvicorn.Config(
        create_echo_app(hop),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        ws="websockets-sansio",
        ws_per_message_deflate=False,
        lifespan="on",
    )
    with uvicorn_in_thread(config):
        yield f"ws://127.0.0.1:{port}"


@pytest.mark.parametrize("client", ["raw", "websockets"])
def test_short_run_against_echo_counts_every_result(client: str) -> None:
    with _echo(hop=512) as url:
        r = run_load(
            LoadConfig(
                urls=[url],
                sessions=4,
                duration=0.8,
                warmup=0.2,
                frames_per_message=3,
                client=client,
                quiet=True,
                procs=2,
            )
        )
    assert r["connected"] == 4 and not r["process_failures"]
    assert r["close_codes"] == {"1000": 4}
    assert r["lost_results"] == 0 and r["no_summary"] == 0 and not r["errors"]
    # hop 4 frames, 3 frames per message: every frame sent is scored (the last hop padded)
    assert r["results_total"] >= r["frames_sent"] / 4
    assert r["results_measured"] > 0 and r["latency_ms"]["p50"] is not None


def test_short_run_against_lookback() -> None:
    models = [p.parent.parent.name for p in STORE.glob("*/*/model.json")]
    if not models:
        pytest.skip("no model in model_store")
    model = "lookback-vad" if "lookback-vad" in models else models[0]
    with running_server(make_settings(models=[model], default_model=model)) as srv:
        r = run_load(LoadConfig(urls=[srv.ws], sessions=3, duration=0.8, warmup=0.2, model=model, quiet=True))
        assert r["connected"] == 3 and r["lost_results"] == 0 and not r["errors"]
        assert r["close_codes"] == {"1000": 3}


def test_idle_sessions_open_and_close() -> None:
    async def run(url: str) -> int:
        async with loadtest.IdleSessions(url, 5) as idle:
            return idle.ready

    with _echo(hop=128) as url:
        assert asyncio.run(run(url)) == 5
