"""``lookback serve --workers N``: N engine processes behind one port, one /metrics, one drain.

One process runs one event loop, and that loop is the limit (a few hundred real-time
sessions per core), so a many-core machine needs several processes. The supervisor here:

- gives every worker a listening socket of its own on the same port (``SO_REUSEPORT``),
  and the kernel spreads connections over them by a hash of the client's address. The
  alternative, one socket bound by the supervisor that every worker accepts from (what
  uvicorn's and gunicorn's ``--workers`` do; ``worker_socket=shared`` here), loses no
  queued connection when a worker dies, but asyncio accepts everything queued in one go,
  so a burst of connections (clients reconnecting after a network blip) lands on one
  worker and stays there for the life of those long sessions. The supervisor keeps a
  bound, never listening, socket on the port: it reserves the port (and resolves port
  0) while workers come and go.
- starts each worker with the spawn method: a fresh interpreter with its own engine
  (batcher, state slabs, ONNX Runtime sessions), its share of the server's limits, and
  ONNX Runtime threads sized so N workers never use more CPUs than the server may;
- restarts a worker that dies (counted in ``lookback_worker_restarts_total``), and stops
  the server if a worker cannot start at all;
- on SIGTERM/SIGINT sends SIGTERM to every worker: they drain in parallel (each scores and
  summarises its open sessions within ``drain_grace_s``) and the supervisor exits 0; a
  second signal kills them and exits at once.

The workers share two files in one run folder: prometheus-client's multiprocess value
files (so any worker's ``/metrics`` answers for the whole server) and a small *board*,
one row of int64 per worker (state, pid, restarts, open sessions) mapped into every
process, so any worker's ``/readyz`` is 200 only when every worker is ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import logging
import math
import mmap
import multiprocessing as mp
import multiprocessing.connection
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import numpy as np
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from lookback.settings import Settings

if TYPE_CHECKING:
    from starlette.datastructures import State

    from lookback.metrics import Metrics
    from lookback.server import DrainingServer

log = logging.getLogger("lookback.workers")

# worker states on the board
DOWN, STARTING, READY, DRAINING = 0, 1, 2, 3
STATE_NAMES = {DOWN: "down", STARTING: "starting", READY: "ready", DRAINING: "draining"}
_STATE, _PID, _RESTARTS, _SESSIONS, _SCORES_ADMITTED, _SCORES_RUNNING = range(6)
_FIELDS = 6
BOARD_FILE = "lookback-workers.board"
HOUSEKEEPING_S = 0.25  # worker: fold histograms, publish its session count, watch the supervisor
SCORE_SLOT_POLL_S = 0.02  # a queued offline clip looks for a free server-wide slot this often


# -- how many workers, and what each one gets -----------------------------------------------


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota.

    A container limited to 2 CPUs on a 64-core host sees 64 in ``os.cpu_count()``; only
    the quota (cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``) says 2.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cpus = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


def _cgroup_quota() -> float | None:
    with contextlib.suppress(OSError, ValueError):
        text = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if text and text[0] != "max":
            return int(text[0]) / int(text[1])
        return None
    with contextlib.suppress(OSError, ValueError):
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        if quota > 0 and period > 0:
            return quota / period
    return None


def resolve_workers(value: int | str) -> int:
    """The number of worker processes for a ``workers`` setting (an int, or ``auto``)."""
    return available_cpus() if value == "auto" else int(value)


def share(total: int, n: int, index: int) -> int:
    """Worker ``index``'s part of a per-server limit split over ``n`` workers (sums to total)."""
    return total // n + (1 if index < total % n else 0)


