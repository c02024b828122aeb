"""A bounded fuzz pass against a real ``lookback serve`` process.

REST: schemathesis generates requests from the app's own OpenAPI document (schema-valid
ones for every operation, schema-invalid ones for ``POST /v1/score``) and checks: no 5xx,
documented status codes and content types, responses matching their schemas. Bodies for
the audio media types come from a registered strategy: random bytes, real WAV/FLAC/OGG
clips, truncated, resampled or stereo ones, and raw speech PCM.

WebSocket: hypothesis generates connect queries and sequences of binary and text
messages (whole frames of speech, random bytes, empty, oversized, too many frames,
NaN-bearing float32, JSON of every shape, flush, end) and closes each session by `end`,
a close frame or a dropped TCP connection. A small model of the protocol predicts every
error code and the final summary (frames, steps, padding), which the server must match.

Afterwards the server is idle (no slot held), its log holds no traceback and no ERROR
line, and SIGTERM stops it cleanly. Case counts are printed (``-s`` shows them).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import requests
import schemathesis
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode, checks
from websockets.exceptions import ConnectionClosed

from tests.api.ws_util import Transcript, abort, metric, metrics_text, read_all, ws_connect
from tests.conftest import Spawned, read_clip, spawn_server

REST_EXAMPLES = 150
REST_NEGATIVE_EXAMPLES = 100
WS_EXAMPLES = 150
MAX_MSG = 64 * 1024
MAX_FRAMES = 64
HOP = 512
SPEECH = read_clip("silero_ref_speech.wav")
SPEECH_F32 = (SPEECH.astype(np.float32) / 32768).astype("<f4")
MAX_FLOAT_AMPLITUDE = 4.0  # Settings.max_float_amplitude's default, as the fuzz server runs
FUZZ_SETTINGS: dict[str, Any] = dict(
    deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
)


def _clip(seconds: float, fmt: str, rate: int = 16000, channels: int = 1) -> bytes:
    data = SPEECH[: int(seconds * rate)]
    if channels == 2:
        data = np.stack([data, data], 1)
    buf = io.BytesIO()
    sf.write(buf, data, rate, format=fmt, subtype="VORBIS" if fmt == "OGG" else "PCM_16")
    return buf.getvalue()


_CLIPS = [_clip(s, f) for s in (0.05, 0.5) for f in ("WAV", "FLAC", "OGG")]
_CLIPS += [_clip(0.3, "WAV", 8000), _clip(0.3, "WAV", channels=2)]
AUDIO_BODIES = st.one_of(
    st.binary(max_size=3000),
    st.sampled_from(_CLIPS),
    st.builds(lambda clip, frac: clip[: int(len(clip) * frac)], st.sampled_from(_CLIPS), st.floats(0.0, 1.0)),
    st.builds(
        lambda start, n: SPEECH[start : start + n].tobytes(), st.integers(0, 100_000), st.integers(0, 9000)
    ),
)
for _media in ("audio/wav", "audio/flac", "audio/ogg", "application/octet-stream"):
    schemathesis.openapi.media_type(_media, AUDIO_BODIES)


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory, silero_model: str) -> Iterator[Spawned]:
    env = {
        "LOOKBACK_MODELS": "silero-vad",
        "LOOKBACK_DEFAULT_MODEL": "silero-vad",
        "LOOKBACK_MAX_UPLOAD_BYTES": str(1 << 20),
    }
    with spawn_server(tmp_path_factory.mktemp("fuzz"), **env) as srv:
        yield srv


# -- REST -----------------------------------------------------------------------------------

REST_CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
]


def test_rest_schemathesis(fuzz_server: Spawned) -> None:
    schema = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")
    seen: collections.Counter[tuple[str, str, int]] = collections.Counter()
    session = requests.Session()

    def call(case: Any) -> None:
        response = case.call(base_url=fuzz_server.url, timeout=30, session=session)
        seen[(case.method, case.path, response.status_code)] += 1
        case.validate_response(response, checks=REST_CHECKS)

    @settings(max_examples=REST_EXAMPLES, **FUZZ_SETTINGS)
    @given(case=schema.as_strategy())
    def positive(case: Any) -> None:
        call(case)

    @settings(max_examples=REST_NEGATIVE_EXAMPLES, **FUZZ_SETTINGS)
    @given(case=schema["/v1/score"]["POST"].as_strategy(GenerationMode.NEGATIVE))
    def negative(case: Any) -> None:
        call(case)

    positive()
    negative()
    total = sum(seen.values())
    statuses = collections.Counter(status for _, _, status in seen.elements())
    print(
        f"\nschemathesis REST: {total} cases over "
        f"{len({(m, p) for m, p, _ in seen})} operations; statuses {dict(statuses)}"
    )
    assert total >= REST_EXAMPLES
    assert not any(status >= 500 for status in statuses)


# -- WebSocket --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Frames:
    """``n`` whole frames of speech in the session's encoding (64+ is too many)."""

    n: int
    poison: bool = False  # float32 only: one NaN among them


