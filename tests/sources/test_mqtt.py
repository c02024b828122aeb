"""MQTT source against a real mosquitto and real ``lookback consume`` processes."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import aiomqtt
import orjson

from lookback.sources.mqtt import encode_payload
from tests.sources.conftest import Broker, Consumer
from tests.sources.support import device_audio, messages, solo_reference


class Collector:
    """Subscribes to every device's scores and events, and the errors topic."""

    def __init__(self, port: int, prefix: str) -> None:
        self.port, self.prefix = port, prefix
        self.records: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.errors: list[dict[str, Any]] = []
        self.ready = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        async with aiomqtt.Client("127.0.0.1", self.port, identifier="collector") as c:
            for t in ("+/scores", "+/events", "errors"):
                await c.subscribe(f"{self.prefix}/{t}", qos=1)
            self.ready.set()
            async for m in c.messages:
                body = orjson.loads(bytes(m.payload))
                if m.topic.value.endswith("/errors"):
                    self.errors.append(body)
                else:
                    self.records[body["device"]].extend(body["records"])

    async def __aenter__(self) -> Collector:
        self.task = asyncio.create_task(self.run())
        await asyncio.wait_for(self.ready.wait(), 30)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.task is not None
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task

    def finished(self) -> int:
        return sum(1 for recs in self.records.values() if any(x["type"] == "summary" for x in recs))


async def test_many_devices_consumer_restarted_mid_run_exactly_once(
    mqtt_broker: Broker, redis_broker: Broker, consumers: list[Consumer], tmp_path: Path
) -> None:
    n_devices, frames, fpm = 200, 200, 20
    audios = device_audio(n_devices, frames)
    reference = await solo_reference(audios)
    url = f"mqtt://127.0.0.1:{mqtt_broker.port}?prefix=t&client_id=lookback-1"
    env = {"LOOKBACK_STATE_STORE": redis_broker.url}
    c = Consumer(url, tmp_path / "c.log", **env)
    consumers.append(c)
    c.start()
    per_dev = {d: messages(a, fpm) for d, a in audios.items()}
    n_msgs = len(next(iter(per_dev.values())))
    async with (
        Collector(mqtt_broker.port, "t") as col,
        aiomqtt.Client("127.0.0.1", mqtt_broker.port, identifier="producer") as pub,
    ):
        for i in range(n_msgs):  # interleaved: message i of every device, then i + 1
            for d, msgs in per_dev.items():
                payload = encode_payload(i, msgs[i], end=i == n_msgs - 1, ts=time.time())
                await pub.publish(f"t/{d}/audio", payload, qos=1)
            if i == n_msgs // 2:
                # restart mid-stream: once results are flowing, stop (SIGTERM) and start again
                deadline = time.monotonic() + 60
                while not col.records:
                    assert time.monotonic() < deadline, "no results before the restart"
                    await asyncio.sleep(0.02)  # poll what the collector received
                assert c.stop() == 0
                c.start()
        deadline = time.monotonic() + 120
        while col.finished() < n_devices:
            assert time.monotonic() < deadline, f"only {col.finished()}/{n_devices} devices finished"
            assert c.proc is not None and c.proc.poll() is None, "consumer died"
            await asyncio.sleep(0.2)  # poll what the collector received
        for dev, ref in reference.items():
            recs = col.records[dev]
            steps = [x for x in recs if x["type"] == "result"]
            assert [x["step"] for x in steps] == list(range(len(ref))), dev  # each step once, in order
            assert [x["scores"] for x in steps] == ref, dev
            summaries = [x for x in recs if x["type"] == "summary"]
            assert len(summaries) == 1 and summaries[0]["steps"] == len(ref)
        assert col.errors == []
    assert c.stop() == 0
    log = (tmp_path / "c.log").read_text()
    assert log.count("lookback consume: ready") == 2 and "Traceback" not in log
    # the restarted process continued devices from their checkpoints, and scored the rest
    stops = re.findall(r"stopped \((\d+) messages scored, (\d+) devices restored\)", log)
    assert len(stops) == 2
    (first, _), (second, restored) = ((int(a), int(b)) for a, b in stops)
    assert int(restored) > 0 and first > 0 and first + second == n_devices * n_msgs


