"""The broker-independent ingestion core: per-device sessions fed from any message source.

An adapter (Redis Streams, MQTT, Kafka) turns broker records into
``Message`` (or ``Rejection``) values and ``submit``s them; the core runs one worker per
device that feeds that device's ``StreamSession`` in order, and hands back one ``Commit``
per consumed message: the records to publish (results, events, gap notices, summaries,
errors), the device's checkpoint (its last consumed sequence number plus its session
snapshot) and the broker tokens to acknowledge. The adapter applies a commit as
"publish, then checkpoint, then acknowledge" (atomically where the broker allows), so a
crash anywhere leaves either the previous or the new checkpoint and the message still
pending: the next owner restores the checkpoint and skips what it had consumed.

A device processes one message at a time and waits for its steps before committing, so
the snapshot is taken idle; many devices run at once, so their steps share batches.
Backpressure: ``submit`` waits (the adapter stops reading) while too many messages are in
flight or the batcher backlog is high; nothing is dropped and no queue grows without bound.
Fairness: a device whose queue is full does not stop the reading; its further messages are
held aside in order (within the in-flight bound), so one device's flood cannot keep the
other devices of its partition from being read and scored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, cast

import numpy as np
import orjson

from lookback.engine.decoder import make_decoder, needs_decoder
from lookback.engine.events import Event
from lookback.engine.pcm import (
    BYTES_PER_SAMPLE,
    ENCODINGS_TEXT,
    SAMPLE_RATES,
    Encoding,
    float_problem,
    silence,
)
from lookback.engine.session import StreamSession
from lookback.errors import CapacityError, LookbackError, SnapshotError
from lookback.metrics import Metrics
from lookback.settings import Settings

log = logging.getLogger("lookback.sources")

GapPolicy = Literal["zero_fill", "reset"]
FRAME_SAMPLES = 128
_CKPT = struct.Struct("<4sI")
_CKPT_MAGIC = b"LBDC"
_MAX_SKIPPED = 1024  # sequence numbers remembered per device to tell "late" from "duplicate"
MAX_SEQ = 2**63 - 1  # a seq must fit a signed 64-bit integer: JSON, checkpoints, Lua all take it
MAX_DEVICE_BYTES = 256  # a device id is part of broker keys and of every record
MAX_NAME_CHARS = 256  # model / version names
DEFAULT_MAX_FLOAT_AMPLITUDE: float = Settings.model_fields["max_float_amplitude"].default


# -- values exchanged with adapters -------------------------------------------------------


@dataclass(slots=True)
class Message:
    """One well-formed audio message of one device (whole 128-sample frames)."""

    device: str
    seq: int
    audio: bytes
    encoding: str = "pcm_s16le"
    model: str | None = None
    version: str | None = None
    end: bool = False
    sent: float | None = None  # producer's wall clock (time.time()), for publish latency
    token: Any = None  # what the adapter acknowledges once the commit is applied
    partition: str = ""
    sample_rate: int | None = None  # the producer's, when not the model's (resampled)


@dataclass(slots=True)
class Rejection:
    """A message that cannot be fed; ``device``/``seq`` are set when they could be read."""

    reason: str
    detail: str
    device: str | None = None
    seq: int | None = None
    token: Any = None
    partition: str = ""


@dataclass(slots=True)
class Commit:
    device: str | None
    partition: str
    seq: int | None
    records: list[dict[str, Any]]  # results, events, gap notices, summaries (in order)
    errors: list[dict[str, Any]]
    checkpoint: bytes | None  # None: the device's checkpoint does not change
    tokens: list[Any]
    sent: float | None = None


class Adapter(Protocol):
    """What the core needs from a broker."""

    async def load_checkpoint(self, device: str) -> bytes | None: ...

    async def commit(self, commit: Commit) -> bool:
        """Publish, store the checkpoint, acknowledge; False if this consumer lost the device."""

    def lost(self, partition: str) -> None:
        """A device of ``partition`` failed to commit: redeliver its unacknowledged messages.

        Its later messages were dropped unacknowledged (never processed out of order), so
        the adapter must have the broker deliver them again, in order (Redis: re-claim the
        partition's pending entries; MQTT: reconnect the persistent session).
        """


def validate_audio(
    audio: bytes,
    encoding: str,
    max_frames: int,
    max_amplitude: float = DEFAULT_MAX_FLOAT_AMPLITUDE,
    sample_rate: int | None = None,
) -> tuple[str, str] | None:
    """(reason, detail) when an audio payload cannot be fed, else None.

    Float audio follows the WebSocket's and REST's rule (``engine.pcm.float_problem``).
    PCM at 16 kHz comes in whole frames; G.711 or another rate in any whole number of
    samples, at most ``max_frames`` frames' duration.
    """
    bps = BYTES_PER_SAMPLE.get(encoding)
    if bps is None:
        return "bad_encoding", f"encoding must be {ENCODINGS_TEXT}, not {encoding[:40]!r}"
    if not audio:
        return "empty_message", "message carries no audio"
    if needs_decoder(encoding, sample_rate, 16000):
        rate = sample_rate or 16000
        if len(audio) % bps:
            return "partial_sample", f"{len(audio)} bytes is not a whole number of {bps}-byte samples"
        if len(audio) // bps > max_frames * FRAME_SAMPLES * rate // 16000:
            return "too_many_frames", f"more than max_frames_per_message={max_frames} frames' duration"
    elif len(audio) % (FRAME_SAMPLES * bps):
        return (
            "bad_frame_size",
            f"{len(audio)} bytes is not a whole number of {FRAME_SAMPLES * bps}-byte frames",
        )
    elif len(audio) // (FRAME_SAMPLES * bps) > max_frames:
        return "too_many_frames", f"more than max_frames_per_message={max_frames} frames"
    if bps == 4:
        return float_problem(np.frombuffer(audio, "<f4"), max_amplitude)
    return None


def _rate(session: StreamSession, *, model: bool = False) -> int:
    """The device's sample rate (its decoder's), or the model's."""
    dec = session.decoder
    return session.model.spec.sample_rate if model or dec is None else dec.sample_rate


