"""Admission: whether a new session or upload may start now, and the offline queue's places.

Load is shed before latency grows: a new session is refused while draining, before the
models are warm, at the session cap, or while the batcher is behind; an upload gets a
place in a bounded queue or a 503. Open connections themselves are kept by
``lookback.api.connection.Connections``; connections that have not sent a whole request
head yet are kept apart, in a ``HeadBudget``, so idle sockets cannot take anyone's place.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

from lookback.engine.engine import Engine
from lookback.settings import Settings


class Peers(Protocol):
    """The other workers of this server (``--workers N``; ``lookback.workers.Board``)."""

    def all_ready(self) -> bool: ...
    def any_draining(self) -> bool: ...
    def sessions(self) -> int: ...
    def describe(self) -> list[dict[str, Any]]: ...


class OfflineGate(Protocol):
    """Server-wide offline places shared by every worker (``lookback.workers.ScoreGate``)."""

    def admit(self) -> bool: ...
    def running(self) -> AbstractAsyncContextManager[None]: ...
    def release(self) -> None: ...


class Admission:
    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        self.reserved = 0  # WebSocket handlers between admission and close
        self.draining = False
        self.scores_running = 0
        self._score_sem = asyncio.Semaphore(settings.max_concurrent_scores)
        self.worker = 0  # this process's index under --workers N (lookback/workers.py)
        self.peers: Peers | None = None  # --workers N: every worker's state, for /readyz
        self.score_gate: OfflineGate | None = None  # --workers N: server-wide offline limits

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

    def admit_score(self) -> ScoreLease | None:
        """A place in the offline queue, or None when it is full (the caller answers 503)."""
        s = self.settings
        if self.draining or self.scores_running >= s.max_concurrent_scores + s.max_queued_scores:
            return None
        if self.score_gate is not None and not self.score_gate.admit():
            return None
        self.scores_running += 1
        return ScoreLease(self)


class ScoreLease:
    """One admitted offline request: a queue place now, an executor slot while scoring."""

    def __init__(self, admission: Admission) -> None:
        self.admission = admission
        self.released = False

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        async with self.admission._score_sem:
            if self.admission.score_gate is None:
                yield
                return
            async with self.admission.score_gate.running():
                yield

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.admission.scores_running -= 1
            if self.admission.score_gate is not None:
                self.admission.score_gate.release()


class Unadmitted(Protocol):
    """A connection before its request head is complete (``lookback.transport``)."""

    def evict(self) -> None: ...


class HeadBudget:
    """Connections that have not sent a whole request head: new, slow, idle between
    keep-alive requests, or refused and not yet closed by their client.

    No key is needed to open them, so they never count against the connection limit that
    admitted work gets; they get this budget of their own. Past ``limit``, the oldest
    connection of the client address holding the most is evicted: idle sockets from one
    place cannot push out anyone else's, and a legitimate client, whose head follows its
    connection at once, is among the newest. Only connections older than ``grace_s`` are
    evicted (a burst accepted at once has its heads already on the way): a younger surplus
    is swept once it is old enough.
    """

    def __init__(self, limit: int, loop: asyncio.AbstractEventLoop, grace_s: float = 1.0) -> None:
        self.limit = limit
        self.grace_s = grace_s
        self.loop = loop
        self._address: dict[Unadmitted, str] = {}
        self._groups: dict[str, dict[Unadmitted, float]] = {}  # per address, oldest first
        self._sweep: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._address)

    def add(self, conn: Unadmitted, address: str) -> None:
        """Count ``conn`` (again a no-op: it keeps its age), evicting the surplus."""
        if conn in self._address:
            return
        self._address[conn] = address
        self._groups.setdefault(address, {})[conn] = self.loop.time()
        if len(self._address) > self.limit:
            self._shed()

    def discard(self, conn: Unadmitted) -> None:
        address = self._address.pop(conn, None)
        if address is not None:
            group = self._groups[address]
            del group[conn]
            if not group:
                del self._groups[address]

    def _shed(self) -> None:
        while len(self._address) > self.limit:
            group = max(self._groups.values(), key=len)  # ties: the address seen first
            victim, since = next(iter(group.items()))
            if since > self.loop.time() - self.grace_s:  # too young: come back when it is not
                if self._sweep is None:  # (a timer may fire a clock tick early: a little later)
                    self._sweep = self.loop.call_at(since + self.grace_s + 0.01, self._swept)
                return
            self.discard(victim)
            victim.evict()

    def _swept(self) -> None:
        self._sweep = None
        self._shed()
