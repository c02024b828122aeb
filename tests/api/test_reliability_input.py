"""Bad input never hurts anyone else: issue 6, "Reliability and security", input half.

Every bad input below gets its specific error code (or HTTP status / close code), the
server stays up, and two healthy sessions streaming *at the same time* (one on Silero VAD,
hop 512, one on the default model, hop 128) each receive a transcript byte-identical to
the one they receive alone. The bad client runs while both are provably mid-stream (all
results of their first half in, their second half not yet sent).
"""

from __future__ import annotations

import asyncio
import io
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
import soundfile as sf

from tests.api.ws_util import (
    SILERO_Q,
    ErrorLog,
    Transcript,
    metric,
    metrics_text,
    read_all,
    refused,
    stream_clip,
    wait_until,
    ws_connect,
)
from tests.conftest import Server, read_clip, running_server
from tests.conftest import test_settings as make_settings

KEY = "healthy-key-7f3a9c"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_MSG = 64 * 1024
MAX_UPLOAD = 256 * 1024
IDLE_S = 1.0
END = '{"type":"end"}'

CLIP = read_clip("silero_ref_speech.wav")[: 4 * 16000]  # 4 s: 500 frames, 125 Silero steps
PCM = CLIP.tobytes()
F32 = (CLIP.astype(np.float32) / 32768).astype("<f4")
S16_HOP = CLIP[:512].tobytes()  # 4 frames: one Silero step
F32_HOP = F32[:512].tobytes()


DEFAULT_Q = "model=lookback-vad"


@dataclass
class Module:
    srv: Server
    reference: Transcript  # the healthy Silero session, run alone
    reference_default: Transcript  # the healthy default-model session, run alone
    log: ErrorLog
    tmp: Path


@pytest.fixture(scope="module")
def mod(silero_model: str, default_model: str) -> Iterator[Module]:
    settings = make_settings(
        default_model="silero-vad",
        models=["silero-vad", default_model],
        api_keys=[KEY],
        max_message_bytes=MAX_MSG,
        max_upload_bytes=MAX_UPLOAD,
        idle_timeout_s=IDLE_S,
    )
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as mp:
        mp.setattr(tempfile, "tempdir", tmp)  # REST spools uploads here: count leftovers
        with running_server(settings) as srv, ErrorLog() as log:
            refs = [
                asyncio.run(stream_clip(srv.ws, PCM, query=q, headers=AUTH)) for q in (SILERO_Q, DEFAULT_Q)
            ]
            for ref, hop in zip(refs, (512, 128), strict=True):
                assert ref.close_code == 1000
                assert ref.summary["frames"] == len(PCM) // 256
                assert len(ref.of_type("result")) == ref.summary["steps"] == len(CLIP) // hop
                assert ref.of_type("event"), "the clip must produce events"
            yield Module(srv, refs[0], refs[1], log, Path(tmp))


async def healthy_next_to(mod: Module, bad: Callable[[], Awaitable[None]]) -> None:
    """Run ``bad()`` while two healthy sessions (Silero, default model) are mid-stream;
    neither transcript may move by a byte."""
    default_mid = asyncio.Event()
    bad_done = asyncio.Event()

    async def at_default_midway() -> None:
        default_mid.set()
        await bad_done.wait()

    async def at_silero_midway() -> None:
        await default_mid.wait()
        try:
            await bad()
        finally:
            bad_done.set()

    silero, default = await asyncio.gather(
        stream_clip(mod.srv.ws, PCM, headers=AUTH, midway=at_silero_midway),
        stream_clip(mod.srv.ws, PCM, query=DEFAULT_Q, headers=AUTH, midway=at_default_midway),
    )
    for got, ref in ((silero, mod.reference), (default, mod.reference_default)):
        assert got.close_code == ref.close_code == 1000
        assert got.messages == ref.messages, "healthy session disturbed by a bad client"


def errors_by_code(mod: Module) -> dict[str, float]:
    text = metrics_text(mod.srv.url)
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "lookback_errors_total":
                out[s.labels["code"]] = s.value
    return out