@dataclass(frozen=True)
class Oversized:
    """A binary message just above max_message_bytes (a marker: keeps reprs short)."""


Msg = bytes | str | Frames | Oversized

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
TEXT = st.one_of(
    st.just('{"type":"flush"}'),
    st.just('{"type":"end"}'),
    st.text(max_size=30),
    st.builds(
        lambda t, extra: json.dumps({"type": t, **extra}),
        st.one_of(
            st.sampled_from(["flush", "end", "pause", "", "FLUSH"]),
            st.text(max_size=10),
            st.integers(),
            st.none(),
        ),
        st.dictionaries(st.text(max_size=6), JSON_VALUES, max_size=2),
    ),
    JSON_VALUES.map(json.dumps),
)
BINARY = st.one_of(
    st.builds(Frames, st.integers(1, MAX_FRAMES + 6), st.booleans()),
    st.builds(Frames, st.integers(1, 12)),
    st.builds(Frames, st.integers(1, 12), st.just(True)),
    st.binary(max_size=1100),
    st.just(b""),
    st.just(Oversized()),
)
VALID_QUERY = st.fixed_dictionaries(
    {
        "model": st.sampled_from(["silero-vad", None]),
        "encoding": st.sampled_from([None, "pcm_s16le", "pcm_f32le", "pcm_f32le"]),
        "results": st.sampled_from([None, "all", "events"]),
        "sample_rate": st.sampled_from([None, "16000"]),
    }
)
ANY_QUERY = st.fixed_dictionaries(
    {
        "model": st.sampled_from(["silero-vad", None, "nope"]),
        "encoding": st.sampled_from([None, "pcm_s16le", "pcm_f32le", "pcm_x"]),
        "results": st.sampled_from([None, "all", "events", "maybe"]),
        "sample_rate": st.sampled_from([None, "16000", "8000", "abc"]),
    }
)
# one connect query in five may be invalid; the rest open a session to fuzz
QUERY = st.sampled_from(range(5)).flatmap(lambda i: ANY_QUERY if i == 4 else VALID_QUERY)
SEQUENCE = st.tuples(
    QUERY,
    st.lists(st.one_of(BINARY, BINARY, TEXT), max_size=14),
    st.sampled_from(["end", "end", "end", "close", "abort"]),
)


