"""Merging the client processes' counts into one report, and the text forms of reports."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import asdict
from typing import Any

from lookback.loadtest.config import CLIENT_CPU_LIMIT, SLIP_LIMIT_S, VERIFY_TOLERANCE, LoadConfig, proc_count


def merge(cfg: LoadConfig, outs: list[dict[str, Any]], failures: list[str]) -> dict[str, Any]:
    import numpy as np

    lat = np.concatenate([np.frombuffer(o["latencies"], np.float64) for o in outs]) if outs else np.zeros(0)
    lat_ms = lat * 1e3

    def pct(q: float) -> float | None:
        return float(np.percentile(lat_ms, q)) if lat_ms.size else None

    def add(key: str) -> int:
        return int(sum(o[key] for o in outs))

    def counts(key: str) -> dict[str, int]:
        c: Counter[str] = Counter()
        for o in outs:
            c.update(o[key])
        return dict(c)

    cpus = [o["cpu"] for o in outs]
    try:
        ncpu = len(cfg.cpus) if cfg.cpus else len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        ncpu = os.cpu_count() or 1
    total_cpu = sum(cpus)
    slip_p99 = max((o["slip_p99_ms"] for o in outs), default=0.0)
    reasons = []
    if cpus and max(cpus) > CLIENT_CPU_LIMIT:
        reasons.append(f"a client process used {max(cpus) * 100:.0f}% of a core")
    if total_cpu > CLIENT_CPU_LIMIT * ncpu:
        reasons.append(f"client processes used {total_cpu * 100:.0f}% of their {ncpu} CPU(s)")
    if slip_p99 > SLIP_LIMIT_S * 1e3:
        why = (
            ""
            if max(cpus, default=0) > 0.5
            else f"; the client itself used at most {max(cpus, default=0) * 100:.0f}% of a core, so "
            "other work on its CPU(s) delays it"
        )
        reasons.append(f"sends ran late against their schedule (p99 {slip_p99:.1f} ms){why}")
    msgs = sum(o["messages"] for o in outs)
    us_per_msg = sum(o["cpu_s"] for o in outs) / msgs * 1e6 if msgs else None
    late = int((lat_ms > cfg.p99_ms).sum())
    errors = counts("errors")
    conn_fail = counts("connect_failures")
    connected = add("connected")
    lost = add("lost_results")
    p99 = pct(99)
    window = max((o["window_s"] for o in outs), default=0.0) or cfg.duration
    checks = [o["verify"] for o in outs if o.get("verify")]
    verified = None
    if checks:
        verified = {
            "sessions": sum(c["sessions"] for c in checks),
            "skipped": sum(c["skipped"] for c in checks),
            "max_abs_diff": max(c["max_abs_diff"] for c in checks),
            "tolerance": VERIFY_TOLERANCE,
            "failures": [f for c in checks for f in c["failures"]],
        }
        verified["passed"] = not verified["failures"] and verified["max_abs_diff"] <= VERIFY_TOLERANCE
    ok = (
        not failures
        and connected == cfg.sessions
        and lost == 0
        and not errors
        and p99 is not None
        and p99 <= cfg.p99_ms
        and (verified is None or verified["passed"])
    )
    return {
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("api_key", "quiet")},
        "sessions": cfg.sessions,
        "procs": len(outs) or proc_count(cfg),
        "frames_per_message": cfg.frames_per_message,
        "connected": connected,
        "connect_s": max((o["connect_s"] for o in outs), default=0.0),
        "connect_failures": conn_fail,
        "measured_s": window,
        "results_measured": int(lat_ms.size),
        "results_per_s": lat_ms.size / window if window else 0.0,
        "results_total": add("results"),
        "frames_sent": add("frames_sent"),
        "frames_per_s": add("frames_sent") / (cfg.warmup + cfg.duration),
        "latency_ms": {
            "p50": pct(50),
            "p90": pct(90),
            "p99": p99,
            "p99.9": pct(99.9),
            "max": float(lat_ms.max()) if lat_ms.size else None,
            "mean": float(lat_ms.mean()) if lat_ms.size else None,
        },
        "bound_ms": cfg.p99_ms,
        "late": late,
        "late_fraction": late / lat_ms.size if lat_ms.size else 0.0,
        "lost_results": lost,
        "no_summary": add("no_summary"),
        "send_skipped": add("send_skipped"),
        "errors": errors,
        "close_codes": counts("close_codes"),
        "events": add("events"),
        "end_wait_s": max((o["end_wait_s"] for o in outs), default=0.0),
        "ended_early": any(o.get("ended_early") for o in outs),
        "client": {
            "cpu_per_proc": cpus,
            "cpu_total": total_cpu,
            "cpus_available": ncpu,
            "cpu_us_per_message": us_per_msg,
            "slip_p50_ms": max((o["slip_p50_ms"] for o in outs), default=0.0),
            "slip_p99_ms": slip_p99,
            "slip_max_ms": max((o["slip_max_ms"] for o in outs), default=0.0),
            "bottleneck": bool(reasons),
            "reasons": reasons,
        },
        "process_failures": failures,
        "verify": verified,
        "passed": ok,
    }


def fmt(v: float | None, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def format_report(r: dict[str, Any]) -> str:
    c = r["config"]
    lat = r["latency_ms"]
    cl = r["client"]
    encoding, rate = c.get("encoding", "pcm_s16le"), c.get("sample_rate") or 16000
    if encoding in ("pcm_s16le", "pcm_f32le") and rate == 16000:
        per = f"{r['frames_per_message']} frame(s)/message"
    else:
        per = f"{c['message_ms']} ms/message"
    form = "" if (encoding, rate) == ("pcm_s16le", 16000) else f" {encoding} at {rate} Hz,"
    lines = [
        f"{r['sessions']} sessions x {per},{form} "
        f"model {c.get('model') or '(server default)'}, {r['measured_s']:.1f} s measured after "
        f"{c['warmup']:.1f} s warm-up, {r['procs']} client process(es), {c['client']} client",
        f"  connected {r['connected']}/{r['sessions']} in {r['connect_s']:.1f} s"
        + (f"; refused/failed: {r['connect_failures']}" if r["connect_failures"] else ""),
        f"  results {r['results_measured']} measured ({r['results_per_s']:.0f}/s); "
        f"frames sent {r['frames_sent']} ({r['frames_per_s']:.0f}/s)",
        f"  latency ms: p50 {fmt(lat['p50'])}  p90 {fmt(lat['p90'])}  p99 {fmt(lat['p99'])}  "
        f"p99.9 {fmt(lat['p99.9'])}  max {fmt(lat['max'])}   (bound {r['bound_ms']:g} ms)",
        f"  late (> {r['bound_ms']:g} ms): {r['late']} ({r['late_fraction'] * 100:.3f}%)   "
        f"lost results: {r['lost_results']}   no summary: {r['no_summary']}   "
        f"sends skipped (server not reading): {r['send_skipped']}",
        f"  errors: {r['errors'] or 'none'}   close codes: {r['close_codes'] or '-'}",
        f"  client: CPU {cl['cpu_total'] * 100:.0f}% of {cl['cpus_available']} CPU(s) "
        f"(per process max {max(cl['cpu_per_proc'], default=0) * 100:.0f}%; "
        f"{fmt(cl['cpu_us_per_message'], '.1f')} us per message sent or received), send lateness "
        f"p50 {cl['slip_p50_ms']:.2f} p99 {cl['slip_p99_ms']:.2f} max {cl['slip_max_ms']:.1f} ms",
    ]
    if r.get("ended_early"):
        lines.append(
            "  (p99 was over the bound when sending ended: waited <= 1 s for the rest, so "
            "results still in flight count as lost)"
        )
    if cl["bottleneck"]:
        lines.append("  WARNING: the client may be the bottleneck: " + "; ".join(cl["reasons"]))
    for f in r["process_failures"]:
        lines.append(f"  FAILURE: {f}")
    v = r.get("verify")
    if v:
        skipped = f", {v['skipped']} skipped (too long to upload)" if v["skipped"] else ""
        lines.append(
            f"  scores of {v['sessions']} session(s) against /v1/score: max abs diff "
            f"{v['max_abs_diff']:.1e} (bound {v['tolerance']:g}){skipped}"
        )
        lines += [f"  VERIFY FAILURE: {f}" for f in v["failures"]]
    checked = ", scores match REST" if v else ""
    verdict = "PASS" if r["passed"] else "FAIL"
    lines.append(f"  {verdict} (p99 <= {r['bound_ms']:g} ms, nothing lost, no errors{checked})")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# Ramp: the largest N that passes


def trial_row(r: dict[str, Any]) -> dict[str, Any]:
    return {
        "sessions": r["sessions"],
        "passed": r["passed"],
        "retried": bool(r.get("retried")),
        "p50_ms": r["latency_ms"]["p50"],
        "p99_ms": r["latency_ms"]["p99"],
        "p999_ms": r["latency_ms"]["p99.9"],
        "results_per_s": r["results_per_s"],
        "lost": r["lost_results"],
        "errors": sum(r["errors"].values()),
        "connected": r["connected"],
        "client_cpu": r["client"]["cpu_total"],
        "client_bottleneck": r["client"]["bottleneck"],
        "slip_p99_ms": r["client"]["slip_p99_ms"],
    }


def format_ramp(res: dict[str, Any]) -> str:
    lines = [
        f"ramp (p99 <= {res['bound_ms']:g} ms, nothing lost, "
        f"{res['frames_per_message']} frame(s)/message): trials"
    ]
    lines.append("  sessions  pass   p50 ms   p99 ms  p99.9 ms  results/s  lost  errors  client cpu")
    for t in res["trials"]:
        verdict = "yes" if t["passed"] else ("no*" if t.get("retried") else "no ")
        lines.append(
            f"  {t['sessions']:8d}  {verdict:4s} "
            f"{fmt(t['p50_ms']):>7s}  {fmt(t['p99_ms']):>7s}  {fmt(t['p999_ms']):>8s}  "
            f"{t['results_per_s']:9.0f}  {t['lost']:4d}  {t['errors']:6d}  "
            f"{t['client_cpu'] * 100:6.0f}%"
            f"{' (client slipped)' if t['client_bottleneck'] else ''}"
        )
    if any(t.get("retried") for t in res["trials"]):
        lines.append("  (no* = failed while the client's own schedule slipped; run once more)")
    lines.append(
        f"  => {res['max_sessions']} real-time sessions "
        f"(first failure at {res['first_fail'] or '-'}; stop: {res['stop']}; "
        f"{res['elapsed_s']:.0f} s)"
    )
    if res["client_bottleneck"]:
        lines.append(
            "  WARNING: the client was near its limit (or could not keep its schedule) "
            "in the best trial; the server may hold more"
        )
    if res["best"] is not None:
        lines.append("best trial:")
        lines.append(format_report(res["best"]))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