# -- WebSocket messages and handshake ---------------------------------------------------------


@dataclass(frozen=True)
class WsCase:
    send: tuple[bytes | str, ...] = ()
    errors: tuple[str, ...] = ()  # error codes the bad client receives, in order
    close: int = 1000  # 1000: the session stayed usable (a valid hop + end follow)
    query: str = SILERO_Q
    then_valid: bool = True
    ready: bool = True  # a `ready` precedes (False: refused right after the upgrade)


NAN_FRAME = np.full(128, np.nan, "<f4").tobytes()
INF_FRAMES = (
    np.r_[np.zeros(200, "<f4"), np.float32(np.inf), np.zeros(54, "<f4"), np.float32(-np.inf)]
    .astype("<f4")
    .tobytes()
)

WS_CASES: dict[str, WsCase] = {
    "partial_frame": WsCase((bytes(100),), ("bad_frame_size",)),
    "frame_and_a_half": WsCase((bytes(256 + 128),), ("bad_frame_size",)),
    "partial_frame_f32": WsCase((bytes(256),), ("bad_frame_size",), query=SILERO_Q + "&encoding=pcm_f32le"),
    "empty_binary": WsCase((b"",), ("empty_message",)),
    "above_max_message_bytes": WsCase((bytes(MAX_MSG + 256),), ("message_too_large",)),
    "above_transport_limit": WsCase((bytes(4 * MAX_MSG + 256),), (), close=1009, then_valid=False),
    "too_many_frames": WsCase((bytes(65 * 256),), ("too_many_frames",)),
    "text_not_json": WsCase(("this is {not json",), ("bad_json",)),
    "json_without_type": WsCase(('{"kind":"end"}', "[1,2]", '{"type":7}', '"end"'), ("missing_type",) * 4),
    "unknown_type": WsCase(('{"type":"pause"}',), ("unknown_type",)),
    # 64 frames = 16 steps to score before the summary: the late audio and flush arrive
    # while `end` is still being finished, and each gets its error
    "audio_after_end": WsCase(
        (PCM[: 64 * 256], END, PCM[:256], '{"type":"flush"}'),
        ("audio_after_end", "audio_after_end"),
        then_valid=False,
    ),
    "nan_f32": WsCase((NAN_FRAME,), ("non_finite_audio",), query=SILERO_Q + "&encoding=pcm_f32le"),
    "inf_f32": WsCase((INF_FRAMES,), ("non_finite_audio",), query=SILERO_Q + "&encoding=pcm_f32le"),
    "unknown_model": WsCase(
        errors=("unknown_model",), close=4404, query="model=no-such-model", then_valid=False, ready=False
    ),
    "unknown_version": WsCase(
        errors=("unknown_version",),
        close=4404,
        query=SILERO_Q + "&version=0.0.1",
        then_valid=False,
        ready=False,
    ),
    "bad_encoding": WsCase(
        errors=("bad_encoding",),
        close=4400,
        query=SILERO_Q + "&encoding=pcm_u8",
        then_valid=False,
        ready=False,
    ),
    "wrong_sample_rate": WsCase(
        errors=("bad_sample_rate",),
        close=4400,
        query=SILERO_Q + "&sample_rate=11025",
        then_valid=False,
        ready=False,
    ),
    "sample_rate_not_a_number": WsCase(
        errors=("bad_sample_rate",),
        close=4400,
        query=SILERO_Q + "&sample_rate=fast",
        then_valid=False,
        ready=False,
    ),
    "bad_results_value": WsCase(
        errors=("bad_query",), close=4400, query=SILERO_Q + "&results=some", then_valid=False, ready=False
    ),
}


