"""Kafka devices at other rates and in G.711 (the broker fields of docs/sources.md).

Written beside the audio-rates work (issue 28, part 1): skipped where the engine has no
streaming resampler yet, and runs once both are in one tree.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from lookback.engine.engine import Engine
from lookback.metrics import Metrics
from lookback.sources.kafka import KafkaSource, publish
from tests import conftest
from tests.sources.conftest import Broker
from tests.sources.kafka_support import errors, kafka_producer, results
from tests.sources.support import device_audio
from tests.sources.test_kafka import _run_source, _summaries, _wait_for

rate_support = pytest.importorskip("tests.engine.rate_support", reason="needs the audio rates of issue 28")


async def test_kafka_devices_at_other_rates_and_in_g711_score_as_a_solo_session(kafka_broker: Broker) -> None:
    """A telephony device (8 kHz µ-law, 20 ms records) and a browser one (48 kHz int16):
    results equal one session fed the same bytes; a record without its device's rate is refused."""
    from tests.engine.engine_support import Collect

    at_rate, encode = rate_support.at_rate, rate_support.encode
    clip = np.frombuffer(device_audio(1, 125)["dev-0000"], "<i2")
    devices = {
        "phone": ("mulaw", 8000, encode(at_rate(clip, 8000), "mulaw"), 160),
        "browser": ("pcm_s16le", 48000, encode(at_rate(clip, 48000), "pcm_s16le"), 2 * 960),
    }
    engine: Any = Engine(conftest.test_settings(models=["lookback-vad"]))
    await engine.start()
    ref: dict[str, list[list[float]]] = {}
    try:
        handle = engine.resolve("lookback-vad")
        for dev, (enc, rate, audio, _) in devices.items():
            audio = audio + audio[:2]  # what the `end` record adds
            sink = Collect()
            sess = engine.open_session(handle, sink, encoding=enc, sample_rate=rate)
            for i in range(0, len(audio), 4000):
                sess.push(audio[i : i + 4000])
                await sess.wait_idle()
            sess.flush()
            await sess.wait_idle()
            sess.close()
            ref[dev] = [list(map(float, row)) for row in sink.rows]
    finally:
        await engine.stop()
    prod = kafka_producer(kafka_broker)

    async def body(src: KafkaSource) -> None:
        for dev, (enc, rate, audio, size) in devices.items():
            parts = [audio[i : i + size] for i in range(0, len(audio), size)]
            for seq, part in enumerate(parts):
                publish(prod, "g.audio", dev, seq, part, encoding=enc, sample_rate=rate)
            publish(prod, "g.audio", dev, len(parts), parts[0][:512], encoding=enc)  # no rate: refused
            publish(
                prod, "g.audio", dev, len(parts) + 1, parts[0][:2], encoding=enc, sample_rate=rate, end=True
            )
        prod.flush(10)
        await _wait_for(lambda: _summaries(kafka_broker, "g.audio.results", devices), "both summaries")

    await _run_source(f"{kafka_broker.url}/g.audio?group=g&consumer=c", Metrics(), body)
    got_errors = sorted((e["device"], e["reason"]) for e in errors(kafka_broker, "g.audio.errors"))
    assert got_errors == [("browser", "bad_sample_rate"), ("phone", "bad_sample_rate")]
    res = results(kafka_broker, "g.audio.results")
    for dev in devices:
        got = [x["scores"] for x in res[dev] if x["type"] == "result"]
        assert got == ref[dev] and len(got) > 100
