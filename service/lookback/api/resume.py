"""Resume: tokens, periodic checkpoints, resume on connect, migration on drain.

A resume token is ``<session id>.<key id><issuer mac><key mac>``: the session id is 128
random bits; the first MAC (HMAC-SHA256 under the resume secret) proves the token was
issued by this service, the second binds it to the API key that opened the session.
Both are checked before the store is asked anything, so a caller with another key
learns nothing about whether the session exists. A successful resume consumes the token
(the store marks its session ``used``) and issues a new one.

The resume secret is ``settings.resume_secret`` where configured (every replica the
same, whatever happens to the store); otherwise one the replicas share through the
store. Each replica re-offers the secrets it holds every ``SECRET_REFRESH_S``, so a store
that restarted empty gets them back and tokens issued before still verify on every
replica; the key id says which secret signed a token, so one signed with a secret no
replica holds any more is told apart (``resume_secret_rotated``) from a forged one.

Snapshots go into the store sealed (``lookback.engine.snapshot.seal``): a MAC under the
same secret binds them to their session id and API key.

Checkpoints never touch the per-frame path: one task visits every session once per
``snapshot_interval_s``, snapshots those that advanced and are idle (tens of
microseconds each, on the event loop), writes them in one pipelined store round trip
together with the lease renewals of the others, and then tells each client
``{"type":"checkpoint","samples":N}``: audio before sample N is durable and need not be
kept for a replay. The visits are spread over ticks of about ``TICK_S`` (each session has
its turn), because one burst of every session's snapshot per interval stalls the event
loop long enough to show in every stream's latency.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import itertools
import logging
import re
import secrets
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import orjson

from lookback.engine import snapshot as snapmod
from lookback.engine.events import Event
from lookback.engine.session import ResultSink, StreamSession
from lookback.errors import LookbackError, ModelNotFound, SnapshotError
from lookback.protocol import Close, checkpoint_message, error_message, spec_for
from lookback.state_store import LOST, NEEDS_SNAPSHOT, Put, StateStore, StoreUnavailable, open_store

if TYPE_CHECKING:
    from fastapi import WebSocket

    from lookback.engine.engine import Engine
    from lookback.engine.served import ServedModel
    from lookback.metrics import Metrics
    from lookback.settings import Settings

log = logging.getLogger("lookback.resume")
TICK_S = 0.025  # a checkpoint interval is spread over ticks of about this length
SECRET_REFRESH_S = 1.0  # how often a replica re-offers and re-reads the store's secrets
_MAX_SECRETS = 16  # secrets a replica accepts tokens of (the newest)
_turns = itertools.count()  # spreads sessions evenly over a round's ticks
_TOKEN = re.compile(r"^([A-Za-z0-9_-]{22})\.([A-Za-z0-9_-]{8})([A-Za-z0-9_-]{32})$")
_RESULTS = ("all", "batch", "events")
_COUNT_PARAMS = ("next_step", "sent")  # the resume query's counters, checked before the token
_OUTCOME_CODE = {
    "unknown": "resume_unknown",
    "expired": "resume_expired",
    "used": "resume_token_used",
    "conflict": "resume_conflict",
}
_METRIC_OUTCOME = {
    "resume_token_invalid": "invalid",
    "resume_forbidden": "forbidden",
    "resume_unknown": "unknown",
    "resume_expired": "expired",
    "resume_token_used": "used",
    "resume_conflict": "conflict",
    "resume_incompatible": "incompatible",
    "snapshot_invalid": "incompatible",
    "snapshot_version": "incompatible",
    "resume_unavailable": "unavailable",
    "resume_secret_rotated": "rotated",
    "bad_query": "invalid",
}


Recent = tuple[int, float, Sequence[float], list[Event] | None]
"""A result as on_result got it (step, end time, scores, events): a resume re-sends it."""


@dataclass
class ResumeState:
    """A connection's resumable identity."""

    sid: str
    owner: str  # this connection: the lease holder
    key_fp: str
    token: str | None = None
    token_sent: bool = False
    written_frames: int = -1  # frames in the last durable snapshot
    migrated: bool = False  # final snapshot written or being written: rounds skip it
    resend: list[Any] = field(default_factory=list)  # tail results to re-send after ready
    marks: deque[int] = field(default_factory=lambda: deque(maxlen=2))  # steps of the last writes
    turn: int = field(default_factory=lambda: next(_turns))  # which tick of a round visits it


