"""``lookback.protocol``: the one source of error codes, close codes and wire encoding."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import orjson

from lookback.protocol import (
    _SPECS,
    CLOSE_CODES,
    ERRORS,
    Close,
    encode,
    error_message,
    markdown_tables,
    spec_for,
)

SERVICE = Path(__file__).resolve().parents[1] / "service"

#: Codes raised inside the service that never reach a client as an error message.
INTERNAL_ONLY = {
    "model_contract": "a manifest/graph mismatch refuses the model at load time",
    "import_failed": "`lookback models import` only",
    "session_closed": "push() after close; the transport stops reading before closing",
}


def test_codes_are_unique_and_well_formed() -> None:
    assert len(_SPECS) == len(ERRORS)
    for code, spec in ERRORS.items():
        assert spec.code == code
        assert re.fullmatch(r"[a-z]+(_[a-z]+)*", code), code
        assert 400 <= spec.http <= 599, code
        assert spec.close is None or spec.close in CLOSE_CODES, code
        assert spec.summary and "|" not in spec.summary  # it goes into a markdown table


def test_close_codes() -> None:
    assert set(CLOSE_CODES) == set(Close)
    for close, text in CLOSE_CODES.items():
        assert 1000 <= close <= 1015 or 4000 <= close <= 4999, close
        assert text and "|" not in text
    assert Close.NORMAL == 1000 and Close.BAD_REQUEST == 4400 and Close.UNKNOWN_MODEL == 4404


def test_documented_mappings() -> None:
    """The mappings the clients rely on (README table, issue 4)."""
    stays_open = [
        "bad_frame_size",
        "empty_message",
        "message_too_large",
        "too_many_frames",
        "bad_json",
        "missing_type",
        "unknown_type",
        "audio_after_end",
        "non_finite_audio",
        "too_many_pending_steps",
        "inference_failed",
    ]
    assert all(ERRORS[c].close is None for c in stays_open)
    for code in ("bad_encoding", "bad_sample_rate", "bad_query"):
        assert (ERRORS[code].close, ERRORS[code].http) == (Close.BAD_REQUEST, 400)
    for code in ("unknown_model", "unknown_version"):
        assert (ERRORS[code].close, ERRORS[code].http) == (Close.UNKNOWN_MODEL, 404)
    assert ERRORS["unauthorized"].http == 401
    assert ERRORS["upload_too_large"].http == ERRORS["audio_too_long"].http == 413
    assert ERRORS["server_busy"].http == 503 and ERRORS["server_busy"].close == Close.TRY_AGAIN_LATER
    assert ERRORS["slow_consumer"].close == Close.SLOW_CONSUMER
    assert ERRORS["idle_timeout"].close == Close.IDLE_TIMEOUT


def test_spec_for_unknown_code_is_internal_error() -> None:
    assert spec_for("no_such_code") is ERRORS["internal_error"]
    assert spec_for("bad_json") is ERRORS["bad_json"]


def _emitted_codes() -> set[str]:
    patterns = [
        r'code\s*=\s*"([a-z_]+)"',
        r'send_error\(\s*"([a-z_]+)"',
        r'\.error\(\s*"([a-z_]+)"',
        r'_refuse\(\s*\d+,\s*"([a-z_]+)"',
        r'close_now\(\s*Close\.[A-Z_]+,\s*"([a-z_]+)"',
    ]
    found: set[str] = set()
    for path in SERVICE.rglob("*.py"):
        text = path.read_text()
        for p in patterns:
            found |= set(re.findall(p, text))
    return found


def test_every_code_the_service_sends_is_documented() -> None:
    emitted = _emitted_codes()
    assert {"bad_frame_size", "bad_json", "upload_too_large", "unauthorized"} <= emitted
    undocumented = emitted - set(ERRORS) - set(INTERNAL_ONLY)
    assert not undocumented, f"codes sent but missing from lookback.protocol.ERRORS: {undocumented}"


def test_error_message() -> None:
    body = json.loads(error_message("inference_failed", "boom", step=3))
    assert body == {"type": "error", "code": "inference_failed", "message": "boom", "step": 3}


def test_encode_keeps_float32_scores_exact() -> None:
    values = np.random.default_rng(0).random(1000, dtype=np.float32)
    text = encode({"scores": [float(v) for v in values]})
    back = np.asarray(orjson.loads(text)["scores"], np.float64)
    assert (back == values.astype(np.float64)).all()
    assert (back.astype(np.float32) == values).all()


def test_markdown_tables() -> None:
    md = markdown_tables()
    lines = md.splitlines()
    assert lines[0] == "| code | HTTP | WebSocket | meaning |"
    rows = [line for line in lines if line.startswith("| `")]
    assert [r.split("`")[1] for r in rows] == [s.code for s in _SPECS]
    for close in CLOSE_CODES:
        assert any(line.startswith(f"| {int(close)} |") for line in lines), close
    assert "| close code | meaning |" in md
