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
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from lookback.loadtest.config import LoadConfig, auth_headers, http_base, wire_rate
from lookback.loadtest.rawclient import SessionBase

if TYPE_CHECKING:
    import numpy as np

MAX_VERIFY_BYTES = 64 * 1024 * 1024


def sent_audio(raw: list[bytes], session: SessionBase) -> bytes:
    """The audio ``session`` sent: its messages (``raw``: without WebSocket framing) in order."""
    n = len(raw)
    return b"".join(raw[(session.first_msg + i) % n] for i in range(len(session.send_times)))


def reference(cfg: LoadConfig, url: str, audio: bytes, labels: list[str]) -> np.ndarray:
    """``/v1/score`` of ``audio`` in the run's wire form: ``[steps, labels]`` in ``labels`` order."""
    import numpy as np

    query = {"model": cfg.model, "version": cfg.version, "encoding": cfg.encoding}
    query["sample_rate"] = str(wire_rate(cfg))
    req = urllib.request.Request(
        f"{http_base(url)}/v1/score?{urlencode({k: v for k, v in query.items() if v is not None})}",
        data=audio,
        headers={"Content-Type": "application/octet-stream", **auth_headers(cfg)},
    )
    with urllib.request.urlopen(req, timeout=120) as resp:
        scores = json.loads(resp.read())["scores"]
    return np.array([scores[lab] for lab in labels], np.float64).T.reshape(-1, len(labels))


def check(cfg: LoadConfig, sessions: list[tuple[str, SessionBase]], raw: list[bytes]) -> dict[str, Any]:
    """Each (URL, session) pair's kept scores against REST: the largest difference, and what
    could not be compared (counted as failures)."""
    import numpy as np

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
            want = reference(cfg, url, audio, s.labels)
        except (OSError, ValueError, KeyError) as exc:  # urllib's errors are OSErrors
            detail = ""
            if isinstance(exc, urllib.error.HTTPError):  # the error body says why
                detail = exc.read()[:200].decode(errors="replace")
            failures.append(f"session {i}: /v1/score failed: {exc} {detail}".strip())
            continue
        got = np.frombuffer(s.kept, np.float64).reshape(-1, len(s.labels))
        verified += 1
        if s.kept_disorder:
            failures.append(f"session {i}: results out of order or missing")
        if got.shape != want.shape:
            failures.append(f"session {i}: {len(got)} results streamed, REST scored {len(want)} steps")
        elif got.size:
            diff = np.abs(got - want)  # NaN anywhere: as far off as can be
            worst = max(worst, math.inf if np.isnan(diff).any() else float(diff.max()))
    return {"sessions": verified, "skipped": skipped, "max_abs_diff": worst, "failures": failures}