def encode(msg: Msg, f32: bool) -> bytes | str:
    if isinstance(msg, Oversized):
        return bytes(MAX_MSG + 512)
    if not isinstance(msg, Frames):
        return msg
    start = (msg.n * 977) % (len(SPEECH) - 128 * msg.n)
    if f32:
        samples = SPEECH_F32[start : start + 128 * msg.n].copy()
        if msg.poison:
            samples[len(samples) // 2] = np.nan
        return samples.tobytes()
    return SPEECH[start : start + 128 * msg.n].tobytes()


class Oracle:
    """What the protocol promises for a message sequence: error codes before `end`, and
    the summary's frames, steps and padding."""

    def __init__(self, f32: bool) -> None:
        self.f32 = f32
        self.bps = 4 if f32 else 2
        self.frame_bytes = 128 * self.bps
        self.errors: list[str] = []
        self.frames = self.steps = self.padded = self.buf = 0
        self.ended = False

    def feed(self, data: bytes | str) -> None:
        if self.ended:
            return
        if isinstance(data, bytes):
            n = len(data)
            code = (
                "message_too_large"
                if n > MAX_MSG
                else "too_many_frames"
                if n > MAX_FRAMES * self.frame_bytes
                else "empty_message"
                if n == 0
                else "bad_frame_size"
                if n % self.frame_bytes
                else "non_finite_audio"
                if self.f32 and not np.isfinite(np.frombuffer(data, "<f4")).all()
                else "audio_out_of_range"
                if self.f32 and np.abs(np.frombuffer(data, "<f4")).max() > MAX_FLOAT_AMPLITUDE
                else None
            )
            if code:
                self.errors.append(code)
                return
            self.frames += n // self.frame_bytes
            self.buf += n // self.bps
            self.steps += self.buf // HOP
            self.buf %= HOP
            return
        try:
            body = orjson.loads(data)
        except orjson.JSONDecodeError:
            self.errors.append("bad_json")
            return
        kind = body.get("type") if isinstance(body, dict) else None
        if not isinstance(kind, str):
            self.errors.append("missing_type")
        elif kind in ("flush", "end"):
            self._flush()
            self.ended = kind == "end"
        else:
            self.errors.append("unknown_type")

    def _flush(self) -> None:
        if self.buf:
            self.steps += 1
            self.padded += HOP - self.buf
            self.buf = 0


AFTER_END = {
    "audio_after_end",
    "message_too_large",
    "too_many_frames",
    "bad_json",
    "missing_type",
    "unknown_type",
}
QUERY_ERRORS = {"unknown_model": 4404, "bad_encoding": 4400, "bad_sample_rate": 4400, "bad_query": 4400}


def expected_refusal(q: dict[str, str | None]) -> str | None:
    if q["model"] == "nope":
        return "unknown_model"
    if q["encoding"] not in (None, "pcm_s16le", "pcm_f32le"):
        return "bad_encoding"
    if q["sample_rate"] not in (None, "16000"):
        return "bad_sample_rate"
    if q["results"] not in (None, "all", "events"):
        return "bad_query"
    return None


async def ws_session(
    base: str, q: dict[str, str | None], msgs: list[Msg], ending: str
) -> tuple[Transcript, Oracle, int]:
    f32 = q["encoding"] == "pcm_f32le"
    query = "&".join(f"{k}={v}" for k, v in q.items() if v is not None)
    oracle = Oracle(f32)
    t = Transcript()
    sent = 0
    async with ws_connect(f"{base}/v1/stream?{query}") as ws:
        reader = asyncio.create_task(read_all(ws, t))
        with contextlib.suppress(ConnectionClosed):
            for m in msgs:
                data = encode(m, f32)
                await ws.send(data)
                oracle.feed(data)
                sent += 1
            if ending == "end" and not oracle.ended:
                await ws.send('{"type":"end"}')
                oracle.feed('{"type":"end"}')
        if ending == "abort":
            abort(ws)
            reader.cancel()
            return t, oracle, sent
        if ending == "close" and not oracle.ended:
            await ws.close()
        await asyncio.wait_for(reader, 30)
    return t, oracle, sent


def check_transcript(t: Transcript, oracle: Oracle, q: dict[str, str | None], ending: str) -> None:
    msgs = t.parsed()
    assert all(m["type"] in ("ready", "result", "event", "error", "summary") for m in msgs)
    codes = t.error_codes()
    assert "internal_error" not in codes and t.close_code != 1011
    if ending == "abort":  # the client left at once: it may not even have seen `ready`
        return
    refusal = expected_refusal(q)
    if ending == "close" and not oracle.ended:
        # the client hung up first: the server drops what it had not sent yet
        expected = [refusal] if refusal else oracle.errors
        assert codes == expected[: len(codes)], (codes, expected)
        assert not t.of_type("summary")
        return
    if refusal is not None:
        assert codes == [refusal] and t.close_code == QUERY_ERRORS[refusal], (codes, t.close_code)
        assert [m["type"] for m in msgs] == ["error"]
        return
    assert msgs and msgs[0]["type"] == "ready"
    assert codes[: len(oracle.errors)] == oracle.errors, (codes, oracle.errors)
    assert set(codes[len(oracle.errors) :]) <= AFTER_END, codes
    assert oracle.ended
    assert t.close_code == 1000 and msgs[-1]["type"] == "summary"
    s = t.summary
    assert (s["frames"], s["steps"], s["failed_steps"], s["padded_samples"]) == (
        oracle.frames,
        oracle.steps,
        0,
        oracle.padded,
    ), (s, vars(oracle))
    results = [m["step"] for m in t.of_type("result")]
    assert results == (list(range(oracle.steps)) if q["results"] != "events" else [])


def test_ws_random_message_sequences(fuzz_server: Spawned) -> None:
    stats: collections.Counter[str] = collections.Counter()

    @settings(max_examples=WS_EXAMPLES, **FUZZ_SETTINGS)
    @given(seq=SEQUENCE)
    def one(seq: tuple[dict[str, str | None], list[Msg], str]) -> None:
        q, msgs, ending = seq
        t, oracle, sent = asyncio.run(ws_session(fuzz_server.ws, q, msgs, ending))
        check_transcript(t, oracle, q, ending)
        stats["sequences"] += 1
        stats["messages"] += sent
        stats[f"ending:{ending}"] += 1
        stats["refused_at_connect"] += expected_refusal(q) is not None
        for code in t.error_codes():
            stats[f"error:{code}"] += 1

    one()
    print(f"\nWebSocket fuzz: {dict(sorted(stats.items()))}")
    assert stats["sequences"] >= WS_EXAMPLES
    assert stats["error:bad_frame_size"] and stats["error:non_finite_audio"]


def test_server_clean_after_fuzzing(fuzz_server: Spawned) -> None:
    import time

    deadline = time.monotonic() + 20
    while True:  # readiness-style poll: aborted sessions are reaped on disconnect
        text = metrics_text(fuzz_server.url)
        if (
            metric(text, "lookback_state_slots", kind="used") == 0
            and metric(text, "lookback_sessions_active") == 0
        ):
            break
        assert time.monotonic() < deadline, "slots still held after the fuzz pass"
        time.sleep(0.05)
    assert metric(text, "lookback_errors_total", code="internal_error") == 0
    fuzz_server.terminate()
    assert fuzz_server.proc.wait(30) == 0
    log = Path(fuzz_server.log).read_text()
    bad = [
        line
        for line in log.splitlines()
        if "Traceback" in line or " ERROR " in line or line.startswith("ERROR")
    ]
    assert bad == [], "\n".join(bad[:20])
