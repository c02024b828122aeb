"""In-process state store: no setup; resume works within this server process.

Entries expire by monotonic deadline, swept lazily; tombstones are also capped in
number (oldest dropped first), so memory stays bounded however many sessions come and go.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict

from lookback.state_store.base import LOST, NEEDS_SNAPSHOT, WRITTEN, Outcome, Put

MAX_TOMBSTONES = 100_000


class MemoryStore:
    kind = "memory"

    def __init__(self, *, window_s: float, lease_s: float, tomb_s: float) -> None:
        self.window_s, self.lease_s, self.tomb_s = window_s, lease_s, tomb_s
        self.available = True
        self._secret = secrets.token_bytes(32)
        self._snaps: dict[str, tuple[bytes, float]] = {}
        self._leases: dict[str, tuple[str, float]] = {}
        self._tombs: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._next_sweep = 0.0

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        self._snaps.clear()
        self._leases.clear()
        self._tombs.clear()

    async def secrets(self, offer: list[bytes]) -> tuple[bytes, list[bytes]]:
        return self._secret, [self._secret]

    # -- helpers ---------------------------------------------------------------------------
    def _get(self, d: dict, key: str, now: float) -> object:
        item = d.get(key)
        if item is None:
            return None
        if item[1] <= now:
            del d[key]
            return None
        return item[0]

    def _sweep(self, now: float) -> None:
        if now < self._next_sweep:
            return
        self._next_sweep = now + 1.0
        for d in (self._snaps, self._leases, self._tombs):
            for k in [k for k, (_, exp) in d.items() if exp <= now]:
                del d[k]
        while len(self._tombs) > MAX_TOMBSTONES:
            self._tombs.popitem(last=False)

    def _tomb(self, sid: str, value: str, now: float) -> None:
        self._tombs[sid] = (value, now + self.tomb_s)
        self._tombs.move_to_end(sid)

    # -- interface -------------------------------------------------------------------------
    async def sync(self, puts: list[Put]) -> list[int]:
        now = time.monotonic()
        self._sweep(now)
        out = []
        for p in puts:
            lease = self._get(self._leases, p.sid, now)
            if (lease is not None and lease != p.owner) or self._get(self._tombs, p.sid, now) == "used":
                out.append(LOST)
                continue
            answer = WRITTEN
            if p.data is not None:
                self._snaps[p.sid] = (p.data, now + self.window_s)
                self._tomb(p.sid, "live", now)
            elif self._get(self._snaps, p.sid, now) is None:
                answer = NEEDS_SNAPSHOT
            if p.release:
                self._leases.pop(p.sid, None)
            else:
                self._leases[p.sid] = (p.owner, now + self.lease_s)
            out.append(answer)
        return out

    async def claim(self, sid: str, owner: str) -> tuple[Outcome, bytes | None]:
        now = time.monotonic()
        tomb = self._get(self._tombs, sid, now)
        if tomb is None:
            return "unknown", None
        if tomb == "used":
            return "used", None
        lease = self._get(self._leases, sid, now)
        if lease is not None and lease != owner:
            return "conflict", None
        snap = self._get(self._snaps, sid, now)
        if snap is None:
            return "expired", None
        self._leases[sid] = (owner, now + self.lease_s)
        assert isinstance(snap, bytes)
        return "ok", snap

    async def consume(self, old: str, new: str, owner: str, data: bytes) -> bool:
        now = time.monotonic()
        if self._get(self._leases, old, now) != owner:
            return False
        self._snaps.pop(old, None)
        self._leases.pop(old, None)
        self._tomb(old, "used", now)
        self._snaps[new] = (data, now + self.window_s)
        self._tomb(new, "live", now)
        self._leases[new] = (owner, now + self.lease_s)
        return True

    async def release(self, sid: str, owner: str) -> None:
        if self._get(self._leases, sid, time.monotonic()) == owner:
            del self._leases[sid]

    async def discard(self, sid: str) -> None:
        self._snaps.pop(sid, None)
        self._leases.pop(sid, None)
        self._tombs.pop(sid, None)

    async def ping(self) -> None:
        return None