def _finite(x: float) -> bool:
    return abs(x) < 2**63 if isinstance(x, int) else math.isfinite(x)  # float(10**400) overflows


def _shown(value: object) -> str:
    return repr(value)[:40]


def make_message(
    device: object,
    seq: object,
    audio: object,
    fields: Mapping[str, object],
    *,
    max_frames: int,
    max_amplitude: float,
    token: Any = None,
    partition: str = "",
) -> Message | Rejection:
    """Check every field of one broker message; a ``Message`` only if all of them are valid.

    The adapters hand over what they decoded (JSON values from MQTT; from Redis, ints,
    floats and strings where the bytes spell one, the raw bytes where they do not), so one
    set of rules holds for every broker. Nothing that reaches the core can fail later
    (a ``seq`` beyond 64 bits once jammed a partition on every commit). Optional fields in
    ``fields``: ``encoding``, ``model``, ``version``, ``end``, ``ts``; others are ignored.
    """
    dev: str | None = None
    why = ""
    if device is None:
        why = "no `device`"
    elif not isinstance(device, str) or not device:
        why = f"`device` must be a non-empty string, not {_shown(device)}"
    elif len(device.encode(errors="replace")) > MAX_DEVICE_BYTES:
        why = f"`device` longer than {MAX_DEVICE_BYTES} bytes"
    else:
        dev = device
    n: int | None = None
    if isinstance(seq, int) and not isinstance(seq, bool) and 0 <= seq <= MAX_SEQ:
        n = seq
    elif not why:
        why = "no `seq`" if seq is None else f"`seq` must be an integer in [0, 2^63-1], not {_shown(seq)}"
    if why:
        return Rejection("missing_field", f"message has no valid device/seq: {why}", dev, n, token, partition)
    assert dev is not None and n is not None

    def reject(reason: str, detail: str) -> Rejection:
        return Rejection(reason, detail, dev, n, token, partition)

    if audio is None:
        return reject("missing_field", "message has no `audio`")
    if not isinstance(audio, bytes):
        return reject("missing_field", f"`audio` must be bytes, not {type(audio).__name__}")
    encoding = fields.get("encoding")
    if encoding is None:
        encoding = "pcm_s16le"
    if not isinstance(encoding, str):
        return reject("bad_encoding", f"encoding must be {ENCODINGS_TEXT}, not {_shown(encoding)}")
    rate = fields.get("sample_rate")
    if rate is not None and (not isinstance(rate, int) or isinstance(rate, bool) or rate not in SAMPLE_RATES):
        return reject("bad_sample_rate", f"sample_rate must be one of {SAMPLE_RATES}, not {_shown(rate)}")
    names: dict[str, str | None] = {}
    for key in ("model", "version"):
        v = fields.get(key)
        if v is None or v == "":
            names[key] = None
        elif not isinstance(v, str) or len(v) > MAX_NAME_CHARS:
            return reject("invalid_field", f"`{key}` must be a string of at most {MAX_NAME_CHARS} characters")
        else:
            names[key] = v
    end = fields.get("end")
    if end is None:
        end = False
    elif isinstance(end, int) and end in (0, 1):  # True/False are ints too
        end = bool(end)
    else:
        return reject("invalid_field", f"`end` must be true/false or 1/0, not {_shown(end)}")
    ts = fields.get("ts")
    sent: float | None = None
    if ts is not None:
        if isinstance(ts, bool) or not isinstance(ts, int | float) or not _finite(ts):
            return reject("invalid_field", f"`ts` must be a finite number (time.time()), not {_shown(ts)}")
        sent = float(ts)
    bad = validate_audio(audio, encoding, max_frames, max_amplitude, rate)
    if bad is not None:
        return reject(*bad)
    return Message(
        dev, n, audio, encoding, names["model"], names["version"], end, sent, token, partition, rate
    )