@pytest.mark.parametrize("name", list(WS_CASES))
async def test_ws_bad_input(mod: Module, name: str) -> None:
    case = WS_CASES[name]
    f32 = "pcm_f32le" in case.query
    before = errors_by_code(mod)
    got = Transcript()

    async def bad() -> None:
        async with ws_connect(f"{mod.srv.ws}/v1/stream?{case.query}", additional_headers=AUTH) as ws:
            reader = asyncio.create_task(read_all(ws, got))
            if case.ready:  # bad input after `ready`, as a real client would send it
                await wait_until(lambda: bool(got.messages) or reader.done(), what="ready")
            for m in case.send:
                await ws.send(m)
            if case.then_valid:
                await ws.send(F32_HOP if f32 else S16_HOP)
                await ws.send(END)
            await asyncio.wait_for(reader, 30)

    await healthy_next_to(mod, bad)

    kinds = [m["type"] for m in got.parsed()]
    assert got.error_codes() == list(case.errors), got.messages
    assert got.close_code == case.close, (got.close_code, got.close_reason)
    assert (kinds[:1] == ["ready"]) == case.ready, kinds
    if case.close >= 4000:
        assert got.close_reason == case.errors[0]
    if case.then_valid:  # the session stayed usable and the bad message left no trace
        s = got.summary
        assert (s["frames"], s["steps"], s["failed_steps"], s["padded_samples"]) == (4, 1, 0, 0)
        assert kinds.count("result") == 1
        assert kinds.index("error") < kinds.index("result")
    if name == "audio_after_end":
        assert got.summary["frames"] == 64 and got.summary["steps"] == 16
        assert kinds.index("summary") > max(i for i, k in enumerate(kinds) if k == "error")
    after = errors_by_code(mod)
    for code in set(case.errors):
        assert after.get(code, 0) - before.get(code, 0) == case.errors.count(code), code


@pytest.mark.parametrize("key", [None, "wrong-key-0000"])
async def test_ws_missing_or_wrong_key_is_401_before_upgrade(mod: Module, key: str | None) -> None:
    result: list[tuple[int, dict[str, str], bytes]] = []

    async def bad() -> None:
        q = SILERO_Q + (f"&token={key}" if key else "")
        result.append(await refused(f"{mod.srv.ws}/v1/stream?{q}"))
        result.append(
            await refused(
                f"{mod.srv.ws}/v1/stream?{SILERO_Q}", additional_headers={"Authorization": f"Bearer {key}"}
            )
        )

    before = metric(metrics_text(mod.srv.url), "lookback_sessions_refused_total", reason="unauthorized")
    await healthy_next_to(mod, bad)
    for status, _headers, body in result:
        assert status == 401
        assert orjson.loads(body)["error"]["code"] == "unauthorized"
    after = metric(metrics_text(mod.srv.url), "lookback_sessions_refused_total", reason="unauthorized")
    assert after - before == 2


async def test_ws_non_finite_audio_never_touches_state(mod: Module) -> None:
    """NaN/Inf messages are dropped whole: the rest of the stream scores exactly as if they
    had never been sent (state, context buffer, partial hop and step count untouched)."""
    q = SILERO_Q + "&encoding=pcm_f32le"
    clean = await stream_clip(mod.srv.ws, F32.tobytes(), query=q, bytes_per_sample=4, headers=AUTH)
    msgs = [F32[i : i + 384].tobytes() for i in range(0, len(F32), 384)]  # 3 frames each
    poison = [NAN_FRAME, INF_FRAMES, np.r_[F32[:383], np.float32(np.nan)].astype("<f4").tobytes()]
    got = Transcript()

    async def bad() -> None:
        async with ws_connect(f"{mod.srv.ws}/v1/stream?{q}", additional_headers=AUTH) as ws:
            reader = asyncio.create_task(read_all(ws, got))
            for i, m in enumerate(msgs):
                await ws.send(m)
                if i % 25 == 7:  # poison lands mid-hop as well as on hop boundaries
                    await ws.send(poison[i % 3])
            await ws.send(END)
            await asyncio.wait_for(reader, 30)

    await healthy_next_to(mod, bad)
    n_poison = sum(1 for i in range(len(msgs)) if i % 25 == 7)
    assert got.error_codes() == ["non_finite_audio"] * n_poison
    without_errors = [m for m in got.messages if not m.startswith('{"type":"error"')]
    # `clean` was streamed in the same 3-frame messages without the poison
    assert without_errors == clean.messages
    assert got.close_code == 1000


