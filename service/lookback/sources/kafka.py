"""Kafka source (confluent-kafka / librdkafka): one consumer group, results co-partitioned.

Input: one record per message on ``<topic>``, **keyed by the device id** (so a device's
records stay in one partition, in order), the audio as the value and the other fields as
headers (``seq``, ``encoding``, ``sample_rate``, ``model``, ``version``, ``end``, ``ts``;
the values spelled as in Redis: decimal digits, ``1``/``0``, a float). ``publish`` is a producer helper.

Output: per consumed message one record on ``output`` (default ``<topic>.results``),
keyed by the device, on the **same partition number** as the input record, whose value is
``{"device", "seq", "by", "records"}`` and whose headers carry the device checkpoint
(``lookback-checkpoint``) and the input offset it consumed (``lookback-offset``).
Rejections go to ``errors`` (default ``<topic>.errors``).

The results partition is the device's changelog (Kafka Streams' idea, with the changelog
and the output as one record): a commit is one produced record, so results and the
checkpoint that records their ``seq`` exist together or not at all. The input offset is
committed after the record is delivered. A new owner of a partition (rebalance, a dead
consumer) reads the results partition to its end before it consumes, restores each
device's last checkpoint, and skips the input records at or below the offset that
checkpoint consumed: every step appears once in the results topic, none is skipped.
Transactions are not used (see docs/sources.md: the mock cluster cannot show they work,
and the single-record commit does not need them against a crash; it is a zombie that
lost its partitions without noticing that only fencing would stop).

Backpressure: while the core is saturated the consumer pauses its partitions (and keeps
polling, so the group does not evict it); it resumes when there is room.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer, TopicPartition

from lookback.metrics import Metrics
from lookback.settings import Settings
from lookback.sources.core import Commit, DeviceHub, Message, Rejection, SourceOptions, make_message, spawn
from lookback.sources.redis_streams import _value as header_value

log = logging.getLogger("lookback.sources.kafka")

T = TypeVar("T")
CKPT_HEADER = "lookback-checkpoint"
OFFSET_HEADER = "lookback-offset"
_FIELDS = ("seq", "encoding", "sample_rate", "model", "version", "end", "ts")  # headers read


def publish(
    producer: Producer,
    topic: str,
    device: str,
    seq: int,
    audio: bytes,
    *,
    encoding: str = "pcm_s16le",
    sample_rate: int | None = None,
    end: bool = False,
    partition: int | None = None,
    **extra: str,
) -> None:
    """Producer helper (tests, bench, docs): one record keyed by the device (not flushed)."""
    headers: list[tuple[str, str | bytes | None]] = [
        ("seq", str(seq).encode()),
        ("encoding", encoding.encode()),
        ("ts", repr(time.time()).encode()),
    ]
    if sample_rate is not None:
        headers.append(("sample_rate", str(sample_rate).encode()))
    if end:
        headers.append(("end", b"1"))
    headers += [(k, v.encode()) for k, v in extra.items()]
    kw: dict[str, Any] = {} if partition is None else {"partition": partition}
    producer.produce(topic, value=audio, key=device.encode(), headers=headers, **kw)


@dataclass(slots=True)
class _Saved:
    """A device's last delivered checkpoint and the input record it consumed."""

    partition: int
    offset: int
    checkpoint: bytes


class _Offsets:
    """One partition's read-but-not-committed offsets: Kafka commits a position, not a record."""

    __slots__ = ("committed", "high", "open")

    def __init__(self) -> None:
        self.open: set[int] = set()
        self.high = -1  # the newest offset read
        self.committed = -1

    def position(self) -> int:
        """The offset to commit: everything below it is done."""
        return min(self.open) if self.open else self.high + 1


