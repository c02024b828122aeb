"""Where session snapshots live between connections: one small async interface.

``MemoryStore`` (the default) keeps them in this process: resume works after a dropped
connection to the same server. ``RedisStore`` (``LOOKBACK_STATE_STORE=redis://...``)
shares them between replicas: a client may resume on any of them after a crash, a
drain or a scale-down.

Per session id the store keeps three entries, so every refusal has its own answer:
the snapshot (TTL = the resume window), a tombstone that outlives it (``live`` while
resumable, ``used`` once a resume consumed it: tells "expired" from "unknown" and
refuses a replayed token), and a lease naming the one connection that owns the session
(TTL ``lease_s``, renewed at every checkpoint). Writes are conditional on the lease, so
a server that lost a session (its client resumed elsewhere) cannot overwrite it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

Outcome = Literal["ok", "unknown", "expired", "used", "conflict"]


class StoreUnavailable(Exception):
    """The store cannot be reached now; streaming goes on without durable snapshots."""


@dataclass(frozen=True, slots=True)
class Put:
    sid: str
    owner: str
    data: bytes | None  # None: renew the lease only
    release: bool = False  # give up the lease after writing (disconnect, drain)


class StateStore(Protocol):
    kind: str
    available: bool

    async def start(self) -> None:
        """Connect; never raises: an unreachable store leaves ``available`` False."""

    async def stop(self) -> None: ...

    async def secret(self) -> bytes:
        """A key shared by every server on this store, for resume-token MACs."""

    async def sync(self, puts: list[Put]) -> list[bool]:
        """Write snapshots / renew leases in one round trip; False where the lease is lost."""

    async def claim(self, sid: str, owner: str) -> tuple[Outcome, bytes | None]:
        """Take the lease of ``sid`` for a resume and read its snapshot."""

    async def consume(self, old: str, new: str, owner: str, data: bytes) -> bool:
        """Finish a resume: ``old`` becomes used, ``new`` holds ``data`` owned by ``owner``."""

    async def release(self, sid: str, owner: str) -> None:
        """Give up a claimed lease without consuming (the resume was refused)."""

    async def discard(self, sid: str) -> None:
        """The session ended normally: nothing to resume."""

    async def ping(self) -> None:
        """Raise StoreUnavailable if the store is unreachable (keeps ``available`` honest)."""


def open_store(url: str, *, window_s: float, lease_s: float, tomb_s: float) -> StateStore:
    """``memory`` or ``redis://...`` / ``rediss://...`` / ``unix://...``."""
    if url in ("", "memory", "memory://"):
        from lookback.state_store.memory import MemoryStore

        return MemoryStore(window_s=window_s, lease_s=lease_s, tomb_s=tomb_s)
    if url.startswith(("redis://", "rediss://", "unix://")):
        from lookback.state_store.redis import RedisStore

        return RedisStore(url, window_s=window_s, lease_s=lease_s, tomb_s=tomb_s)
    raise ValueError(f"state_store must be 'memory' or a redis:// URL, not {url[:40]!r}")