# -- checkpoints ---------------------------------------------------------------------------


@dataclass
class Checkpoint:
    seq: int  # last sequence number consumed (-1: none yet)
    epoch: int  # sessions this device has had (a reset or an end starts the next)
    snapshot: bytes | None  # the open session's state; None: no session open

    def encode(self) -> bytes:
        head = orjson.dumps({"seq": self.seq, "epoch": self.epoch})
        return _CKPT.pack(_CKPT_MAGIC, len(head)) + head + (self.snapshot or b"")

    @staticmethod
    def decode(data: bytes) -> Checkpoint:
        if len(data) < _CKPT.size:
            raise SnapshotError("device checkpoint truncated")
        magic, hlen = _CKPT.unpack_from(data)
        if magic != _CKPT_MAGIC or _CKPT.size + hlen > len(data):
            raise SnapshotError("not a Lookback device checkpoint")
        try:
            h = orjson.loads(data[_CKPT.size : _CKPT.size + hlen])
            seq, epoch = int(h["seq"]), int(h["epoch"])
        except (KeyError, TypeError, ValueError, orjson.JSONDecodeError) as exc:
            raise SnapshotError(f"device checkpoint header malformed: {exc}") from exc
        snap = data[_CKPT.size + hlen :]
        return Checkpoint(seq, epoch, snap or None)


# -- the core ------------------------------------------------------------------------------


