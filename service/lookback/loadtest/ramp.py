"""The ramp: the largest number of sessions that passes, by bracketing then bisection."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from lookback.loadtest.config import MAX_SESSIONS, LoadConfig, check_urls, http_base, log
from lookback.loadtest.fanout import run_load
from lookback.loadtest.report import fmt, trial_row


def wait_server_idle(url: str, timeout: float = 15.0) -> None:
    """Between trials: until the server reports no open sessions (if it says so at all)."""
    import httpx

    deadline = time.monotonic() + timeout
    base = http_base(url)
    while time.monotonic() < deadline:
        try:
            body = httpx.get(f"{base}/readyz", timeout=2.0).json()
        except Exception:
            return
        if not isinstance(body, dict) or not body.get("sessions"):
            return
        time.sleep(0.2)


def ramp(
    cfg: LoadConfig,
    *,
    start: int = 32,
    max_sessions: int = 4096,
    max_trials: int = 10,
    precision: float = 0.05,
    max_time: float = 300.0,
    retry_noisy: bool = True,
    on_trial: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Exponential search up from ``start`` (down when it fails), then bisection.

    A trial passes when every session connected, p99 <= the bound, nothing was lost and no
    error came back. Stops when the gap between the largest pass and the smallest fail is
    within ``precision`` (or 2 sessions), after ``max_trials`` trials, or past ``max_time``.
    With ``retry_noisy``, a trial that fails while the client could not keep its own send
    schedule (a busy machine, not necessarily the server) is run once more at the same N.
    """
    check_urls(cfg)
    max_sessions = max(1, min(max_sessions, MAX_SESSIONS))
    t_start = time.monotonic()
    trials: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    lo, hi = 0, max_sessions + 1
    n = max(1, min(start, max_sessions))
    stop = "max_trials"
    retried: set[int] = set()
    while len(trials) < max_trials:
        for url in cfg.urls:
            wait_server_idle(url)
        r = run_load(replace(cfg, sessions=n, fail_fast=True))
        trials.append(r)
        log(
            cfg,
            f"ramp trial {len(trials)}: N={n}  p99 {fmt(r['latency_ms']['p99'])} ms  "
            f"lost {r['lost_results']}  errors {sum(r['errors'].values())}  "
            f"client cpu {r['client']['cpu_total'] * 100:.0f}%  "
            f"{'PASS' if r['passed'] else 'FAIL'}"
            + ("  (client schedule slipped)" if r["client"]["bottleneck"] else ""),
        )
        if on_trial is not None:
            on_trial(r)
        if (
            retry_noisy
            and not r["passed"]
            and r["client"]["bottleneck"]
            and n not in retried
            and len(trials) < max_trials
            and time.monotonic() - t_start + cfg.warmup + cfg.duration + 5 <= max_time
        ):
            retried.add(n)
            r["retried"] = True
            log(cfg, f"ramp: the client slipped while N={n} failed; running it once more")
            continue
        if r["passed"]:
            lo = n
            best = r
        else:
            hi = n
        if lo >= max_sessions:
            stop = "max_sessions"
            break
        if hi <= 1:
            stop = "nothing_passes"
            break
        if hi > max_sessions:
            n = min(max_sessions, lo * 2)
        elif lo == 0:
            n = max(1, hi // 2)
        else:
            if hi - lo <= max(2, math.ceil(precision * lo)):
                stop = "converged"
                break
            n = (lo + hi) // 2
        # A trial takes about connect + warm-up + duration + end: do not start one past the budget.
        if time.monotonic() - t_start + cfg.warmup + cfg.duration + 5 > max_time:
            stop = "max_time"
            break
    return {
        "max_sessions": lo,
        "first_fail": hi if hi <= max_sessions else None,
        "stop": stop,
        "bound_ms": cfg.p99_ms,
        "frames_per_message": cfg.frames_per_message,
        "best": best,
        "trials": [trial_row(t) for t in trials],
        "client_bottleneck": bool(best and best["client"]["bottleneck"]),
        "elapsed_s": time.monotonic() - t_start,
    }
