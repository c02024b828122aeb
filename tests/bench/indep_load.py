"""An independent load generator for ``/v1/stream``: no Lookback code, another WebSocket stack.

Issue 25 asks that the project's own load generator (``lookback loadtest``: its raw
framing, its fan-out, its verification) and an independent one agree on what a server
sustains. This one shares nothing with it but the wire protocol: picows' Cython client
for the framing, the stdlib ``wave`` module for the audio, one asyncio scheduler that
sends every session's next message when it is due (real time, starts spread over one
period; uvloop when installed), and latency taken per result from the send of the message that completed the
result's hop to its arrival. A run passes when p99 <= ``--p99-ms``, no result is lost
(every hop sent before ``end`` is answered, in order), no error message arrives, and the
scores of ``--verify`` sessions equal, within the README's 1e-5, what the REST endpoint
gives for the exact bytes each of them sent (one batched call of another code path).

    python -m tests.bench.indep_load --url ws://127.0.0.1:8000 --sessions 300 \
        --seconds 6 --warmup 2 --wav tests/fixtures/audio/silero_ref_speech.wav [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import resource
import sys
import time
import urllib.request
import wave
from typing import Any

import orjson
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

RATE = 16000
FRAME = 128
TOLERANCE = 1e-5  # stream against REST: another graph, the README's bound
SLACK = 0.001  # s: sends due this soon share a wake-up (latency counts from the real send)


class Session(WSListener):
    """One stream: sends are driven by the scheduler, results recorded here."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.transport: WSTransport | None = None
        self.ready = asyncio.get_running_loop().create_future()
        self.closed = asyncio.get_running_loop().create_future()
        self.hop_frames = 1
        self.sent: list[float] = []  # send time of each message
        self.next_step = 0  # results must arrive in step order, none skipped
        self.verify = False
        self.errors = 0
        self.out_of_order = 0
        self.summary: dict[str, Any] | None = None
        self.scores: list[float] = []  # the first label's, in step order
        self.audio = bytearray()  # what was sent, for the REST cross-check

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.TEXT:
            now = time.monotonic()
            msg = orjson.loads(frame.get_payload_as_bytes())
            kind = msg.get("type")
            if kind == "result":
                step = msg["step"]
                if step != self.next_step:
                    self.out_of_order += 1
                self.next_step = step + 1
                self.scores.append(next(iter(msg["scores"].values())))
                # the message that completed this hop: its last frame's message
                last_frame = (step + 1) * self.hop_frames - 1
                sent = self.sent[last_frame // self.run.fpm]
                if self.run.measuring_from <= sent < self.run.measuring_to:
                    self.run.latencies.append(now - sent)
            elif kind == "ready":
                self.hop_frames = max(1, int(msg["hop_samples"]) // FRAME)
                if not self.ready.done():
                    self.ready.set_result(None)
            elif kind == "summary":
                self.summary = msg
            elif kind == "error":
                self.errors += 1
        elif frame.msg_type == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code(), frame.get_close_message())
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("closed before ready"))