async def test_bad_payloads_are_reported_and_good_devices_unaffected(
    mqtt_broker: Broker, tmp_path: Path
) -> None:
    from lookback.engine.engine import Engine
    from lookback.metrics import Metrics
    from lookback.settings import Settings
    from lookback.sources.core import SourceOptions
    from lookback.sources.mqtt import MqttSource
    from tests import conftest

    ((good, audio),) = device_audio(1, 48).items()
    m = messages(audio, 8)
    reference = await solo_reference({good: audio})
    settings: Settings = conftest.test_settings(models=["lookback-vad"])
    metrics = Metrics()
    engine = Engine(settings, metrics)
    await engine.start()
    url = f"mqtt://127.0.0.1:{mqtt_broker.port}?prefix=q&client_id=solo"
    src = MqttSource(url, engine, SourceOptions.from_settings(settings), metrics, settings=settings)
    await src.start()
    try:
        async with (
            Collector(mqtt_broker.port, "q") as col,
            aiomqtt.Client("127.0.0.1", mqtt_broker.port, identifier="producer") as pub,
        ):
            bad = [
                ("bad-1", b"no header line at all"),
                ("bad-2", b"[1, 2]\n" + m[0]),  # header not an object
                ("bad-3", orjson.dumps({"encoding": "pcm_s16le"}) + b"\n" + m[0]),  # no seq
                ("bad-4", encode_payload(0, m[0][:300])),  # not whole frames
                ("bad-5", encode_payload(0, m[0], model="no-such-model")),
            ]
            for i in range(len(m)):
                await pub.publish(f"q/{good}/audio", encode_payload(i, m[i], end=i == len(m) - 1), qos=1)
                if i < len(bad):
                    await pub.publish(f"q/{bad[i][0]}/audio", bad[i][1], qos=1)
            await pub.publish(f"q/{good}/audio", encode_payload(1, m[1]), qos=1)  # a repeat
            deadline = time.monotonic() + 30
            while not (col.finished() == 1 and len(col.errors) == 6):
                assert time.monotonic() < deadline, f"{col.finished()} finished, errors {col.errors}"
                await asyncio.sleep(0.05)  # poll what the collector received
            steps = [x for x in col.records[good] if x["type"] == "result"]
            assert [x["scores"] for x in steps] == reference[good]
            got = sorted((e["device"], e["reason"]) for e in col.errors)
            assert got == sorted(
                [
                    ("bad-1", "bad_header"),
                    ("bad-2", "bad_header"),
                    ("bad-3", "missing_field"),
                    ("bad-4", "bad_frame_size"),
                    ("bad-5", "unknown_model"),
                    (good, "duplicate_message"),
                ]
            )
            assert src._task is not None and not src._task.done()
    finally:
        await src.stop()
        await engine.stop()


async def test_consumer_killed_mid_run_loses_nothing_and_repeats_are_identical(
    mqtt_broker: Broker, redis_broker: Broker, consumers: list[Consumer], tmp_path: Path
) -> None:
    """SIGKILL: at least once on the output; a repeated result is the same record, bit for bit."""
    n_devices, frames, fpm = 50, 160, 16
    audios = device_audio(n_devices, frames)
    reference = await solo_reference(audios)
    url = f"mqtt://127.0.0.1:{mqtt_broker.port}?prefix=k&client_id=lookback-k"
    c = Consumer(url, tmp_path / "k.log", LOOKBACK_STATE_STORE=redis_broker.url).start()
    consumers.append(c)
    per_dev = {d: messages(a, fpm) for d, a in audios.items()}
    n_msgs = len(next(iter(per_dev.values())))
    async with (
        Collector(mqtt_broker.port, "k") as col,
        aiomqtt.Client("127.0.0.1", mqtt_broker.port, identifier="producer") as pub,
    ):
        for i in range(n_msgs):
            for d, msgs in per_dev.items():
                await pub.publish(f"k/{d}/audio", encode_payload(i, msgs[i], end=i == n_msgs - 1), qos=1)
            if i == n_msgs // 2:
                deadline = time.monotonic() + 60
                while not col.records:
                    assert time.monotonic() < deadline, "no results before the kill"
                    await asyncio.sleep(0.02)  # poll what the collector received
                c.kill()
                c.start()
        deadline = time.monotonic() + 120
        while col.finished() < n_devices:
            assert time.monotonic() < deadline, f"only {col.finished()}/{n_devices} devices finished"
            await asyncio.sleep(0.2)  # poll what the collector received
        for dev, ref in reference.items():
            seen: dict[int, list[float]] = {}
            for x in col.records[dev]:
                if x["type"] == "result":
                    assert seen.setdefault(x["step"], x["scores"]) == x["scores"], (dev, x["step"])
            assert [seen[k] for k in sorted(seen)] == ref and sorted(seen) == list(range(len(ref))), dev
            assert {x["epoch"] for x in col.records[dev]} == {0}