class KafkaSource:
    kind = "kafka"

    def __init__(
        self,
        url: str,
        engine: Any,
        opts: SourceOptions,
        metrics: Metrics,
        *,
        settings: Settings,
        admit: Any = None,
    ) -> None:
        parts = urlsplit(url)
        q = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        passthrough = {**settings.source_kafka_config, **{k: v for k, v in q.items() if "." in k}}
        opts.apply_query(q)
        self.bootstrap = unquote(parts.netloc) or "127.0.0.1:9092"
        self.topic = parts.path.strip("/") or "lookback.audio"
        self.group = q.get("group", "lookback")
        self.consumer_name = q.get("consumer") or f"{socket.gethostname()}-{os.getpid()}"
        self.output = q.get("output", f"{self.topic}.results")
        self.errors = q.get("errors", f"{self.topic}.errors")
        self.batch = int(q.get("count", "500"))
        self.name = f"kafka:{self.topic}"
        self.metrics = metrics
        base = {"bootstrap.servers": self.bootstrap, "client.id": self.consumer_name, **passthrough}
        self._consumer_conf = {
            **base,
            "group.id": self.group,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
        }
        self._restore_conf = {
            **base,
            "group.id": f"{self.group}.restore",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
        producer_conf = {"enable.idempotence": True, "acks": "all", "linger.ms": 2, **base}
        for k in list(producer_conf):  # consumer-only settings would make the producer warn
            if k.startswith(("session.", "heartbeat.", "max.poll", "auto.", "group.")):
                del producer_conf[k]
        for k in list(self._restore_conf):
            if k.startswith(("session.", "heartbeat.", "max.poll")):
                del self._restore_conf[k]
        self.producer = Producer(producer_conf)
        self.consumer: Consumer | None = None
        self.hub = DeviceHub(engine, self, opts, metrics, source=self.name, admit=admit)
        self.owned: set[int] = set()
        self.offsets: dict[int, _Offsets] = {}
        self.saved: dict[str, _Saved] = {}
        self._cx = ThreadPoolExecutor(1, thread_name_prefix="kafka-consumer")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._stopping = False
        self._closing = threading.Event()
        self._poller: threading.Thread | None = None
        self._paused = False
        self._early: list[Any] = []  # records a poll returned while waiting for room
        self._recovering: set[int] = set()

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._poller = threading.Thread(target=self._serve_producer, name="kafka-producer", daemon=True)
        self._poller.start()
        await self._call(self._check_topics)
        self.consumer = Consumer(self._consumer_conf)
        await self._call(
            self.consumer.subscribe,
            [self.topic],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        self._tasks = [
            asyncio.create_task(self._reader(), name="kafka-source-reader"),
            asyncio.create_task(self._committer(), name="kafka-source-offsets"),
        ]
        log.info("consuming %s as %s/%s", self.topic, self.group, self.consumer_name)

    def alive(self) -> bool:
        return bool(self._tasks) and all(not t.done() for t in self._tasks)

    async def stop(self) -> None:
        """Read no more, commit what was read (results, then offsets), leave the group."""
        self._stopping = True
        reader = self._tasks[0] if self._tasks else None
        if reader is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
        await self.hub.stop()
        for t in self._tasks[1:]:
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self.consumer is not None:
            consumer = self.consumer
            with contextlib.suppress(KafkaException, RuntimeError):
                await self._call(self._commit_offsets, True)
            try:
                await self._call(consumer.close)  # leaves the group (revoke: nothing left to finish)
            except (KafkaException, RuntimeError) as exc:
                log.warning("leaving the consumer group: %s", exc)
        await asyncio.to_thread(self.producer.flush, 10)
        self._closing.set()
        self._cx.shutdown(wait=False)

    def _check_topics(self) -> None:
        """The results topic must have a partition for every input partition (co-partitioned)."""
        md = self.producer.list_topics(self.topic, timeout=10)
        n_in = len(md.topics[self.topic].partitions) if self.topic in md.topics else 0
        md = self.producer.list_topics(self.output, timeout=10)
        n_out = len(md.topics[self.output].partitions) if self.output in md.topics else 0
        if n_in and n_out < n_in:
            raise ValueError(
                f"results topic {self.output} has {n_out} partitions, the input {self.topic} {n_in}: "
                "it needs at least as many (a device's results live on its input partition's number)"
            )

    def _serve_producer(self) -> None:
        while not self._closing.is_set():
            self.producer.poll(0.05)  # delivery callbacks run here

    async def _call(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        """Consumer calls on one thread (librdkafka runs rebalance callbacks inside poll)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._cx, lambda: fn(*args, **kw))

    def _on_loop(self, coro: Coroutine[Any, Any, T]) -> T:
        """From the consumer thread: run ``coro`` on the event loop and wait for it."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    # -- reading -----------------------------------------------------------------------------
    async def _reader(self) -> None:
        consumer = self.consumer
        assert consumer is not None
        while not self._stopping:
            full = self.hub.saturated()
            if full != self._paused:
                await self._call(self._pause if full else self._resume, consumer)
            try:
                if self._early:
                    msgs, self._early = self._early, []
                else:
                    msgs = await self._call(self._fetch, consumer)
            except KafkaException as exc:
                log.warning("reading: %s", exc)
                await asyncio.sleep(0.5)  # back off from a failing cluster
                continue
            for m in msgs:
                err = m.error()
                if err is not None:
                    if err.code() != KafkaError._PARTITION_EOF:
                        log.warning("reading: %s", err)
                    continue
                await self._take(m)

    def _fetch(self, consumer: Consumer) -> list[Any]:
        """What has arrived, as soon as anything has: ``consume(n, timeout)`` alone waits
        for ``n`` records or the whole timeout, which at real-time rates added up to
        100 ms to every message; ``poll`` returns at the first, the rest is already here."""
        first = consumer.poll(0.1)
        if first is None:
            return []
        return [first, *consumer.consume(self.batch - 1, 0)] if self.batch > 1 else [first]

    def _pause(self, consumer: Consumer) -> None:
        consumer.pause(consumer.assignment())
        self._paused = True
        self.metrics.source_fetch_pauses.labels(self.name).inc()

    def _resume(self, consumer: Consumer) -> None:
        consumer.resume(consumer.assignment())
        self._paused = False

    async def _take(self, m: Any) -> None:
        p, off = m.partition(), m.offset()
        if p not in self.owned or str(p) in self.hub.blocked:
            return  # read again after the recovery's seek
        track = self.offsets.setdefault(p, _Offsets())
        key = m.key()
        device: str | bytes | None = key
        with contextlib.suppress(UnicodeDecodeError, AttributeError):
            device = key.decode()  # not UTF-8: the bytes go on, and the core refuses them
        saved = self.saved.get(device) if isinstance(device, str) else None
        if saved is not None and saved.partition == p and off <= saved.offset:
            # consumed before a crash or a rebalance: its results are already published
            track.high = max(track.high, off)
            self.metrics.source_messages.labels(self.name, "redelivery", "replayed").inc()
            return
        item = self._parse(m, device)
        await self._until_room()
        track.open.add(off)
        track.high = max(track.high, off)
        await self.hub.submit(item)

    async def _until_room(self) -> None:
        """While the core is saturated: partitions paused, the consumer still polled.

        ``submit`` would wait too, but without a poll for ``max.poll.interval.ms`` the group
        evicts this consumer; paused, a poll fetches nothing and only keeps it a member
        (what it returns anyway, an assignment's record before its pause, is read next).
        """
        consumer = self.consumer
        assert consumer is not None
        while self.hub.saturated() and not self._stopping:
            if not self._paused:
                await self._call(self._pause, consumer)
            self._early.extend(await self._call(consumer.consume, self.batch, 0.05))

    def _parse(self, m: Any, device: str | bytes | None) -> Message | Rejection:
        fields: dict[str, object] = {}
        for k, v in m.headers() or ():
            if k in _FIELDS and v is not None:
                fields[k] = header_value(k, bytes(v))
        value = m.value()
        return make_message(
            device,
            fields.pop("seq", None),
            bytes(value) if value is not None else None,
            fields,
            max_frames=self.hub.opts.max_frames,
            max_amplitude=self.hub.opts.max_amplitude,
            token=(m.partition(), m.offset()),
            partition=str(m.partition()),
        )

    # -- partition ownership (called by librdkafka inside consume, on the consumer thread) -----
    def _on_assign(self, consumer: Consumer, parts: list[TopicPartition]) -> None:
        ps = [tp.partition for tp in parts]
        saved = self._restore(ps)
        self._on_loop(self._assigned(ps, saved))
        if self._paused:
            consumer.pause(parts)

    async def _assigned(self, ps: list[int], saved: dict[str, _Saved]) -> None:
        for dev, s in saved.items():
            cur = self.saved.get(dev)
            if cur is None or cur.partition != s.partition or cur.offset <= s.offset:
                self.saved[dev] = s
        for p in ps:
            self.owned.add(p)
            self.offsets[p] = _Offsets()
            self.hub.blocked.discard(str(p))
        self.metrics.source_rebalances.labels(self.name, "assigned").inc(len(ps))
        log.info("assigned partitions %s (%d device checkpoints)", ps, len(saved))

    def _on_revoke(self, consumer: Consumer, parts: list[TopicPartition]) -> None:
        ps = [tp.partition for tp in parts]
        self._on_loop(self._handing_over(ps, lost=False))
        with contextlib.suppress(KafkaException):
            self._commit_offsets(False, ps)
        self._on_loop(self._dropped(ps))
        self.metrics.source_rebalances.labels(self.name, "revoked").inc(len(ps))

    def _on_lost(self, consumer: Consumer, parts: list[TopicPartition]) -> None:
        ps = [tp.partition for tp in parts]
        self._on_loop(self._handing_over(ps, lost=True))
        self._on_loop(self._dropped(ps))
        self.metrics.source_rebalances.labels(self.name, "lost").inc(len(ps))

    async def _handing_over(self, ps: list[int], *, lost: bool) -> None:
        """Finish (revoke) or drop (lost: commits are refused) what was read from ``ps``."""
        for p in ps:
            self.hub.blocked.add(str(p))
            if lost:
                self.owned.discard(p)
        await asyncio.gather(*(self.hub.release(str(p)) for p in ps))

    async def _dropped(self, ps: list[int]) -> None:
        for p in ps:
            self.owned.discard(p)
            self.offsets.pop(p, None)
            with contextlib.suppress(KeyError):
                self.metrics.source_lag.remove(self.name, str(p))
            self.hub.blocked.discard(str(p))
        for dev in [d for d, s in self.saved.items() if s.partition in ps]:
            del self.saved[dev]  # the next owner has the newer checkpoints

    def _restore(self, ps: Iterable[int]) -> dict[str, _Saved]:
        """Each device's last checkpoint on the results partitions ``ps``, read to their end."""
        out: dict[str, _Saved] = {}
        c = Consumer(self._restore_conf)
        try:
            todo: dict[int, int] = {}
            for p in ps:
                lo, hi = c.get_watermark_offsets(TopicPartition(self.output, p), timeout=10)
                if hi > lo:
                    todo[p] = hi
            if not todo:
                return out
            c.assign([TopicPartition(self.output, p, OFFSET_BEGINNING) for p in todo])
            deadline = time.monotonic() + 300
            while todo:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"restoring checkpoints from {self.output} timed out")
                for m in c.consume(1000, 0.2):
                    if m.error() is not None:
                        continue
                    p, off = m.partition() or 0, m.offset() or 0  # set on records (not errors)
                    headers = dict(m.headers() or ())
                    ck, at, key = headers.get(CKPT_HEADER), headers.get(OFFSET_HEADER), m.key()
                    if ck is not None and at is not None and key is not None:
                        ckpt = ck.encode() if isinstance(ck, str) else ck  # bytes from librdkafka
                        out[key.decode(errors="replace")] = _Saved(p, int(at), ckpt)
                    if p in todo and off >= todo[p] - 1:
                        del todo[p]
            return out
        finally:
            c.close()

    def lost(self, partition: str) -> None:
        """A device's commit failed: replay the partition from its oldest unfinished record."""
        p = int(partition)
        if p not in self.owned or p in self._recovering:
            return
        self._recovering.add(p)
        self.hub.blocked.add(partition)
        spawn(self._recover(p))

    async def _recover(self, p: int) -> None:
        try:
            await self.hub.release(str(p))
            track = self.offsets.get(p)
            if track is not None and p in self.owned and self.consumer is not None:
                start = track.position()
                self.offsets[p] = _Offsets()
                await self._call(self.consumer.seek, TopicPartition(self.topic, p, start))
        except KafkaException as exc:
            log.warning("partition %d: seeking back failed: %s", p, exc)
        finally:
            self._recovering.discard(p)
            self.hub.blocked.discard(str(p))

    # -- offsets and lag ---------------------------------------------------------------------
    async def _committer(self) -> None:
        while True:
            await asyncio.sleep(0.2)  # the offset commit period
            with contextlib.suppress(KafkaException, RuntimeError):
                await self._call(self._commit_offsets, False)
                await self._call(self._update_lag)

    def _commit_offsets(self, sync: bool, only: Iterable[int] | None = None) -> None:
        assert self.consumer is not None
        todo = []
        for p in list(only if only is not None else self.owned):
            track = self.offsets.get(p)
            if track is None or track.high < 0:
                continue
            pos = track.position()
            if pos > track.committed:
                todo.append((track, TopicPartition(self.topic, p, pos)))
        if todo:
            offsets = [tp for _, tp in todo]
            if sync:
                self.consumer.commit(offsets=offsets, asynchronous=False)
            else:
                self.consumer.commit(offsets=offsets, asynchronous=True)
            for track, tp in todo:
                track.committed = tp.offset

    def _update_lag(self) -> None:
        assert self.consumer is not None
        owned = sorted(self.owned)
        if not owned:
            return
        positions = self.consumer.position([TopicPartition(self.topic, p) for p in owned])
        for tp in positions:
            _, hi = self.consumer.get_watermark_offsets(tp, cached=True)
            if hi >= 0 and tp.offset >= 0:
                self.metrics.source_lag.labels(self.name, str(tp.partition)).set(max(0, hi - tp.offset))

    # -- the adapter interface ---------------------------------------------------------------
    async def load_checkpoint(self, device: str) -> bytes | None:
        s = self.saved.get(device)
        return s.checkpoint if s is not None else None

    async def commit(self, commit: Commit) -> bool:
        p = int(commit.partition) if commit.partition else -1
        if commit.device is not None and p not in self.owned:
            return False  # the partition moved on: its new owner replays this message
        loop = asyncio.get_running_loop()
        futs: list[asyncio.Future[KafkaError | None]] = []

        def delivered(fut: asyncio.Future[KafkaError | None]) -> Callable[[Any, Any], None]:
            def cb(err: Any, _msg: Any) -> None:
                loop.call_soon_threadsafe(_settle, fut, err)

            return cb

        prev = self.saved.get(commit.device) if commit.device is not None else None
        # an idle close consumes no record: the device's last consumed offset stays
        last = prev.offset if prev is not None and prev.partition == p else -1
        offset = max((t[1] for t in commit.tokens if t is not None), default=last)
        if commit.device is not None and (commit.checkpoint is not None or commit.records):
            value = orjson.dumps(
                {
                    "device": commit.device,
                    "seq": commit.seq,
                    "by": self.consumer_name,
                    "records": commit.records,
                }
            )
            headers = [(OFFSET_HEADER, str(offset).encode())]
            if commit.checkpoint is not None:
                headers.append((CKPT_HEADER, commit.checkpoint))
            futs.append(loop.create_future())
            self._produce(self.output, commit.device, value, headers, p, delivered(futs[-1]))
        for e in commit.errors:
            futs.append(loop.create_future())
            self._produce(self.errors, e.get("device"), orjson.dumps(e), None, None, delivered(futs[-1]))
        errs = [e for e in await asyncio.gather(*futs) if e is not None]
        if errs:
            log.warning("publishing for %s seq %s failed: %s", commit.device, commit.seq, errs[0])
            return False
        if commit.device is not None and commit.checkpoint is not None:
            self.saved[commit.device] = _Saved(p, offset, commit.checkpoint)
        for t in commit.tokens:
            if t is not None and (track := self.offsets.get(t[0])) is not None:
                track.open.discard(t[1])
        return True

    def _produce(
        self,
        topic: str,
        key: str | None,
        value: bytes,
        headers: list[tuple[str, bytes]] | None,
        partition: int | None,
        cb: Callable[[Any, Any], None],
    ) -> None:
        kw: dict[str, Any] = {"on_delivery": cb}
        if partition is not None:
            kw["partition"] = partition
        if headers:
            kw["headers"] = headers
        k = key.encode() if key is not None else None
        while True:
            try:
                self.producer.produce(topic, value=value, key=k, **kw)
                return
            except BufferError:  # the producer queue is full: the poller thread drains it
                time.sleep(0.005)


def _settle(fut: asyncio.Future[KafkaError | None], err: Any) -> None:
    if not fut.done():
        fut.set_result(err)
