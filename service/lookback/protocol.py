"""The wire protocol in one place: error codes, close codes, message encoders.

README's "Errors and limits" table is generated from ``ERRORS`` and ``CLOSE_CODES``
(``lookback protocol``) so the docs cannot drift from the code. Domain errors carry
only a code; the HTTP status and the close code for a code are decided here.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import numpy as np
import orjson


class Close(IntEnum):
    """WebSocket close codes Lookback uses (RFC 6455 range plus the private 4000-4999)."""

    NORMAL = 1000  # after {"type":"end"} and the summary
    GOING_AWAY = 1001  # server draining (SIGTERM), after a summary
    MESSAGE_TOO_BIG = 1009  # transport limit (uvicorn ws_max_size) exceeded
    INTERNAL_ERROR = 1011  # unexpected server failure
    TRY_AGAIN_LATER = 1013  # capacity reached after the upgrade (a race with the cap)
    BAD_REQUEST = 4400  # handshake query invalid: bad encoding, sample rate, results, ...
    UNKNOWN_MODEL = 4404  # model or version not loaded
    IDLE_TIMEOUT = 4408  # nothing received for idle_timeout_s
    MAX_DURATION = 4409  # session open longer than max_session_s
    SLOW_CONSUMER = 4429  # the client does not read results fast enough
    RESUME_ELSEWHERE = 4100  # drained: session snapshotted, reconnect with ?resume=TOKEN
    RESUME_INVALID = 4460  # resume token malformed or not issued by this service
    RESUME_FORBIDDEN = 4461  # resume token issued to another API key
    RESUME_UNKNOWN = 4462  # no such session (or it ended normally)
    RESUME_EXPIRED = 4463  # the session's resume window has passed
    RESUME_USED = 4464  # the token was already used by a resume (single use)
    RESUME_CONFLICT = 4465  # another connection owns the session now
    RESUME_INCOMPATIBLE = 4466  # the model changed since the snapshot
    RESUME_UNAVAILABLE = 4467  # resume is off or the state store is unreachable
    RESUME_ROTATED = 4468  # the token's resume secret is held by no replica any more


CLOSE_CODES: dict[Close, str] = {
    Close.NORMAL: "normal end after `end` and `summary`",
    Close.GOING_AWAY: "server is draining (SIGTERM); buffered audio was scored and a summary sent",
    Close.MESSAGE_TOO_BIG: "message above the transport limit (4 x max_message_bytes)",
    Close.INTERNAL_ERROR: "unexpected server error",
    Close.TRY_AGAIN_LATER: "session cap reached after the upgrade; retry with backoff",
    Close.BAD_REQUEST: "invalid query parameter at connect (see the error code)",
    Close.UNKNOWN_MODEL: "model or version not loaded",
    Close.IDLE_TIMEOUT: "no message for idle_timeout_s",
    Close.MAX_DURATION: "session reached max_session_s",
    Close.SLOW_CONSUMER: "client did not read results; send queue bound exceeded",
    Close.RESUME_ELSEWHERE: "server draining: the session was snapshotted; reconnect with `?resume=TOKEN`",
    Close.RESUME_INVALID: "resume refused: token malformed or forged",
    Close.RESUME_FORBIDDEN: "resume refused: token belongs to another API key",
    Close.RESUME_UNKNOWN: "resume refused: no such session",
    Close.RESUME_EXPIRED: "resume refused: resume window passed",
    Close.RESUME_USED: "resume refused: token already used",
    Close.RESUME_CONFLICT: "resume refused: another connection owns the session (retry after the lease)",
    Close.RESUME_INCOMPATIBLE: "resume refused: model or snapshot format changed",
    Close.RESUME_UNAVAILABLE: "resume refused: resume disabled or state store unreachable",
    Close.RESUME_ROTATED: "resume refused: token signed with a secret no replica holds now (retry briefly)",
}


@dataclass(frozen=True)
class ErrorSpec:
    code: str
    http: int  # status when this code answers a REST request
    close: Close | None  # None: the WebSocket session stays open
    summary: str


_SPECS = [
    # -- WebSocket messages (session stays open unless a close code is given) --
    ErrorSpec(
        "bad_frame_size",
        400,
        None,
        "binary message is not a whole number of 128-sample frames (PCM at the model's rate); dropped",
    ),
    ErrorSpec(
        "partial_sample",
        400,
        None,
        "binary message is not a whole number of samples of its encoding (G.711 or another rate: "
        "any whole number of samples is a valid message); dropped",
    ),
    ErrorSpec(
        "bad_media_event",
        400,
        None,
        "telephony media stream: an event that is not valid JSON, of an unknown kind, out of "
        "sequence or with a bad payload; dropped (before `start`: the session closes with 4400)",
    ),
    ErrorSpec("empty_message", 400, None, "empty binary message; ignored"),
    ErrorSpec("message_too_large", 413, None, "binary message above max_message_bytes; dropped"),
    ErrorSpec(
        "too_many_frames", 400, None, "more frames in one message than max_frames_per_message; dropped"
    ),
    ErrorSpec(
        "non_finite_audio",
        400,
        None,
        "pcm_f32le message holds NaN or Inf; dropped whole so state is never poisoned",
    ),
    ErrorSpec(
        "audio_out_of_range",
        400,
        None,
        "pcm_f32le (or float WAV) sample outside [-max_float_amplitude, max_float_amplitude] "
        "(full scale is 1.0); dropped whole",
    ),
    ErrorSpec(
        "non_finite_state",
        500,
        None,
        "a model step produced NaN or Inf; the step has no result and the session's state was "
        "reset to initial (the session goes on)",
    ),
    ErrorSpec(
        "too_many_pending_steps",
        429,
        None,
        "one message would queue more steps than max_pending_steps (misconfiguration); "
        "faster-than-real-time clients are slowed by backpressure, not refused",
    ),
    ErrorSpec("bad_json", 400, None, "text message is not valid JSON"),
    ErrorSpec("missing_type", 400, None, "JSON message without a string `type`"),
    ErrorSpec("unknown_type", 400, None, "JSON `type` is not flush or end"),
    ErrorSpec("audio_after_end", 400, None, "audio or flush received after `end`; ignored"),
    ErrorSpec(
        "inference_failed",
        500,
        None,
        "the model call failed for the batch holding this step; the step has no result",
    ),
    # -- connect / request parameters --
    ErrorSpec("bad_encoding", 400, Close.BAD_REQUEST, "encoding must be pcm_s16le, pcm_f32le, mulaw or alaw"),
    ErrorSpec(
        "bad_sample_rate",
        400,
        Close.BAD_REQUEST,
        "sample_rate not one of 8000, 16000, 22050, 24000, 32000, 44100, 48000 (or the model's); a "
        "container at another rate than the model's; raw REST bodies without sample_rate",
    ),
    ErrorSpec("bad_query", 400, Close.BAD_REQUEST, "a query parameter has an invalid value"),
    ErrorSpec(
        "duplicate_query",
        400,
        Close.BAD_REQUEST,
        "a query parameter is given twice; which one counts is unclear",
    ),
    ErrorSpec("unknown_model", 404, Close.UNKNOWN_MODEL, "model not loaded"),
    ErrorSpec("unknown_version", 404, Close.UNKNOWN_MODEL, "version of the model not loaded"),
    ErrorSpec("unauthorized", 401, None, "missing or wrong API key (WebSocket: HTTP 401 before the upgrade)"),
    ErrorSpec(
        "origin_not_allowed", 403, None, "browser Origin not in allowed_origins (HTTP 403 before the upgrade)"
    ),
    ErrorSpec(
        "server_busy",
        503,
        Close.TRY_AGAIN_LATER,
        "session cap, scoring queue or batcher backlog full; retry after Retry-After",
    ),
    ErrorSpec("draining", 503, Close.GOING_AWAY, "server is shutting down; connect elsewhere"),
    # -- resume (docs/sessions.md); refusals never say whether a session exists to another key --
    ErrorSpec("resume_token_invalid", 400, Close.RESUME_INVALID, "resume token malformed or not issued here"),
    ErrorSpec("resume_forbidden", 403, Close.RESUME_FORBIDDEN, "resume token was issued to another API key"),
    ErrorSpec("resume_unknown", 404, Close.RESUME_UNKNOWN, "no resumable session for this token"),
    ErrorSpec("resume_expired", 410, Close.RESUME_EXPIRED, "the session's resume window has passed"),
    ErrorSpec("resume_token_used", 409, Close.RESUME_USED, "token already used; a resume issues a new one"),
    ErrorSpec(
        "resume_conflict",
        409,
        Close.RESUME_CONFLICT,
        "another connection owns the session (the original is still open); retry after resume_lease_s",
    ),
    ErrorSpec(
        "resume_incompatible", 409, Close.RESUME_INCOMPATIBLE, "the model's graph changed since the snapshot"
    ),
    ErrorSpec(
        "snapshot_invalid",
        409,
        Close.RESUME_INCOMPATIBLE,
        "stored snapshot damaged, truncated, out of range, or not this session's (altered or moved)",
    ),
    ErrorSpec(
        "snapshot_version",
        409,
        Close.RESUME_INCOMPATIBLE,
        "snapshot written by another format version",
    ),
    ErrorSpec(
        "resume_unavailable", 503, Close.RESUME_UNAVAILABLE, "resume disabled, or the state store unreachable"
    ),
    ErrorSpec(
        "resume_secret_rotated",
        410,
        Close.RESUME_ROTATED,
        "token signed with a resume secret no replica holds now (store restarted empty, no "
        "resume_secret set): retry a few times over ~2 s, then start a new session",
    ),
    # -- broker sources (docs/sources.md): the message goes to the errors stream/topic, acknowledged;
    #    bad_encoding, bad_frame_size, empty_message, too_many_frames, non_finite_audio and
    #    unknown_model/unknown_version above apply to broker messages too --
    ErrorSpec(
        "missing_field",
        400,
        None,
        "broker message lacks a valid device, seq (an integer in [0, 2^63-1]) or audio; rejected",
    ),
    ErrorSpec(
        "invalid_field",
        400,
        None,
        "an optional field of a broker message (model, version, end, ts) has the wrong type or value; "
        "rejected",
    ),
    ErrorSpec("bad_header", 400, None, "MQTT payload does not start with the JSON header line; rejected"),
    ErrorSpec(
        "wrong_partition", 400, None, "Redis entry on a partition its device does not hash to; rejected"
    ),
    ErrorSpec(
        "duplicate_message", 409, None, "sequence number already consumed (a redelivery or a repeat); skipped"
    ),
    ErrorSpec(
        "late_message",
        409,
        None,
        "arrived after a later message of its device, whose gap was already handled; skipped",
    ),
    ErrorSpec(
        "checkpoint_invalid", 500, None, "device checkpoint unreadable; the device starts a new session"
    ),
    ErrorSpec(
        "checkpoint_incompatible",
        409,
        None,
        "device checkpoint of another model graph; the device starts a new session",
    ),
    # -- REST bodies --
    ErrorSpec("empty_body", 400, None, "request body is empty"),
    ErrorSpec("bad_audio", 415, None, "body is not decodable audio (or wrong content type / truncated file)"),
    ErrorSpec("bad_channels", 400, None, "audio must be mono"),
    ErrorSpec("upload_too_large", 413, None, "body above max_upload_bytes"),
    ErrorSpec("audio_too_long", 413, None, "audio above max_upload_seconds"),
    ErrorSpec(
        "upload_too_slow",
        408,
        None,
        "body arrives slower than min_upload_rate_bps on average (after upload_rate_grace_s)",
    ),
    ErrorSpec(
        "send_timeout",
        408,
        None,
        "the client read nothing for response_send_timeout_s (ndjson) or ws_send_timeout_s "
        "(WebSocket); the connection is dropped, so this code is only counted",
    ),
    # -- HTTP transport (before any route; the connection is closed after the answer) --
    ErrorSpec(
        "header_timeout",
        408,
        None,
        "request line and headers not complete within header_timeout_s, or not yet complete "
        "while more than max_pending_connections such connections are open",
    ),
    ErrorSpec("request_line_too_long", 414, None, "request line above max_request_line_bytes"),
    ErrorSpec(
        "headers_too_large",
        431,
        None,
        "headers above max_header_bytes in all, or more than max_headers lines",
    ),
    ErrorSpec("idle_timeout", 408, Close.IDLE_TIMEOUT, "no data for idle_timeout_s"),
    ErrorSpec("max_duration", 400, Close.MAX_DURATION, "session reached max_session_s"),
    ErrorSpec("slow_consumer", 400, Close.SLOW_CONSUMER, "send queue overflow"),
    ErrorSpec("internal_error", 500, Close.INTERNAL_ERROR, "unexpected server error"),
]

ERRORS: dict[str, ErrorSpec] = {s.code: s for s in _SPECS}


def spec_for(code: str) -> ErrorSpec:
    return ERRORS.get(code, ERRORS["internal_error"])


# --- server messages (hot path: orjson, floats at full float32 precision) ------------------


def encode(msg: dict[str, Any]) -> str:
    return orjson.dumps(msg).decode()


def error_body(code: str, message: str) -> dict[str, Any]:
    """The JSON body of every HTTP refusal: REST errors and pre-upgrade WebSocket refusals."""
    return {"error": {"code": code, "message": message}}


def error_message(code: str, message: str, **extra: Any) -> str:
    body: dict[str, Any] = {"type": "error", "code": code, "message": message}
    body.update(extra)
    return encode(body)


def ready_message(
    *,
    session_id: str,
    model: str,
    version: str,
    sample_rate: int,
    frame_samples: int,
    hop_samples: int,
    labels: list[str],
    encoding: str | None,
    threshold: float,
    worker: int = 0,
    **resume: Any,
) -> str:
    """``resume``: resume_token on a resumable session; resumed, replay_from_sample, ... on a resume."""
    return encode(
        {
            "type": "ready",
            "session_id": session_id,
            "model": model,
            "version": version,
            "sample_rate": sample_rate,
            "frame_samples": frame_samples,
            "hop_samples": hop_samples,
            "labels": labels,
            "encoding": encoding,
            "threshold": threshold,
            "worker": worker,
            **resume,
        }
    )


def checkpoint_message(samples: int, resume_token: str | None = None) -> str:
    """Audio before sample ``samples`` is durable; the first one carries a deferred token."""
    msg: dict[str, Any] = {"type": "checkpoint", "samples": samples}
    if resume_token is not None:
        msg["resume_token"] = resume_token
    return encode(msg)


def result_message(step: int, time: float, scores: dict[str, float]) -> str:
    return result_bytes(step, time, scores).decode()


def result_bytes(step: int, time: float, scores: dict[str, float]) -> bytes:
    """``result_message`` as the UTF-8 bytes a WebSocket text frame carries."""
    # orjson on a small dict is about twice as fast as an f-string with float reprs
    return orjson.dumps({"type": "result", "step": step, "time": time, "scores": scores})


def results_message(step: int, times: list[float], scores: dict[str, list[float]]) -> str:
    """``results=batch``: one model call's consecutive steps, columnar.

    Step ``step + i`` has time ``times[i]`` and score ``scores[label][i]``: the same floats
    as the ``result`` messages it replaces, one WebSocket message instead of one per step.
    """
    return results_bytes(step, times, scores).decode()


def results_bytes(step: int, times: list[float], scores: dict[str, list[float]]) -> bytes:
    """``results_message`` as UTF-8 bytes."""
    return orjson.dumps({"type": "results", "step": step, "times": times, "scores": scores})


#: ``result_format=binary``: a results message as one binary WebSocket message: this
#: header (kind, labels per row, rows, first step), then ``rows x labels`` little-endian
#: float32 scores, row by row. Step ``first + i`` ends at ``(first + i + 1) * hop_samples``
#: samples, so times need no bytes. The floats are the ones JSON writes as doubles.
BINARY_RESULTS = struct.Struct("<BBHQ")
BINARY_RESULTS_KIND = 1
MAX_BINARY_ROWS = 0xFFFF
RESULT_FORMATS = ("json", "binary")


def results_binary(first: int, rows: Sequence[Sequence[float]] | np.ndarray, labels: int) -> bytes:
    """Steps ``first, first + 1, ...`` (at most ``MAX_BINARY_ROWS``) as one binary message."""
    head = BINARY_RESULTS.pack(BINARY_RESULTS_KIND, labels, len(rows), first)
    if isinstance(rows, np.ndarray):  # float32 [n, labels]: its bytes, row by row
        return head + rows.astype("<f4", copy=False).tobytes()
    if labels == 1:
        return head + struct.pack(f"<{len(rows)}f", *[r[0] for r in rows])
    return head + struct.pack(f"<{len(rows) * labels}f", *[x for r in rows for x in r])


def decode_results_binary(data: bytes, ready: dict[str, Any]) -> dict[str, Any]:
    """A binary results message as the JSON ``results`` message it stands for (``ready``
    gives the labels, hop and rate)."""
    kind, n_labels, rows, first = BINARY_RESULTS.unpack_from(data)
    labels = ready["labels"]
    if kind != BINARY_RESULTS_KIND or n_labels != len(labels):
        raise ValueError(f"not a results message for {len(labels)} labels")
    if len(data) != BINARY_RESULTS.size + 4 * rows * n_labels:
        raise ValueError("binary results message of the wrong length")
    values = struct.unpack_from(f"<{rows * n_labels}f", data, BINARY_RESULTS.size)
    hop, rate = ready["hop_samples"], ready["sample_rate"]
    return {
        "type": "results",
        "step": first,
        "times": [(first + i + 1) * hop / rate for i in range(rows)],
        "scores": {label: list(values[j::n_labels]) for j, label in enumerate(labels)},
    }


def split_results(msg: dict[str, Any]) -> list[dict[str, Any]]:
    """A decoded ``results`` message as the ``result`` messages ``results=all`` would send."""
    first, times, scores = msg["step"], msg["times"], msg["scores"]
    return [
        {"type": "result", "step": first + i, "time": t, "scores": {k: v[i] for k, v in scores.items()}}
        for i, t in enumerate(times)
    ]


def event_message(event: dict[str, Any]) -> str:
    return orjson.dumps({"type": "event", **event}).decode()


def summary_message(
    *,
    session_id: str,
    frames: int,
    steps: int,
    failed_steps: int,
    padded_samples: int,
    duration: float,
    events: list[dict[str, Any]],
    events_truncated: int = 0,
) -> str:
    """``events``: the last ``session_events_kept``; ``events_truncated`` counts the older ones."""
    return encode(
        {
            "type": "summary",
            "session_id": session_id,
            "frames": frames,
            "steps": steps,
            "failed_steps": failed_steps,
            "padded_samples": padded_samples,
            "duration": duration,
            "events": events,
            "events_truncated": events_truncated,
        }
    )


# --- REST ndjson lines (format=ndjson of POST /v1/score) -----------------------------------

_NP = orjson.OPT_SERIALIZE_NUMPY


def ndjson_header(
    *, model: str, version: str, sample_rate: int, hop_samples: int, labels: list[str]
) -> dict[str, Any]:
    """The clip header; the JSON answer carries the same fields at its top level."""
    return {
        "model": model,
        "version": version,
        "sample_rate": sample_rate,
        "hop_samples": hop_samples,
        "labels": labels,
    }


def ndjson_line(kind: str, body: dict[str, Any]) -> bytes:
    """One line of an ndjson answer: ``header``, ``scores``, ``summary`` or ``error``."""
    return orjson.dumps({"type": kind, **body}, option=_NP) + b"\n"


def markdown_tables() -> str:
    """The README tables, rendered from the definitions above."""
    lines = ["| code | HTTP | WebSocket | meaning |", "| --- | --- | --- | --- |"]
    for s in _SPECS:
        ws = f"closes {int(s.close)}" if s.close is not None else "stays open"
        lines.append(f"| `{s.code}` | {s.http} | {ws} | {s.summary} |")
    lines += ["", "| close code | meaning |", "| --- | --- |"]
    lines += [f"| {int(c)} | {d} |" for c, d in CLOSE_CODES.items()]
    return "\n".join(lines)
