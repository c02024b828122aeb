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

from lookback.state_store.base import (
    LOST,
    NEEDS_SNAPSHOT,
    WRITTEN,
    Outcome,
    Put,
    StateStore,
    StoreUnavailable,
)

__all__ = [
    "LOST",
    "NEEDS_SNAPSHOT",
    "WRITTEN",
    "Outcome",
    "Put",
    "StateStore",
    "StoreUnavailable",
    "open_store",
]


def open_store(url: str, *, window_s: float, lease_s: float, tomb_s: float) -> StateStore:
    """``memory`` or ``redis://...`` / ``rediss://...`` / ``unix://...``."""
    if url in ("", "memory", "memory://"):
        from lookback.state_store.memory import MemoryStore

        return MemoryStore(window_s=window_s, lease_s=lease_s, tomb_s=tomb_s)
    if url.startswith(("redis://", "rediss://", "unix://")):
        from lookback.state_store.redis import RedisStore

        return RedisStore(url, window_s=window_s, lease_s=lease_s, tomb_s=tomb_s)
    raise ValueError(f"state_store must be 'memory' or a redis:// URL, not {url[:40]!r}")
