"""Redis Streams source: partitioned input streams, a consumer group, atomic commits.

Devices are spread over ``partitions`` input streams ``<stream>:<p>`` (``p =
partition_of(device)``, crc32 modulo the count, what producers use), so one device's
entries stay in one stream, in order. Consumers of one group share the partitions through
leases (``<stream>:<p>:owner``, renewed every third of ``lease_s``); each takes its fair
share of the live members and hands surplus partitions back (finishing what it read).
A partition whose owner died is free once its lease lapses: the new owner ``XAUTOCLAIM``s
its pending entries first, then reads new ones.

One Lua script applies a commit: it checks the partition lease (a consumer that lost the
partition cannot publish), appends the results and errors, writes the device checkpoint
and ``XACK``s the entry, all at once. So an entry is acknowledged exactly when its results
and the checkpoint that records its sequence number exist: a crash before leaves the
entry pending and the old checkpoint; after, nothing to redo. Keys are not hash-tagged:
one Redis server (or a primary with replicas), not Redis Cluster.

Entry fields: ``device``, ``seq``, ``audio`` (whole 128-sample frames), optional
``encoding`` (pcm_s16le), ``model``, ``version``, ``end`` (1), ``ts`` (producer time.time()).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import re
import socket
import time
import zlib
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit, urlunsplit

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from lookback.metrics import Metrics
from lookback.sources.core import Commit, DeviceHub, Message, Rejection, SourceOptions, make_message, spawn

log = logging.getLogger("lookback.sources.redis")

_COMMIT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local n = 8
for i = 1, tonumber(ARGV[6]) do
  redis.call('XADD', KEYS[4], '*', 'device', ARGV[7], 'seq', ARGV[8], 'by', ARGV[1], 'records', ARGV[n + i])
end
n = n + tonumber(ARGV[6]) + 1
local ne = tonumber(ARGV[n])
for i = 1, ne do redis.call('XADD', KEYS[5], '*', 'error', ARGV[n + i]) end
n = n + ne + 1
if ARGV[2] ~= '' then redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3]) end
for i = n, #ARGV do redis.call('XACK', KEYS[3], ARGV[4], ARGV[i]) end
return 1
"""
# ARGV: me, checkpoint, ttl, group, -, n_entries, device, seq, entries..., n_err, errs..., ids...
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


_FIELDS = {
    k: k.encode() for k in ("device", "seq", "encoding", "sample_rate", "model", "version", "end", "ts")
}
_DIGITS = re.compile(rb"[0-9]{1,20}")
_BOOLS = {b"1": True, b"true": True, b"0": False, b"false": False}


def _value(name: str, raw: bytes) -> object:
    """A Redis field as the JSON value it spells, or the raw bytes (which the core refuses)."""
    if name in ("seq", "sample_rate"):
        return int(raw) if _DIGITS.fullmatch(raw) else raw  # int() alone takes " +1_0 "
    if name == "end":
        return _BOOLS.get(raw, raw)
    if name == "ts":
        try:
            return float(raw)
        except ValueError:
            return raw
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return raw


def _no_group(exc: ResponseError) -> bool:
    return str(exc).startswith("NOGROUP")


def _id_tuple(eid: bytes | str) -> tuple[int, int]:
    ms, _, n = (eid.decode() if isinstance(eid, bytes) else eid).partition("-")
    return int(ms), int(n or 0)


def partition_of(device: str, partitions: int) -> int:
    """The partition of a device: producers and consumers must agree on it."""
    return zlib.crc32(device.encode()) % partitions


def stream_key(stream: str, partition: int) -> str:
    return f"{stream}:{partition}"


async def publish(
    r: aioredis.Redis,
    device: str,
    seq: int,
    audio: bytes,
    *,
    stream: str = "lookback:audio",
    partitions: int = 16,
    encoding: str = "pcm_s16le",
    end: bool = False,
    **extra: str,
) -> None:
    """Producer helper (tests, bench, docs): one entry on the device's partition."""
    fields: dict[Any, Any] = {
        "device": device,
        "seq": seq,
        "audio": audio,
        "encoding": encoding,
        "ts": repr(time.time()),
    }
    if end:
        fields["end"] = 1
    fields.update(extra)
    await r.xadd(stream_key(stream, partition_of(device, partitions)), fields)


