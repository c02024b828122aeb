"""``/v1/media-stream``: a phone call's media events, replayed from a WAV, against a real server.

The replay is built the way a telephony platform sends a call: the fixture clip taken to
8 kHz and encoded as G.711 µ-law (by nearest code, not by Lookback), cut into 20 ms
``media`` events of 160 bytes in base64 between ``connected``/``start`` and ``stop``, with a
``mark`` and the other track's media mixed in. Its scores and events must equal, bit for bit,
a ``/v1/stream`` session sending the same bytes with ``encoding=mulaw&sample_rate=8000``,
and REST scoring of the same body agrees within 1e-5 (the sequence graph).
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from tests.api.ws_util import END, Session, collect_json, refused, run_session, score, ws_connect
from tests.conftest import AUDIO, Server, running_server
from tests.conftest import test_settings as make_settings
from tests.engine.rate_support import at_rate, encode

SID = "MZ0123456789abcdef0123456789abcdef"
CALL = "CA0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def call_audio() -> bytes:
    """Four seconds of the speech fixture as 8 kHz µ-law."""
    clip, rate = sf.read(str(AUDIO / "silero_ref_speech.wav"), dtype="int16")
    assert rate == 16000
    return encode(at_rate(clip[: 16000 * 4], 8000), "mulaw")


@pytest.fixture(scope="module")
def tel_server(default_model: str) -> Iterator[Server]:
    with running_server(make_settings(models=[default_model], default_model=default_model)) as srv:
        yield srv


def start_event(encoding: str = "audio/x-mulaw", rate: Any = 8000, channels: int = 1) -> str:
    return json.dumps(
        {
            "event": "start",
            "sequenceNumber": "1",
            "streamSid": SID,
            "start": {
                "streamSid": SID,
                "callSid": CALL,
                "accountSid": "AC0",
                "tracks": ["inbound"],
                "customParameters": {},
                "mediaFormat": {"encoding": encoding, "sampleRate": rate, "channels": channels},
            },
        }
    )


def media_event(seq: int, payload: bytes, track: str = "inbound") -> str:
    return json.dumps(
        {
            "event": "media",
            "sequenceNumber": str(seq),
            "streamSid": SID,
            "media": {
                "track": track,
                "chunk": str(seq),
                "timestamp": str(seq * 20),
                "payload": base64.b64encode(payload).decode(),
            },
        }
    )


def replay(audio: bytes) -> list[str]:
    """A call as the platform streams it: 160-byte (20 ms) media events."""
    events = [json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}), start_event()]
    seq = 2
    for i in range(0, len(audio), 160):
        events.append(media_event(seq, audio[i : i + 160]))
        seq += 1
        if i == 160 * 20:
            events.append(json.dumps({"event": "mark", "sequenceNumber": str(seq), "mark": {"name": "m1"}}))
            seq += 1
            events.append(media_event(seq, b"\x00" * 160, track="outbound"))  # the other leg
            seq += 1
    events.append(json.dumps({"event": "stop", "sequenceNumber": str(seq), "stop": {"callSid": CALL}}))
    return events


async def media_session(base_ws: str, events: list[str], query: str = "") -> Session:
    async def go() -> Session:
        got: list[dict[str, Any]] = []
        async with ws_connect(f"{base_ws}/v1/media-stream{query}") as ws:
            reader = asyncio.create_task(collect_json(ws, got))
            for e in events:
                await ws.send(e)
            await reader
            return Session(got, ws.close_code, ws.close_reason or "")

    return await asyncio.wait_for(go(), 60)


def same_results(a: Session, b: Session) -> None:
    assert [r["step"] for r in a.results] == [r["step"] for r in b.results]
    assert [r["time"] for r in a.results] == [r["time"] for r in b.results]
    assert [r["scores"] for r in a.results] == [r["scores"] for r in b.results]  # exact floats
    strip = [{k: v for k, v in e.items() if k != "streamSid"} for e in a.events]
    assert strip == b.events


async def test_a_replayed_call_scores_as_the_same_audio_on_v1_stream(
    tel_server: Server, call_audio: bytes
) -> None:
    call = await media_session(tel_server.ws, replay(call_audio))
    assert call.close_code == 1000, call.messages[-3:]
    assert not call.errors, call.errors
    ready = call.ready
    assert ready["encoding"] == "mulaw" and ready["input_sample_rate"] == 8000 and ready["call_sid"] == CALL
    assert all(m["streamSid"] == SID for m in call.messages)
    assert call.events, "the clip must produce events for the comparison to mean something"
    steps = len(call_audio) * 2 // 128  # 8 kHz -> 16 kHz, 128-sample hops, tail padded
    assert abs(len(call.results) - steps) <= 1
    for per_message in (160, 1000, 37):
        msgs: list[bytes | str] = [
            call_audio[i : i + per_message] for i in range(0, len(call_audio), per_message)
        ]
        ref = await run_session(tel_server.ws, [*msgs, END], encoding="mulaw", sample_rate=8000)
        assert ref.close_code == 1000 and not ref.errors
        same_results(call, ref)
        assert call.summary["steps"] == ref.summary["steps"]


async def test_rest_scores_the_same_body_within_1e_5(tel_server: Server, call_audio: bytes) -> None:
    ref = await run_session(
        tel_server.ws,
        [call_audio[i : i + 160] for i in range(0, len(call_audio), 160)] + [END],
        encoding="mulaw",
        sample_rate=8000,
    )
    r = score(tel_server.url, call_audio, "application/octet-stream", encoding="mulaw", sample_rate=8000)
    assert r.status_code == 200, r.text
    got = np.array(r.json()["scores"]["speech"])
    want = np.array(ref.scores("speech"))
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-5
    r48 = score(tel_server.url, b"\x00\x00" * 4800, "application/octet-stream", sample_rate=48000)
    assert r48.status_code == 200 and r48.json()["steps"] == 13  # 0.1 s -> 1600 samples (+ pad)
    bad = score(tel_server.url, b"\x00\x00" * 100, "application/octet-stream", sample_rate=11025)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_sample_rate"


@pytest.mark.parametrize(
    ("start", "code"),
    [
        (start_event("audio/l16"), "bad_encoding"),
        (start_event(rate=11025), "bad_sample_rate"),
        (start_event(channels=2), "bad_media_event"),
        (json.dumps({"event": "media", "media": {"payload": ""}}), "bad_media_event"),
        ("not json", "bad_media_event"),
    ],
)
async def test_a_stream_that_does_not_start_right_is_refused(
    tel_server: Server, start: str, code: str
) -> None:
    s = await media_session(tel_server.ws, [start])
    assert [m["code"] for m in s.errors] == [code]
    assert s.close_code == 4400


async def test_bad_events_are_answered_and_the_call_goes_on(tel_server: Server, call_audio: bytes) -> None:
    good = replay(call_audio[: 160 * 50])
    events = [
        *good[:5],
        '{"event":"media","sequenceNumber":"3","media":{"payload":"AAAA"}}',  # sequence went back
        json.dumps({"event": "media", "sequenceNumber": "900", "media": {"payload": "***"}}),
        '{"event":"surprise"}',
        start_event(),
        *good[5:],
    ]
    s = await media_session(tel_server.ws, events)
    assert [m["code"] for m in s.errors] == ["bad_media_event"] * 4
    assert s.close_code == 1000
    clean = await media_session(tel_server.ws, good)
    assert [r["scores"] for r in s.results] == [r["scores"] for r in clean.results]


async def test_refused_before_the_upgrade_without_the_api_key(default_model: str) -> None:
    settings = make_settings(models=[default_model], default_model=default_model, api_keys="k" * 24)
    with running_server(settings) as srv:
        status, _, body = await refused(f"{srv.ws}/v1/media-stream")
        assert status == 401 and b"unauthorized" in body
        s = await media_session(srv.ws, replay(b"\xff" * 1600), query="?token=" + "k" * 24)
        assert s.close_code == 1000 and s.summary["steps"] > 0


async def test_v1_stream_rates_and_whole_samples(tel_server: Server) -> None:
    s = await run_session(tel_server.ws, [b"\x00\x00\x00", b"\x00\x00" * 3, END], sample_rate=8000)
    assert [m["code"] for m in s.errors] == ["partial_sample"]  # dropped; the session goes on
    assert s.close_code == 1000
    s = await run_session(tel_server.ws, [b"\x00\x00" * 100, END], sample_rate=16000)
    assert [m["code"] for m in s.errors] == ["bad_frame_size"]  # the model's rate: whole frames
    for rate in ("11025", "8000.0", "-8000"):
        s = await run_session(tel_server.ws, sample_rate=rate)
        assert [m["code"] for m in s.errors] == ["bad_sample_rate"] and s.close_code == 4400
    s = await run_session(tel_server.ws, encoding="ulaw")
    assert [m["code"] for m in s.errors] == ["bad_encoding"] and s.close_code == 4400


async def test_no_start_within_the_idle_timeout_closes_4408(default_model: str) -> None:
    settings = make_settings(models=[default_model], default_model=default_model, idle_timeout_s=0.5)
    with running_server(settings) as srv:
        connected = json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"})
        s = await media_session(srv.ws, [connected])
        assert [m["code"] for m in s.errors] == ["idle_timeout"] and s.close_code == 4408