# -- REST bodies --------------------------------------------------------------------------


def wav(samples: np.ndarray, rate: int = 16000, fmt: str = "WAV") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format=fmt, subtype="PCM_16")
    return buf.getvalue()


ONE_S = CLIP[:16000]
GOOD_WAV = wav(ONE_S)


@dataclass(frozen=True)
class RestCase:
    body: bytes
    ctype: str
    status: int
    code: str
    params: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=lambda: dict(AUTH))


RAW = "application/octet-stream"
REST_CASES: dict[str, RestCase] = {
    "empty_wav": RestCase(b"", "audio/wav", 400, "empty_body"),
    "empty_raw": RestCase(b"", RAW, 400, "empty_body", {"sample_rate": "16000"}),
    "truncated_wav": RestCase(GOOD_WAV[: len(GOOD_WAV) // 2], "audio/wav", 415, "bad_audio"),
    "truncated_wav_odd_byte": RestCase(GOOD_WAV[: len(GOOD_WAV) // 2 + 1], "audio/wav", 415, "bad_audio"),
    "wav_header_only": RestCase(GOOD_WAV[:40], "audio/wav", 415, "bad_audio"),
    "wav_8khz": RestCase(wav(ONE_S[:8000], 8000), "audio/wav", 400, "bad_sample_rate"),
    "wav_stereo": RestCase(wav(np.stack([ONE_S, ONE_S], 1)), "audio/wav", 400, "bad_channels"),
    "non_audio_bytes": RestCase(np.random.default_rng(6).bytes(5000), "audio/wav", 415, "bad_audio"),
    "non_audio_flac": RestCase(b"fLaC" + bytes(2000), "audio/flac", 415, "bad_audio"),
    "wrong_content_type": RestCase(b"hello", "text/plain", 415, "bad_audio"),
    "raw_odd_length": RestCase(b"abc", RAW, 415, "bad_audio", {"sample_rate": "16000"}),
    "raw_without_rate": RestCase(PCM[:2048], RAW, 400, "bad_sample_rate"),
    "raw_wrong_rate": RestCase(PCM[:2048], RAW, 400, "bad_sample_rate", {"sample_rate": "11025"}),
    "raw_f32_nan": RestCase(
        np.r_[F32[:1000], np.float32(np.nan)].astype("<f4").tobytes(),
        RAW,
        400,
        "non_finite_audio",
        {"sample_rate": "16000", "encoding": "pcm_f32le"},
    ),
    "bad_format_value": RestCase(GOOD_WAV, "audio/wav", 400, "bad_query", {"format": "xml"}),
    "negative_sample_rate": RestCase(PCM[:2048], RAW, 400, "bad_query", {"sample_rate": "-5"}),
    "unknown_model": RestCase(GOOD_WAV, "audio/wav", 404, "unknown_model", {"model": "nope"}),
    "unknown_version": RestCase(
        GOOD_WAV, "audio/wav", 404, "unknown_version", {"model": "silero-vad", "version": "0.0.1"}
    ),
    "missing_key": RestCase(GOOD_WAV, "audio/wav", 401, "unauthorized", headers={}),
    "wrong_key": RestCase(
        GOOD_WAV, "audio/wav", 401, "unauthorized", headers={"Authorization": "Bearer nope"}
    ),
    "too_large_chunked": RestCase(wav(np.tile(CLIP, 3)), "audio/wav", 413, "upload_too_large"),
}


@pytest.mark.parametrize("name", list(REST_CASES))
async def test_rest_bad_input(mod: Module, name: str) -> None:
    case = REST_CASES[name]
    got: list[httpx.Response] = []

    async def body() -> AsyncIterator[bytes]:  # a generator body goes out chunked, without a length
        for i in range(0, len(case.body), 16384):
            yield case.body[i : i + 16384]

    async def bad() -> None:
        async with httpx.AsyncClient(base_url=mod.srv.url, timeout=30) as client:
            content = body() if name.endswith("_chunked") else case.body
            got.append(
                await client.post(
                    "/v1/score",
                    content=content,
                    params=case.params,
                    headers={**case.headers, "Content-Type": case.ctype},
                )
            )

    await healthy_next_to(mod, bad)
    (r,) = got
    assert (r.status_code, r.json()["error"]["code"]) == (case.status, case.code), r.text
    if case.status == 401:
        assert r.headers["www-authenticate"] == "Bearer"
    assert mod.srv.app.state.admission.scores_running == 0  # type: ignore[attr-defined]


async def _raw_post(
    port: int, length: int, first: bytes
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /v1/score HTTP/1.1\r\nHost: test\r\nContent-Type: audio/wav\r\n"
        + f"Authorization: Bearer {KEY}\r\nContent-Length: {length}\r\n\r\n".encode()
        + first
    )
    await writer.drain()
    return reader, writer


async def _response(reader: asyncio.StreamReader, within: float) -> bytes:
    """One HTTP response (head + Content-Length body), without waiting for the socket to close."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), within)
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return head + await asyncio.wait_for(reader.readexactly(length), within)


def _status_and_code(raw: bytes) -> tuple[int, str]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), orjson.loads(body)["error"]["code"]


async def test_rest_oversize_refused_before_the_body_is_read(mod: Module) -> None:
    """Content-Length above max_upload_bytes: 413 after 1 KB of a declared 8 MB body."""
    got: list[bytes] = []

    async def bad() -> None:
        reader, writer = await _raw_post(mod.srv.port, 32 * MAX_UPLOAD, GOOD_WAV[:1024])
        got.append(await _response(reader, 10))  # before the rest is even sent
        writer.close()

    await healthy_next_to(mod, bad)
    assert _status_and_code(got[0]) == (413, "upload_too_large")


async def test_rest_client_stops_mid_body(mod: Module) -> None:
    """A client that goes silent mid-body gets 408 after idle_timeout_s; one that hangs up
    mid-body is counted as bad_audio. Either way its queue place and temp file are freed."""
    svc = mod.srv.app.state  # type: ignore[attr-defined]
    got: list[bytes] = []
    before = errors_by_code(mod)

    async def bad() -> None:
        # silent: keeps the connection open, never sends the rest
        reader, writer = await _raw_post(mod.srv.port, 100_000, GOOD_WAV[:1000])
        await wait_until(lambda: svc.admission.scores_running == 1, what="upload admitted")
        got.append(await _response(reader, 10 * IDLE_S))
        writer.close()
        await wait_until(lambda: svc.admission.scores_running == 0, what="lease freed after 408")
        # gone: hangs up mid-body
        reader, writer = await _raw_post(mod.srv.port, 100_000, GOOD_WAV[:1000])
        await wait_until(lambda: svc.admission.scores_running == 1, what="upload admitted")
        writer.transport.abort()
        await wait_until(lambda: svc.admission.scores_running == 0, what="lease freed after hang-up")

    await healthy_next_to(mod, bad)
    assert _status_and_code(got[0]) == (408, "idle_timeout")
    after = errors_by_code(mod)
    assert after["idle_timeout"] - before.get("idle_timeout", 0) == 1
    assert after["bad_audio"] - before.get("bad_audio", 0) == 1
    assert not list(mod.tmp.glob("lookback-*")), "upload spool files left behind"


# -- after all of it ------------------------------------------------------------------------


def test_server_survived_every_bad_input(mod: Module) -> None:
    srv = mod.srv
    svc = srv.app.state  # type: ignore[attr-defined]
    assert srv.get("/healthz").status_code == 200
    assert srv.get("/readyz").status_code == 200
    assert len(svc.engine.models) == 2
    assert all(h.table.used == 0 for h in svc.engine.models.values())
    assert not svc.connections and svc.admission.scores_running == 0
    text = metrics_text(srv.url)
    assert metric(text, "lookback_state_slots", kind="used") == 0
    assert metric(text, "lookback_errors_total", code="internal_error") == 0
    assert metric(text, "lookback_batch_failures_total") == 0
    assert not list(mod.tmp.glob("lookback-*"))
    assert mod.log.problems() == []
