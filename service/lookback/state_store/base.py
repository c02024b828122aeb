"""The state store's interface and its values, shared by the implementations."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

Outcome = Literal["ok", "unknown", "expired", "used", "conflict"]


LOST, WRITTEN, NEEDS_SNAPSHOT = 0, 1, 2  # what ``sync`` answers per put


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

    async def secrets(self, offer: list[bytes]) -> tuple[bytes, list[bytes]]:
        """The resume secret every server on this store shares, and every one it knows.

        ``offer`` (this server's secrets, its current one first) goes back into a store
        that lost them (an empty restart): the first becomes the shared one if none is set,
        and the others stay known, so tokens issued before the restart still verify.
        """

    async def sync(self, puts: list[Put]) -> list[int]:
        """Write snapshots / renew leases in one round trip. Per put: ``WRITTEN``,
        ``LOST`` (another owner has the lease) or ``NEEDS_SNAPSHOT`` (lease renewed, but
        the store holds no snapshot: it expired or the store restarted empty)."""

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
