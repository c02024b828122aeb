"""REST: ``POST /v1/score`` (WAV, FLAC, raw PCM, NDJSON, limits), models, health, OpenAPI.

Also the central promise: streaming a clip over the WebSocket and scoring it over REST
give the same scores and the same events.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
from fastapi.testclient import TestClient

from lookback.app import create_app
from lookback.protocol import ERRORS
from tests.api.ws_util import (
    END,
    HOPS,
    RATE,
    error_code,
    frames,
    manifest,
    run_session,
    score,
)
from tests.conftest import SILERO, Server, running_server
from tests.conftest import test_settings as make_settings

RAW = "application/octet-stream"


def _wav(samples: np.ndarray, fmt: str = "WAV", rate: int = RATE) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format=fmt, subtype="PCM_16")
    return buf.getvalue()


def _assert_same(model: str, a: list[float], b: list[float]) -> None:
    """Silero runs one step graph on every path: equal. Others: within 1e-5."""
    assert len(a) == len(b)
    if model == SILERO:
        assert a == b
    else:
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def wav_result() -> dict[str, dict]:
    """The JSON answer for the speech clip, per model (scored once per module)."""
    return {}


def _score_wav(server: Server, model: str, body: bytes, cache: dict[str, dict]) -> dict:
    if model not in cache:
        r = score(server.url, body, model=model)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "application/json"
        cache[model] = r.json()
    return cache[model]


# -- /v1/score -------------------------------------------------------------------------------


def test_score_wav(
    server: Server, model: str, speech_wav: bytes, speech_clip: np.ndarray, wav_result: dict
) -> None:
    spec = manifest(model)
    body = _score_wav(server, model, speech_wav, wav_result)
    labels = [lab for out in spec["outputs"] for lab in out["labels"]]
    hop = HOPS[model]
    steps = -(-len(speech_clip) // hop)
    assert body["model"] == model and body["version"] == spec["version"]
    assert body["sample_rate"] == 16000 and body["hop_samples"] == hop
    assert body["labels"] == labels
    assert body["steps"] == steps
    assert body["duration"] == len(speech_clip) / RATE  # the audio sent, without padding
    assert list(body["scores"]) == labels
    for lab in labels:
        col = np.asarray(body["scores"][lab])
        assert col.shape == (steps,)
        assert np.isfinite(col).all() and (col >= 0).all() and (col <= 1).all()
        assert (col.astype(np.float32).astype(np.float64) == col).all()  # float32, exact
    kinds = [e["event"] for e in body["events"]]
    assert kinds and kinds == ["start", "end"] * (len(kinds) // 2)
    assert all(set(e) == {"event", "label", "time"} for e in body["events"])


@pytest.mark.parametrize("encoding", ["pcm_s16le", "pcm_f32le"])
def test_raw_pcm_matches_wav(
    server: Server, model: str, speech_wav: bytes, speech_clip: np.ndarray, wav_result: dict, encoding: str
) -> None:
    ref = _score_wav(server, model, speech_wav, wav_result)
    if encoding == "pcm_s16le":
        raw = speech_clip.astype("<i2").tobytes()
    else:
        raw = (speech_clip.astype(np.float32) / 32768).astype("<f4").tobytes()
    r = score(server.url, raw, RAW, model=model, encoding=encoding, sample_rate=16000)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["steps"] == ref["steps"]
    for lab in ref["labels"]:
        _assert_same(model, body["scores"][lab], ref["scores"][lab])
    assert body["events"] == ref["events"]


def test_flac_matches_wav(
    server: Server, silero_model: str, speech_wav: bytes, speech_clip: np.ndarray, wav_result: dict
) -> None:
    ref = _score_wav(server, SILERO, speech_wav, wav_result)
    r = score(server.url, _wav(speech_clip, "FLAC"), "audio/flac", model=SILERO)
    assert r.status_code == 200, r.text
    assert r.json()["scores"] == ref["scores"]
    assert r.json()["events"] == ref["events"]


def test_ndjson_stream(server: Server, model: str, speech_wav: bytes, wav_result: dict) -> None:
    ref = _score_wav(server, model, speech_wav, wav_result)
    with httpx.stream(
        "POST",
        f"{server.url}/v1/score",
        params={"model": model, "format": "ndjson"},
        content=speech_wav,
        headers={"content-type": "audio/wav"},
        timeout=60,
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in r.iter_lines() if line]
    head, chunks, summary = lines[0], lines[1:-1], lines[-1]
    assert head == {
        "type": "header",
        "model": model,
        "version": ref["version"],
        "sample_rate": 16000,
        "hop_samples": HOPS[model],
        "labels": ref["labels"],
    }
    assert chunks and all(c["type"] == "scores" for c in chunks)
    expected_first = 0
    for c in chunks:
        assert c["first_step"] == expected_first
        expected_first += len(c["scores"][ref["labels"][0]])
    for lab in ref["labels"]:
        joined = [x for c in chunks for x in c["scores"][lab]]
        assert joined == ref["scores"][lab]
    assert [e for c in chunks for e in c["events"]] == ref["events"]
    assert summary == {
        "type": "summary",
        "steps": ref["steps"],
        "events": ref["events"],
        "duration": ref["duration"],
    }


def test_raw_needs_a_supported_sample_rate(
    server: Server, silero_model: str, speech_clip: np.ndarray
) -> None:
    raw = speech_clip[:RATE].tobytes()
    for params in ({}, {"sample_rate": 11025}):
        r = score(server.url, raw, RAW, model=SILERO, **params)
        assert r.status_code == 400, params
        assert error_code(r) == "bad_sample_rate"
    r = score(server.url, _wav(speech_clip[:8000], rate=8000), model=SILERO)
    assert (r.status_code, error_code(r)) == (400, "bad_sample_rate")


@pytest.mark.parametrize(
    ("params", "status", "code"),
    [
        ({"model": "no-such-model"}, 404, "unknown_model"),
        ({"model": SILERO, "version": "9.9.9"}, 404, "unknown_version"),
        ({"model": SILERO, "format": "xml"}, 400, "bad_query"),
        ({"model": SILERO, "encoding": "pcm_u8"}, 400, "bad_query"),
    ],
)
def test_score_query_errors(
    server: Server, silero_model: str, speech_wav: bytes, params: dict[str, str], status: int, code: str
) -> None:
    r = score(server.url, speech_wav, **params)
    assert r.status_code == status == ERRORS[code].http
    assert error_code(r) == code


def test_score_body_errors(server: Server, silero_model: str, speech_clip: np.ndarray) -> None:
    cases = [
        (b"", "audio/wav", 400, "empty_body"),
        (b"", RAW, 400, "empty_body"),
        (b"RIFF not really a wav file at all", "audio/wav", 415, "bad_audio"),
        (speech_clip[:RATE].tobytes(), "text/plain", 415, "bad_audio"),
        (_wav(np.stack([speech_clip[:RATE]] * 2, axis=1)), "audio/wav", 400, "bad_channels"),
    ]
    for body, ctype, status, code in cases:
        params = {"sample_rate": 16000} if ctype == RAW else {}
        r = score(server.url, body, ctype, model=SILERO, **params)
        assert (r.status_code, error_code(r)) == (status, code), (ctype, r.text)
        assert ERRORS[code].http == status


# -- WAV streamed as it arrives -------------------------------------------------------------------


@pytest.mark.parametrize(("rate", "fmt"), [(8000, "WAV"), (48000, "FLAC"), (44100, "WAV")])
def test_a_file_at_another_rate_is_resampled_only_when_asked(
    server: Server, silero_model: str, speech_clip: np.ndarray, rate: int, fmt: str
) -> None:
    """A 16-bit WAV streams through the raw path's decoder, FLAC through libsndfile's
    float blocks into the same decoder: both equal the raw body at that rate exactly."""
    from tests.engine.rate_support import at_rate, encode

    pcm = encode(at_rate(speech_clip[: RATE * 3], rate), "pcm_s16le")
    body = _wav(np.frombuffer(pcm, "<i2"), fmt, rate=rate)
    assert error_code(score(server.url, body, model=SILERO)) == "bad_sample_rate"  # not asked
    assert error_code(score(server.url, body, model=SILERO, sample_rate=16000)) == "bad_sample_rate"
    raw = score(server.url, pcm, RAW, model=SILERO, sample_rate=rate)
    got = score(server.url, body, model=SILERO, sample_rate=rate)
    assert raw.status_code == got.status_code == 200, got.text
    assert got.json()["scores"] == raw.json()["scores"]
    assert got.json()["steps"] == raw.json()["steps"] == -(-(len(pcm) // 2 * RATE // rate) // 512)


def _wav_variant(samples: np.ndarray, kind: str) -> bytes:
    """The same 16-bit PCM audio in WAV layouts the streaming parser must follow."""
    data = samples.astype("<i2").tobytes()
    fmt = (1, 1, RATE, RATE * 2, 2, 16)
    fmt_chunk = (
        b"fmt "
        + (16).to_bytes(4, "little")
        + b"".join(v.to_bytes(n, "little") for v, n in zip(fmt, (2, 2, 4, 4, 2, 2), strict=True))
    )
    if kind == "extensible":  # WAVE_FORMAT_EXTENSIBLE with the PCM sub-format GUID
        body = b"".join(
            v.to_bytes(n, "little")
            for v, n in zip(
                (0xFFFE, 1, RATE, RATE * 2, 2, 16, 22, 16, 4), (2, 2, 4, 4, 2, 2, 2, 2, 4), strict=True
            )
        ) + bytes.fromhex("0100000000001000800000aa00389b71")
        fmt_chunk = b"fmt " + len(body).to_bytes(4, "little") + body
    extra = b"LIST" + (5).to_bytes(4, "little") + b"INFOx\0"  # odd size: padded
    size = 0xFFFFFFFF if kind == "open_length" else len(data)
    chunks = [fmt_chunk]
    if kind == "chunk_before_data":
        chunks.append(extra)
    chunks.append(b"data" + size.to_bytes(4, "little") + data)
    if kind == "chunk_after_data":
        chunks.append(b"LIST" + (8).to_bytes(4, "little") + b"\x7f" * 8)  # not audio
    riff = b"WAVE" + b"".join(chunks)
    return b"RIFF" + len(riff).to_bytes(4, "little") + riff


@pytest.fixture(scope="module")
def short_chunk_server(default_model: str) -> Iterator[Server]:
    """Offline chunks of 7 steps (1,792 bytes): a clip spans hundreds of them, so body
    parts of any size split samples across chunk boundaries."""
    with running_server(
        make_settings(models=[default_model], default_model=default_model, offline_chunk_steps=7)
    ) as srv:
        yield srv


@pytest.mark.parametrize(
    "kind", ["plain", "extensible", "open_length", "chunk_before_data", "chunk_after_data"]
)
@pytest.mark.parametrize("part", [999, 1000, 65537])  # odd parts split samples
def test_streamed_wav_layouts_score_like_the_plain_wav(
    short_chunk_server: Server, default_model: str, speech_clip: np.ndarray, kind: str, part: int
) -> None:
    clip = speech_clip[: 3 * RATE + 77]
    want = score(short_chunk_server.url, _wav(clip), model=default_model).json()
    body = _wav(clip) if kind == "plain" else _wav_variant(clip, kind)
    got = score(short_chunk_server.url, _chunked(body, part), model=default_model)
    assert got.status_code == 200, got.text
    body = got.json()
    assert body["steps"] == want["steps"] and body["duration"] == want["duration"]
    assert body["scores"] == want["scores"] and body["events"] == want["events"]


def test_float_wav_is_decoded_by_libsndfile(
    server: Server, default_model: str, speech_clip: np.ndarray
) -> None:
    """Not 16-bit PCM: spooled and decoded as before, same numbers."""
    clip = speech_clip[: 2 * RATE]
    buf = io.BytesIO()
    sf.write(buf, clip.astype(np.float32) / 32768, RATE, format="WAV", subtype="FLOAT")
    got = score(server.url, buf.getvalue(), model=default_model)
    want = score(server.url, _wav(clip), model=default_model)
    assert got.status_code == want.status_code == 200, got.text
    assert got.json()["scores"] == want.json()["scores"]


@pytest.mark.parametrize("ctype", ["audio/wav", RAW])
def test_ndjson_reads_a_body_that_arrives_in_many_parts(
    server: Server, default_model: str, speech_clip: np.ndarray, ctype: str
) -> None:
    """The scorer reads the body while the response streams: no other reader may take
    parts of it (Starlette's disconnect listener once did, losing audio)."""
    clip = speech_clip[: 5 * RATE]
    body = _wav(clip) if ctype == "audio/wav" else clip.astype("<i2").tobytes()
    params: dict[str, str | int] = {"model": default_model, "format": "ndjson"}
    if ctype == RAW:
        params["sample_rate"] = RATE
    with httpx.stream(
        "POST",
        f"{server.url}/v1/score",
        params=params,
        content=_chunked(body, 4096),
        headers={"content-type": ctype},
        timeout=60,
    ) as r:
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert lines[-1]["type"] == "summary", lines[-1]
    assert lines[-1]["duration"] == len(clip) / RATE
    assert sum(len(c["scores"]["speech"]) for c in lines[1:-1]) == lines[-1]["steps"]


def test_truncated_streamed_wav_is_bad_audio(
    short_chunk_server: Server, default_model: str, speech_clip: np.ndarray
) -> None:
    wav = _wav(speech_clip[: 2 * RATE])
    for cut, part in ((len(wav) // 2, 1000), (len(wav) // 2 + 1, 1000), (len(wav) - 2, 999)):
        r = score(short_chunk_server.url, _chunked(wav[:cut], part), model=default_model)
        assert (r.status_code, error_code(r)) == (415, "bad_audio")
        assert "truncated" in r.json()["error"]["message"]


# -- upload limits ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_server(silero_model: str) -> Iterator[Server]:
    """Limits small enough to hit: 100 kB bodies, 1 s of audio."""
    settings = make_settings(
        models=[SILERO], default_model=SILERO, max_upload_bytes=100_000, max_upload_seconds=1.0
    )
    with running_server(settings) as srv:
        yield srv


def _chunked(data: bytes, size: int = 8192) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def test_content_length_above_limit(small_server: Server, speech_clip: np.ndarray) -> None:
    big = _wav(speech_clip[: 4 * RATE])  # 128 kB
    for body, ctype, params in (
        (big, "audio/wav", {}),
        (speech_clip[: 4 * RATE].tobytes(), RAW, {"sample_rate": 16000}),
    ):
        r = score(small_server.url, body, ctype, **params)
        assert (r.status_code, error_code(r)) == (413, "upload_too_large"), ctype


def test_chunked_body_above_limit(small_server: Server, speech_clip: np.ndarray) -> None:
    """No Content-Length to check up front: the server counts while it reads."""
    big = speech_clip[: 4 * RATE].tobytes()
    for ctype, body, params in (
        ("audio/wav", _wav(speech_clip[: 4 * RATE]), {}),
        (RAW, big, {"sample_rate": 16000}),
    ):
        r = score(small_server.url, _chunked(body), ctype, **params)
        assert "content-length" not in r.request.headers
        assert r.request.headers["transfer-encoding"] == "chunked"
        assert (r.status_code, error_code(r)) == (413, "upload_too_large"), ctype


def test_audio_longer_than_limit(small_server: Server, speech_clip: np.ndarray) -> None:
    two_s = speech_clip[: 2 * RATE]  # 64 kB: under the byte limit, over 1 s
    for body, ctype, params in (
        (_wav(two_s), "audio/wav", {}),
        (_wav(two_s, "FLAC"), "audio/flac", {}),
        (two_s.tobytes(), RAW, {"sample_rate": 16000}),
        (_chunked(two_s.tobytes()), RAW, {"sample_rate": 16000}),
    ):
        r = score(small_server.url, body, ctype, **params)
        assert (r.status_code, error_code(r)) == (413, "audio_too_long"), ctype
    ok = score(small_server.url, _wav(speech_clip[:RATE]))
    assert ok.status_code == 200, ok.text


# -- parity: streaming == offline ---------------------------------------------------------------


async def test_ws_rest_parity(server: Server, model: str, speech_clip: np.ndarray, speech_wav: bytes) -> None:
    s = await run_session(server.ws, [*frames(speech_clip, 5), END], model=model)
    async with httpx.AsyncClient(timeout=60) as http:
        r = await http.post(
            f"{server.url}/v1/score",
            params={"model": model},
            content=speech_wav,
            headers={"content-type": "audio/wav"},
        )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["steps"] == len(s.results) == s.summary["steps"]
    for lab in body["labels"]:
        _assert_same(model, s.scores(lab), body["scores"][lab])
    streamed = [{k: e[k] for k in ("event", "label", "time")} for e in s.events]
    assert streamed == body["events"] == s.summary["events"]
    assert streamed, "the speech clip should produce events"


# -- models, health, OpenAPI --------------------------------------------------------------------


def test_models(server: Server, model: str) -> None:
    r = server.get("/v1/models")
    assert r.status_code == 200
    body = r.json()
    assert body["provider"] == "CPUExecutionProvider"
    assert body["default_model"] == "lookback-vad"
    spec = manifest(model)
    entry = next(m for m in body["models"] if m["name"] == model)
    assert entry["key"] == f"{model}/{spec['version']}"
    assert entry["provider"] == "CPUExecutionProvider"
    assert entry["latest"] is True
    for field in ("sample_rate", "frame_samples", "hop_samples", "context_samples"):
        assert entry[field] == spec[field], field
    assert entry["hop_samples"] == HOPS[model]
    assert [s["input"] for s in entry["states"]] == [s["input"] for s in spec["states"]]
    assert [o["labels"] for o in entry["outputs"]] == [o["labels"] for o in spec["outputs"]]
    assert entry["graph"]["sha256"] == spec["graph"]["sha256"]
    assert entry["sequence_graph"] is ("sequence" in spec and spec["sequence"] is not None)
    assert entry["state_bytes_per_session"] > 0


def test_health_and_readiness(server: Server, silero_model: str) -> None:
    assert server.get("/healthz").json() == {"status": "ok"}
    r = server.get("/readyz")
    assert r.status_code == 200
    body = r.json()
    assert body["ready"] is True and body["draining"] is False
    assert body["provider"] == "CPUExecutionProvider"
    assert f"{SILERO}/{manifest(SILERO)['version']}" in body["models"]


def test_readiness_lists_a_model_that_failed_to_load(tmp_path: Path) -> None:
    """One bad model directory: the server serves the others and says which one failed."""
    from tests.engine import engine_graphs as g

    g.write_model(tmp_path, g.toy_manifest(name="toy"))
    folder = g.write_model(tmp_path, g.toy_manifest(name="broken"))
    (folder / "model.onnx").write_bytes(b"not a graph")
    with running_server(make_settings(model_store=tmp_path, default_model="toy")) as srv:
        r = srv.get("/readyz")
        assert r.status_code == 200
        body = r.json()
        assert body["models"] == ["toy/1"]
        assert list(body["failed"]) == ["broken/1"] and "sha256 mismatch" in body["failed"]["broken/1"]


def test_openapi_and_docs(silero_model: str) -> None:
    app = create_app(make_settings(models=[SILERO], default_model=SILERO))
    with TestClient(app) as client:
        spec = client.get("/openapi.json").json()
        paths = spec["paths"]
        for path in ("/v1/score", "/v1/models", "/healthz", "/readyz"):
            assert path in paths, path
        score_op = paths["/v1/score"]["post"]
        assert {"audio/wav", "audio/flac", "application/octet-stream"} <= set(
            score_op["requestBody"]["content"]
        )
        params = {p["name"] for p in score_op["parameters"]}
        assert {"model", "version", "format", "encoding", "sample_rate"} <= params
        docs = client.get("/docs")
        assert docs.status_code == 200
        assert docs.headers["content-type"].startswith("text/html")
        assert "swagger" in docs.text.lower()
        # the in-process app scores too (TestClient drives the same lifespan)
        r = client.get("/v1/models")
        assert [m["name"] for m in r.json()["models"]] == [SILERO]


def test_protocol_page(server: Server) -> None:
    """``/protocol`` serves the same tables as ``lookback protocol`` and the README."""
    from lookback.protocol import markdown_tables

    r = server.get("/protocol")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert r.text == markdown_tables()
    assert all(f"`{code}`" in r.text for code in ERRORS)