class Resumable(ResultSink, Protocol):
    """What the resumer needs of a connection (``lookback.api.connection.Connection``): the
    restored session's sink, its resume fields, its output and close.

    A protocol, not an import: the connection module knows the resumer, not the reverse.
    """

    resume: ResumeState | None
    recent: deque[Recent] | None
    ready_extra: dict[str, Any]
    session: StreamSession | None
    handle: ServedModel
    results: str  # all | batch | events, as the client asked

    @property
    def ended(self) -> bool: ...

    @property
    def end_reason(self) -> str | None: ...

    def send_message(self, text: str) -> None: ...

    def close_now(self, code: int, reason: str, message: str) -> None: ...

    def close_after_queue(self, code: int, reason: str) -> None: ...


C = TypeVar("C", bound=Resumable)


def _b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).decode().rstrip("=")


def key_fingerprint(api_key: str | None) -> str:
    return hashlib.sha256((api_key or "").encode()).hexdigest()


def key_id(secret: bytes) -> str:
    """8 characters naming a secret (not revealing it): tokens and snapshots carry it."""
    return _b64(hmac.new(secret, b"key-id", hashlib.sha256).digest()[:6])


def _context(sid: str, key_fp: str) -> str:
    return f"{sid}|{key_fp}"


def _count_params(ws: WebSocket) -> dict[str, int]:
    """The resume query's counters, refused (``bad_query``) unless plain numbers in range."""
    out = {}
    for name in _COUNT_PARAMS:
        v = ws.query_params.get(name)
        if not v:
            continue
        if not (v.isascii() and v.isdigit()) or len(v) > 16 or int(v) > snapmod.MAX_COUNT:
            raise LookbackError(f"{name} must be a whole number below 2^53", code="bad_query")
        out[name] = int(v)
    return out


