"""Redis state store (redis-py asyncio): snapshots shared by every replica.

Each operation is one Lua script, so the lease check and the write are atomic across
replicas; ``sync`` pipelines a whole checkpoint round (every session's snapshot or lease
renewal) into one round trip. Socket timeouts are short: an unreachable Redis makes
``available`` False and raises ``StoreUnavailable`` (streaming goes on), and a probe
reconnects in the background; the next checkpoint round then writes again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from lookback.state_store.base import Outcome, Put, StoreUnavailable

log = logging.getLogger("lookback.state_store")
PREFIX = "lookback:session:"
SECRET_KEY = "lookback:resume-secret"

_PUT = """
local l = redis.call('GET', KEYS[3])
if (l and l ~= ARGV[1]) or redis.call('GET', KEYS[2]) == 'used' then return 0 end
if ARGV[2] ~= '' then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  redis.call('SET', KEYS[2], 'live', 'PX', ARGV[4])
end
if ARGV[6] == '1' then redis.call('DEL', KEYS[3])
else redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[5]) end
return 1
"""
_CLAIM = """
local t = redis.call('GET', KEYS[2])
if not t then return {'unknown'} end
if t == 'used' then return {'used'} end
local l = redis.call('GET', KEYS[3])
if l and l ~= ARGV[1] then return {'conflict'} end
local s = redis.call('GET', KEYS[1])
if not s then return {'expired'} end
redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[2])
return {'ok', s}
"""
_CONSUME = """
if redis.call('GET', KEYS[3]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1], KEYS[3])
redis.call('SET', KEYS[2], 'used', 'PX', ARGV[4])
redis.call('SET', KEYS[4], ARGV[2], 'PX', ARGV[3])
redis.call('SET', KEYS[5], 'live', 'PX', ARGV[4])
redis.call('SET', KEYS[6], ARGV[1], 'PX', ARGV[5])
return 1
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"""


def _keys(sid: str) -> list[str]:
    base = PREFIX + sid
    return [base + ":snap", base + ":tomb", base + ":lease"]


class RedisStore:
    kind = "redis"

    def __init__(self, url: str, *, window_s: float, lease_s: float, tomb_s: float) -> None:
        self.url = url
        self.window_ms = str(int(window_s * 1000))
        self.lease_ms = str(int(lease_s * 1000))
        self.tomb_ms = str(int(tomb_s * 1000))
        self.available = False
        self._r = aioredis.from_url(
            url, socket_timeout=1.0, socket_connect_timeout=1.0, decode_responses=False
        )
        self._put = self._r.register_script(_PUT)
        self._claim = self._r.register_script(_CLAIM)
        self._consume = self._r.register_script(_CONSUME)
        self._release = self._r.register_script(_RELEASE)
        self._secret: bytes | None = None
        self._probe: asyncio.Task[None] | None = None

    async def start(self) -> None:
        try:
            await self._connect()
        except StoreUnavailable:
            log.error("state store %s unreachable: serving without resume until it returns", self.where)
            self._start_probe()

    @property
    def where(self) -> str:
        return self.url.split("@")[-1]  # never log a password

    async def _connect(self) -> None:
        try:
            await self._r.ping()
            await self._r.set(SECRET_KEY, secrets.token_bytes(32), nx=True)
            secret = await self._r.get(SECRET_KEY)
        except (RedisError, OSError) as exc:
            self.available = False
            raise StoreUnavailable(str(exc)) from exc
        self._secret = secret if isinstance(secret, bytes) else None
        if not self.available:
            log.info("state store %s reachable", self.where)
        self.available = True

    def _start_probe(self) -> None:
        if self._probe is None or self._probe.done():
            self._probe = asyncio.create_task(self._reconnect(), name="state-store-probe")

    async def _reconnect(self) -> None:
        while not self.available:
            await asyncio.sleep(1.0)  # a periodic probe of an unreachable store
            with contextlib.suppress(StoreUnavailable):
                await self._connect()

    async def stop(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
        with contextlib.suppress(Exception):
            await self._r.aclose()

    async def _call(self, coro: Any) -> Any:
        if not self.available:
            coro.close()
            raise StoreUnavailable(f"state store {self.where} unreachable")
        try:
            return await coro
        except (RedisError, OSError) as exc:
            if self.available:
                log.warning("state store %s lost: %s", self.where, exc)
            self.available = False
            self._start_probe()
            raise StoreUnavailable(str(exc)) from exc

    async def secret(self) -> bytes:
        if self._secret is None:
            raise StoreUnavailable("state store not reached yet")
        return self._secret

    async def sync(self, puts: list[Put]) -> list[bool]:
        if not puts:
            return []

        async def run() -> list[Any]:
            async with self._r.pipeline(transaction=False) as pipe:
                for p in puts:
                    await self._put(
                        keys=_keys(p.sid),
                        args=[
                            p.owner,
                            p.data or b"",
                            self.window_ms,
                            self.tomb_ms,
                            self.lease_ms,
                            "1" if p.release else "0",
                        ],
                        client=pipe,
                    )
                return await pipe.execute()

        return [bool(r) for r in await self._call(run())]

    async def claim(self, sid: str, owner: str) -> tuple[Outcome, bytes | None]:
        res = await self._call(self._claim(keys=_keys(sid), args=[owner, self.lease_ms]))
        outcome = res[0].decode()
        return outcome, (bytes(res[1]) if outcome == "ok" else None)

    async def consume(self, old: str, new: str, owner: str, data: bytes) -> bool:
        keys = _keys(old) + _keys(new)
        args: list[bytes | str] = [owner, data, self.window_ms, self.tomb_ms, self.lease_ms]
        return bool(await self._call(self._consume(keys=keys, args=args)))

    async def release(self, sid: str, owner: str) -> None:
        await self._call(self._release(keys=_keys(sid)[2:], args=[owner]))

    async def discard(self, sid: str) -> None:
        await self._call(self._r.delete(*_keys(sid)))

    async def ping(self) -> None:
        await self._call(self._r.ping())
