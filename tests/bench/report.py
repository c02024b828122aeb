"""The bench report's arithmetic and text: pure functions of the runner's results.

``run_all`` measures; this module derives (the model-alone bound, the ratios against their
targets, medians over back-to-back ramp pairs) and writes the markdown. Nothing here reads
files or the clock, so ``test_report.py`` checks it on hand-made results.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def max_sessions_of(res: dict[str, Any] | None) -> int | None:
    if not res or "max_sessions" not in res:
        return None
    return int(res["max_sessions"])


def p99_of(res: dict[str, Any] | None) -> str:
    best = (res or {}).get("best")
    if not best:
        return "-"
    return f"{best['latency_ms']['p99']:.1f}"


def ratio_of(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def cpu_per_session(res: dict[str, Any], key: str = "cpu_per_session") -> dict[str, float | None]:
    """Server CPU seconds per real-time session-second at 1 and 10 frames/msg (and 10 with
    results=batch), and each 10 / 1."""
    step = res.get(key) or {}
    one = (step.get("fpm1") or {}).get("cpu_per_session_s")
    ten = (step.get("fpm10") or {}).get("cpu_per_session_s")
    batch = (step.get("fpm10_batch") or {}).get("cpu_per_session_s")
    return {
        "fpm1": one,
        "fpm10": ten,
        "ratio": ten / one if one and ten is not None else None,
        "fpm10_batch": batch,
        "batch_ratio": batch / one if one and batch is not None else None,
    }


def summarize(res: dict[str, Any], hop_samples: int) -> dict[str, Any]:
    """The derived figures: model-alone sessions, the bound, ratios vs targets.

    ``hop_samples`` is the Lookback model's hop: the engine table counts frames, a session
    steps once per hop.
    """
    echo, look, naive = (
        max_sessions_of(res.get("echo")),
        max_sessions_of(res.get("lookback")),
        max_sessions_of(res.get("naive")),
    )
    # Rounds run back to back: the first ramps, then the repeated ones (echo, Lookback, null).
    rounds = [
        {"echo": echo, "lookback": look, "null": max_sessions_of(res.get("null"))},
        *(res.get("pairs") or {}).get("runs", []),
    ]
    pairs = [(r["echo"], r["lookback"]) for r in rounds if r["echo"] and r["lookback"] is not None]
    pair_ratios = [lb / e for e, lb in pairs]
    if len(pairs) > 1:  # the medians over back-to-back pairs stand for this machine
        echo = int(np.median([e for e, _ in pairs]))
        look = int(np.median([lb for _, lb in pairs]))
    # The null twin, run right after each Lookback ramp: (null, Lookback, echo) triples.
    triples = [
        (r["null"], r["lookback"], r["echo"]) for r in rounds if r.get("null") and r["lookback"] and r["echo"]
    ]
    null = int(np.median([t[0] for t in triples])) if triples else None
    sil, sil_naive, f10 = (
        max_sessions_of(res.get("silero")),
        max_sessions_of(res.get("silero_naive")),
        max_sessions_of(res.get("fpm10")),
    )
    hand, sil_hand, echo10 = (
        max_sessions_of(res.get("handwritten")),
        max_sessions_of(res.get("handwritten_silero")),
        max_sessions_of(res.get("echo10")),
    )
    # Against the first Lookback ramp, not the pair median: it ran just before, on the same load.
    resume = ratio_of(max_sessions_of(res.get("resume_redis")), max_sessions_of(res.get("lookback")))
    f10b, echo10b = max_sessions_of(res.get("fpm10_batch")), max_sessions_of(res.get("echo10_batch"))
    null10 = max_sessions_of(res.get("null10"))
    sil4, sil20 = max_sessions_of(res.get("silero4")), max_sessions_of(res.get("silero20"))
    cpu = cpu_per_session(res)
    cpu_null = cpu_per_session(res, "cpu_per_session_null")
    model_alone = None
    eng = res.get("engine") or {}
    rows = eng.get("rows") or []
    if rows:
        mid = [r for r in rows if 64 <= r.get("sessions", 0) <= 512] or rows
        ceiling = max(float(r.get("ort_ceiling_fps", 0)) for r in mid)
        model_alone = ceiling * hop_samples / 128 / 125
    bound = (1 / (1 / echo + 1 / model_alone)) if echo and model_alone else None

    ratio = ratio_of
    off = res.get("offline") or {}
    x_rt = (off.get("long") or {}).get("x_realtime")
    rss_ratio = off.get("peak_rss_ratio")
    targets = [
        (
            "Lookback / echo (1 frame/msg)" + (f", median of {len(pairs)} pairs" if len(pairs) > 1 else ""),
            float(np.median(pair_ratios)) if pair_ratios else None,
            0.8,
        ),
        ("resumable, Redis checkpoints every 250 ms / Lookback", resume, 0.9),
        ("Lookback / naive (1 frame/msg)", ratio(look, naive), 2.5),
        ("Lookback / hand-written (1 frame/msg)", ratio(look, hand), 2.5),
        ("Silero / Silero naive", ratio(sil, sil_naive), 2.0),
        ("Silero / hand-written Silero", ratio(sil, sil_hand), 2.0),
        ("10 frames/msg / naive", ratio(f10, naive), 4.0),
        ("10 frames/msg / bound", ratio(f10, bound), 0.9),
        ("10 frames/msg / echo at 10 frames/msg", ratio(f10, echo10), 0.9),
        ("10 frames/msg results=batch / echo batch at 10", ratio(f10b, echo10b), 0.9),
        (
            "10 frames/msg null twin / echo at 10 (the server's work without the model's math)",
            ratio(null10, echo10),
            0.9,
        ),
        ("Silero 20 frames/msg / Silero 4 frames/msg", ratio(sil20, sil4), 1.0),
        ("offline x real time (long clip)", x_rt, 2000.0),
    ]
    rows_t = [
        {"name": n, "value": v, "target": t, "met": None if v is None else v >= t} for n, v, t in targets
    ]
    for name, value, target in (
        ("long / short clip peak RSS", rss_ratio, 1.2),
        ("CPU per session-second, 10 / 1 frame/msg", cpu["ratio"], 0.5),
        ("CPU per session-second, 10 results=batch / 1 frame/msg", cpu["batch_ratio"], 0.5),
        ("CPU per session-second, null twin, 10 / 1 frame/msg", cpu_null["ratio"], 0.5),
        ("CPU per session-second, null twin, 10 results=batch / 1 frame/msg", cpu_null["batch_ratio"], 0.5),
    ):
        rows_t.append(
            {
                "name": name,
                "value": value,
                "target": target,
                "met": None if value is None else value <= target,
                "at_most": True,
            }
        )
    return {
        "echo_sessions": echo,
        "lookback_sessions": look,
        "pairs": pairs,
        "null_sessions": null,
        "null_triples": triples,
        "null_over_echo": float(np.median([n / e for n, _, e in triples])) if triples else None,
        "lookback_over_null": float(np.median([lb / n for n, lb, _ in triples])) if triples else None,
        "pair_ratios": pair_ratios,
        "resume_redis_over_lookback": resume,
        "times_naive": ratio(look, naive),
        "times_handwritten": ratio(look, hand),
        "silero_times_naive": ratio(sil, sil_naive),
        "silero_times_handwritten": ratio(sil, sil_hand),
        "echo10_sessions": echo10,
        "echo10_batch_sessions": echo10b,
        "null10_over_echo10": ratio(null10, echo10),
        "silero20_over_silero4": ratio(sil20, sil4),
        "cpu_per_session": cpu,
        "cpu_per_session_null": cpu_null,
        "model_alone_sessions": model_alone,
        "bound_sessions": bound,
        "targets": rows_t,
    }


def to_markdown(report: dict[str, Any]) -> str:
    res = report["results"]
    s = report["summary"]
    m = report["machine"]
    model = report["model"]
    lines = [
        f"# Lookback benchmark {report['date']} on {m['host']}",
        "",
        f"{m['cpu_model']}, nproc {m['nproc']}; server pinned to CPU {m['server_cpu']}, "
        f"load generator to CPU(s) {m['client_cpus']}; load average {m['loadavg_start']} at "
        f"start, {m['loadavg_end']} at end. Model `{model}`"
        + (" (quick smoke pass: tiny durations, numbers not meaningful)" if report["quick"] else "")
        + ".",
        "",
        f"Real-time sessions: each streams 128-sample frames at 16 kHz (one frame per 8 ms); "
        f"the largest N with p99 frame-to-result latency <= {report['p99_ms']:g} ms and no "
        "result lost (ramp: doubling, then bisection).",
        "",
        "| run | frames/msg | max sessions | p99 ms at max | results/s at max | client CPU at max "
        "| client send lateness p99 ms | trials |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    names = [
        ("echo", "echo ceiling (same stack, instant reply)", 1),
        ("lookback", f"Lookback `{model}`", 1),
        (
            "null",
            f"Lookback `{(res.get('null') or {}).get('model', 'null twin')}` "
            "(null twin: no arithmetic; not a target)",
            1,
        ),
        ("resume_redis", f"Lookback `{model}`, resumable, Redis checkpoints every 250 ms", 1),
        ("naive", f"Lookback `{model}`, max_batch_size=1", 1),
        ("handwritten", f"hand-written naive server `{model}` (FastAPI + one ORT session, batch 1)", 1),
        ("echo10", "echo ceiling (same stack, instant reply)", 10),
        ("fpm10", f"Lookback `{model}`", 10),
        ("echo10_batch", "echo ceiling, results=batch", 10),
        ("fpm10_batch", f"Lookback `{model}`, results=batch", 10),
        ("null10", f"Lookback `null-{model}` (null twin: no arithmetic)", 10),
        ("silero", "Lookback `silero-vad` (hop 512)", 1),
        ("silero4", "Lookback `silero-vad`, one hop per message", 4),
        ("silero20", "Lookback `silero-vad`, five hops per message", 20),
        ("silero_naive", "Lookback `silero-vad`, max_batch_size=1", 1),
        ("handwritten_silero", "hand-written naive server `silero-vad`", 1),
        ("workers", f"2 server processes (one per CPU), `{model}`", 1),
    ]
    for key, label, fpm in names:
        r = res.get(key)
        if r is None:
            continue
        if "max_sessions" not in r:
            lines.append(f"| {label} | {fpm} | {r.get('error') or r.get('skipped') or '-'} | | | | | |")
            continue
        best = r.get("best") or {}
        client = best.get("client", {})
        cpu = client.get("cpu_total")
        warn = " (client-bound?)" if r.get("client_bottleneck") else ""
        lines.append(
            f"| {label} | {fpm} | {r['max_sessions']}{warn} | {p99_of(r)} | "
            f"{fmt(best.get('results_per_s'), '.0f')} | "
            f"{'-' if cpu is None else f'{cpu * 100:.0f}%'} | "
            f"{fmt(client.get('slip_p99_ms'), '.1f')} | {len(r['trials'])} |"
        )
    flagged = [
        (label, r["best"]["client"]["reasons"])
        for key, label, _ in names
        if (r := res.get(key)) and r.get("client_bottleneck") and r.get("best")
    ]
    if flagged:
        lines.append("")
    for label, reasons in flagged:
        lines.append(f"- {label}: client may have been the limit: {'; '.join(reasons)}")
    if len(s["pairs"]) > 1:
        each = ", ".join(
            f"{lb}/{e} = {r:.2f}" for (e, lb), r in zip(s["pairs"], s["pair_ratios"], strict=True)
        )
        lines += [
            "",
            f"Echo and Lookback (1 frame/msg) ramps, {len(s['pairs'])} pairs run back "
            f"to back (the first pair is in the table above), Lookback/echo: {each}. "
            f"Medians: echo {s['echo_sessions']}, Lookback {s['lookback_sessions']}; the "
            "ratio row and the bound below use the medians.",
        ]
    if s.get("null_triples"):
        each = ", ".join(f"{n}/{lb}/{e}" for n, lb, e in s["null_triples"])
        lines += [
            "",
            f"Null twin / Lookback / echo, each run back to back: {each}. Medians: null "
            f"twin / echo {s['null_over_echo']:.2f} (everything the server does per step "
            f"but the model's math), Lookback / null twin {s['lookback_over_null']:.2f} "
            "(what the math costs on top).",
        ]
    times = []
    for who, k in ((f"Lookback `{model}`", "times_"), ("Silero", "silero_times_")):
        got = [
            f"{s[k + key]:.1f}x {label}"
            for key, label in (("naive", "naive (max_batch_size=1)"), ("handwritten", "hand-written"))
            if s.get(k + key) is not None
        ]
        if got:
            times.append(f"{who}: " + ", ".join(got))
    if times:
        lines += ["", "Capacity at 1 frame/msg: " + "; ".join(times) + "."]
    cpu_step = res.get("cpu_per_session") or {}
    if "fpm1" in cpu_step or "fpm10" in cpu_step:
        parts = []
        kinds = (
            ("fpm1", "1 frame(s)/msg"),
            ("fpm10", "10 frame(s)/msg"),
            ("fpm10_batch", "10 results=batch"),
        )
        for key, what in kinds:
            r = cpu_step.get(key) or {}
            if "cpu_per_session_s" not in r:
                continue
            late = "" if r.get("passed") else f" (**not real time**: p99 {fmt(r.get('p99_ms'), '.1f')} ms)"
            parts.append(
                f"{what} {r['cpu_per_session_s'] * 1e3:.2f} ms ({r['cpu_share'] * 100:.0f}% of a core){late}"
            )
        lines += [
            "",
            f"Server CPU seconds per real-time session-second at {cpu_step.get('sessions')} "
            f"sessions (/proc utime + stime over {fmt((cpu_step.get('fpm1') or {}).get('wall_s'), '.1f')} s "
            f"of the measured window): " + ", ".join(parts) + f"; 10 / 1 = "
            f"{fmt(s['cpu_per_session']['ratio'], '.2f')}, 10 batch / 1 = "
            f"{fmt(s['cpu_per_session']['batch_ratio'], '.2f')} (target <= 0.5).",
        ]
    elif cpu_step:
        lines += ["", f"CPU per session: {cpu_step.get('error') or cpu_step.get('skipped')}"]
    lines += [
        "",
        f"Model alone (ORT ceiling / 125 frames/s): "
        f"{fmt(s['model_alone_sessions'], '.0f')} sessions; bound "
        f"1/(1/echo + 1/model_alone) = {fmt(s['bound_sessions'], '.0f')} sessions.",
        "",
    ]
    off = res.get("offline") or {}
    if "long" in off:
        lines += [
            "| offline clip | audio s | wall s | x real time | server peak RSS MiB |",
            "| --- | --- | --- | --- | --- |",
        ]
        for k in ("short", "long"):
            o = off[k]
            lines.append(
                f"| {k} | {o['audio_s']:.0f} | {o['seconds']:.2f} | {o['x_realtime']:.0f} | "
                f"{o['peak_rss'] / 2**20:.0f} |"
            )
        lines.append("")
    elif off:
        lines += [f"Offline: {off.get('error') or off.get('skipped')}", ""]
    soak = res.get("soak") or {}
    if "rss_end_mib" in soak:
        lines += [
            f"Soak: {soak['sessions']} sessions churned in {soak['seconds']} s; RSS after "
            f"warm-up {soak['rss_warm_mib']} MiB, at end {soak['rss_end_mib']} MiB "
            f"({soak['rss_change_pct']:+.2f}%, target within 5%); slots in use "
            f"{soak['slots_used']}; fds {soak['fds_warm']} -> {soak['fds_end']}.",
            "",
        ]
    mem = res.get("memory") or {}
    if "bytes_per_session" in mem:
        lines += [
            f"Memory: server RSS {mem['rss_0'] / 2**20:.0f} MiB with 0 sessions, "
            f"{mem['rss_n'] / 2**20:.0f} MiB with {mem['ready']} idle sessions: "
            f"{mem['bytes_per_session'] / 1024:.1f} KiB per session.",
            "",
        ]
    lines += ["| ratio | value | target | met |", "| --- | --- | --- | --- |"]
    for t in s["targets"]:
        op = "<=" if t.get("at_most") else ">="
        met = "-" if t["met"] is None else ("yes" if t["met"] else "**no**")
        lines.append(f"| {t['name']} | {fmt(t['value'], '.2f')} | {op} {t['target']:g} | {met} |")
    eng = res.get("engine") or {}
    if eng.get("markdown"):
        lines += ["", eng["markdown"]]
    elif eng:
        lines += ["", f"Engine bench: {eng.get('error') or eng.get('skipped')}"]
    w = res.get("workers") or {}
    if w.get("how"):
        lines += ["", f"Two server processes: {w['how']}."]
    return "\n".join(lines) + "\n"


def fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def strip_blobs(obj: Any) -> Any:
    """JSON-safe copy without raw byte blobs."""
    if isinstance(obj, dict):
        return {k: strip_blobs(v) for k, v in obj.items() if not isinstance(v, bytes | bytearray)}
    if isinstance(obj, list | tuple):
        return [strip_blobs(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