class Resumer:
    def __init__(self, settings: Settings, metrics: Metrics, store: StateStore | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.store = store or open_store(
            settings.state_store,
            window_s=settings.resume_window_s,
            lease_s=settings.resume_lease_s,
            tomb_s=settings.resume_tombstone_s,
        )
        self._keys: dict[str, tuple[bytes, bytes]] = {}  # key id -> (secret, snapshot key)
        self._current: str | None = None  # key id of the secret new tokens and snapshots use
        self._configured = settings.resume_secret is not None
        if settings.resume_secret is not None:
            self._current = self._adopt(settings.resume_secret.get_secret_value().encode())
        self._refreshed = -SECRET_REFRESH_S  # monotonic time of the last refresh
        self._task: asyncio.Task[None] | None = None
        self.connections: Iterable[Resumable] = ()
        self._next_ping = 0.0

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self, connections: Iterable[Resumable]) -> None:
        self.connections = connections
        await self.store.start()
        await self.refresh()
        self._publish()
        self._task = asyncio.create_task(self._loop(), name="checkpoints")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.store.stop()

    def _publish(self) -> None:
        self.metrics.store_up.labels(self.store.kind).set(1 if self.store.available else 0)

    @property
    def can_migrate(self) -> bool:
        """Drain hands sessions to other replicas only through a shared, reachable store."""
        return self.store.kind != "memory" and self.store.available

    def readiness(self) -> dict[str, Any]:
        return {"store": self.store.kind, "available": self.store.available}

    # -- secrets and tokens ------------------------------------------------------------------
    def _adopt(self, secret: bytes) -> str:
        kid = key_id(secret)
        self._keys.pop(kid, None)  # newest last
        self._keys[kid] = (secret, hmac.new(secret, b"snapshot-key", hashlib.sha256).digest())
        while len(self._keys) > _MAX_SECRETS:
            oldest = next(k for k in self._keys if k != self._current)
            del self._keys[oldest]
        return kid

    async def refresh(self) -> None:
        """Agree with the store on the shared secret; put back what an empty restart lost.

        A configured secret needs no store. Otherwise this server offers its secrets
        (current first) and adopts the store's: the one it then signs with, and every
        other one it knows, which it accepts.
        """
        self._refreshed = time.monotonic()
        if self._configured:
            return
        offer = [self._keys[k][0] for k in reversed(self._keys)]
        if self._current is not None:
            offer.insert(0, offer.pop(offer.index(self._keys[self._current][0])))
        try:
            current, known = await self.store.secrets(offer)
        except StoreUnavailable:
            return
        for s in known:
            if key_id(s) not in self._keys:
                self._adopt(s)
        self._current = self._adopt(current)

    async def _key(self) -> tuple[str, bytes] | None:
        if self._current is None:
            await self.refresh()
        return None if self._current is None else (self._current, self._keys[self._current][0])

    def seal(self, st: ResumeState, data: bytes) -> bytes:
        assert self._current is not None  # a session has a token (a secret) before any write
        return snapmod.seal(data, self._keys[self._current][1], self._current, _context(st.sid, st.key_fp))

    def _unseal(self, data: bytes, sid: str, key_fp: str) -> bytes:
        return snapmod.unseal(data, {k: v[1] for k, v in self._keys.items()}, _context(sid, key_fp))

    @staticmethod
    def _macs(secret: bytes, sid: str, key_fp: str) -> tuple[str, str]:
        issuer = hmac.new(secret, b"issue|" + sid.encode(), hashlib.sha256).digest()[:12]
        scoped = hmac.new(secret, f"key|{sid}|{key_fp}".encode(), hashlib.sha256).digest()[:12]
        return _b64(issuer), _b64(scoped)

    async def issue(self, state: ResumeState) -> None:
        key = await self._key()
        if key is not None:
            kid, secret = key
            a, b = self._macs(secret, state.sid, state.key_fp)
            state.token = f"{state.sid}.{kid}{a}{b}"

    async def new_state(self, api_key: str | None) -> ResumeState:
        state = ResumeState(_b64(secrets.token_bytes(16)), uuid.uuid4().hex, key_fingerprint(api_key))
        await self.issue(state)
        return state

    async def verify(self, token: str, api_key: str | None) -> str:
        """The session id of a genuine token of this key; refuses without asking the store."""
        m = _TOKEN.match(token)
        if m is None:
            raise LookbackError("resume token is malformed", code="resume_token_invalid")
        sid, kid, tag = m.groups()
        if kid not in self._keys and time.monotonic() - self._refreshed >= SECRET_REFRESH_S / 4:
            await self.refresh()  # signed by a replica whose secret this one has not seen yet
        if self._current is None:
            raise LookbackError("state store unreachable: cannot resume now", code="resume_unavailable")
        if kid not in self._keys:
            raise LookbackError(
                "resume token was signed with a resume secret no replica holds any more "
                "(the state store lost it): retry shortly, else start a new session",
                code="resume_secret_rotated",
            )
        a, b = self._macs(self._keys[kid][0], sid, key_fingerprint(api_key))
        if not hmac.compare_digest(tag[:16], a):
            raise LookbackError("resume token was not issued by this service", code="resume_token_invalid")
        if not hmac.compare_digest(tag[16:], b):
            raise LookbackError("resume token belongs to another API key", code="resume_forbidden")
        return sid

    # -- resume on connect -------------------------------------------------------------------
    async def open_resumed(
        self,
        ws: WebSocket,
        engine: Engine,
        token: str,
        api_key: str | None,
        connect: Callable[[ServedModel, str, str], C],
    ) -> C | None:
        """Restore the session of ``token`` into a new connection, or refuse with its code.

        ``connect(model, results, session_id)`` makes the connection (the restored
        session's sink). Returns it, its ``ready_extra`` saying where the client resumes,
        or None after sending the refusal.
        """

        state: ResumeState | None = None
        old_sid: str | None = None
        claimed = False
        try:
            counts = _count_params(ws)  # a bad parameter must not cost the session its token
            if not self.store.available:
                raise LookbackError("state store unreachable: cannot resume now", code="resume_unavailable")
            old_sid = await self.verify(token, api_key)
            state = ResumeState(_b64(secrets.token_bytes(16)), uuid.uuid4().hex, key_fingerprint(api_key))
            outcome, data = await self.store.claim(old_sid, state.owner)
            if outcome != "ok" or data is None:
                raise LookbackError(f"cannot resume: {outcome}", code=_OUTCOME_CODE[outcome])
            claimed = True
            body = self._unseal(data, old_sid, state.key_fp)
            snap = snapmod.decode(body)
            tail = self._tail(snap)  # everything that can refuse comes before the restore
            next_step = counts.get("next_step", snap.steps)
            results = snap.options.get("results", "all")
            if results not in _RESULTS:
                raise SnapshotError(f"snapshot results mode {results[:20]!r} is not one this server sends")
            try:
                model = engine.resolve(snap.model, snap.version)
            except ModelNotFound as exc:
                raise SnapshotError(
                    f"model {snap.model}/{snap.version} of the snapshot is not served here",
                    code="resume_incompatible",
                ) from exc
            conn = connect(model, results, state.sid)
            conn.session = StreamSession.restore(
                model,
                conn,
                snap,
                max_pending_steps=self.settings.max_pending_steps,
                max_amplitude=self.settings.max_float_amplitude,
            )
            try:  # from here a refusal must free the restored session's slot
                conn.resume = state
                conn.recent = deque(maxlen=self.settings.resume_tail_messages)
                state.resend = [r for r in tail if r[0] >= next_step]
                conn.recent.extend(r for r in tail if r[0] < next_step)  # on_result adds the rest
                events_sent = (
                    snap.events_truncated + len(snap.events) - sum(len(r[3] or ()) for r in state.resend)
                )
                sealed = self.seal(state, body)  # bound to the new session id
                if not await self.store.consume(old_sid, state.sid, state.owner, sealed):
                    raise LookbackError("another connection took the session", code="resume_conflict")
            except BaseException:
                conn.session.close()
                raise
            claimed = False
            state.written_frames = snap.frames
            await self.issue(state)
            state.token_sent = state.token is not None
        except StoreUnavailable:
            await self._refuse(ws, "resume_unavailable", "state store unreachable: cannot resume now")
            return None
        except Exception as exc:  # anything unforeseen must not leave the lease held
            if claimed and old_sid is not None and state is not None:
                with contextlib.suppress(StoreUnavailable):
                    await self.store.release(old_sid, state.owner)
            if not isinstance(exc, LookbackError):
                log.exception("resume failed")
                exc = LookbackError(f"resume failed: {type(exc).__name__}", code="internal_error")
            await self._refuse(ws, exc.code, exc.message)
            return None
        self.metrics.resumes.labels("ok").inc()
        sent = counts.get("sent", 0)
        if sent > snap.samples:
            self.metrics.replayed_samples.inc(sent - snap.samples)
        conn.ready_extra = {
            "resumed": True,
            "replay_from_sample": snap.samples,
            "next_step": snap.steps,
            # > the client's next_step: results in between are gone (the tail did not reach)
            "resent_from_step": state.resend[0][0] if state.resend else snap.steps,
            "events_sent": events_sent,
            "resume_token": state.token,
        }
        return conn

    async def _refuse(self, ws: WebSocket, code: str, message: str) -> None:
        self.metrics.resumes.labels(_METRIC_OUTCOME.get(code, "error")).inc()
        self.metrics.error(code)
        await ws.send_text(error_message(code, message))
        await ws.close(code=spec_for(code).close or Close.BAD_REQUEST, reason=code)

    # -- checkpoints -------------------------------------------------------------------------
    @staticmethod
    def _options(conn: Resumable) -> dict[str, str]:
        """Transport options, and the results a client may not have received yet.

        A client that read checkpoint k-1 has every result sent before it, so the tail
        starts at the snapshot two writes back (capped by resume_tail_messages): a few
        dozen results, encoded by orjson straight from on_result's tuples and Events.
        """
        recent = conn.recent or deque()
        st = conn.resume
        since = st.marks[0] if st is not None and len(st.marks) == st.marks.maxlen else 0
        idx = 0
        if recent:
            idx = max(0, len(recent) - (recent[-1][0] - since + 1))
            while idx < len(recent) and recent[idx][0] < since:
                idx += 1
        tail = orjson.dumps(list(itertools.islice(recent, idx, None))).decode()
        return {"results": conn.results, "tail": tail}

    @staticmethod
    def _tail(snap: snapmod.Snapshot) -> list[Any]:
        try:
            return [
                (int(i), float(t), [float(x) for x in scores], [Event(**e) for e in evs] if evs else None)
                for i, t, scores, evs in orjson.loads(snap.options.get("tail", "[]"))
            ]
        except (ValueError, TypeError) as exc:
            raise SnapshotError(f"snapshot result tail is malformed: {exc}") from exc

    async def _loop(self) -> None:
        interval = self.settings.snapshot_interval_s
        ticks = max(1, round(interval / TICK_S))
        for tick in itertools.count():
            await asyncio.sleep(interval / ticks)  # the checkpoint period, not a wait for a condition
            try:
                if time.monotonic() - self._refreshed >= SECRET_REFRESH_S:
                    await self.refresh()  # a store that restarted empty gets the secrets back
                await self.checkpoint(tick % ticks, ticks)
            except Exception:  # a failed tick must not end checkpointing
                log.exception("checkpoint round failed")

    async def checkpoint(self, tick: int = 0, ticks: int = 1) -> int:
        """One tick of a round: the sessions whose turn it is are snapshotted if idle and
        advanced, or have their lease renewed. ``checkpoint()`` visits every session."""
        self._publish()
        if not self.store.available or await self._key() is None:
            return 0
        conns: list[Resumable] = []
        puts: list[Put] = []
        frames: list[int] = []
        taken: list[int] = []  # client samples in each snapshot (its rate, not the model's)
        steps: list[int] = []
        visited = 0
        for c in list(self.connections):
            st = c.resume
            if st is None or st.turn % ticks != tick:
                continue
            visited += 1
            if visited % 64 == 0:
                await asyncio.sleep(0)  # thousands of snapshots must not stall the loop in one go
            s = c.session
            if s is None or st.migrated or c.end_reason is not None or s.closed:
                continue
            data = None
            if s.frames != st.written_frames and s.idle:
                data = self.seal(st, s.snapshot(self._options(c)))
            conns.append(c)
            frames.append(s.frames if data is not None else -1)
            taken.append(s.client_samples)
            steps.append(s.steps_done)
            puts.append(Put(st.sid, st.owner, data))
        if not puts:
            now = time.monotonic()
            if now >= self._next_ping:  # idle: still notice a lost store (readyz, metric)
                self._next_ping = now + 1.0
                with contextlib.suppress(StoreUnavailable):
                    await self.store.ping()
                self._publish()
            return 0
        t0 = time.perf_counter()
        try:
            ok = await self.store.sync(puts)
        except StoreUnavailable:
            self._publish()
            return 0
        written = [p for p in puts if p.data is not None]
        self.metrics.snapshot_write.observe(time.perf_counter() - t0)
        self.metrics.snapshots.labels("checkpoint").inc(len(written))
        self.metrics.snapshot_bytes.inc(sum(len(p.data or b"") for p in written))
        for c, p, f, n, t, good in zip(conns, puts, frames, steps, taken, ok, strict=True):
            st = c.resume
            assert st is not None
            if good == LOST:
                c.close_now(
                    Close.RESUME_CONFLICT, "resume_conflict", "the session was resumed on another connection"
                )
                continue
            if p.data is None:
                if good == NEEDS_SNAPSHOT:  # the store lost it (expired, restarted empty)
                    st.written_frames = -1  # the next turn writes one
                continue
            st.written_frames = f
            st.marks.append(n)
            token = None
            if not st.token_sent:
                if st.token is None:
                    await self.issue(st)
                if st.token is not None:
                    token = st.token
                    st.token_sent = True
            c.send_message(checkpoint_message(t, token))
        return len(written)

    # -- end of a connection -----------------------------------------------------------------
    async def on_close(self, conn: Resumable, reason: str) -> None:
        """Normal end: forget the session. Anything else: a final snapshot, lease released."""
        st, s = conn.resume, conn.session
        if st is None or s is None or st.migrated:
            return
        st.migrated = True  # checkpoint rounds leave it alone from now on (no lease renewal)
        try:
            if reason in ("normal", "draining") or s.closed:  # the summary went out: nothing to resume
                await self.store.discard(st.sid)
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(s.wait_idle(), 2.0)
            if not s.idle or s.closed or await self._key() is None:
                await self.store.sync([Put(st.sid, st.owner, None, release=True)])
                return
            data = self.seal(st, s.snapshot(self._options(conn)))
            await self.store.sync([Put(st.sid, st.owner, data, release=True)])
            self.metrics.snapshots.labels("disconnect").inc()
            self.metrics.snapshot_bytes.inc(len(data))
        except StoreUnavailable:
            self._publish()

    async def migrate(self, conns: list[C], grace: float) -> list[C]:
        """Drain: snapshot every session, hand it to the store, close with 4100.

        Returns the connections that could not be migrated (still busy at the deadline,
        or not resumable); the caller finishes those the old way.
        """
        deadline = time.monotonic() + grace / 2
        if await self._key() is None:
            return conns
        ready: list[C] = []
        left: list[C] = []
        puts = []
        samples = []
        for c in conns:
            s, st = c.session, c.resume
            if st is None or s is None or c.ended:
                left.append(c)
                continue
            # The client may still be sending: idle is a moment between batches, so the
            # snapshot is taken in the same loop turn that sees it (no await in between).
            while not s.idle and not s.closed and (remaining := deadline - time.monotonic()) > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(s.wait_idle(), remaining)
            if not s.idle or s.closed:
                left.append(c)
                continue
            st.migrated = True  # the reader may still push: the client replays what follows
            puts.append(Put(st.sid, st.owner, self.seal(st, s.snapshot(self._options(c))), release=True))
            samples.append(s.client_samples)
            ready.append(c)
        try:
            ok = await self.store.sync(puts) if puts else []
        except StoreUnavailable:
            for c in ready:
                assert c.resume is not None
                c.resume.migrated = False
            return conns
        for c, p, n, good in zip(ready, puts, samples, ok, strict=True):
            if good == LOST:
                assert c.resume is not None
                c.resume.migrated = False
                left.append(c)
                continue
            self.metrics.sessions_migrated.inc()
            self.metrics.snapshots.labels("drain").inc()
            self.metrics.snapshot_bytes.inc(len(p.data or b""))
            c.send_message(checkpoint_message(n))
            c.close_after_queue(Close.RESUME_ELSEWHERE, "resume_elsewhere")
        return left
