"""``make bench``: how many real-time streams one core holds, against the stack's own ceiling.

Server pinned to CPU 0, load generator (``lookback.loadtest``) to CPU 1, all figures from
one run so their ratios hold on a noisy machine:

1. echo ceiling: the same FastAPI/uvicorn WebSocket stack answering at once (ramp);
2. Lookback (default model ``lookback-vad``): real-time sessions at p99 <= 20 ms (ramp);
3. naive baseline: the same with ``LOOKBACK_MAX_BATCH_SIZE=1``;
4. Silero VAD (hop 512), batched and naive;
5. a client sending 10 frames per message;
6. offline: a 1-hour generated clip through ``POST /v1/score`` vs a 1-minute clip
   (seconds, x real time, server peak RSS, each on a fresh server);
7. memory per session: server RSS at 0 and at 1000 idle sessions;
8. the engine-only table (``tests/bench/engine_bench.py``), whose ORT ceiling gives the
   bound ``1 / (1/echo + 1/model_alone)``, model_alone = ceiling frames/s / 125;
9. not a target: two server processes (one per core, two ports, sessions split; ``lookback
   serve`` runs one process) with the client unpinned;
10. ``--pairs`` (default 2) more echo + Lookback ramp pairs at the end: on a shared VM one
    ramp moves by 10-30%, so the headline Lookback / echo ratio is the median over all
    pairs, each pair measured back to back, and the report lists every pair;
11. not a target: Lookback on the default model's null twin (``tests/bench/null_model.py``:
    same contract, no arithmetic), right after each Lookback ramp, to split the gap to the
    echo into the server's per-step work and the model's math;
12. ``handwritten`` / ``handwritten_silero``: the hand-written naive server
    (``tests/bench/handwritten_server.py``: FastAPI + one shared ORT session, batch 1), the
    baseline users would write, next to Lookback's own ``max_batch_size=1``;
13. ``echo10``: the echo ceiling at 10 frames per message, for Lookback@10 / echo@10;
    ``echo10_batch`` / ``fpm10_batch``: the same with ``results=batch`` (one results
    message per received message / per model call);
14. ``cpu_per_session``: at a fixed number of real-time sessions, the server's CPU seconds
    (``/proc/<pid>/stat`` utime + stime over the measured window) per real-time
    session-second, at 1 and at 10 frames per message, and at 10 with ``results=batch``;
    ``cpu_per_session_null``: the same on the null twin (the server's work without math);
15. ``resume_redis``: the Lookback ramp with resumable sessions checkpointed every 250 ms to
    a real redis-server, against step 2 (target >= 0.9x);
16. ``null10``: the null twin at 10 frames per message against ``echo10``: the server's own
    per-step work at 10 frames per message, without the model's math;
17. ``silero4`` / ``silero20``: Silero at one hop (4 frames) and five hops (20 frames) per
    message.

Writes ``tests/bench/results/<date>-<host>.{json,md}`` and prints the table.

    python -m tests.bench.run_all [--quick] [--only echo,lookback,...] [--model lookback-vad]
    python -m tests.bench.run_all --only handwritten,handwritten_silero,echo10,cpu_per_session
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from lookback.loadtest.config import LoadConfig
from lookback.loadtest.fanout import raise_fd_limit, run_load
from lookback.loadtest.idle import IdleSessions
from lookback.loadtest.ramp import ramp
from lookback.loadtest.report import format_ramp
from tests.bench.report import fmt, max_sessions_of, p99_of, strip_blobs, summarize, to_markdown
from tests.support import free_port

REPO = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).resolve().parent / "results"
FIXTURE = REPO / "tests" / "fixtures" / "audio" / "silero_ref_speech.wav"
BIN = Path(sys.executable).parent
STEPS = (
    "engine",
    "echo",
    "lookback",
    "null",
    "resume_redis",
    "naive",
    "handwritten",
    "echo10",
    "fpm10",
    "echo10_batch",
    "fpm10_batch",
    "null10",
    "cpu_per_session",
    "cpu_per_session_null",
    "silero",
    "silero4",
    "silero20",
    "silero_naive",
    "handwritten_silero",
    "offline",
    "memory",
    "workers",
    "soak",
    "pairs",
)


@dataclass(frozen=True)
class Plan:
    warmup: float
    duration: float
    max_trials: int
    ramp_time: float
    offline_short_s: float
    offline_long_s: float
    idle_sessions: int
    engine_seconds: float
    engine_sessions: tuple[int, ...]
    start: int
    cpu_sessions: int


FULL = Plan(
    warmup=2.0,
    duration=6.0,
    max_trials=8,
    ramp_time=140.0,
    offline_short_s=60.0,
    offline_long_s=3600.0,
    idle_sessions=1000,
    engine_seconds=3.0,
    engine_sessions=(1, 64, 512, 2048),
    start=64,
    cpu_sessions=64,
)
QUICK = Plan(
    warmup=0.5,
    duration=1.5,
    max_trials=3,
    ramp_time=25.0,
    offline_short_s=10.0,
    offline_long_s=120.0,
    idle_sessions=100,
    engine_seconds=0.3,
    engine_sessions=(1, 64),
    start=16,
    cpu_sessions=16,
)


def log(text: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------
# machine and processes


def cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return list(range(os.cpu_count() or 1))


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (``/proc/<pid>/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM of a process in bytes (Linux)."""
    out = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, val = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(val.split()[0]) * 1024
    return out


