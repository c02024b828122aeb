"""Idle sessions held open, for memory-per-session measurements."""

from __future__ import annotations

import asyncio
from collections import Counter

from lookback.loadtest.config import LoadConfig, auth_headers, check_urls, query_string
from lookback.loadtest.fanout import raise_fd_limit
from lookback.loadtest.rawclient import Proc, RawSession


class IdleSessions:
    """Open ``n`` sessions and keep them idle: ``async with IdleSessions(...) as s``."""

    def __init__(
        self,
        url: str,
        n: int,
        *,
        model: str | None = None,
        api_key: str | None = None,
        concurrency: int = 32,
        timeout: float = 15.0,
    ) -> None:
        self.cfg = LoadConfig(
            urls=[url],
            sessions=n,
            model=model,
            api_key=api_key,
            connect_concurrency=concurrency,
            connect_timeout=timeout,
        )
        self.sessions: list[RawSession] = []

    @property
    def ready(self) -> int:
        return sum(1 for s in self.sessions if s.ready and not s.closed)

    @property
    def failures(self) -> dict[str, int]:
        return dict(Counter(s.failure for s in self.sessions if s.failure and not s.ready))

    async def __aenter__(self) -> IdleSessions:
        cfg = self.cfg
        check_urls(cfg)
        raise_fd_limit(cfg.sessions)
        proc = Proc(cfg)
        sem = asyncio.Semaphore(cfg.connect_concurrency)
        msgs = [b""]

        async def one() -> RawSession:
            async with sem:
                return await RawSession.open(
                    proc, msgs, 0, cfg.urls[0], query_string(cfg), auth_headers(cfg), cfg.connect_timeout
                )

        self.sessions = list(await asyncio.gather(*(one() for _ in range(cfg.sessions))))
        return self

    async def __aexit__(self, *exc: object) -> None:
        for s in self.sessions:
            s.send_end()
        pending = [s.done_fut for s in self.sessions if not s.done_fut.done()]
        if pending:
            await asyncio.wait(pending, timeout=10)
        for s in self.sessions:
            s.close()


# ------------------------------------------------------------------------------------------