class Run:
    def __init__(self, args: argparse.Namespace, audio: bytes) -> None:
        self.args = args
        self.fpm = args.frames_per_message
        msg_bytes = FRAME * 2 * self.fpm
        self.msgs = [audio[i : i + msg_bytes] for i in range(0, len(audio) - msg_bytes + 1, msg_bytes)]
        self.period = FRAME * self.fpm / RATE
        self.latencies: list[float] = []
        self.measuring_from = self.measuring_to = 0.0

    async def main(self) -> dict[str, Any]:
        a = self.args
        url = f"{a.url.rstrip('/')}/v1/stream?encoding=pcm_s16le&results=all"
        sessions: list[Session] = []
        for i in range(0, a.sessions, 50):  # connect in waves: a listen backlog is finite
            batch = await asyncio.gather(
                *[ws_connect(lambda: Session(self), url) for _ in range(min(50, a.sessions - i))]
            )
            sessions += [listener for _, listener in batch]  # type: ignore[misc]
        await asyncio.gather(*[s.ready for s in sessions])
        for s in sessions[: a.verify]:
            s.verify = True
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.monotonic() + 0.05
        self.measuring_from = t0 + a.warmup
        self.measuring_to = self.measuring_from + a.seconds
        end = self.measuring_to + self.period
        rng = random.Random(0)
        # every session has the same period: visit them in the order of their phase, one
        # after another, so a send costs O(1) whatever the number of sessions
        phases = sorted((rng.random() * self.period, s) for s in sessions)
        n_msgs, k, late = len(self.msgs), 0, 0
        while True:
            phase, s = phases[k % len(phases)]
            due = t0 + (k // len(phases)) * self.period + phase
            if due >= end:
                break
            now = time.monotonic()
            if due > now + SLACK:  # what is due within SLACK goes out on this wake-up
                await asyncio.sleep(due - now)
                now = time.monotonic()
            elif now - due > 0.005:
                late += 1
            assert s.transport is not None
            msg = self.msgs[len(s.sent) % n_msgs]
            s.sent.append(now)
            s.transport.send(WSMsgType.BINARY, msg)
            if s.verify:
                s.audio += msg
            k += 1
        for s in sessions:
            assert s.transport is not None
            s.transport.send(WSMsgType.TEXT, b'{"type": "end"}')
        await asyncio.wait([s.closed for s in sessions], timeout=a.end_timeout)
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        wall = time.monotonic() - t0
        cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
        expected = sum(len(s.sent) * self.fpm // s.hop_frames for s in sessions)
        received = sum(s.next_step for s in sessions)
        lat = sorted(self.latencies)

        def pct(q: float) -> float | None:
            return lat[min(len(lat) - 1, int(q * len(lat)))] * 1000 if lat else None

        http = a.url.replace("ws://", "http://", 1).rstrip("/")
        worst = await asyncio.to_thread(verify, http, [s for s in sessions if s.verify])
        errors = sum(s.errors for s in sessions)
        disorder = sum(s.out_of_order for s in sessions)
        lost = max(0, expected - received)
        p99 = pct(0.99)
        return {
            "sessions": a.sessions,
            "frames_per_message": self.fpm,
            "results_measured": len(lat),
            "p50_ms": pct(0.50),
            "p99_ms": p99,
            "p999_ms": pct(0.999),
            "lost": lost,
            "errors": errors,
            "out_of_order": disorder,
            "summaries": sum(1 for s in sessions if s.summary is not None),
            "late_sends": late,
            "client_cpu": cpu / wall if wall > 0 else None,
            "verified_sessions": min(a.verify, len(sessions)),
            "verify_max_abs_diff": worst,
            "passed": bool(
                p99 is not None
                and p99 <= a.p99_ms
                and lost == 0
                and not errors
                and not disorder
                and (worst is None or worst <= TOLERANCE)
            ),
        }


def verify(http: str, sessions: list[Session]) -> float | None:
    """The largest |stream - REST| score over ``sessions`` (inf when counts differ)."""
    worst: float | None = None
    for s in sessions:
        req = urllib.request.Request(
            f"{http}/v1/score?encoding=pcm_s16le&sample_rate={RATE}",
            data=bytes(s.audio),
            headers={"Content-Type": "application/octet-stream"},
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            ref = next(iter(json.loads(resp.read())["scores"].values()))
        got = s.scores
        if len(got) != len(ref):
            diff = math.inf
        else:
            diff = max((abs(x - y) for x, y in zip(got, ref, strict=True)), default=0.0)
        worst = diff if worst is None else max(worst, diff)
    return worst


def read_wav(path: str) -> bytes:
    with wave.open(path, "rb") as w:
        if (w.getframerate(), w.getnchannels(), w.getsampwidth()) != (RATE, 1, 2):
            raise SystemExit(f"{path}: need 16 kHz mono 16-bit PCM")
        return w.readframes(w.getnframes())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--url", required=True)
    p.add_argument("--sessions", type=int, default=100)
    p.add_argument("--seconds", type=float, default=6.0, help="measurement window")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--frames-per-message", type=int, default=1)
    p.add_argument("--wav", required=True)
    p.add_argument("--p99-ms", type=float, default=20.0)
    p.add_argument("--end-timeout", type=float, default=6.0)
    p.add_argument("--verify", type=int, default=4, help="sessions whose scores are checked against REST")
    p.add_argument("--cpu", type=int, help="pin to this CPU")
    p.add_argument("--json", help="write the result here")
    args = p.parse_args(argv)
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    try:
        import uvloop

        factory: Any = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        res = runner.run(Run(args, read_wav(args.wav)).main())
    text = json.dumps(res, indent=1)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    print(text, file=sys.stderr if args.json else sys.stdout)
    return 0 if res["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