class Server:
    """A server subprocess pinned to ``cpu``: started, polled for /readyz, SIGTERM-stopped."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str],
        port: int,
        cpu: int | None,
        *,
        cwd: Path = REPO,
        ready_path: str | None = "/readyz",
    ) -> None:
        self.name, self.argv, self.port, self.cpu = name, argv, port, cpu
        self.cwd, self.ready_path = cwd, ready_path
        self.env = {**os.environ, **env}
        self.proc: subprocess.Popen[bytes] | None = None
        fd, name_ = tempfile.mkstemp(prefix=f"bench-{name}-", suffix=".log")
        os.close(fd)
        self.logpath = Path(name_)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def __enter__(self) -> Server:
        cpu = self.cpu

        def pin() -> None:
            if cpu is not None:
                os.sched_setaffinity(0, {cpu})

        with open(self.logpath, "wb") as logfile:  # the child keeps its own copy of the fd
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=self.cwd,
                stdout=logfile,
                stderr=subprocess.STDOUT,
                preexec_fn=pin,
            )
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n" + self.log_tail())
            if self.ready_path is None:  # a server that answers only WebSockets: its port
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 1):
                    return self
            else:
                with contextlib.suppress(httpx.HTTPError):
                    url = f"http://127.0.0.1:{self.port}{self.ready_path}"
                    if httpx.get(url, timeout=2).status_code == 200:
                        return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{self.name} not ready after 180 s:\n{self.log_tail()}")

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.stop()
        if exc_type is None:
            self.logpath.unlink(missing_ok=True)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def log_tail(self, n: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return self.logpath.read_text(errors="replace")[-n:]
        return ""


def report_paths(directory: Path, base: str) -> tuple[Path, Path]:
    """``base.json`` and ``base.md`` in ``directory``, or ``base-2.*``, ``base-3.*``... where
    a report of that name exists: a day's earlier report is kept, not overwritten."""
    name, n = base, 1
    while (directory / f"{name}.json").exists() or (directory / f"{name}.md").exists():
        n += 1
        name = f"{base}-{n}"
    return directory / f"{name}.json", directory / f"{name}.md"


def lookback_server(model: str, port: int, cpu: int | None, **env: Any) -> Server:
    base = {
        "LOOKBACK_HOST": "127.0.0.1",
        "LOOKBACK_PORT": str(port),
        "LOOKBACK_LOG_LEVEL": "warning",
        "LOOKBACK_MODELS": model,
        "LOOKBACK_DEFAULT_MODEL": model,
        "LOOKBACK_MAX_SESSIONS": "4200",
    }
    base.update({f"LOOKBACK_{k.upper()}": str(v) for k, v in env.items()})
    script = BIN / "lookback"
    argv = [str(script), "serve"] if script.exists() else [sys.executable, "-m", "lookback.cli", "serve"]
    return Server(f"lookback-{model}", argv, base, port, cpu)


