"""Soak, short variant (``make bench`` runs the 20,000-session one: tests/bench/soak.py).

Session churn against one ``lookback serve`` process: opening, streaming a few frames,
leaving by ``end``, by a close frame, or by dropping TCP. Afterwards the server must be
back where it was after the first warm batch: RSS within 5%, the same open file
descriptors (±2), no slot used, no session open, no traceback, and every summary right.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bench.soak import run_soak

SESSIONS = 2000
WARM = 500


@pytest.mark.slow
def test_session_churn_leaks_nothing(tmp_path: Path, silero_model: str) -> None:
    f = run_soak(SESSIONS, warm=WARM, concurrency=32, workdir=tmp_path)
    print(f"\nsoak: {f}")
    client = f["client"]
    assert client.get("ended", 0) + client.get("closed", 0) + client.get("dropped", 0) == SESSIONS, (
        client
    )  # no client failure of any kind
    assert client.get("wrong_summary", 0) == 0
    assert f["ended_by_reason"] == {
        "normal": client["ended"],
        "client_gone": client["closed"] + client["dropped"],
    }
    assert f["server_errors"] == {}
    assert f["slots_used"] == 0 and f["sessions_active"] == 0
    assert abs(f["rss_change_pct"]) <= 5.0, f
    assert abs(f["fds_change"]) <= 2, f
    assert f["tracebacks"] == 0 and f["exit_code"] == 0
