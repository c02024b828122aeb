"""MQTT source (aiomqtt, MQTT 5): ``<prefix>/<device>/audio`` in, scores and events out, QoS 1.

The consumer keeps a persistent session (fixed client id, clean start off, a session
expiry), so the broker queues a device's messages while the consumer restarts. Incoming
messages are acknowledged by hand, only once their results are published and the
device checkpoint is stored; ``receive_maximum`` caps the unacknowledged messages the
broker sends, which is the consumer's backpressure (a slow consumer holds its PUBACKs and
the broker stops sending).

Payload: one JSON header line, a newline, then the audio (whole 128-sample frames)::

    {"seq": 12, "encoding": "pcm_s16le", "model": "lookback-vad", "end": false, "ts": 1764400000.1}\\n<PCM>

Results of one consumed message are one QoS 1 message on ``<prefix>/<device>/scores``
(``result`` records) and one on ``<prefix>/<device>/events`` (events, gap notices,
summaries); rejections go to ``<prefix>/errors``. Device checkpoints live in the state
store (``LOOKBACK_STATE_STORE``; Redis to survive a restart). MQTT has no transaction
over publish + checkpoint + ack: a crash between publishing results and storing the
checkpoint republishes that message's results after the restart (each record carries
``device``, ``epoch`` and ``step``, so a reader can drop the repeat); a clean stop
(SIGTERM) loses and repeats nothing. One consumer per topic prefix keeps each device's
messages in order (shared subscriptions would split a device across consumers).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiomqtt
import orjson
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from lookback.metrics import Metrics
from lookback.settings import Settings
from lookback.sources.core import Commit, DeviceHub, Message, Rejection, SourceOptions, make_message
from lookback.state_store import LOST, Put, StateStore, open_store

log = logging.getLogger("lookback.sources.mqtt")


def _log_exit(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("MQTT source stopped: %r", task.exception())


def encode_payload(seq: int, audio: bytes, **header: Any) -> bytes:
    """Producer helper: the documented payload (header line + audio)."""
    return orjson.dumps({"seq": seq, **header}) + b"\n" + audio


class MqttSource:
    kind = "mqtt"

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
        opts.apply_query(q)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 1883
        self.username = parts.username
        self.password = parts.password
        self.prefix = q.get("prefix", "lookback").rstrip("/")
        self.client_id = q.get("client_id") or f"lookback-{socket.gethostname()}-{os.getpid()}"
        self.receive_maximum = min(65535, int(q.get("receive_maximum", str(min(opts.max_inflight, 1024)))))
        self.session_expiry = int(min(settings.source_checkpoint_ttl_s, 0xFFFFFFFE))
        self.name = f"mqtt:{self.prefix}"
        ttl = settings.source_checkpoint_ttl_s
        self.store: StateStore = open_store(settings.state_store, window_s=ttl, lease_s=ttl, tomb_s=ttl)
        if self.store.kind == "memory":
            log.warning(
                "MQTT source with the memory state store: device checkpoints do not survive a restart"
            )
        self.hub = DeviceHub(engine, self, opts, metrics, source=self.name, admit=admit)
        self.client: aiomqtt.Client | None = None
        self._task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._stopping = False

    def _sid(self, device: str) -> str:
        return f"mqtt:{self.prefix}:{device}"

    async def start(self) -> None:
        await self.store.start()
        self._task = asyncio.create_task(self._run(), name="mqtt-source")
        self._task.add_done_callback(_log_exit)
        done, _ = await asyncio.wait(
            [self._task, asyncio.ensure_future(self._connected.wait())], return_when=asyncio.FIRST_COMPLETED
        )
        if self._task in done:
            self._task.result()  # raises why it could not connect

    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    def _make_client(self) -> aiomqtt.Client:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.session_expiry
        props.ReceiveMaximum = self.receive_maximum
        client = aiomqtt.Client(
            self.host,
            self.port,
            username=self.username,
            password=self.password,
            identifier=self.client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=False,
            properties=props,
        )
        client._client.manual_ack_set(True)  # PUBACK after the commit, not on receipt
        return client

    async def _run(self) -> None:
        while not self._stopping:
            try:
                async with self._make_client() as client:
                    self.client = client
                    await client.subscribe(f"{self.prefix}/+/audio", qos=1)
                    self._connected.set()
                    log.info("consuming %s/+/audio as %s", self.prefix, self.client_id)
                    async for msg in client.messages:
                        if self._stopping:
                            # not acknowledged: the broker redelivers it to the next session; the
                            # connection stays up for the commits of what was taken (stop cancels)
                            await asyncio.Event().wait()
                        await self.hub.submit(self._parse(msg))
                    return
            except aiomqtt.MqttError as exc:
                if not self._connected.is_set():
                    raise
                log.warning("MQTT connection lost (%s); reconnecting", exc)
                self.client = None
                self.hub.blocked.add("")
                await self.hub.release("")  # unacknowledged messages come again, in order
                self.hub.blocked.discard("")
                await asyncio.sleep(1.0)  # reconnect back-off

    def _parse(self, msg: aiomqtt.Message) -> Message | Rejection:
        token = (msg.mid, msg.qos)
        levels = msg.topic.value.split("/")
        device = levels[-2] if len(levels) >= 3 else None
        data = bytes(msg.payload) if isinstance(msg.payload, bytes | bytearray) else b""
        nl = data.find(b"\n")
        try:
            if nl < 0:
                raise ValueError("no header line")
            head = orjson.loads(data[:nl])
            if not isinstance(head, dict):
                raise ValueError("header is not an object")
        except (ValueError, orjson.JSONDecodeError) as exc:
            return Rejection("bad_header", f"payload header: {exc}", device, None, token)
        return make_message(
            device,
            head.get("seq"),
            data[nl + 1 :],
            head,
            max_frames=self.hub.opts.max_frames,
            max_amplitude=self.hub.opts.max_amplitude,
            token=token,
        )

    # -- the adapter interface ---------------------------------------------------------------
    async def load_checkpoint(self, device: str) -> bytes | None:
        outcome, data = await self.store.claim(self._sid(device), self.client_id)
        if outcome == "conflict":
            log.warning("device %s: its checkpoint is leased by another consumer", device)
        return data if outcome == "ok" else None

    def lost(self, partition: str) -> None:
        """A commit failed: reconnect, so the broker resends every unacknowledged message."""
        self.hub.blocked.add(partition)
        if self.client is not None:
            self.client._client.disconnect()

    async def commit(self, commit: Commit) -> bool:
        client = self.client
        if client is None:
            return False
        dev = commit.device
        scores = [r for r in commit.records if r["type"] == "result"]
        other = [r for r in commit.records if r["type"] != "result"]
        head = {"device": dev, "seq": commit.seq}
        if scores:
            await client.publish(
                f"{self.prefix}/{dev}/scores", orjson.dumps({**head, "records": scores}), qos=1
            )
        if other:
            await client.publish(
                f"{self.prefix}/{dev}/events", orjson.dumps({**head, "records": other}), qos=1
            )
        for e in commit.errors:
            await client.publish(f"{self.prefix}/errors", orjson.dumps(e), qos=1)
        ok = True
        if dev is not None and commit.checkpoint is not None:
            ok = (await self.store.sync([Put(self._sid(dev), self.client_id, commit.checkpoint)]))[0] != LOST
        for t in commit.tokens:
            if t is not None:
                client._client.ack(*t)
        return ok

    async def stop(self) -> None:
        """Stop taking messages, commit (and acknowledge) everything taken, disconnect."""
        self._stopping = True
        await self.hub.stop()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await self._task
        await self.store.stop()