def echo_server(port: int, cpu: int | None, hop: int = 128) -> Server:
    env = {"LOOKBACK_HOST": "127.0.0.1", "LOOKBACK_LOG_LEVEL": "warning", "LOOKBACK_MAX_SESSIONS": "4200"}
    return Server(
        "echo",
        [sys.executable, "-m", "tests.bench.echo_server", "--port", str(port), "--hop", str(hop)],
        env,
        port,
        cpu,
    )


def handwritten_server(model: str, port: int, cpu: int | None) -> Server:
    return Server(
        f"handwritten-{model}",
        [sys.executable, "-m", "tests.bench.handwritten_server", "--port", str(port), "--model", model],
        {},
        port,
        cpu,
    )


# ------------------------------------------------------------------------------------------
# the steps


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.plan = QUICK if args.quick else FULL
        self.cpus = cpus()
        self.pinned = len(self.cpus) >= 2
        self.server_cpu = self.cpus[0] if self.pinned else None
        self.client_cpus = self.cpus[1:] if self.pinned else None
        self.model = args.model
        self.results: dict[str, Any] = {}
        self.t0 = time.monotonic()
        self.budget = args.budget_s

    def load_cfg(self, url: str | list[str], fpm: int = 1, **kw: Any) -> LoadConfig:
        p = self.plan
        return LoadConfig(
            urls=[url] if isinstance(url, str) else url,
            warmup=p.warmup,
            duration=p.duration,
            wav=str(FIXTURE) if FIXTURE.exists() else None,
            frames_per_message=fpm,
            p99_ms=self.args.p99_ms,
            cpus=self.client_cpus,
            end_timeout=6.0,
            quiet=False,
            **kw,
        )

    def ramp(self, cfg: LoadConfig, start: int) -> dict[str, Any]:
        p = self.plan
        res = ramp(cfg, start=max(1, start), max_sessions=4000, max_trials=p.max_trials, max_time=p.ramp_time)
        print(format_ramp(res), file=sys.stderr, flush=True)
        return res

    def ramp_start(self, key: str, frac: float = 0.5, default: int | None = None) -> int:
        """Start a ramp near a known result (a power of two below frac * it)."""
        prev = self.results.get(key, {}).get("max_sessions")
        if not prev:
            return default or self.plan.start
        return max(8, 2 ** int(math.log2(max(1, prev * frac))))

    # 8. engine-only --------------------------------------------------------------------
    def step_engine(self) -> dict[str, Any]:
        p = self.plan
        out = Path(tempfile.mkstemp(prefix="engine-bench-", suffix=".json")[1])
        code = (
            "import inspect, json, sys\n"
            "import tests.bench.engine_bench as eb\n"
            "if not hasattr(eb, 'main'):\n"
            "    sys.exit(3)\n"
            "want = json.loads(sys.argv[2])\n"
            "params = inspect.signature(eb.main).parameters\n"
            "kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in want.items() if k in params}\n"
            "res = eb.main(sys.argv[1], **kw)\n"
            "open(sys.argv[1], 'w').write(json.dumps(res, default=str))\n"
        )
        want = {"model": self.model, "seconds": p.engine_seconds, "sessions": list(p.engine_sessions)}
        cpu = self.server_cpu

        def pin() -> None:
            if cpu is not None:
                os.sched_setaffinity(0, {cpu})

        r = subprocess.run(
            [sys.executable, "-c", code, str(out), json.dumps(want)],
            cwd=REPO,
            preexec_fn=pin,
            timeout=900,
            stdout=sys.stderr,
        )
        if r.returncode == 3:
            return {"skipped": "tests/bench/engine_bench.py has no main()"}
        if r.returncode != 0:
            raise RuntimeError(f"engine bench exited with {r.returncode} (its output is above)")
        res: dict[str, Any] = json.loads(out.read_text())
        out.unlink(missing_ok=True)
        return res

    # 1. echo ceiling -------------------------------------------------------------------
    def step_echo(self) -> dict[str, Any]:
        with echo_server(free_port(), self.server_cpu) as srv:
            return self.ramp(self.load_cfg(srv.url), self.plan.start * 2)

    # 13. echo ceiling at 10 frames per message -------------------------------------------
    def step_echo10(self) -> dict[str, Any]:
        with echo_server(free_port(), self.server_cpu) as srv:
            return self.ramp(self.load_cfg(srv.url, 10), self.ramp_start("echo", 1.0, self.plan.start * 2))

    def step_echo10_batch(self) -> dict[str, Any]:
        with echo_server(free_port(), self.server_cpu) as srv:
            start = self.ramp_start("echo10", 1.0, self.plan.start * 2)
            return self.ramp(self.load_cfg(srv.url, 10, results="batch"), start)

    # 12. the hand-written naive server -------------------------------------------------
    def _handwritten_ramp(self, model: str, start: int) -> dict[str, Any]:
        with handwritten_server(model, free_port(), self.server_cpu) as srv:
            res = self.ramp(self.load_cfg(srv.url, 1, model=model), start)
            res["server_rss_bytes"] = proc_status(srv.pid)
            return res

    def step_handwritten(self) -> dict[str, Any]:
        start = self.ramp_start("naive", 1.0, self.ramp_start("lookback", 0.25))
        return self._handwritten_ramp(self.model, start)

    def step_handwritten_silero(self) -> dict[str, Any]:
        if self.model == "silero-vad" and "handwritten" in self.results:
            return {**self.results["handwritten"], "same_as": "handwritten"}
        if not has_model("silero-vad"):
            return {"skipped": "silero-vad is not imported (make silero)"}
        start = self.ramp_start("silero_naive", 1.0, self.ramp_start("silero", 0.25))
        return self._handwritten_ramp("silero-vad", start)

    # 14. CPU per real-time session-second ------------------------------------------------
    def step_cpu_per_session(self) -> dict[str, Any]:
        return self._cpu_per_session(self.model, None)

    def step_cpu_per_session_null(self) -> dict[str, Any]:
        """The same on the null twin: the server's own work per session-second, no math."""
        with self._null_twin() as (name, store):
            return {**self._cpu_per_session(name, store), "model": name}

    def _cpu_per_session(self, model: str, store: str | None) -> dict[str, Any]:
        n = self.plan.cpu_sessions
        out: dict[str, Any] = {"sessions": n}
        env = {"model_store": store} if store else {}
        for fpm, results in ((1, "all"), (10, "all"), (10, "batch")):
            key = f"fpm{fpm}" if results == "all" else f"fpm{fpm}_{results}"
            with lookback_server(model, free_port(), self.server_cpu, **env) as srv:
                out[key] = r = self._cpu_run(srv, n, fpm, results, model)
            log(
                f"cpu_per_session {model}: {n} sessions at {fpm} frames/msg, results={results}: server CPU "
                f"{r['cpu_share'] * 100:.1f}% of a core = {r['cpu_per_session_s'] * 1e3:.2f} ms "
                f"per session-second; p99 {fmt(r['p99_ms'], '.1f')} ms, {'PASS' if r['passed'] else 'FAIL'}"
            )
        return out

    def _cpu_run(
        self, srv: Server, n: int, fpm: int, results: str = "all", model: str | None = None
    ) -> dict[str, Any]:
        """One fixed-N load; the server's CPU over the middle of the measured window.

        The window opens once ``/readyz`` counts all ``n`` sessions plus the load
        generator's start delay and warm-up, and covers 80% of the measured seconds, so
        connects, warm-up and the end-of-stream summaries stay outside it.
        """
        p = self.plan
        cfg = replace(self.load_cfg(srv.url, fpm, model=model or self.model, results=results), sessions=n)
        window: dict[str, float] = {}
        done = threading.Event()

        def sample() -> None:
            deadline = time.monotonic() + 120
            while not done.is_set() and time.monotonic() < deadline:
                with contextlib.suppress(httpx.HTTPError, ValueError):
                    body = httpx.get(f"http://127.0.0.1:{srv.port}/readyz", timeout=2).json()
                    if int(body.get("sessions") or 0) >= n:
                        break
                done.wait(0.05)
            else:
                return
            if done.wait(0.2 + p.warmup):  # the run ended before its window: no figure
                return
            c0, w0 = proc_cpu_seconds(srv.pid), time.monotonic()
            if done.wait(0.8 * p.duration):
                return
            window.update(cpu_s=proc_cpu_seconds(srv.pid) - c0, wall_s=time.monotonic() - w0)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        try:
            res = run_load(cfg)
        finally:
            done.set()
            th.join()
        if not window:
            raise RuntimeError(f"no CPU window at {n} sessions, {fpm} frames/msg (did they connect?)")
        share = window["cpu_s"] / window["wall_s"]
        return {
            **window,
            "frames_per_message": fpm,
            "results": results,
            "cpu_share": share,
            "cpu_per_session_s": share / n,  # CPU seconds per real-time session-second
            "clock_tick_s": 1 / os.sysconf("SC_CLK_TCK"),
            "passed": bool(res.get("passed")),
            "p99_ms": (res.get("latency_ms") or {}).get("p99"),
            "lost_results": res.get("lost_results"),
            "connected": res.get("connected"),
        }

    # 2./3./5. Lookback ---------------------------------------------------------------
    def _lookback_ramp(
        self, model: str, fpm: int, start: int, results: str = "all", resumable: bool = False, **env: Any
    ) -> dict[str, Any]:
        with lookback_server(model, free_port(), self.server_cpu, **env) as srv:
            cfg = self.load_cfg(srv.url, fpm, model=model, results=results, resumable=resumable)
            res = self.ramp(cfg, start)
            res["server_rss_bytes"] = proc_status(srv.pid)
            return res

    def step_lookback(self) -> dict[str, Any]:
        return self._lookback_ramp(self.model, 1, self.ramp_start("echo"))

    # 15. resumable sessions checkpointed to Redis --------------------------------------
    def step_resume_redis(self) -> dict[str, Any]:
        from tests.fixtures_services import redis_server

        with tempfile.TemporaryDirectory(prefix="bench-redis-") as tmp, redis_server(Path(tmp)) as url:
            return self._lookback_ramp(
                self.model,
                1,
                self.ramp_start("lookback", 1.0),
                resumable=True,
                state_store=url,
                snapshot_interval_s=0.25,
            )

    # 11. the null twin -----------------------------------------------------------------
    @contextlib.contextmanager
    def _null_twin(self) -> Iterator[tuple[str, str]]:
        """The default model's null twin in a temporary store: (its name, the store)."""
        from tests.bench.null_model import make_null_model

        with tempfile.TemporaryDirectory(prefix="bench-null-") as store:
            yield make_null_model(self.model, Path(store)), store

    def _null_ramp(self, fpm: int, start_key: str) -> dict[str, Any]:
        with (
            self._null_twin() as (name, store),
            lookback_server(name, free_port(), self.server_cpu, model_store=store) as srv,
        ):
            res = self.ramp(self.load_cfg(srv.url, fpm, model=name), self.ramp_start(start_key, 1.0))
        res["model"] = name
        return res

    def step_null(self) -> dict[str, Any]:
        return self._null_ramp(1, "lookback")

    def step_null10(self) -> dict[str, Any]:
        return self._null_ramp(10, "fpm10")

    # 10. repeated echo / Lookback pairs ------------------------------------------------
    def step_pairs(self) -> dict[str, Any]:
        n = 0 if self.args.quick else self.args.pairs
        runs = []
        for _ in range(n):
            echo = self.step_echo()
            look = self.step_lookback()
            run = {
                "echo": max_sessions_of(echo),
                "lookback": max_sessions_of(look),
                "echo_p99_ms": p99_of(echo),
                "lookback_p99_ms": p99_of(look),
            }
            if "null" in self.results:  # the twin rides along when its step ran
                null = self.step_null()
                run.update(null=max_sessions_of(null), null_p99_ms=p99_of(null))
            runs.append(run)
        return {"runs": runs}

    def step_naive(self) -> dict[str, Any]:
        return self._lookback_ramp(self.model, 1, self.ramp_start("lookback", 0.25), max_batch_size=1)

    def step_fpm10(self) -> dict[str, Any]:
        return self._lookback_ramp(self.model, 10, self.ramp_start("lookback", 1.0))

    def step_fpm10_batch(self) -> dict[str, Any]:
        return self._lookback_ramp(self.model, 10, self.ramp_start("fpm10", 1.0), results="batch")

    # 4. Silero -----------------------------------------------------------------------
    def step_silero(self) -> dict[str, Any]:
        if self.model == "silero-vad" and "lookback" in self.results:
            return {**self.results["lookback"], "same_as": "lookback"}
        if not has_model("silero-vad"):
            return {"skipped": "silero-vad is not imported (make silero)"}
        return self._lookback_ramp("silero-vad", 1, self.ramp_start("lookback", 1.0))

    def _silero_fpm(self, fpm: int, start_key: str) -> dict[str, Any]:
        if not has_model("silero-vad"):
            return {"skipped": "silero-vad is not imported (make silero)"}
        return self._lookback_ramp("silero-vad", fpm, self.ramp_start(start_key, 1.0))

    def step_silero4(self) -> dict[str, Any]:
        return self._silero_fpm(4, "silero")

    def step_silero20(self) -> dict[str, Any]:
        return self._silero_fpm(20, "silero4")

    def step_silero_naive(self) -> dict[str, Any]:
        if self.model == "silero-vad" and "naive" in self.results:
            return {**self.results["naive"], "same_as": "naive"}
        if not has_model("silero-vad"):
            return {"skipped": "silero-vad is not imported (make silero)"}
        return self._lookback_ramp("silero-vad", 1, self.ramp_start("silero", 0.25), max_batch_size=1)

    # 9. two server processes -----------------------------------------------------------
    def step_workers(self) -> dict[str, Any]:
        if not self.pinned:
            return {"skipped": "needs 2 CPUs"}
        ports = [free_port(), free_port()]
        with (
            lookback_server(self.model, ports[0], self.cpus[0]) as a,
            lookback_server(self.model, ports[1], self.cpus[1]) as b,
        ):
            cfg = replace(self.load_cfg([a.url, b.url], model=self.model), cpus=self.cpus)
            res = self.ramp(cfg, self.ramp_start("lookback", 1.0))
        res["how"] = (
            "2 `lookback serve` processes on 2 ports, one pinned per CPU; sessions "
            "alternate between them; client processes unpinned (share both CPUs)"
        )
        return res

    # 6. offline ----------------------------------------------------------------------
    def step_offline(self) -> dict[str, Any]:
        p = self.plan
        out: dict[str, Any] = {}
        with tempfile.TemporaryDirectory(prefix="bench-offline-") as tmp:
            for label, seconds in (("short", p.offline_short_s), ("long", p.offline_long_s)):
                path = Path(tmp) / f"{label}.wav"
                t = time.perf_counter()
                make_clip(path, seconds)
                gen_s = time.perf_counter() - t
                with lookback_server(self.model, free_port(), self.server_cpu) as srv:
                    before = proc_status(srv.pid)
                    r = score_file(srv.port, path, self.model, srv.pid)
                    r.update(
                        audio_s=seconds,
                        file_bytes=path.stat().st_size,
                        generate_s=gen_s,
                        rss_before=before.get("VmRSS"),
                        hwm_before=before.get("VmHWM"),
                    )
                log(
                    f"offline {label}: {seconds:.0f} s audio in {r['seconds']:.2f} s "
                    f"({r['x_realtime']:.0f}x real time), server peak RSS "
                    f"{r['peak_rss'] / 2**20:.0f} MiB"
                )
                out[label] = r
                path.unlink()
        out["peak_rss_ratio"] = out["long"]["peak_rss"] / out["short"]["peak_rss"]
        return out

    # 7. memory per session -------------------------------------------------------------
    def step_memory(self) -> dict[str, Any]:
        n = self.plan.idle_sessions
        raise_fd_limit(n + 64)
        with lookback_server(self.model, free_port(), self.server_cpu, max_sessions=max(n + 16, 1200)) as srv:
            time.sleep(0.5)
            rss0 = proc_status(srv.pid)["VmRSS"]

            async def hold() -> tuple[int, int, dict[str, int]]:
                async with IdleSessions(srv.url, n, model=self.model) as idle:
                    await asyncio.sleep(1.0)
                    rss = proc_status(srv.pid)["VmRSS"]
                    return idle.ready, rss, idle.failures

            ready, rss1, failures = asyncio.run(hold())
        per = (rss1 - rss0) / max(1, ready)
        log(
            f"memory: {ready}/{n} idle sessions: RSS {rss0 / 2**20:.0f} -> {rss1 / 2**20:.0f} MiB "
            f"= {per / 1024:.1f} KiB per session"
        )
        return {
            "sessions": n,
            "ready": ready,
            "failures": failures,
            "rss_0": rss0,
            "rss_n": rss1,
            "bytes_per_session": per,
        }

    # 9. soak: session churn (issue 6's long variant) --------------------------------------
    def step_soak(self) -> dict[str, Any]:
        from tests.bench.soak import run_soak

        n = 2000 if self.plan.idle_sessions < 1000 else 20_000
        r = run_soak(n, warm=500)
        log(
            f"soak: {n} sessions in {r['seconds']} s; RSS {r['rss_warm_mib']} -> "
            f"{r['rss_end_mib']} MiB ({r['rss_change_pct']:+.2f}%); slots used "
            f"{r['slots_used']}; fds {r['fds_warm']} -> {r['fds_end']}"
        )
        return r

    # -----------------------------------------------------------------------------------
    def run(self, steps: list[str]) -> dict[str, Any]:
        for name in steps:
            elapsed = time.monotonic() - self.t0
            if elapsed > self.budget:
                log(f"skipping {name}: past the {self.budget:.0f} s budget")
                self.results[name] = {"skipped": "time budget"}
                continue
            log(f"--- {name} ---")
            t = time.monotonic()
            try:
                res = getattr(self, f"step_{name}")()
            except Exception as exc:  # one failed step must not lose the others
                log(f"{name} FAILED: {type(exc).__name__}: {exc}")
                res = {"error": f"{type(exc).__name__}: {exc}"[:4000]}
            res["step_s"] = time.monotonic() - t
            self.results[name] = res
        return self.results