@dataclass
class SourceOptions:
    """Per-source behaviour, from settings (``LOOKBACK_SOURCE_*``) and the source URL."""

    model: str | None = None
    version: str | None = None
    idle_timeout_s: float = 60.0
    gap_policy: GapPolicy = "zero_fill"
    max_gap_fill_s: float = 10.0
    max_inflight: int = 4096  # messages read and not yet committed, all devices together
    device_queue: int = 32  # messages queued for one device; more are held aside (fairness)
    max_frames: int = 64
    max_amplitude: float = DEFAULT_MAX_FLOAT_AMPLITUDE  # float audio beyond it: audio_out_of_range
    max_pending_steps: int = 64
    shed_backlog_steps: int = 4096
    max_devices: int = 1000

    @classmethod
    def from_settings(cls, s: Settings, **over: Any) -> SourceOptions:
        opts = cls(
            model=s.source_model or None,
            idle_timeout_s=s.source_idle_timeout_s,
            gap_policy=s.source_gap_policy,
            max_gap_fill_s=s.source_max_gap_fill_s,
            max_inflight=s.source_max_inflight,
            device_queue=s.source_device_queue,
            max_frames=s.max_frames_per_message,
            max_amplitude=s.max_float_amplitude,
            max_pending_steps=s.max_pending_steps,
            shed_backlog_steps=s.shed_backlog_steps,
            max_devices=s.max_sessions,
        )
        for k, v in over.items():
            setattr(opts, k, v)
        return opts

    def apply_query(self, q: dict[str, str]) -> None:
        """Per-source overrides from the source URL (``?model=...&gap_policy=reset``)."""
        if "model" in q:
            self.model = q["model"]
        if "version" in q:
            self.version = q["version"]
        if "gap_policy" in q:
            if q["gap_policy"] not in ("zero_fill", "reset"):
                raise ValueError(f"gap_policy must be zero_fill or reset, not {q['gap_policy'][:20]!r}")
            self.gap_policy = cast(GapPolicy, q["gap_policy"])
        if "idle_timeout_s" in q:
            self.idle_timeout_s = float(q["idle_timeout_s"])


class _Sink:
    """Collects one device's outputs between two commits (called on the event loop)."""

    def __init__(self, dev: Device) -> None:
        self.dev = dev

    def on_result(self, index: int, time: float, scores: list[float], events: list[Event] | None) -> None:
        d = self.dev
        d.records.append({"type": "result", "epoch": d.epoch, "step": index, "time": time, "scores": scores})
        for e in events or ():
            d.records.append(
                {"type": "event", "epoch": d.epoch, "event": e.event, "label": e.label, "time": e.time}
            )

    def on_error(self, index: int, error: LookbackError) -> None:
        self.dev.errors.append({"type": "error", "reason": error.code, "detail": str(error), "step": index})


@dataclass
class Device:
    id: str
    partition: str
    queue: asyncio.Queue[Message | Rejection] = field(default_factory=asyncio.Queue)
    held: deque[Message | Rejection] = field(default_factory=deque)  # beyond its queue, in order
    session: StreamSession | None = None
    loaded: bool = False
    last_seq: int = -1
    epoch: int = 0
    gaps: int = 0
    skipped: deque[int] = field(default_factory=lambda: deque(maxlen=_MAX_SKIPPED))
    records: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    task: asyncio.Task[None] | None = None
    leaving: bool = False
    failed: bool = False  # a commit failed: drop (unacknowledged) until the adapter replays


class BrokerFailure(Exception):
    """An adapter call failed (the broker, not the message): replay from the checkpoint."""


Resolver = Callable[[str | None, str | None], Any]  # (model, version) -> ServedModel


