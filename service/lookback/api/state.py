"""Server-wide state of the API layer: open connections, load shedding, timeouts, drain.

One reaper task checks every connection once a second for idle and maximum-duration
limits and publishes per-session counters in bulk, instead of a timer or a metric call
per frame on the hot path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from lookback.api.resume import Resumer
from lookback.engine.engine import Engine
from lookback.metrics import Metrics
from lookback.protocol import Close
from lookback.settings import Settings

if TYPE_CHECKING:
    from lookback.api.ws import Connection

log = logging.getLogger("lookback.service")


class ServiceState:
    def __init__(self, settings: Settings, engine: Engine, metrics: Metrics) -> None:
        self.settings = settings
        self.engine = engine
        self.metrics = metrics
        self.connections: set[Connection] = set()
        self.reserved = 0  # WebSocket handlers between admission and close
        self.draining = False
        self.scores_running = 0
        self._score_sem = asyncio.Semaphore(settings.max_concurrent_scores)
        self._reaper: asyncio.Task[None] | None = None
        self.resumer: Resumer | None = Resumer(settings, metrics) if settings.resume_enabled else None

    def refusal(self) -> tuple[str, str] | None:
        """Why a new session must be refused now (shed load before latency grows), or None."""
        if self.draining:
            return "draining", "server is draining; reconnect to another instance"
        if not self.engine.ready:
            return "not_ready", "models are still loading"
        if self.reserved >= self.settings.max_sessions:
            return "capacity", f"session cap reached ({self.settings.max_sessions})"
        if self.engine.backlog >= self.settings.shed_backlog_steps:
            return "backlog", "the batcher is behind; shedding new sessions"
        return None

    def account_frames(self, conn: Connection) -> None:
        session = conn.session
        if session is not None and session.frames > conn.frames_reported:
            self.metrics.frames.labels(conn.handle.spec.key).inc(session.frames - conn.frames_reported)
            conn.frames_reported = session.frames

    def admit_score(self) -> ScoreLease | None:
        """A place in the offline queue, or None when it is full (the caller answers 503)."""
        s = self.settings
        if self.draining or self.scores_running >= s.max_concurrent_scores + s.max_queued_scores:
            return None
        self.scores_running += 1
        return ScoreLease(self)

    def tick_metrics(self) -> None:
        for conn in list(self.connections):
            self.account_frames(conn)
        for key, h in self.engine.models.items():
            self.metrics.slots.labels(key, "used").set(h.table.used)
            self.metrics.slots.labels(key, "capacity").set(h.table.capacity)
            self.metrics.backlog.labels(key).set(h.batcher.backlog)

    # -- reaper ----------------------------------------------------------------------------
    def start(self) -> None:
        self._reaper = asyncio.create_task(self._reap(), name="reaper")

    async def stop(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper

    async def _reap(self) -> None:
        s = self.settings
        interval = min(1.0, s.idle_timeout_s / 4, s.max_session_s / 4)
        while True:
            await asyncio.sleep(interval)  # a periodic timer, not a wait for a condition
            self.tick(time.monotonic())

    def tick(self, now: float) -> None:
        s = self.settings
        loop_now = asyncio.get_running_loop().time()
        for conn in list(self.connections):
            if conn.end_reason is not None:
                continue
            if now - conn.opened > s.max_session_s:
                conn.close_now(
                    Close.MAX_DURATION, "max_duration", f"session reached max_session_s={s.max_session_s:g}"
                )
                self.metrics.error("max_duration")
            elif loop_now - conn.last_seen > s.idle_timeout_s and not conn.ended:
                conn.close_now(
                    Close.IDLE_TIMEOUT, "idle_timeout", f"no message for idle_timeout_s={s.idle_timeout_s:g}"
                )
                self.metrics.error("idle_timeout")
        self.tick_metrics()

    # -- graceful drain --------------------------------------------------------------------
    async def drain(self, grace: float) -> None:
        """Refuse new work, finish every open session with a summary and 1001, in ``grace``."""
        self.draining = True
        self.metrics.ready.set(0)
        conns = [c for c in self.connections if c.end_reason is None]
        log.info("draining %d open sessions (grace %.1fs)", len(conns), grace)
        if self.resumer is not None and self.resumer.can_migrate:
            # shared store: hand each session to another replica instead of ending it
            migrated = set(conns)
            conns = await self.resumer.migrate(conns, grace)
            migrated -= set(conns)
            log.info("%d sessions snapshotted for resume elsewhere", len(migrated))
            waiters = [c.writer for c in migrated if c.writer is not None]
            if waiters:
                await asyncio.wait(waiters, timeout=grace / 2)
        tasks = []
        for c in conns:
            if c.finisher is None:
                c.finisher = asyncio.create_task(c.finish(Close.GOING_AWAY, "draining"))
            tasks.append(c.finisher)
        writers = [c.writer for c in conns if c.writer is not None]
        if tasks or writers:
            _, pending = await asyncio.wait([*tasks, *writers], timeout=grace)
            if pending:
                log.warning("drain grace %.1fs over; %d sessions cut short", grace, len(pending))
        log.info("drain complete")


class ScoreLease:
    """One admitted offline request: a queue place now, an executor slot while scoring."""

    def __init__(self, svc: ServiceState) -> None:
        self.svc = svc
        self.released = False

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        async with self.svc._score_sem:
            yield

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.svc.scores_running -= 1
