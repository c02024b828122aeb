"""Redis state store (redis-py asyncio): snapshots shared by every replica.

Each operation is one Lua script, so the lease check and the write are atomic across
replicas; ``sync`` writes a whole checkpoint tick (every session's snapshot or lease
renewal) in one round trip, up to ``SYNC_BATCH`` sessions per script call (one command
per session cost redis-py more than the write itself). Socket timeouts are short: an
unreachable Redis makes ``available`` False and raises ``StoreUnavailable`` (streaming
goes on), and a probe reconnects in the background; the next checkpoint round then
writes again.
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
KNOWN_SECRETS_KEY = "lookback:resume-secrets"  # every secret a server still holds (a set)

# Many sessions per call: KEYS are (snap, tomb, lease) per session, ARGV the three TTLs
# (window, tombstone, lease) then (owner, snapshot or '', release '1'/'0') per session.
_SYNC = """
local out = {}
for i = 0, #KEYS / 3 - 1 do
  local snap, tomb, lease = KEYS[3 * i + 1], KEYS[3 * i + 2], KEYS[3 * i + 3]
  local owner, data = ARGV[3 * i + 4], ARGV[3 * i + 5]
  local l = redis.call('GET', lease)
  if (l and l ~= owner) or redis.call('GET', tomb) == 'used' then
    out[i + 1] = 0
  else
    out[i + 1] = 1
    if data ~= '' then
      redis.call('SET', snap, data, 'PX', ARGV[1])
      redis.call('SET', tomb, 'live', 'PX', ARGV[2])
    elseif redis.call('EXISTS', snap) == 0 then
      out[i + 1] = 2
    end
    if ARGV[3 * i + 6] == '1' then redis.call('DEL', lease)
    else redis.call('SET', lease, owner, 'PX', ARGV[3]) end
  end
end
return out
"""
SYNC_BATCH = 256  # sessions per script call: Redis runs one script at a time
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
# KEYS: the shared secret, the set of known ones; ARGV: the offered secrets, current first
_SECRETS = """
redis.call('SET', KEYS[1], ARGV[1], 'NX')
redis.call('SADD', KEYS[2], unpack(ARGV))
return {redis.call('GET', KEYS[1]), redis.call('SMEMBERS', KEYS[2])}
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
        self._sync = self._r.register_script(_SYNC)
        self._claim = self._r.register_script(_CLAIM)
        self._consume = self._r.register_script(_CONSUME)
        self._release = self._r.register_script(_RELEASE)
        self._secrets = self._r.register_script(_SECRETS)
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
        except (RedisError, OSError) as exc:
            self.available = False
            raise StoreUnavailable(str(exc)) from exc
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

    async def secrets(self, offer: list[bytes]) -> tuple[bytes, list[bytes]]:
        args = offer or [secrets.token_bytes(32)]
        current, known = await self._call(self._secrets(keys=[SECRET_KEY, KNOWN_SECRETS_KEY], args=args))
        return bytes(current), [bytes(k) for k in known]

    async def sync(self, puts: list[Put]) -> list[int]:
        if not puts:
            return []

        async def run() -> list[Any]:
            async with self._r.pipeline(transaction=False) as pipe:
                for at in range(0, len(puts), SYNC_BATCH):
                    keys: list[str] = []
                    args: list[bytes | str] = [self.window_ms, self.tomb_ms, self.lease_ms]
                    for p in puts[at : at + SYNC_BATCH]:
                        keys += _keys(p.sid)
                        args += [p.owner, p.data or b"", "1" if p.release else "0"]
                    await self._sync(keys=keys, args=args, client=pipe)
                return await pipe.execute()

        return [int(r) for batch in await self._call(run()) for r in batch]

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