# ------------------------------------------------------------------------------------------
# offline helpers


def make_clip(path: Path, seconds: float, seed: int = 0) -> None:
    """Loop the fixture clip with varying gain and added noise, written chunk by chunk."""
    import soundfile as sf

    rng = np.random.default_rng(seed)
    if FIXTURE.exists():
        base, rate = sf.read(str(FIXTURE), dtype="float32")
    else:  # pragma: no cover - the fixture ships with the repo
        rate = 16000
        base = (rng.standard_normal(rate * 10) * 0.1).astype(np.float32)
    total = int(seconds * rate)
    written = 0
    with sf.SoundFile(str(path), "w", samplerate=rate, channels=1, subtype="PCM_16") as f:
        while written < total:
            n = min(len(base), total - written)
            gain = rng.uniform(0.3, 1.0)
            noise = rng.standard_normal(n).astype(np.float32) * rng.uniform(0.001, 0.02)
            f.write(np.clip(base[:n] * gain + noise, -1.0, 0.999))
            written += n


@contextlib.contextmanager
def rss_sampler(pid: int, period: float = 0.05) -> Iterator[Callable[[], int]]:
    """Peak VmRSS sampled in a thread (VmHWM is the authoritative figure; this is a cross-check)."""
    peak = [0]
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], proc_status(pid).get("VmRSS", 0))
            stop.wait(period)

    th = threading.Thread(target=run, daemon=True)
    th.start()
    try:
        yield lambda: peak[0]
    finally:
        stop.set()
        th.join()


