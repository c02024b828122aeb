"""WebSocket ``/v1/stream``: the full protocol against a real uvicorn server and client.

Every test talks to a real server (uvicorn, sansio WebSockets as in production) through
the real ``websockets`` client, for Silero VAD (hop 512 = 4 frames) and the shipped
default model (hop 128 = 1 frame).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from lookback.protocol import ERRORS, Close
from tests.api.ws_util import (
    END,
    FLUSH,
    FRAME,
    HOPS,
    RATE,
    expect_refusal,
    frames,
    manifest,
    recv_json,
    recv_until,
    run_session,
    stream_url,
)
from tests.conftest import SILERO, Server, running_server
from tests.conftest import test_settings as make_settings


def _hop_frames(model: str) -> int:
    return HOPS[model] // FRAME


# -- ready / result / event / summary -----------------------------------------------------------


async def test_ready_message_fields(server: Server, model: str) -> None:
    spec = manifest(model)
    labels = [lab for out in spec["outputs"] for lab in out["labels"]]
    async with connect(stream_url(server.ws, model=model), compression=None) as ws:
        ready = await recv_json(ws)
        assert ready["type"] == "ready"
        assert isinstance(ready["session_id"], str) and len(ready["session_id"]) >= 8
        assert ready["model"] == model
        assert ready["version"] == spec["version"]
        assert ready["sample_rate"] == 16000
        assert ready["frame_samples"] == 128
        assert ready["hop_samples"] == HOPS[model] == spec["hop_samples"]
        assert ready["labels"] == labels
        assert ready["encoding"] == "pcm_s16le"
        await ws.send(END)
        summary = await recv_json(ws)
        assert summary["type"] == "summary"
        assert summary["session_id"] == ready["session_id"]
        assert (summary["frames"], summary["steps"], summary["events"]) == (0, 0, [])
        with pytest.raises(ConnectionClosed):
            await recv_json(ws)
        assert ws.close_code == Close.NORMAL


async def test_session_ids_are_unique(server: Server) -> None:
    ids = set()
    for _ in range(3):
        s = await run_session(server.ws, [END], model=SILERO)
        ids.add(s.ready["session_id"])
    assert len(ids) == 3


@pytest.mark.parametrize("per_message", [1, 7])
async def test_stream_results_events_summary(
    server: Server, model: str, speech_clip: np.ndarray, per_message: int
) -> None:
    hop = HOPS[model]
    msgs = frames(speech_clip, per_message)
    n_frames = math.ceil(len(speech_clip) / FRAME)
    s = await run_session(server.ws, [*msgs, END], model=model)

    assert s.close_code == Close.NORMAL and s.close_reason == "normal"
    assert s.errors == []
    labels = s.ready["labels"]
    kinds = [m["type"] for m in s.messages]
    assert kinds[0] == "ready" and kinds[-1] == "summary" and kinds.count("summary") == 1

    # one result per step, in step order, time = (step + 1) * hop / 16000
    steps = math.ceil(n_frames * FRAME / hop)
    assert [r["step"] for r in s.results] == list(range(steps))
    for r in s.results:
        assert r["time"] == (r["step"] + 1) * hop / RATE
        assert list(r["scores"]) == labels
    scores = np.array([[r["scores"][lab] for lab in labels] for r in s.results])
    assert np.isfinite(scores).all() and (scores >= 0).all() and (scores <= 1).all()
    # full precision: every score is a float32 value sent exactly, not rounded
    flat = scores.ravel()
    assert (flat.astype(np.float32).astype(np.float64) == flat).all()
    assert np.mean(np.round(flat, 6) != flat) > 0.5, "scores look rounded"

    # events: the speech clip has speech; start/end alternate and follow their step's result
    events = s.events
    assert [e["event"] for e in events][:2] == ["start", "end"]
    assert [e["event"] for e in events] == ["start", "end"] * (len(events) // 2)
    times = [e["time"] for e in events]
    assert times == sorted(times) and all(0 <= t <= steps * hop / RATE for t in times)
    for i, m in enumerate(s.messages):
        if m["type"] == "event":
            assert m["label"] in labels
            assert s.messages[i - 1]["type"] in ("result", "event")

    summary = s.summary
    assert summary["frames"] == n_frames
    assert summary["steps"] == steps
    assert summary["failed_steps"] == 0
    assert summary["events"] == [{k: e[k] for k in ("event", "label", "time")} for e in events]
    assert summary["padded_samples"] == steps * hop - n_frames * FRAME
    assert summary["duration"] == n_frames * FRAME / RATE  # audio received, padding excluded


async def test_framing_does_not_change_scores(server: Server, model: str, speech_clip: np.ndarray) -> None:
    """One frame per message and many frames per message give the same numbers."""
    clip = speech_clip[: RATE * 3]
    a = await run_session(server.ws, [*frames(clip, 1), END], model=model)
    b = await run_session(server.ws, [*frames(clip, 13), END], model=model)
    label = a.ready["labels"][0]
    assert a.scores(label) == b.scores(label)
    assert a.events == b.events


async def test_results_events_mode(server: Server, model: str, speech_clip: np.ndarray) -> None:
    msgs = [*frames(speech_clip, 8), END]
    full = await run_session(server.ws, msgs, model=model)
    quiet = await run_session(server.ws, msgs, model=model, results="events")
    assert quiet.close_code == Close.NORMAL
    assert quiet.results == []
    assert quiet.events == full.events and quiet.events
    assert quiet.summary["steps"] == full.summary["steps"] == len(full.results)
    assert quiet.summary["events"] == full.summary["events"]
    assert {m["type"] for m in quiet.messages} == {"ready", "event", "summary"}


async def test_flush_pads_a_partial_hop(server: Server, model: str, speech_clip: np.ndarray) -> None:
    hop = HOPS[model]
    one = speech_clip[:FRAME].tobytes()
    async with connect(stream_url(server.ws, model=model), compression=None) as ws:
        await recv_json(ws)
        await ws.send(one)  # one frame: a partial hop for Silero, a whole one for hop 128
        await ws.send(FLUSH)
        first = await recv_json(ws)
        assert first["type"] == "result" and first["step"] == 0
        assert first["time"] == hop / RATE
        await ws.send(FLUSH)  # nothing buffered: no step
        # time keeps counting the padded samples: the next hop is step 1
        await ws.send(b"".join(frames(speech_clip[FRAME : FRAME + hop])))
        second = await recv_json(ws)
        assert second["type"] == "result" and second["step"] == 1
        assert second["time"] == 2 * hop / RATE
        await ws.send(END)
        rest = await recv_until(ws, "summary")
    summary = rest[-1]
    assert [m["type"] for m in rest if m["type"] == "result"] == []
    assert summary["frames"] == 1 + hop // FRAME
    assert summary["steps"] == 2
    assert summary["padded_samples"] == hop - FRAME
    assert ws.close_code == Close.NORMAL


async def test_end_flushes_buffered_audio(server: Server, silero_model: str, speech_clip: np.ndarray) -> None:
    """``end`` scores a partial hop like ``flush`` before the summary."""
    s = await run_session(server.ws, [speech_clip[: 3 * FRAME].tobytes(), END], model=SILERO)
    assert [r["step"] for r in s.results] == [0]
    assert s.summary["frames"] == 3 and s.summary["steps"] == 1
    assert s.summary["padded_samples"] == FRAME
    assert s.close_code == Close.NORMAL


async def test_f32_encoding_matches_s16(server: Server, model: str, speech_clip: np.ndarray) -> None:
    clip = speech_clip[: RATE * 2]
    as_f32 = (clip.astype(np.float32) / 32768).astype("<f4")
    a = await run_session(server.ws, [*frames(clip, 4), END], model=model)
    b = await run_session(
        server.ws, [*frames(as_f32, 4), END], model=model, encoding="pcm_f32le", sample_rate=16000
    )
    assert b.ready["encoding"] == "pcm_f32le"
    label = a.ready["labels"][0]
    assert a.scores(label) == b.scores(label)


# -- errors that keep the session open ---------------------------------------------------------

BAD_MESSAGES: list[tuple[bytes | str, str]] = [
    (b"\x00" * 100, "bad_frame_size"),
    (b"\x00" * (2 * FRAME + 1), "bad_frame_size"),
    (b"", "empty_message"),
    (b"\x00" * (64 * 1024 + 2 * FRAME), "message_too_large"),
    (b"\x00" * (65 * 2 * FRAME), "too_many_frames"),
    ("not json", "bad_json"),
    ("", "bad_json"),
    ("[1, 2]", "missing_type"),
    ('{"kind": "end"}', "missing_type"),
    ('{"type": 5}', "missing_type"),
    ('{"type": "pause"}', "unknown_type"),
]


@pytest.mark.parametrize(
    ("bad", "code"), BAD_MESSAGES, ids=[f"{c}-{i}" for i, (_, c) in enumerate(BAD_MESSAGES)]
)
async def test_bad_message_keeps_session_open(
    server: Server, silero_model: str, speech_clip: np.ndarray, bad: bytes | str, code: str
) -> None:
    hop = speech_clip[: HOPS[SILERO]].tobytes()
    s = await run_session(server.ws, [bad, hop, END], model=SILERO)
    assert ERRORS[code].close is None  # documented as "stays open"
    assert [e["code"] for e in s.errors] == [code]
    assert s.errors[0]["message"]
    kinds = [m["type"] for m in s.messages]
    assert kinds == ["ready", "error", "result", "summary"], kinds
    assert s.results[0]["step"] == 0
    assert s.summary["frames"] == HOPS[SILERO] // FRAME  # the dropped message counts nothing
    assert s.close_code == Close.NORMAL


async def test_non_finite_audio_is_dropped_whole(server: Server, model: str, speech_clip: np.ndarray) -> None:
    hop = HOPS[model]
    good = (speech_clip[:hop].astype(np.float32) / 32768).astype("<f4")
    nan = good.copy()
    nan[5] = np.nan
    inf = good.copy()
    inf[-1] = np.inf
    q = dict(model=model, encoding="pcm_f32le")
    s = await run_session(server.ws, [nan.tobytes(), inf.tobytes(), good.tobytes(), END], **q)
    clean = await run_session(server.ws, [good.tobytes(), END], **q)
    assert [e["code"] for e in s.errors] == ["non_finite_audio"] * 2
    label = s.ready["labels"][0]
    # the state was never poisoned: the first good hop scores as in a clean session
    assert s.scores(label) == clean.scores(label) and math.isfinite(s.scores(label)[0])
    assert s.summary["frames"] == hop // FRAME
    assert s.close_code == Close.NORMAL


async def test_audio_after_end(server: Server, silero_model: str, speech_clip: np.ndarray) -> None:
    hop = HOPS[SILERO]
    # 48 steps in three messages are still being scored when `end` arrives, so the
    # messages after it are read while the session finishes.
    burst = frames(speech_clip[: 48 * hop], 16)
    s = await run_session(server.ws, [*burst, END, speech_clip[:FRAME].tobytes(), FLUSH, END], model=SILERO)
    assert [e["code"] for e in s.errors] == ["audio_after_end", "audio_after_end"]
    assert s.summary["steps"] == 48 and s.summary["frames"] == 48 * hop // FRAME
    assert len(s.results) == 48
    assert s.close_code == Close.NORMAL


# -- connect-time refusals: one error, then the documented close code -------------------------

REFUSALS = [
    ({"encoding": "pcm_u8"}, "bad_encoding"),
    ({"encoding": ""}, "bad_encoding"),
    ({"sample_rate": "11025"}, "bad_sample_rate"),
    ({"sample_rate": "sixteen"}, "bad_sample_rate"),
    ({"results": "xyz"}, "bad_query"),
    ({"results": "BATCH"}, "bad_query"),
    ({"model": "no-such-model"}, "unknown_model"),
    ({"version": "9.9.9"}, "unknown_version"),
]


@pytest.mark.parametrize(("query", "code"), REFUSALS, ids=[c for _, c in REFUSALS])
async def test_query_refusal(server: Server, silero_model: str, query: dict[str, str], code: str) -> None:
    q = {"model": SILERO, **query}
    s = await expect_refusal(server.ws, **q)
    err = s.messages[0]
    assert err["code"] == code and err["message"]
    assert s.close_code == ERRORS[code].close
    assert s.close_code == (Close.UNKNOWN_MODEL if code.startswith("unknown_") else Close.BAD_REQUEST)
    assert s.close_reason == code


async def test_valid_query_values_are_accepted(server: Server, silero_model: str) -> None:
    for q in (
        {"sample_rate": "16000"},
        {"encoding": "pcm_f32le"},
        {"results": "events"},
        {"results": "all"},
        {"results": "batch"},
        {"version": "latest"},
        {"version": manifest(SILERO)["version"]},
    ):
        s = await run_session(server.ws, [END], model=SILERO, **q)
        assert s.ready["model"] == SILERO, q
        assert s.close_code == Close.NORMAL, q


async def test_default_model_when_no_model_given(server: Server, default_model: str) -> None:
    s = await run_session(server.ws, [END])
    assert s.ready["model"] == default_model
    assert s.ready["hop_samples"] == 128


# -- configured limits ---------------------------------------------------------------------------


async def test_configured_limits(silero_model: str, speech_clip: np.ndarray) -> None:
    """max_frames_per_message and max_message_bytes are the configured ones, not defaults."""
    settings = make_settings(
        models=[SILERO], max_frames_per_message=8, max_message_bytes=4096, max_pending_steps=8
    )
    hop = speech_clip[: HOPS[SILERO]].tobytes()
    with running_server(settings) as srv:
        s = await run_session(
            srv.ws,
            [
                b"\x00" * (9 * 2 * FRAME),  # 9 frames: above max_frames_per_message
                b"\x00" * (17 * 2 * FRAME),  # 4352 bytes: above max_message_bytes
                hop,
                END,
            ],
            model=SILERO,
        )
    assert [e["code"] for e in s.errors] == ["too_many_frames", "message_too_large"]
    assert "max_frames_per_message=8" in s.errors[0]["message"]
    assert "max_message_bytes=4096" in s.errors[1]["message"]
    assert [r["step"] for r in s.results] == [0]
    assert s.summary["frames"] == 4
    assert s.close_code == Close.NORMAL


def test_error_json_shape() -> None:
    """Error messages on the wire: type, code, message (plus step for a failed step)."""
    from lookback.protocol import error_message

    body = json.loads(error_message("bad_json", "nope"))
    assert body == {"type": "error", "code": "bad_json", "message": "nope"}