async def test_every_malformed_header_field_is_rejected_and_the_device_goes_on(
    mqtt_broker: Broker, tmp_path: Path
) -> None:
    """Each malformed field of the documented payload: its code on the errors topic, acknowledged."""
    import numpy as np

    from lookback.engine.engine import Engine
    from lookback.metrics import Metrics
    from lookback.settings import Settings
    from lookback.sources.core import SourceOptions
    from lookback.sources.mqtt import MqttSource
    from tests import conftest

    ((good, audio),) = device_audio(1, 48).items()
    m = messages(audio, 8)
    reference = await solo_reference({good: audio, "seq-2^64": m[0] + m[1]})
    frame = bytes(256)
    loud = np.full(128, 1e20, "<f4").tobytes()
    nan = np.full(128, np.nan, "<f4").tobytes()
    cases: list[tuple[str, dict[str, Any] | bytes, bytes, str]] = [
        # (device, header, audio, expected reason)
        ("seq-2^64", b'{"seq": %d}' % 2**64, frame, "missing_field"),
        ("seq-2^63", {"seq": 2**63}, frame, "missing_field"),
        ("seq-negative", {"seq": -1}, frame, "missing_field"),
        ("seq-fraction", {"seq": 1.5}, frame, "missing_field"),
        ("seq-string", {"seq": "12"}, frame, "missing_field"),
        ("seq-bool", {"seq": True}, frame, "missing_field"),
        ("seq-null", {"seq": None}, frame, "missing_field"),
        ("seq-list", {"seq": [1]}, frame, "missing_field"),
        ("seq-missing", {}, frame, "missing_field"),
        ("audio-empty", {"seq": 0}, b"", "empty_message"),
        ("audio-odd", {"seq": 0}, frame[:100], "bad_frame_size"),
        ("audio-huge", {"seq": 0}, frame * 65, "too_many_frames"),
        ("audio-loud", {"seq": 0, "encoding": "pcm_f32le"}, loud, "audio_out_of_range"),
        ("audio-nan", {"seq": 0, "encoding": "pcm_f32le"}, nan, "non_finite_audio"),
        ("encoding-number", {"seq": 0, "encoding": 5}, frame, "bad_encoding"),
        ("encoding-unknown", {"seq": 0, "encoding": "pcm_u8"}, frame, "bad_encoding"),
        ("rate-unknown", {"seq": 0, "sample_rate": 11025}, frame, "bad_sample_rate"),
        ("rate-string", {"seq": 0, "sample_rate": "8000"}, frame, "bad_sample_rate"),
        ("rate-partial-sample", {"seq": 0, "sample_rate": 48000}, frame[:101], "partial_sample"),
        ("model-number", {"seq": 0, "model": 5}, frame, "invalid_field"),
        ("model-huge", {"seq": 0, "model": "m" * 300}, frame, "invalid_field"),
        ("version-list", {"seq": 0, "version": [1]}, frame, "invalid_field"),
        ("end-string", {"seq": 0, "end": "false"}, frame, "invalid_field"),
        ("end-two", {"seq": 0, "end": 2}, frame, "invalid_field"),
        ("ts-string", {"seq": 0, "ts": "now"}, frame, "invalid_field"),
        ("ts-bool", {"seq": 0, "ts": True}, frame, "invalid_field"),
        ("d" * 300, {"seq": 0}, frame, "missing_field"),  # device longer than 256 bytes
        ("", {"seq": 0}, frame, "missing_field"),  # topic q//audio
    ]
    settings: Settings = conftest.test_settings(models=["lookback-vad"])
    metrics = Metrics()
    engine = Engine(settings, metrics)
    await engine.start()
    url = f"mqtt://127.0.0.1:{mqtt_broker.port}?prefix=v&client_id=solo-v"
    src = MqttSource(url, engine, SourceOptions.from_settings(settings), metrics, settings=settings)
    await src.start()
    try:
        async with (
            Collector(mqtt_broker.port, "v") as col,
            aiomqtt.Client("127.0.0.1", mqtt_broker.port, identifier="producer") as pub,
        ):
            for i, (device, head, pcm, _) in enumerate(cases):
                line = head if isinstance(head, bytes) else orjson.dumps(head)
                await pub.publish(f"v/{device}/audio", line + b"\n" + pcm, qos=1)
                if i < len(m):  # a neighbour, between the bad ones
                    await pub.publish(f"v/{good}/audio", encode_payload(i, m[i], end=i == len(m) - 1), qos=1)
            for i in (0, 1):  # the device whose seq was 2^64 goes on
                await pub.publish("v/seq-2^64/audio", encode_payload(i, m[i], end=i == 1), qos=1)
            deadline = time.monotonic() + 30
            while not (col.finished() == 2 and len(col.errors) >= len(cases)):
                assert time.monotonic() < deadline, f"{col.finished()} finished, errors {col.errors}"
                await asyncio.sleep(0.05)  # poll what the collector received
            got = sorted((str(e["device"]), e["reason"]) for e in col.errors)
            # without a valid device the error names none
            assert got == sorted((d if 0 < len(d) <= 256 else "None", r) for d, _, _, r in cases)
            for dev in (good, "seq-2^64"):
                steps = [x["scores"] for x in col.records[dev] if x["type"] == "result"]
                assert steps == reference[dev], dev
            assert src._task is not None and not src._task.done()
    finally:
        await src.stop()
        await engine.stop()