def _cuda_driver_present() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def worker_settings(settings: Settings, index: int, n: int, cpus: int, *, gpu: bool) -> Settings:
    """The settings of worker ``index``: its share of the server's sessions and of its CPUs.

    ``max_sessions`` is divided, so the server's cap means what it says whatever N is (a
    worker whose share is used up refuses even when another has room; the kernel spreads
    connections evenly, so that happens only within a few percent of the cap). Offline
    limits are not divided: the workers share server-wide counters (``ScoreGate``), since
    two uploads landing on one worker must still run at once. ONNX Runtime threads are
    capped at the worker's CPUs (``0``, ORT's all-cores default, becomes that cap), and with
    one CPU per worker CPU model calls run inline on the event loop: a hand-off thread
    would only compete with the loop for it.
    """
    cores = max(1, cpus // n)
    update: dict[str, Any] = {
        "workers": 1,
        "max_sessions": share(settings.max_sessions, n, index),
        "intra_op_threads": min(settings.intra_op_threads or cores, cores),
        "inter_op_threads": min(settings.inter_op_threads or cores, cores),
    }
    if settings.model_calls == "auto" and cores == 1 and not gpu:
        update["model_calls"] = "inline"
    return settings.model_copy(update=update)


# -- the board: one row per worker, shared by every process ----------------------------------


class Board:
    """A memory-mapped int64 table ``[workers, 4]``: state, pid, restarts, open sessions.

    Each worker writes only its own row (and the supervisor a dead worker's); aligned
    8-byte stores are atomic on every platform Lookback runs on, so no lock is needed.
    """

    def __init__(self, path: Path, n: int | None = None) -> None:
        if n is not None:
            path.write_bytes(bytes(8 * _FIELDS * n))
        self.path = path
        self._file = path.open("r+b")
        self._mm = mmap.mmap(self._file.fileno(), 0)
        self.rows = np.ndarray((len(self._mm) // (8 * _FIELDS), _FIELDS), np.int64, buffer=self._mm)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """An exclusive lock over every process (released by the kernel if one dies)."""
        fcntl.flock(self._file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._file, fcntl.LOCK_UN)

    def take(self, index: int, column: int, limit: int) -> bool:
        """Count one more in ``column`` for worker ``index`` if the server-wide sum allows."""
        with self._locked():
            if int(self.rows[:, column].sum()) >= limit:
                return False
            self.rows[index, column] += 1
            return True

    def give(self, index: int, column: int) -> None:
        with self._locked():
            self.rows[index, column] = max(0, int(self.rows[index, column]) - 1)

    def clear(self, index: int) -> None:
        """A dead worker's row: its sessions and offline places count no more."""
        with self._locked():
            self.rows[index, _SESSIONS] = 0
            self.rows[index, _SCORES_ADMITTED] = 0
            self.rows[index, _SCORES_RUNNING] = 0

    @property
    def n(self) -> int:
        return int(self.rows.shape[0])

    def set(self, index: int, state: int, pid: int | None = None) -> None:
        if pid is not None:
            self.rows[index, _PID] = pid
        self.rows[index, _STATE] = state

    def state(self, index: int) -> int:
        return int(self.rows[index, _STATE])

    def pid(self, index: int) -> int:
        return int(self.rows[index, _PID])

    def add_restart(self, index: int) -> None:
        self.rows[index, _RESTARTS] += 1

    def set_sessions(self, index: int, count: int) -> None:
        self.rows[index, _SESSIONS] = count

    # -- what /readyz and /metrics read ----------------------------------------------------
    def all_ready(self) -> bool:
        return bool((self.rows[:, _STATE] == READY).all())

    def any_draining(self) -> bool:
        return bool((self.rows[:, _STATE] == DRAINING).any())

    def restarts(self) -> int:
        return int(self.rows[:, _RESTARTS].sum())

    def sessions(self) -> int:
        return int(self.rows[:, _SESSIONS].sum())

    def describe(self) -> list[dict[str, Any]]:
        return [
            {
                "worker": i,
                "pid": int(row[_PID]),
                "state": STATE_NAMES.get(int(row[_STATE]), "unknown"),
                "sessions": int(row[_SESSIONS]),
                "restarts": int(row[_RESTARTS]),
            }
            for i, row in enumerate(self.rows.copy())
        ]

    def close(self) -> None:
        del self.rows
        self._mm.close()
        self._file.close()


class ScoreGate:
    """Server-wide offline limits for one worker: ``max_concurrent_scores`` clips scoring
    and ``max_queued_scores`` more waiting, counted on the board over every worker.

    The kernel places each upload; dividing the limits would leave a worker that got two
    uploads scoring one while another worker idles. A queued clip polls for a free slot
    every ``SCORE_SLOT_POLL_S`` (clips take seconds; the poll costs nothing measurable).
    """

    def __init__(self, board: Board, index: int, settings: Settings) -> None:
        self.board, self.index = board, index
        self.concurrent = settings.max_concurrent_scores
        self.admitted = settings.max_concurrent_scores + settings.max_queued_scores

    def admit(self) -> bool:
        return self.board.take(self.index, _SCORES_ADMITTED, self.admitted)

    def release(self) -> None:
        self.board.give(self.index, _SCORES_ADMITTED)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        while True:  # the slot frees in another process: no event to await across processes
            if self.board.take(self.index, _SCORES_RUNNING, self.concurrent):
                break
            await asyncio.sleep(SCORE_SLOT_POLL_S)
        try:
            yield
        finally:
            self.board.give(self.index, _SCORES_RUNNING)


class BoardCollector(Collector):
    """Exports the supervisor's view: workers by state, and restarts since start."""

    def __init__(self, board: Board) -> None:
        self.board = board

    def collect(self) -> Iterable[CounterMetricFamily | GaugeMetricFamily]:
        rows = self.board.describe()
        yield CounterMetricFamily(
            "lookback_worker_restarts",
            "Worker processes that died and were restarted by the supervisor",
            value=self.board.restarts(),
        )
        g = GaugeMetricFamily("lookback_workers", "Worker processes by state", labels=["state"])
        for name in STATE_NAMES.values():
            g.add_metric([name], sum(1 for r in rows if r["state"] == name))
        yield g


# -- the worker process ------------------------------------------------------------------------


def _server_class() -> type[DrainingServer]:
    from lookback.server import DrainingServer

    class WorkerServer(DrainingServer):
        """A DrainingServer that reports its state on the board and obeys its supervisor.

        Only the first SIGTERM counts, and SIGINT not at all: Ctrl-C in a terminal, or
        systemd stopping a unit, signals every process of the group, and the supervisor
        forwards one more SIGTERM; a worker taking the second as "exit at once" would cut
        its drain short. Exiting at once is the supervisor's job (SIGKILL).
        """

        index: int
        board: Board
        metrics: Metrics
        svc: State
        supervisor_pid: int
        _exit_requested = False

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if sig == signal.SIGINT or self._exit_requested:
                return
            self._exit_requested = True
            if self.board.state(self.index) == READY:
                self.board.set(self.index, DRAINING)
            super().handle_exit(sig, frame)

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if not self.should_exit:
                self._housekeeper = asyncio.create_task(self._housekeeping())
                self.board.set(self.index, READY, os.getpid())
                log.info("worker %d ready (pid %d)", self.index, os.getpid())

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            await super().shutdown(sockets)
            self._publish()

        def _publish(self) -> None:
            self.metrics.flush()
            self.board.set_sessions(self.index, len(self.svc.connections))

        async def _housekeeping(self) -> None:
            told = False
            while True:
                await asyncio.sleep(HOUSEKEEPING_S)  # a periodic timer, not a wait for a condition
                self._publish()
                if not told and os.getppid() != self.supervisor_pid:
                    told = True  # the supervisor died without stopping us: drain, then exit
                    log.warning("worker %d: supervisor gone; draining", self.index)
                    self.handle_exit(signal.SIGTERM, None)

    return WorkerServer


def worker_main(
    settings: Settings, index: int, sock: socket.socket | None, board_path: str, supervisor_pid: int
) -> None:
    """Entry point of one worker process (spawned: imports nothing of the supervisor's).

    ``sock`` is the supervisor's shared socket, or None: bind this worker's own
    ``SO_REUSEPORT`` socket on ``settings.port`` (already resolved by the supervisor).
    """
    if sock is None:
        sock = bind_socket(settings.host, settings.port, reuseport=True)
    from lookback.app import create_app
    from lookback.metrics import Metrics
    from lookback.server import install_log_hygiene, uvicorn_config

    logging.basicConfig(
        level=settings.log_level.upper(),
        format=f"%(asctime)s %(levelname)s [worker {index}] %(name)s: %(message)s",
    )
    board = Board(Path(board_path))
    board.set(index, STARTING, os.getpid())
    metrics = Metrics()
    if not metrics.multiprocess:  # the supervisor sets PROMETHEUS_MULTIPROC_DIR first
        raise RuntimeError("worker started without PROMETHEUS_MULTIPROC_DIR")
    metrics.registry.register(BoardCollector(board))
    app = create_app(settings, metrics=metrics)
    svc: State = app.state
    svc.admission.worker = index
    svc.admission.peers = board
    svc.admission.score_gate = ScoreGate(board, index, settings)
    config = uvicorn_config(app, settings, metrics=metrics)
    install_log_hygiene()
    server = _server_class()(config, settings)
    server.index, server.board, server.metrics, server.svc = index, board, metrics, svc  # type: ignore[attr-defined]
    server.supervisor_pid = supervisor_pid  # type: ignore[attr-defined]
    try:
        server.run(sockets=[sock])
    finally:
        board.set(index, DOWN)
        board.set_sessions(index, 0)


# -- the supervisor -----------------------------------------------------------------------------


def bind_socket(host: str, port: int, *, reuseport: bool, listen: bool = True) -> socket.socket:
    """A socket on ``host:port``: shared by every worker, or one of a ``SO_REUSEPORT`` group."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    if listen:
        sock.listen(2048)
    sock.set_inheritable(True)
    return sock


@dataclass
class _Slot:
    index: int
    proc: Any = None  # multiprocessing.Process
    started: float = 0.0
    ever_ready: bool = False
    crashes: list[float] = field(default_factory=list)
    restart_at: float | None = None
    exitcode: int | None = None


class Supervisor:
    """Starts, watches, restarts and drains the workers; see the module docstring."""

    RESTART_WINDOW_S = 60.0
    MAX_BACKOFF_S = 30.0

    def __init__(self, settings: Settings, n: int) -> None:
        self.settings = settings
        self.n = n
        self.cpus = available_cpus()
        self.gpu = settings.providers != "cpu" and _cuda_driver_present()
        self.ctx = mp.get_context("spawn")
        self.slots = [_Slot(i) for i in range(n)]
        self.signals: list[int] = []
        self.draining = False
        self.drain_deadline = 0.0
        self.failed = False

    # -- run -------------------------------------------------------------------------------
    def run(self) -> int:
        s = self.settings
        if s.max_sessions < self.n:
            log.error("max_sessions=%d is below workers=%d: each worker needs one", s.max_sessions, self.n)
            return 2
        own_dir = "PROMETHEUS_MULTIPROC_DIR" not in os.environ
        run_dir = (
            Path(tempfile.mkdtemp(prefix="lookback-"))
            if own_dir
            else Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
        )
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in run_dir.glob("*.db"):  # values of an earlier run would be summed in
            stale.unlink()
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(run_dir)
        self.run_dir = run_dir
        self.board = Board(run_dir / BOARD_FILE, self.n)
        self.reuseport = s.worker_socket == "reuseport" and hasattr(socket, "SO_REUSEPORT")
        sock = bind_socket(s.host, s.port, reuseport=self.reuseport, listen=not self.reuseport)
        self.sock = sock
        port = self.port = sock.getsockname()[1]
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        old_wakeup = signal.set_wakeup_fd(wake_w)
        log.info(
            "Lookback supervisor (pid %d): %d workers on http://%s:%d (%s), %d CPU(s); limits per "
            "server: max_sessions %d (divided), max_concurrent_scores %d (shared counter)",
            os.getpid(),
            self.n,
            s.host,
            port,
            "SO_REUSEPORT" if self.reuseport else "one shared socket",
            self.cpus,
            s.max_sessions,
            s.max_concurrent_scores,
        )
        try:
            for slot in self.slots:
                self._start(slot)
            code = self._loop(wake_r)
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._kill_all()
            os.close(wake_r)
            os.close(wake_w)
            sock.close()
            self.board.close()
            if own_dir:
                shutil.rmtree(run_dir, ignore_errors=True)
        return code

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        self.signals.append(sig)  # handled in the loop; set_wakeup_fd wakes it

    def _loop(self, wake_r: int) -> int:
        while True:
            for sig in self._take_signals():
                if self.draining:
                    log.warning("second %s: stopping every worker now", signal.Signals(sig).name)
                    self._kill_all()
                    return 128 + sig
                self._drain(f"received {signal.Signals(sig).name}")
            self._reap()
            if self.failed and not self.draining:
                self._drain("a worker failed to start")
            now = time.monotonic()
            if self.draining:
                if not self._alive():
                    return self._exit_code()
                if now > self.drain_deadline:
                    log.error(
                        "workers still running %.0fs after SIGTERM: killing them", now - self.drain_started
                    )
                    self._kill_all()
                    return 1
            else:
                for slot in self.slots:
                    if slot.restart_at is not None and now >= slot.restart_at:
                        self._start(slot)
            self._note_ready()
            waits: list[Any] = [wake_r] + [sl.proc.sentinel for sl in self.slots if sl.proc is not None]
            multiprocessing.connection.wait(waits, timeout=self._timeout(now))
            with contextlib.suppress(BlockingIOError, InterruptedError):
                os.read(wake_r, 512)

    def _take_signals(self) -> list[int]:
        out, self.signals = self.signals, []
        return out

    def _timeout(self, now: float) -> float:
        if self.draining:
            return max(0.0, min(1.0, self.drain_deadline - now))
        starting = any(sl.proc is not None and not sl.ever_ready for sl in self.slots)
        due = [sl.restart_at - now for sl in self.slots if sl.restart_at is not None]
        # a worker becoming ready is seen on the board, not through a file descriptor
        return max(0.0, min([0.2 if starting else 5.0, *due]))

    # -- workers ---------------------------------------------------------------------------
    def _start(self, slot: _Slot) -> None:
        ws = worker_settings(self.settings, slot.index, self.n, self.cpus, gpu=self.gpu)
        ws = ws.model_copy(update={"port": self.port})
        self.board.set(slot.index, STARTING, 0)
        proc = self.ctx.Process(
            target=worker_main,
            args=(ws, slot.index, None if self.reuseport else self.sock, str(self.board.path), os.getpid()),
            name=f"lookback-worker-{slot.index}",
        )
        proc.start()
        slot.proc, slot.started, slot.restart_at, slot.ever_ready = proc, time.monotonic(), None, False
        log.info(
            "worker %d started (pid %d): max_sessions %d, ORT threads %d, model calls %s",
            slot.index,
            proc.pid,
            ws.max_sessions,
            ws.intra_op_threads,
            ws.model_calls,
        )

    def _note_ready(self) -> None:
        for slot in self.slots:
            if slot.proc is not None and not slot.ever_ready and self.board.state(slot.index) == READY:
                slot.ever_ready = True

    def _alive(self) -> bool:
        return any(sl.proc is not None for sl in self.slots)

    def _reap(self) -> None:
        from prometheus_client.multiprocess import mark_process_dead

        self._note_ready()
        for slot in self.slots:
            proc = slot.proc
            if proc is None or proc.is_alive():
                continue
            proc.join()
            slot.proc, slot.exitcode = None, proc.exitcode
            mark_process_dead(proc.pid, str(self.run_dir))  # its live gauges stop counting
            self.board.set(slot.index, DOWN)
            self.board.clear(slot.index)
            if self.draining:
                log.info("worker %d exited (code %s)", slot.index, proc.exitcode)
                if not slot.ever_ready and proc.exitcode == -signal.SIGTERM:
                    slot.exitcode = 0  # killed by the drain while loading: it held no session
                continue
            if not slot.ever_ready:
                log.error("worker %d failed to start (exit code %s): stopping", slot.index, proc.exitcode)
                self.failed = True
                continue
            now = time.monotonic()
            slot.crashes = [t for t in slot.crashes if now - t < self.RESTART_WINDOW_S] + [now]
            delay = 0.0 if len(slot.crashes) == 1 else min(self.MAX_BACKOFF_S, 2.0 ** (len(slot.crashes) - 2))
            slot.restart_at = now + delay
            self.board.add_restart(slot.index)
            log.error(
                "worker %d (pid %d) died (exit code %s); restarting in %.0fs",
                slot.index,
                proc.pid,
                proc.exitcode,
                delay,
            )

    def _drain(self, why: str) -> None:
        self.draining = True
        self.drain_started = time.monotonic()
        # each worker drains within the grace, then uvicorn's own shutdown may wait as long
        self.drain_deadline = self.drain_started + 2 * self.settings.drain_grace_s + 10.0
        log.info("%s: draining %d workers", why, len(self._procs()))
        for slot in self.slots:
            slot.exitcode = None  # the exit code is the drain's: an earlier crash was reported then
        for proc in self._procs():
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)

    def _procs(self) -> list[Any]:
        return [sl.proc for sl in self.slots if sl.proc is not None]

    def _kill_all(self) -> None:
        for proc in self._procs():
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
        for slot in self.slots:
            if slot.proc is not None:
                slot.proc.join(10)
                slot.exitcode, slot.proc = slot.proc.exitcode, None

    def _exit_code(self) -> int:
        if self.failed:
            return 1
        bad = [sl.index for sl in self.slots if sl.exitcode not in (0, None)]
        if bad:
            log.error("workers %s exited with an error during the drain", bad)
            return 1
        log.info("every worker drained: exiting")
        return 0


def supervise(settings: Settings, n: int) -> int:
    """Run ``n`` workers under one supervisor until a signal; the process exit code."""
    return Supervisor(settings, n).run()


def serve(settings: Settings) -> int:
    """``lookback serve``: one server process, or a supervisor of ``workers`` of them."""
    workers = resolve_workers(settings.workers)
    if workers > 1:
        logging.basicConfig(
            level=settings.log_level.upper(),
            format="%(asctime)s %(levelname)s [supervisor] %(name)s: %(message)s",
        )
        return supervise(settings, workers)
    from lookback.server import serve as serve_one

    return serve_one(settings)