class DeviceHub:
    """Per-device sessions over one engine; adapters call ``submit`` in broker order."""

    def __init__(
        self,
        engine: Any,
        adapter: Adapter,
        opts: SourceOptions,
        metrics: Metrics,
        *,
        source: str,
        admit: Callable[[], str | None] | None = None,
    ) -> None:
        self.engine = engine
        self.adapter = adapter
        self.opts = opts
        self.metrics = metrics
        self.source = source
        self.admit = admit
        self.devices: dict[str, Device] = {}
        self.blocked: set[str] = set()  # partitions whose messages the adapter will replay
        self.inflight = 0
        self._room = asyncio.Event()
        self._room.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self.closed = False

    # -- intake ----------------------------------------------------------------------------
    async def submit(self, item: Message | Rejection, *, replay: bool = False) -> None:
        """Queue ``item`` for its device; waits (never drops) while the core is full.

        A device's messages beyond ``device_queue`` are held aside rather than waited for,
        so the adapter reads on to the other devices' messages.

        Items of a ``blocked`` partition (one being recovered after a failed commit) are
        skipped unacknowledged unless they come from the adapter's ``replay``.
        """
        if item.partition in self.blocked and not replay:
            return
        while not self._has_room(item):
            self._room.clear()
            with contextlib.suppress(TimeoutError):
                # re-check the batcher backlog periodically: it drains without waking us
                await asyncio.wait_for(self._room.wait(), 0.05)
        self.inflight += 1
        self._idle.clear()
        if isinstance(item, Message):
            self.metrics.source_bytes.labels(self.source).inc(len(item.audio))
        if item.device is None or (isinstance(item, Rejection) and item.seq is None):
            # without a device and a sequence number it cannot be placed in any stream
            assert isinstance(item, Rejection)
            self.metrics.source_messages.labels(self.source, "rejected", item.reason).inc()
            err = _error_record(item)
            spawn(self._apply(Commit(None, item.partition, None, [], [err], None, [item.token])))
            return
        dev = self.devices.get(item.device)
        if dev is not None and dev.failed:
            self._done()  # unacknowledged: the adapter redelivers it after the failure
            return
        if dev is None:
            dev = self.devices[item.device] = Device(item.device, item.partition)
            dev.task = asyncio.create_task(self._run(dev), name=f"device-{item.device[:32]}")
            self.metrics.source_devices.labels(self.source).set(len(self.devices))
        if dev.held or dev.queue.qsize() >= self.opts.device_queue:
            dev.held.append(item)  # read on past it: a flood must not stall its neighbours
        else:
            dev.queue.put_nowait(item)

    def saturated(self) -> bool:
        """True while ``submit`` would wait on the shared limits (adapters pause fetching)."""
        o = self.opts
        return self.inflight >= o.max_inflight or self.engine.backlog >= o.shed_backlog_steps

    def _has_room(self, item: Message | Rejection) -> bool:
        if self.saturated():
            return False
        if item.device is None or item.device in self.devices:
            return True
        return len(self.devices) < self.opts.max_devices

    def _done(self) -> None:
        self.inflight -= 1
        self._room.set()
        if self.inflight == 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        """Until every submitted message is committed."""
        await self._idle.wait()

    # -- per device -------------------------------------------------------------------------
    async def _run(self, dev: Device) -> None:
        try:
            while True:
                try:
                    item = await asyncio.wait_for(dev.queue.get(), self.opts.idle_timeout_s)
                    if dev.held:  # keeps "held only behind a full queue", so empty means idle
                        dev.queue.put_nowait(dev.held.popleft())
                except TimeoutError:
                    if dev.leaving:
                        break
                    if dev.failed:
                        continue  # kept (and dropping) until the adapter releases its partition
                    if dev.session is not None:
                        await self._close_idle(dev)
                    if dev.queue.empty():
                        break
                    continue
                if item is _WAKE:
                    if dev.leaving and dev.queue.empty():
                        break
                    continue
                try:
                    if not dev.failed:
                        await self._handle(dev, item)
                except BrokerFailure as exc:  # the broker's fault: replay from the checkpoint
                    log.warning(
                        "device %s: message seq %s: broker failed: %s", dev.id, item.seq, exc.__cause__
                    )
                    self._fail(dev)
                except Exception as exc:  # never let one device take the consumer down
                    log.exception("device %s: message seq %s failed", dev.id, item.seq)
                    await self._skip(dev, item, exc)
                finally:
                    self._done()
                if dev.leaving and dev.queue.empty():
                    break
        finally:
            if self.devices.get(dev.id) is dev:
                self._forget(dev)

    def _reset(self, dev: Device) -> None:
        """Drop a device's in-memory state; its checkpoint is the truth from now on."""
        if dev.session is not None:
            dev.session.close()
            dev.session = None
        dev.loaded = False
        dev.last_seq, dev.epoch = -1, 0
        dev.records.clear()
        dev.errors.clear()

    def _fail(self, dev: Device) -> None:
        """Processing or committing failed: nothing of this device is acknowledged any more.

        Its state is dropped and its queued messages skipped unacknowledged; the adapter
        redelivers them from the last commit, and the checkpoint says where that was.
        """
        self._reset(dev)
        dev.failed = True
        self.metrics.source_messages.labels(self.source, "redelivery", "commit_failed").inc()
        self.adapter.lost(dev.partition)

    async def _skip(self, dev: Device, item: Message | Rejection, exc: Exception) -> None:
        """Processing ``item`` raised: publish it as ``internal_error`` and consume its ``seq``.

        A replay would raise again, for ever, and hold every device of the partition (the
        jam of a ``seq`` beyond 64 bits), so the device goes on from its checkpoint (the
        state before this message) as if the message had been rejected. Only if that fails
        too is the partition replayed.
        """
        try:
            self._reset(dev)
            await self._load(dev)
            detail = f"processing the message failed ({type(exc).__name__}); skipped"
            assert item.seq is not None
            await self._reject(dev, item, "internal_error", detail, consume=item.seq > dev.last_seq)
        except Exception:
            log.exception("device %s: skipping message seq %s failed", dev.id, item.seq)
            self._fail(dev)

    def _forget(self, dev: Device) -> None:
        self._reset(dev)
        if self.devices.get(dev.id) is dev:
            del self.devices[dev.id]
            self.metrics.source_devices.labels(self.source).set(len(self.devices))

    async def _load(self, dev: Device) -> None:
        try:
            data = await self.adapter.load_checkpoint(dev.id)
        except Exception as exc:
            raise BrokerFailure from exc
        dev.loaded = True
        if data is None:
            return
        try:
            ck = Checkpoint.decode(data)
        except SnapshotError as exc:
            dev.errors.append({"type": "error", "reason": "checkpoint_invalid", "detail": str(exc)})
            self.metrics.source_messages.labels(self.source, "checkpoint", "checkpoint_invalid").inc()
            return
        dev.last_seq, dev.epoch = ck.seq, ck.epoch
        if ck.snapshot is not None:
            try:
                from lookback.engine import snapshot as snapmod

                snap = snapmod.decode(ck.snapshot)
                handle = self.engine.resolve(snap.model, snap.version)
                dev.session = await self._with_room(
                    lambda: StreamSession.restore(
                        handle,
                        _Sink(dev),
                        snap,
                        max_pending_steps=self.opts.max_pending_steps,
                        max_amplitude=self.opts.max_amplitude,
                    )
                )
                self.metrics.source_restores.labels(self.source).inc()
            except LookbackError as exc:
                # the model changed since the checkpoint: the device starts a new session
                dev.epoch += 1
                dev.errors.append({"type": "error", "reason": "checkpoint_incompatible", "detail": str(exc)})
                self.metrics.source_messages.labels(
                    self.source, "checkpoint", "checkpoint_incompatible"
                ).inc()
            except Exception as exc:
                # a snapshot that passed its checks yet cannot be restored: raising here would
                # fail this device's every message, so it starts a new session instead
                log.exception("device %s: restoring its checkpoint failed", dev.id)
                dev.epoch += 1
                detail = f"device checkpoint cannot be restored ({type(exc).__name__})"
                dev.errors.append({"type": "error", "reason": "checkpoint_invalid", "detail": detail})
                self.metrics.source_messages.labels(self.source, "checkpoint", "checkpoint_invalid").inc()

    async def _handle(self, dev: Device, item: Message | Rejection) -> None:
        if not dev.loaded:
            await self._load(dev)
        assert item.seq is not None
        if dev.last_seq >= 0 and item.seq <= dev.last_seq:
            reason = "late_message" if item.seq in dev.skipped else "duplicate_message"
            what = (
                "arrived after later ones (its gap was already handled)"
                if reason == "late_message"
                else ("already consumed")
            )
            await self._reject(
                dev, item, reason, f"seq {item.seq} {what}; last consumed {dev.last_seq}", consume=False
            )
            return
        if isinstance(item, Rejection):
            await self._reject(dev, item, item.reason, item.detail, consume=True)
            return
        msg = item
        if dev.last_seq >= 0 and msg.seq > dev.last_seq + 1:
            await self._gap(dev, msg)
        if dev.session is None:
            try:
                handle = self.engine.resolve(msg.model or self.opts.model, msg.version or self.opts.version)
            except LookbackError as exc:
                await self._reject(dev, msg, exc.code, str(exc), consume=True)
                return
            await self._admission()
            enc = cast(Encoding, msg.encoding)
            spec = handle.spec
            dec = make_decoder(
                enc,
                msg.sample_rate,
                spec.sample_rate,
                spec.frame_samples,
                max_amplitude=self.opts.max_amplitude,
            )
            dev.session = await self._with_room(
                lambda: StreamSession(
                    handle,
                    _Sink(dev),
                    encoding=enc,
                    max_pending_steps=self.opts.max_pending_steps,
                    decoder=dec,
                )
            )
            self.metrics.source_sessions.labels(self.source, "opened").inc()
        session = dev.session
        if msg.encoding != session.encoding or _rate(session) != (
            msg.sample_rate or _rate(session, model=True)
        ):
            await self._reject(
                dev,
                msg,
                "bad_encoding" if msg.encoding != session.encoding else "bad_sample_rate",
                f"device session streams {session.encoding} at {_rate(session)} Hz, message is "
                f"{msg.encoding} at {msg.sample_rate or 'the model rate'}",
                consume=True,
            )
            return
        try:
            await self._feed(session, msg.audio)
        except LookbackError as exc:
            await self._reject(dev, msg, exc.code, str(exc), consume=True)
            return
        if msg.end:
            await self._end(dev, "end")
        dev.last_seq = msg.seq
        await self._commit(dev, msg)
        self.metrics.source_messages.labels(self.source, "scored", "").inc()

    async def _feed(self, session: StreamSession, audio: bytes) -> None:
        """Push in pieces that fit the step bound, each scored before the next."""
        unit = session.frame_bytes if session.decoder is None else session.decoder.sample_bytes
        half = self.opts.max_pending_steps * session.hop // 2 // session.model.spec.frame_samples
        piece = max(unit, session.wire_bytes(half))
        piece -= piece % unit
        for i in range(0, len(audio), piece):
            session.push(audio[i : i + piece])
            await session.wait_idle()

    async def _admission(self) -> None:
        """Same limits as a WebSocket session: wait (read more slowly) rather than refuse."""
        while self.admit is not None and (why := self.admit()) is not None:
            self.metrics.source_admission_waits.labels(self.source, why).inc()
            await asyncio.sleep(0.1)  # a back-off poll: admission frees up without an event

    async def _with_room(self, open_session: Callable[[], StreamSession]) -> StreamSession:
        """Open a session, waiting while the state table is full (WebSocket sessions too)."""
        while True:
            try:
                return open_session()
            except CapacityError:
                self.metrics.source_admission_waits.labels(self.source, "capacity").inc()
                await asyncio.sleep(0.1)  # a back-off poll: slots free up without an event

    async def _gap(self, dev: Device, msg: Message) -> None:
        missing = msg.seq - dev.last_seq - 1
        dev.gaps += 1
        if missing <= _MAX_SKIPPED:
            dev.skipped.extend(range(dev.last_seq + 1, msg.seq))
        self.metrics.source_gaps.labels(self.source, self.opts.gap_policy).inc()
        self.metrics.source_gap_messages.labels(self.source).inc(missing)
        session = dev.session
        policy = self.opts.gap_policy
        fill = 0
        if session is not None and policy == "zero_fill":
            fill = missing * len(msg.audio) // BYTES_PER_SAMPLE[session.encoding]
            if fill > self.opts.max_gap_fill_s * _rate(session):
                policy, fill = "reset", 0  # too long to pretend it was silence
        dev.records.append(
            {
                "type": "gap",
                "epoch": dev.epoch,
                "after_seq": dev.last_seq,
                "seq": msg.seq,
                "missing": missing,
                "policy": policy,
                "fill_samples": fill,
            }
        )
        if session is None:
            return
        if policy == "zero_fill":
            await self._feed(session, silence(session.encoding, fill))
        else:
            await self._end(dev, "gap")

    async def _end(self, dev: Device, reason: str) -> None:
        session = dev.session
        assert session is not None
        session.flush()
        await session.wait_idle()
        session.finish()
        dev.records.append(
            {
                "type": "summary",
                "epoch": dev.epoch,
                "reason": reason,
                "model": session.model.spec.key,
                "steps": session.steps_done,
                "failed_steps": session.steps_failed,
                "samples": session.samples,
                "padded_samples": session.padded_samples,
                "events": [{"event": e.event, "label": e.label, "time": e.time} for e in session.events],
                "events_truncated": session.events.truncated,
            }
        )
        session.close()
        dev.session = None
        dev.epoch += 1
        self.metrics.source_sessions.labels(self.source, reason).inc()

    async def _close_idle(self, dev: Device) -> None:
        await self._end(dev, "idle")
        self.inflight += 1  # the idle close is committed like a message
        try:
            await self._commit(dev, None)
        finally:
            self._done()

    async def _reject(
        self, dev: Device, item: Message | Rejection, reason: str, detail: str, *, consume: bool
    ) -> None:
        self.metrics.source_messages.labels(self.source, "rejected", reason).inc()
        dev.errors.append({"type": "error", "reason": reason, "detail": detail, "seq": item.seq})
        if consume:
            assert item.seq is not None
            dev.last_seq = item.seq
            await self._commit(dev, item)
        else:  # nothing about the device changes: publish the error and acknowledge
            errs, dev.errors = dev.errors, []
            for e in errs:
                e["device"] = dev.id
            await self._apply(Commit(dev.id, dev.partition, item.seq, [], errs, None, [item.token]))

    async def _commit(self, dev: Device, item: Message | Rejection | None) -> None:
        snap = dev.session.snapshot() if dev.session is not None else None
        ck = Checkpoint(dev.last_seq, dev.epoch, snap).encode()
        records, dev.records = dev.records, []
        errors, dev.errors = dev.errors, []
        seq = item.seq if item is not None else None
        for r in records:
            r["device"] = dev.id
            r["seq"] = seq
        for e in errors:
            e["device"] = dev.id
        sent = item.sent if isinstance(item, Message) else None
        commit = Commit(dev.id, dev.partition, seq, records, errors, ck, [item.token] if item else [], sent)
        if not await self._apply(commit):
            log.warning("device %s: commit refused or failed; its messages will be redelivered", dev.id)
            self._fail(dev)

    async def _apply(self, commit: Commit) -> bool:
        t0 = time.perf_counter()
        try:
            ok = await self.adapter.commit(commit)
        except Exception as exc:
            if commit.device is None:
                self._done()
            raise BrokerFailure from exc
        self.metrics.source_commit_seconds.labels(self.source).observe(time.perf_counter() - t0)
        if ok and (steps := sum(r["type"] == "result" for r in commit.records)):
            self.metrics.source_steps.labels(self.source).inc(steps)
        if commit.sent is not None and ok:
            self.metrics.source_latency.labels(self.source).observe(max(0.0, time.time() - commit.sent))
        if commit.device is None:
            self._done()
        return ok

    # -- ownership changes -----------------------------------------------------------------
    async def release(self, partition: str) -> None:
        """Stop serving a partition: finish what was read, then drop its devices' sessions.

        Every consumed message is already checkpointed, so the next owner restores each
        device exactly where this consumer stopped (the Kafka "snapshot on revoke").
        """
        devs = [d for d in self.devices.values() if d.partition == partition]
        for d in devs:
            d.leaving = True
            d.queue.put_nowait(_WAKE)
        tasks = [d.task for d in devs if d.task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def stop(self) -> None:
        """Finish every queued message (each committed), then drop all sessions."""
        self.closed = True
        await self.wait_idle()
        for d in list(self.devices.values()):
            d.leaving = True
            d.queue.put_nowait(_WAKE)
        tasks = [d.task for d in self.devices.values() if d.task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


_BACKGROUND: set[asyncio.Task[Any]] = set()


def spawn(coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
    """A background task kept referenced until it ends (the loop holds tasks weakly)."""
    task = asyncio.create_task(coro)
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)
    return task


_WAKE = Rejection("wake", "")  # internal: wakes a leaving device's worker


def _error_record(item: Rejection) -> dict[str, Any]:
    return {
        "type": "error",
        "reason": item.reason,
        "detail": item.detail,
        "device": item.device,
        "seq": item.seq,
    }


Starter = Callable[[], Awaitable[None]]