def score_file(port: int, path: Path, model: str, pid: int) -> dict[str, Any]:
    def body() -> Iterator[bytes]:
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                yield block

    with rss_sampler(pid) as sampled:
        t = time.perf_counter()
        with httpx.Client(timeout=1800) as http:
            r = http.post(
                f"http://127.0.0.1:{port}/v1/score",
                params={"model": model},
                content=body(),
                headers={"Content-Type": "audio/wav"},
            )
        seconds = time.perf_counter() - t
        peak_sampled = sampled()
    if r.status_code != 200:
        raise RuntimeError(f"/v1/score answered {r.status_code}: {r.text[:500]}")
    data = r.json()
    st = proc_status(pid)
    return {
        "seconds": seconds,
        "x_realtime": data["duration"] / seconds,
        "steps": data["steps"],
        "duration": data["duration"],
        "response_bytes": len(r.content),
        "peak_rss": st.get("VmHWM", peak_sampled),
        "peak_rss_sampled": peak_sampled,
        "rss_after": st.get("VmRSS"),
    }


# ------------------------------------------------------------------------------------------
# the model's hop (the report's arithmetic is in tests/bench/report.py)


def has_model(name: str) -> bool:
    return any((REPO / "model_store" / name).glob("*/model.json"))


def hop_of(model: str) -> int:
    for mj in sorted((REPO / "model_store" / model).glob("*/model.json")):
        with contextlib.suppress(Exception):
            return int(json.loads(mj.read_text())["hop_samples"])
    return 128


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fast smoke pass with tiny durations")
    ap.add_argument(
        "--model",
        default=None,
        help="Lookback's model (default lookback-vad, or "
        "silero-vad while lookback-vad is not in model_store)",
    )
    ap.add_argument("--only", help=f"comma-separated subset of {','.join(STEPS)}")
    ap.add_argument("--skip", help="comma-separated steps to leave out")
    ap.add_argument("--p99-ms", type=float, default=20.0)
    ap.add_argument(
        "--budget-s",
        type=float,
        default=28 * 60.0,
        help="skip the remaining steps once this much time has passed",
    )
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    ap.add_argument(
        "--pairs",
        type=int,
        default=2,
        help="extra echo + Lookback ramp pairs for the median ratio (0 in --quick)",
    )
    args = ap.parse_args(argv)

    notes = []
    if args.model is None:
        if has_model("lookback-vad"):
            args.model = "lookback-vad"
        else:
            args.model = "silero-vad"
            notes.append("lookback-vad is not in model_store yet: Lookback rows use silero-vad")
            log(notes[-1])
    steps = list(STEPS)
    if args.only:
        steps = [s for s in steps if s in args.only.split(",")]
    if args.skip:
        steps = [s for s in steps if s not in args.skip.split(",")]

    bench = Bench(args)
    if bench.pinned and bench.client_cpus:
        # The harness itself (mostly idle during trials) stays off the server's CPU.
        os.sched_setaffinity(0, set(bench.client_cpus))
    else:
        notes.append("fewer than 2 CPUs: server and client are not pinned apart")
    raise_fd_limit(8192)
    load_start = os.getloadavg()
    t0 = time.monotonic()
    results = bench.run(steps)
    now = dt.datetime.now()
    host = socket.gethostname()
    report = {
        "date": now.isoformat(timespec="seconds"),
        "quick": args.quick,
        "model": args.model,
        "p99_ms": args.p99_ms,
        "notes": notes,
        "elapsed_s": time.monotonic() - t0,
        "machine": {
            "host": host,
            "nproc": os.cpu_count(),
            "cpus_available": bench.cpus,
            "cpu_model": cpu_model(),
            "server_cpu": bench.server_cpu,
            "client_cpus": bench.client_cpus,
            "python": sys.version.split()[0],
            "loadavg_start": [round(x, 2) for x in load_start],
            "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        },
        "results": results,
    }
    report["summary"] = summarize(results, hop_of(args.model))
    md = to_markdown(report)
    if notes:
        md += "\nNotes: " + "; ".join(notes) + "\n"
    report["markdown"] = md
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out_json, out_md = report_paths(args.out_dir, f"{now:%Y-%m-%d}-{host}" + ("-quick" if args.quick else ""))
    out_json.write_text(json.dumps(strip_blobs(report), indent=2, default=str))
    out_md.write_text(md)
    print(md)
    log(f"wrote {out_json} and {out_md.name} in {report['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
