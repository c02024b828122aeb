"""``tests/bench/report.py``: bound, ratios, and the median over repeated ramp pairs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from tests.bench.report import strip_blobs, summarize, to_markdown


def _ramp(n: int) -> dict[str, Any]:
    return {"max_sessions": n, "trials": [], "best": None}


def _results(pairs: Sequence[Mapping[str, int | None]] | None = None) -> dict[str, Any]:
    res: dict[str, Any] = {
        "echo": _ramp(300),
        "lookback": _ramp(150),
        "naive": _ramp(25),
        "fpm10": _ramp(250),
        "engine": {"rows": [{"sessions": 512, "ort_ceiling_fps": 375_000.0}]},
    }
    if pairs is not None:
        res["pairs"] = {"runs": pairs}
    return res


def _target(summary: dict[str, Any], prefix: str) -> float:
    return next(t["value"] for t in summary["targets"] if t["name"].startswith(prefix))


def _markdown(res: dict[str, Any], summary: dict[str, Any]) -> str:
    return to_markdown(
        {
            "results": res,
            "summary": summary,
            "model": "lookback-vad",
            "quick": False,
            "date": "d",
            "p99_ms": 20.0,
            "machine": {
                "host": "h",
                "cpu_model": "c",
                "nproc": 2,
                "server_cpu": 0,
                "client_cpus": [1],
                "loadavg_start": [0],
                "loadavg_end": [0],
            },
        }
    )


def test_single_pair_ratios_and_bound() -> None:
    s = summarize(_results(), hop_samples=128)
    assert s["model_alone_sessions"] == pytest.approx(3000.0)
    assert s["bound_sessions"] == pytest.approx(1 / (1 / 300 + 1 / 3000))
    assert _target(s, "Lookback / echo") == pytest.approx(0.5)
    assert _target(s, "Lookback / naive") == pytest.approx(6.0)
    assert _target(s, "10 frames/msg / bound") == pytest.approx(250 / s["bound_sessions"])


def test_repeated_pairs_use_medians() -> None:
    runs = [{"echo": 250, "lookback": 200}, {"echo": 320, "lookback": 160}]
    s = summarize(_results(runs), hop_samples=128)
    # pair ratios 0.5, 0.8, 0.5 -> median 0.5; medians echo 300, Lookback 160
    assert s["pair_ratios"] == pytest.approx([0.5, 0.8, 0.5])
    assert _target(s, "Lookback / echo (1 frame/msg), median of 3 pairs") == pytest.approx(0.5)
    assert (s["echo_sessions"], s["lookback_sessions"]) == (300, 160)
    assert _target(s, "Lookback / naive") == pytest.approx(160 / 25)
    md = _markdown(_results(runs), s)
    assert "150/300 = 0.50, 200/250 = 0.80, 160/320 = 0.50" in md
    assert "| Lookback / echo (1 frame/msg), median of 3 pairs | 0.50 | >= 0.8 | **no** |" in md


def test_a_failed_pair_is_left_out() -> None:
    s = summarize(_results([{"echo": None, "lookback": 100}]), hop_samples=128)
    assert s["pair_ratios"] == pytest.approx([0.5])


def test_null_twin_medians_over_triples() -> None:
    res = _results(
        [{"echo": 320, "lookback": 200, "null": 240}, {"echo": 280, "lookback": 210, "null": None}]
    )
    res["null"] = {**_ramp(200), "model": "null-lookback-vad"}
    s = summarize(res, hop_samples=128)
    # triples (null, Lookback, echo): (200, 150, 300), (240, 200, 320); the third has no null
    assert s["null_triples"] == [(200, 150, 300), (240, 200, 320)]
    assert s["null_sessions"] == 220
    assert s["null_over_echo"] == pytest.approx((200 / 300 + 240 / 320) / 2)
    assert s["lookback_over_null"] == pytest.approx((150 / 200 + 200 / 240) / 2)
    md = _markdown(res, s)
    assert "| Lookback `null-lookback-vad` (null twin: no arithmetic; not a target) | 1 | 200 |" in md
    assert "200/150/300, 240/200/320" in md


def test_model_alone_scales_with_the_hop() -> None:
    """A 512-sample hop steps once per 4 frames: the same ORT ceiling holds 4x the sessions."""
    assert summarize(_results(), hop_samples=512)["model_alone_sessions"] == pytest.approx(4 * 3000.0)


def test_strip_blobs_leaves_json_safe_values() -> None:
    raw = {"latencies": b"\x00" * 8, "p99": float("nan"), "rows": [(1, float("inf")), {"x": 2.5}]}
    assert strip_blobs(raw) == {"p99": None, "rows": [[1, None], {"x": 2.5}]}


def _with_baselines() -> dict[str, Any]:
    res = _results()
    res.update(
        handwritten=_ramp(60),
        echo10=_ramp(400),
        silero=_ramp(200),
        silero_naive=_ramp(50),
        handwritten_silero=_ramp(80),
        cpu_per_session={
            "sessions": 64,
            "fpm1": {"cpu_per_session_s": 0.008, "cpu_share": 0.512, "passed": True, "wall_s": 4.8},
            "fpm10": {
                "cpu_per_session_s": 0.003,
                "cpu_share": 0.192,
                "passed": False,
                "p99_ms": 31.0,
                "wall_s": 4.8,
            },
        },
    )
    return res


def test_hand_written_echo10_and_cpu_ratios() -> None:
    res = _with_baselines()
    s = summarize(res, hop_samples=128)
    assert _target(s, "Lookback / hand-written") == pytest.approx(150 / 60)
    assert _target(s, "Silero / hand-written Silero") == pytest.approx(200 / 80)
    assert _target(s, "10 frames/msg / echo at 10") == pytest.approx(250 / 400)
    assert _target(s, "CPU per session-second, 10 / 1") == pytest.approx(0.375)
    assert (s["times_naive"], s["times_handwritten"]) == pytest.approx((6.0, 2.5))
    md = _markdown(res, s)
    assert "| Lookback / hand-written (1 frame/msg) | 2.50 | >= 2.5 | yes |" in md
    assert "| 10 frames/msg / echo at 10 frames/msg | 0.62 | >= 0.9 | **no** |" in md
    assert "| CPU per session-second, 10 / 1 frame/msg | 0.38 | <= 0.5 | yes |" in md
    assert "| echo ceiling (same stack, instant reply) | 10 | 400 |" in md
    assert "| hand-written naive server `lookback-vad` (FastAPI + one ORT session, batch 1) | 1 | 60 |" in md
    assert "Lookback `lookback-vad`: 6.0x naive (max_batch_size=1), 2.5x hand-written" in md
    assert "Silero: 4.0x naive (max_batch_size=1), 2.5x hand-written" in md
    assert "1 frame(s)/msg 8.00 ms (51% of a core)" in md
    assert "10 frame(s)/msg 3.00 ms (19% of a core) (**not real time**: p99 31.0 ms)" in md


def test_results_batch_rows() -> None:
    """results=batch: Lookback@10 batch / echo@10 batch and CPU 10 batch / 1, next to the old rows."""
    res = _with_baselines()
    res.update(echo10_batch=_ramp(500), fpm10_batch=_ramp(470))
    res["cpu_per_session"]["fpm10_batch"] = {"cpu_per_session_s": 0.002, "cpu_share": 0.128, "passed": True}
    s = summarize(res, hop_samples=128)
    assert _target(s, "10 frames/msg results=batch / echo batch") == pytest.approx(470 / 500)
    assert _target(s, "CPU per session-second, 10 results=batch") == pytest.approx(0.25)
    assert _target(s, "CPU per session-second, 10 / 1") == pytest.approx(0.375)
    md = _markdown(res, s)
    assert "| 10 frames/msg results=batch / echo batch at 10 | 0.94 | >= 0.9 | yes |" in md
    assert "| CPU per session-second, 10 results=batch / 1 frame/msg | 0.25 | <= 0.5 | yes |" in md
    assert "| echo ceiling, results=batch | 10 | 500 |" in md
    assert "10 results=batch 2.00 ms (13% of a core)" in md and "10 batch / 1 = 0.25" in md


def test_cpu_ratio_over_the_limit_is_not_met_and_missing_runs_give_none() -> None:
    res = _with_baselines()
    res["cpu_per_session"]["fpm10"]["cpu_per_session_s"] = 0.0048
    s = summarize(res, hop_samples=128)
    row = next(t for t in s["targets"] if t["name"].startswith("CPU per session-second"))
    assert row["value"] == pytest.approx(0.6) and row["met"] is False
    bare = summarize(_results(), hop_samples=128)
    assert bare["cpu_per_session"] == {
        "fpm1": None,
        "fpm10": None,
        "ratio": None,
        "fpm10_batch": None,
        "batch_ratio": None,
    }
    assert _target(bare, "CPU per session-second, 10 results=batch") is None
    assert _target(bare, "Lookback / hand-written") is None
    md = _markdown(_results(), bare)
    assert "Lookback `lookback-vad`: 6.0x naive (max_batch_size=1)." in md
    assert "hand-written" not in md.split("| ratio |")[0]


def test_resume_redis_over_the_first_lookback_ramp() -> None:
    """Resumable + Redis checkpoints against the Lookback ramp run just before it, not the pair median."""
    res = _results([{"echo": 300, "lookback": 200}, {"echo": 300, "lookback": 210}])
    res["resume_redis"] = _ramp(140)
    s = summarize(res, hop_samples=128)
    assert s["resume_redis_over_lookback"] == pytest.approx(140 / 150)
    assert _target(s, "resumable, Redis checkpoints") == pytest.approx(140 / 150)
    md = _markdown(res, s)
    assert "| resumable, Redis checkpoints every 250 ms / Lookback | 0.93 | >= 0.9 | yes |" in md
    assert "| Lookback `lookback-vad`, resumable, Redis checkpoints every 250 ms | 1 | 140 |" in md
    assert _target(summarize(_results(), hop_samples=128), "resumable, Redis") is None


def test_null_twin_at_10_and_silero_20_over_4() -> None:
    """The server's own work at 10 frames/msg (null twin / echo) and Silero 20 / 4 frames/msg."""
    res = _with_baselines()
    res.update(null10=_ramp(300), silero4=_ramp(100), silero20=_ramp(180))
    s = summarize(res, hop_samples=128)
    assert s["null10_over_echo10"] == pytest.approx(300 / 400)
    assert _target(s, "Silero 20 frames/msg / Silero 4") == pytest.approx(1.8)
    md = _markdown(res, s)
    assert "| Silero 20 frames/msg / Silero 4 frames/msg | 1.80 | >= 1 | yes |" in md
    assert "| Lookback `silero-vad`, five hops per message | 20 | 180 |" in md
    assert _target(summarize(_results(), hop_samples=128), "Silero 20") is None


def test_cpu_per_session_of_the_null_twin() -> None:
    """The null twin's CPU ratios (the server's work without the model's math) get their rows."""
    res = _with_baselines()
    res["cpu_per_session_null"] = {
        "sessions": 64,
        "fpm1": {"cpu_per_session_s": 0.006, "cpu_share": 0.384, "passed": True},
        "fpm10": {"cpu_per_session_s": 0.0036, "cpu_share": 0.23, "passed": True},
        "fpm10_batch": {"cpu_per_session_s": 0.0024, "cpu_share": 0.15, "passed": True},
    }
    s = summarize(res, hop_samples=128)
    assert _target(s, "CPU per session-second, null twin, 10 / 1") == pytest.approx(0.6)
    assert _target(s, "CPU per session-second, null twin, 10 results=batch") == pytest.approx(0.4)
    md = _markdown(res, s)
    assert "| CPU per session-second, null twin, 10 / 1 frame/msg | 0.60 | <= 0.5 | **no** |" in md
    assert _target(summarize(_results(), hop_samples=128), "CPU per session-second, null twin") is None