class RedisStreamsSource:
    kind = "redis"

    def __init__(
        self,
        url: str,
        engine: Any,
        opts: SourceOptions,
        metrics: Metrics,
        *,
        lease_s: float,
        checkpoint_ttl_s: float,
        admit: Any = None,
    ) -> None:
        parts = urlsplit(url)
        q = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        self.redis_url = urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
        self.stream = q.get("stream", "lookback:audio")
        self.partitions = int(q.get("partitions", "16"))
        self.group = q.get("group", "lookback")
        self.consumer = q.get("consumer") or f"{socket.gethostname()}-{os.getpid()}"
        self.output = q.get("output", "lookback:results")
        self.errors = q.get("errors", "lookback:errors")
        self.batch = int(q.get("count", "256"))
        opts.apply_query(q)
        self.lease_ms = int(lease_s * 1000)
        self.ttl_ms = str(int(checkpoint_ttl_s * 1000))
        self.name = f"redis:{self.stream}"
        # bounded: a burst of new devices loads checkpoints concurrently, waiting for a connection
        pool = aioredis.BlockingConnectionPool.from_url(
            self.redis_url, max_connections=32, timeout=30, socket_timeout=10
        )
        self.r = aioredis.Redis(connection_pool=pool)
        self._commit = self.r.register_script(_COMMIT)
        self._renew = self.r.register_script(_RENEW)
        self._release = self.r.register_script(_RELEASE)
        self.hub = DeviceHub(engine, self, opts, metrics, source=self.name, admit=admit)
        self.owned: set[int] = set()  # leases held
        self.reading: set[int] = set()  # owned and caught up with their pending entries
        self._busy: set[int] = set()  # being onboarded or handed back
        self._settling: set[int] = set()  # given up: its devices are still being dropped
        self._gen: dict[int, int] = {}  # per partition: bumped at every acquisition and loss
        self._last_id: dict[int, bytes] = {}  # per partition: the newest entry read
        self.metrics = metrics
        self._tasks: list[asyncio.Task[Any]] = []
        self._wake = asyncio.Event()
        self._stopping = False
        self._pending: list[tuple[Commit, asyncio.Future[bool]]] = []
        self._flush_wake = asyncio.Event()
        self._lagged: set[int] = set()  # partitions with a lag gauge

    # -- keys --------------------------------------------------------------------------------
    def _owner_key(self, p: int) -> str:
        return f"{self.stream}:{p}:owner"

    def _ckpt_key(self, device: str) -> str:
        return f"{self.stream}:ckpt:{device}"

    def _out_key(self, device: str) -> str:
        return self.output.replace("{device}", device)

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        await self.r.ping()
        for p in range(self.partitions):
            with contextlib.suppress(ResponseError):  # BUSYGROUP: it exists
                await self.r.xgroup_create(stream_key(self.stream, p), self.group, id="0", mkstream=True)
        self._tasks = [
            asyncio.create_task(self._keeper(), name="redis-source-keeper"),
            asyncio.create_task(self._reader(), name="redis-source-reader"),
            asyncio.create_task(self._flusher(), name="redis-source-commits"),
        ]
        log.info("consuming %s x%d as %s/%s", self.stream, self.partitions, self.group, self.consumer)

    def alive(self) -> bool:
        return bool(self._tasks) and all(not t.done() for t in self._tasks)

    async def stop(self) -> None:
        """Read no more, commit what was read, hand the partitions back."""
        self._stopping = True
        self._wake.set()
        reader = self._tasks[1] if len(self._tasks) > 1 else None
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        await self.hub.stop()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        with contextlib.suppress(RedisError, OSError):
            for p in list(self.owned):
                await self._release(keys=[self._owner_key(p)], args=[self.consumer])
            await self.r.zrem(f"{self.stream}:members", self.consumer)
        await self.r.aclose()

    # -- partition ownership -----------------------------------------------------------------
    async def _keeper(self) -> None:
        members = f"{self.stream}:members"
        period = self.lease_ms / 3000
        while not self._stopping:
            try:
                now = int(time.time() * 1000)
                pipe = self.r.pipeline(transaction=False)
                pipe.zadd(members, {self.consumer: now + self.lease_ms})
                pipe.zremrangebyscore(members, "-inf", now)
                pipe.zcard(members)
                res = await pipe.execute()
                live = max(1, int(res[-1]))
                for p in list(self.owned):
                    if not await self._renew(keys=[self._owner_key(p)], args=[self.consumer, self.lease_ms]):
                        log.warning("lost partition %d (lease lapsed)", p)
                        self._drop(p, release_lease=False)
                fair = math.ceil(self.partitions / live)
                if len(self.owned) < fair:
                    for p in range(self.partitions):
                        if len(self.owned) >= fair:
                            break
                        if p in self.owned or p in self._settling:
                            continue
                        if await self.r.set(self._owner_key(p), self.consumer, nx=True, px=self.lease_ms):
                            self.owned.add(p)
                            self._busy.add(p)
                            gen = self._gen[p] = self._gen.get(p, 0) + 1
                            spawn(self._onboard(p, gen))
                elif len(self.owned) > fair:
                    extra = sorted(p for p in self.owned if p not in self._busy)[: len(self.owned) - fair]
                    for p in extra:
                        self._busy.add(p)
                        spawn(self._hand_back(p))
                await self._measure_lag()
            except (RedisError, OSError) as exc:
                log.warning("partition keeper: %s", exc)
            await asyncio.sleep(period)  # the lease renewal period

    async def _measure_lag(self) -> None:
        """Per owned partition, the group's lag (entries not yet delivered; Redis 7+)."""
        owned = sorted(self.owned)
        pipe = self.r.pipeline(transaction=False)
        for p in owned:
            pipe.xinfo_groups(stream_key(self.stream, p))
        for p, groups in zip(owned, await pipe.execute(raise_on_error=False), strict=True):
            if isinstance(groups, Exception):
                continue
            for g in groups:
                name = g.get("name")
                if name in (self.group, self.group.encode()) and g.get("lag") is not None:
                    self.metrics.source_lag.labels(self.name, str(p)).set(g["lag"])
        for p in self._lagged - set(owned):
            with contextlib.suppress(KeyError):
                self.metrics.source_lag.remove(self.name, str(p))
        self._lagged = set(owned)

    async def _onboard(self, p: int, gen: int) -> None:
        """Claim the partition's pending entries (a previous owner's), feed them, then read.

        ``gen`` fences this pass: if the partition is lost meanwhile (a failed commit, a
        lapsed lease) a newer pass replays from the checkpoint and this one stops feeding.
        """
        key = stream_key(self.stream, p)
        try:
            start = "0-0"
            while True:
                try:
                    res = await self.r.xautoclaim(
                        key, self.group, self.consumer, 0, start_id=start, count=self.batch
                    )
                except ResponseError as exc:
                    if not _no_group(exc):
                        raise
                    await self._recreate_groups([p])  # nothing pending survives it: read on
                    break
                start, entries = res[0], res[1]
                for eid, fields in entries:
                    if self._gen.get(p) != gen:
                        return
                    if fields is not None:
                        await self.hub.submit(self._parse(p, eid, fields), replay=True)
                if start in (b"0-0", "0-0") or not entries:
                    break
            if self._gen.get(p) == gen and p in self.owned:
                self.hub.blocked.discard(str(p))
                self.reading.add(p)
                self.metrics.source_rebalances.labels(self.name, "assigned").inc()
                self._wake.set()
        except (RedisError, OSError) as exc:
            log.warning("claiming partition %d: %s", p, exc)
            self._drop(p, release_lease=True)
        finally:
            self._busy.discard(p)

    async def _recreate_groups(self, parts: list[int]) -> None:
        """Make the consumer group again on partitions that lost it (stream deleted, group destroyed).

        Deleting a stream deletes its group, and reading then fails for ever. The group
        restarts after the newest entry this consumer read when the stream still holds it
        (only the group was destroyed), else from the start of the stream (a new stream
        holds only new entries; a repeat is skipped by the device checkpoints' ``seq``).
        """
        for p in parts:
            key = stream_key(self.stream, p)
            start: bytes | str = "0"
            last = self._last_id.get(p)
            if last is not None:
                first: Any = await self.r.xrange(key, count=1)
                if first and _id_tuple(first[0][0]) <= _id_tuple(last):
                    start = last
            try:
                await self.r.xgroup_create(key, self.group, id=start, mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" in str(exc):  # another consumer made it first
                    continue
                raise
            self.metrics.source_groups_recreated.labels(self.name).inc()
            log.warning(
                "partition %d: consumer group %s was gone (stream deleted?); made it again", p, self.group
            )

    def lost(self, partition: str) -> None:
        """A commit failed (lease stolen, broker error): give the partition up entirely.

        Its devices are dropped and its unacknowledged entries stay pending; whoever takes
        the partition next (this consumer, once the release is done, or another) claims
        them from the start and replays them against the checkpoints, in order.
        """
        p = int(partition)
        self.hub.blocked.add(partition)
        if p in self.owned:
            self._drop(p, release_lease=True)

    def _drop(self, p: int, *, release_lease: bool) -> None:
        self.metrics.source_rebalances.labels(self.name, "lost").inc()
        self.owned.discard(p)
        self.reading.discard(p)
        self.hub.blocked.add(str(p))
        self._gen[p] = self._gen.get(p, 0) + 1
        self._settling.add(p)
        spawn(self._settle(p, release_lease))

    async def _settle(self, p: int, release_lease: bool) -> None:
        try:
            await self.hub.release(str(p))
            if release_lease:
                with contextlib.suppress(RedisError, OSError):
                    await self._release(keys=[self._owner_key(p)], args=[self.consumer])
        finally:
            self._settling.discard(p)

    async def _hand_back(self, p: int) -> None:
        """Rebalance: finish (and commit) what was read from ``p``, then free its lease."""
        self.reading.discard(p)
        try:
            await self.hub.release(str(p))
            self.hub.blocked.add(str(p))
            self._gen[p] = self._gen.get(p, 0) + 1
            await self._release(keys=[self._owner_key(p)], args=[self.consumer])
            self.owned.discard(p)
            self.metrics.source_rebalances.labels(self.name, "revoked").inc()
        except (RedisError, OSError) as exc:
            log.warning("handing back partition %d: %s", p, exc)
        finally:
            self._busy.discard(p)

    # -- reading -----------------------------------------------------------------------------
    async def _reader(self) -> None:
        while not self._stopping:
            if not self.reading:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), 0.5)
                continue
            streams: dict[Any, Any] = {stream_key(self.stream, p): ">" for p in sorted(self.reading)}
            try:
                res = await self.r.xreadgroup(self.group, self.consumer, streams, count=self.batch, block=200)
            except ResponseError as exc:
                if _no_group(exc):
                    with contextlib.suppress(RedisError, OSError):
                        await self._recreate_groups(sorted(self.reading))
                        continue
                log.warning("reading: %s", exc)
                await asyncio.sleep(0.5)  # back off from a failing broker
                continue
            except (RedisError, OSError) as exc:
                log.warning("reading: %s", exc)
                await asyncio.sleep(0.5)  # back off from a failing broker
                continue
            for key, entries in cast(list[Any], res or []):
                p = int(bytes(key).rsplit(b":", 1)[1])
                if entries:
                    self._last_id[p] = entries[-1][0]
                for eid, fields in entries:
                    await self.hub.submit(self._parse(p, eid, fields))

    def _parse(self, p: int, eid: bytes, f: dict[bytes, bytes]) -> Message | Rejection:
        """An entry's fields as typed values, checked by the core's one set of rules."""
        part = str(p)
        fields = {k: _value(k, f[b]) for k, b in _FIELDS.items() if b in f}
        item = make_message(
            fields.pop("device", None),
            fields.pop("seq", None),
            f.get(b"audio"),
            fields,
            max_frames=self.hub.opts.max_frames,
            max_amplitude=self.hub.opts.max_amplitude,
            token=eid,
            partition=part,
        )
        if item.device is not None and (home := partition_of(item.device, self.partitions)) != p:
            # fed into no device: its stream lives on another partition
            return Rejection(
                "wrong_partition",
                f"device {item.device} belongs to partition {home}, not {p}",
                None,
                None,
                eid,
                part,
            )
        return item

    # -- the adapter interface ---------------------------------------------------------------
    async def load_checkpoint(self, device: str) -> bytes | None:
        data: Any = await self.r.get(self._ckpt_key(device))
        return bytes(data) if data is not None else None

    async def commit(self, commit: Commit) -> bool:
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending.append((commit, fut))
        self._flush_wake.set()
        return await fut

    async def _flusher(self) -> None:
        """Apply all commits queued since the last round trip in one pipeline."""
        while True:
            await self._flush_wake.wait()
            self._flush_wake.clear()
            batch, self._pending = self._pending, []
            if not batch:
                continue
            try:
                async with self.r.pipeline(transaction=False) as pipe:
                    for c, _ in batch:
                        await self._queue_commit(c, pipe)
                    res = await pipe.execute(raise_on_error=False)
            except (RedisError, OSError) as exc:
                res = [exc] * len(batch)
            for (c, fut), r in zip(batch, res, strict=True):
                if fut.done():
                    continue
                if isinstance(r, Exception):
                    log.warning("commit of %s seq %s failed: %s", c.device, c.seq, r)
                    fut.set_result(False)
                else:
                    fut.set_result(bool(r))

    async def _queue_commit(self, c: Commit, pipe: Any) -> None:
        p = int(c.partition)
        device = c.device or ""
        entries = [orjson.dumps(c.records)] if c.records else []
        errs = [orjson.dumps(e) for e in c.errors]
        ids = [t for t in c.tokens if t is not None]
        args: list[Any] = [
            self.consumer,
            c.checkpoint or b"",
            self.ttl_ms,
            self.group,
            "",
            len(entries),
            device,
            "" if c.seq is None else c.seq,
            *entries,
            len(errs),
            *errs,
            *ids,
        ]
        keys = [
            self._owner_key(p),
            self._ckpt_key(device),
            stream_key(self.stream, p),
            self._out_key(device),
            self.errors,
        ]
        # with a pipeline client this queues EVALSHA (the pipeline loads the script if needed)
        await self._commit(keys=keys, args=args, client=pipe)
