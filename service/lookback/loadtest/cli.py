"""``lookback loadtest`` arguments (``lookback.cli`` adds the subparser and calls ``main_args``)."""

from __future__ import annotations

import sys
from typing import Any

import orjson

from lookback.loadtest.config import SESSIONS_PER_PROC, LoadConfig, LoadtestError
from lookback.loadtest.fanout import run_load
from lookback.loadtest.ramp import ramp
from lookback.loadtest.report import format_ramp, format_report


def add_arguments(p: Any) -> None:
    p.add_argument(
        "--url",
        action="append",
        default=None,
        help="server WebSocket URL (ws://127.0.0.1:8000); repeat to split sessions over several servers",
    )
    p.add_argument("--sessions", type=int, default=100, help="concurrent sessions (ramp: start)")
    p.add_argument(
        "--ramp", action="store_true", help="search the largest N with p99 <= --p99-ms and nothing lost"
    )
    p.add_argument("--p99-ms", type=float, default=20.0, help="latency bound (ms)")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per run/trial")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds streamed before measuring")
    p.add_argument(
        "--wav", help="mono clip to loop, at --sample-rate (default 16 kHz; default: synthetic tone + noise)"
    )
    p.add_argument("--model")
    p.add_argument("--version")
    p.add_argument("--frames-per-message", type=int, default=1)
    p.add_argument(
        "--encoding",
        choices=["pcm_s16le", "pcm_f32le", "mulaw", "alaw"],
        default="pcm_s16le",
        help="wire encoding (mulaw/alaw: G.711 telephony; the server decodes it)",
    )
    p.add_argument(
        "--sample-rate",
        type=int,
        help="send audio at this rate (8000 ... 48000; the server resamples); default the model's 16000",
    )
    p.add_argument(
        "--message-ms",
        type=int,
        default=20,
        help="ms of audio a message when the form is not 16 kHz PCM (default 20, a telephony packet)",
    )
    p.add_argument(
        "--procs",
        type=int,
        default=0,
        help=f"client processes (default: <= {SESSIONS_PER_PROC} sessions each at 1 "
        "frame/message, up to twice that with bigger messages)",
    )
    p.add_argument("--cpus", help="pin client processes to these CPUs, e.g. 1 or 2-3")
    p.add_argument(
        "--client",
        choices=["raw", "websockets"],
        default="raw",
        help="raw: the minimal built-in client; websockets: the library (cross-check)",
    )
    p.add_argument(
        "--results",
        choices=["all", "batch", "events"],
        default="all",
        help="results query: all (one message per step), batch (one per model call), events",
    )
    p.add_argument(
        "--result-format",
        choices=["json", "binary"],
        default="json",
        help="results as JSON text or as binary float32 rows (result_format query)",
    )
    p.add_argument("--max-sessions", type=int, default=4096, help="ramp: upper limit")
    p.add_argument("--max-trials", type=int, default=10, help="ramp: trials at most")
    p.add_argument("--max-time", type=float, default=300.0, help="ramp: seconds at most")
    p.add_argument("--api-key")
    p.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow a non-loopback host (you are loading someone's server)",
    )
    p.add_argument(
        "--verify",
        type=int,
        default=4,
        help="sessions whose scores are checked against /v1/score for the audio they sent "
        "(default 4; 0 for a server without the REST endpoint)",
    )
    p.add_argument("--json", help="write the full report here")


def parse_cpus(text: str | None) -> list[int] | None:
    if not text:
        return None
    out: list[int] = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        out.extend(range(int(a), int(b or a) + 1))
    return out


def main_args(args: Any) -> int:
    cfg = LoadConfig(
        urls=args.url or ["ws://127.0.0.1:8000"],
        sessions=args.sessions,
        duration=args.duration,
        warmup=args.warmup,
        wav=args.wav,
        model=args.model,
        version=args.version,
        frames_per_message=args.frames_per_message,
        procs=args.procs,
        p99_ms=args.p99_ms,
        api_key=args.api_key,
        client=args.client,
        allow_remote=args.allow_remote,
        cpus=parse_cpus(args.cpus),
        results=args.results,
        result_format=args.result_format,
        encoding=args.encoding,
        sample_rate=args.sample_rate,
        message_ms=args.message_ms,
        verify=args.verify,
    )
    try:
        if args.ramp:
            res = ramp(
                cfg,
                start=args.sessions,
                max_sessions=args.max_sessions,
                max_trials=args.max_trials,
                max_time=args.max_time,
            )
            text = format_ramp(res)
            passed = res["max_sessions"] > 0
        else:
            res = run_load(cfg)
            text = format_report(res)
            passed = bool(res["passed"])
    except LoadtestError as exc:
        print(f"loadtest: {exc}", file=sys.stderr)
        return 2
    print(text)
    if args.json:
        with open(args.json, "wb") as f:
            f.write(orjson.dumps(res, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    return 0 if passed else 1
