"""Shared helpers of the source tests: device audio, solo reference runs, output parsing."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import orjson

from lookback.engine.engine import Engine
from lookback.engine.events import Event
from lookback.errors import LookbackError
from tests.conftest import test_settings
from tests.support import read_clip

FRAME = 128


def device_audio(n_devices: int, frames: int) -> dict[str, bytes]:
    """Distinct int16 audio per device: windows of the speech clip at different offsets."""
    clip = np.concatenate([read_clip("lookback_speech_noise.wav"), read_clip("silero_ref_speech.wav")])
    need = frames * FRAME
    out = {}
    for i in range(n_devices):
        start = (i * 2777 * FRAME // 7) % (len(clip) - need)
        out[f"dev-{i:04d}"] = clip[start : start + need].astype("<i2").tobytes()
    return out


def messages(audio: bytes, frames_per_message: int) -> list[bytes]:
    step = frames_per_message * FRAME * 2
    return [audio[i : i + step] for i in range(0, len(audio), step)]


class _Collect:
    def __init__(self) -> None:
        self.rows: list[tuple[int, list[float]]] = []

    def on_result(self, index: int, time: float, scores: list[float], events: list[Event] | None) -> None:
        self.rows.append((index, scores))

    def on_error(self, index: int, error: LookbackError) -> None:
        raise AssertionError(f"reference step {index} failed: {error}")


async def solo_reference(
    audios: dict[str, bytes], model: str = "lookback-vad"
) -> dict[str, list[list[float]]]:
    """Each device's audio scored alone (one session at a time), the ground truth."""
    engine = Engine(test_settings(models=[model]))
    await engine.start()
    try:
        handle = engine.resolve(model)
        out = {}
        for dev, audio in audios.items():
            sink = _Collect()
            s = engine.open_session(handle, sink)
            for piece in messages(audio, 32):
                s.push(piece)
                await s.wait_idle()
            s.flush()
            await s.wait_idle()
            s.close()
            assert [i for i, _ in sink.rows] == list(range(len(sink.rows)))
            out[dev] = [r for _, r in sink.rows]
        return out
    finally:
        await engine.stop()


def by_device(batches: list[tuple[str, list[dict[str, Any]]]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for device, records in batches:
        out[device].extend(records)
    return out


def parse_records(raw: bytes) -> list[dict[str, Any]]:
    recs = orjson.loads(raw)
    assert isinstance(recs, list)
    return recs
