"""Scores under load against the REST endpoint: the numbers, not only their count.

A load run's first ``--verify`` sessions (in its first client process) keep every score
they receive. After the run each one's exact audio (its messages in the order they went
out) is posted to ``/v1/score`` on the same server with the same model and wire form, and
the report requires every row within ``config.VERIFY_TOLERANCE``: REST runs the sequence
graph, not the step graph, so equality is not promised, but a batching or state bug moves
scores by far more. A session that sent more than ``MAX_VERIFY_BYTES`` is skipped (REST
bounds its uploads).
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlencode

from lookback.loadtest.config import LoadConfig, auth_headers, http_base, wire_rate
from lookback.loadtest.rawclient import SessionBase

MAX_VERIFY_BYTES = 64 * 1024 * 1024


def sent_audio(raw: list[bytes], session: SessionBase) -> bytes:
    """The audio ``session`` sent: its messages (``raw``: without WebSocket framing) in order."""
    n = len(raw)
    return b"".join(raw[(session.first_msg + i) % n] for i in range(len(session.send_times)))


def reference(cfg: LoadConfig, url: str, audio: bytes, labels: list[str]) -> list[list[float]]:
    """``/v1/score`` of ``audio`` in the run's wire form: one row per step, in ``labels`` order."""
    query = {"model": cfg.model, "version": cfg.version, "encoding": cfg.encoding}
    query["sample_rate"] = str(wire_rate(cfg))
    req = urllib.request.Request(
        f"{http_base(url)}/v1/score?{urlencode({k: v for k, v in query.items() if v is not None})}",
        data=audio,
        headers={"Content-Type": "application/octet-stream", **auth_headers(cfg)},
    )
    with urllib.request.urlopen(req, timeout=120) as resp:
        scores = json.loads(resp.read())["scores"]
    return [list(row) for row in zip(*(scores[lab] for lab in labels), strict=True)]


def check(cfg: LoadConfig, sessions: list[tuple[str, SessionBase]], raw: list[bytes]) -> dict[str, Any]:
    """Each (URL, session) pair's kept scores against REST: the largest difference, and what
    could not be compared (counted as failures)."""
    worst = 0.0
    failures: list[str] = []
    verified = skipped = 0
    for i, (url, s) in enumerate(sessions):
        if s.kept is None or not s.ready or not s.labels:
            continue
        audio = sent_audio(raw, s)
        if len(audio) > MAX_VERIFY_BYTES:
            skipped += 1
            continue
        try:
            ref = reference(cfg, url, audio, s.labels)
        except (OSError, ValueError, KeyError) as exc:  # urllib's errors are OSErrors
            detail = (
                exc.read()[:200].decode(errors="replace") if isinstance(exc, urllib.error.HTTPError) else ""
            )
            failures.append(f"session {i}: /v1/score failed: {exc} {detail}".strip())
            continue
        width = len(s.labels)
        got = [list(s.kept[r * width : (r + 1) * width]) for r in range(len(s.kept) // width)]
        verified += 1
        if s.kept_disorder:
            failures.append(f"session {i}: results out of order or missing")
        if len(got) != len(ref):
            failures.append(f"session {i}: {len(got)} results streamed, REST scored {len(ref)} steps")
            continue
        for a, b in zip(got, ref, strict=True):
            for x, y in zip(a, b, strict=True):
                d = abs(x - y)
                worst = max(worst, d if d == d else math.inf)  # NaN: as far off as can be
    return {"sessions": verified, "skipped": skipped, "max_abs_diff": worst, "failures": failures}
