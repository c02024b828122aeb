"""``lookback.client.LookbackClient`` against a real running server."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf

from lookback.client import FRAME, LookbackClient, LookbackClientError, frames_of, read_wav
from tests.api.ws_util import HOPS, require_model
from tests.conftest import AUDIO, DEFAULT_MODEL, SILERO, Server, running_server
from tests.conftest import test_settings as make_settings

SPEECH = AUDIO / "silero_ref_speech.wav"


async def _collect(client: LookbackClient, messages: object, **kw: object) -> list[dict]:
    return [m async for m in client.stream(messages, **kw)]  # type: ignore[arg-type]


async def test_stream(server: Server, silero_model: str, speech_clip: np.ndarray) -> None:
    client = LookbackClient(server.url)
    msgs = await _collect(client, frames_of(speech_clip, 4), model=SILERO)
    kinds = [m["type"] for m in msgs]
    assert kinds[0] == "ready" and kinds[-1] == "summary"
    results = [m for m in msgs if m["type"] == "result"]
    steps = -(-len(speech_clip) // HOPS[SILERO])
    assert [r["step"] for r in results] == list(range(steps))
    events = [m for m in msgs if m["type"] == "event"]
    assert [e["event"] for e in events][:2] == ["start", "end"]
    assert msgs[-1]["steps"] == steps and msgs[-1]["frames"] == -(-len(speech_clip) // FRAME)


async def test_stream_batch_yields_the_same_results(
    server: Server, silero_model: str, speech_clip: np.ndarray
) -> None:
    """results=batch: fewer messages on the wire, the same per-step results for callers."""
    client = LookbackClient(server.url)
    full = await _collect(client, frames_of(speech_clip, 20), model=SILERO)
    batch = await _collect(client, frames_of(speech_clip, 20), model=SILERO, results="batch")

    def of(msgs: list[dict], kind: str) -> list[dict]:
        return [m for m in msgs if m["type"] == kind]

    # events come after their call's results, not after their own step: compare each stream
    assert of(batch, "result") == of(full, "result") and of(full, "result")
    assert of(batch, "event") == of(full, "event") and of(full, "event")
    assert "results" not in {m["type"] for m in batch}


async def test_stream_events_only_from_an_async_source(
    server: Server, silero_model: str, speech_clip: np.ndarray
) -> None:
    async def source() -> AsyncIterator[bytes]:
        for m in frames_of(speech_clip, 8):
            yield m

    client = LookbackClient(server.url)
    msgs = await _collect(client, source(), model=SILERO, results="events")
    assert {m["type"] for m in msgs} == {"ready", "event", "summary"}


async def test_stream_realtime_pacing(server: Server, silero_model: str, speech_clip: np.ndarray) -> None:
    clip = speech_clip[:4000]  # 0.25 s
    client = LookbackClient(server.url)
    t0 = time.monotonic()
    msgs = await _collect(client, frames_of(clip), model=SILERO, realtime=True)
    assert time.monotonic() - t0 >= 0.2
    assert msgs[-1]["type"] == "summary"


async def test_stream_default_model(server: Server, speech_clip: np.ndarray) -> None:
    require_model(DEFAULT_MODEL)
    client = LookbackClient(server.url)
    msgs = await _collect(client, frames_of(speech_clip[:16000]))
    assert msgs[0]["model"] == DEFAULT_MODEL and msgs[0]["hop_samples"] == 128
    assert msgs[-1]["steps"] == 125


async def test_stream_refusal_raises(server: Server, silero_model: str) -> None:
    client = LookbackClient(server.url)
    with pytest.raises(LookbackClientError) as info:
        await _collect(client, [], model="no-such-model")
    assert info.value.code == "unknown_model"


async def test_score(server: Server, silero_model: str, tmp_path: Path, speech_clip: np.ndarray) -> None:
    client = LookbackClient(server.url)
    wav = await client.score(SPEECH, model=SILERO)
    async with httpx.AsyncClient(timeout=60) as http:
        r = await http.post(
            f"{server.url}/v1/score",
            params={"model": SILERO},
            content=SPEECH.read_bytes(),
            headers={"content-type": "audio/wav"},
        )
    direct = r.json()
    assert wav == direct
    assert wav["events"]
    flac = tmp_path / "speech.flac"
    sf.write(flac, speech_clip, 16000, subtype="PCM_16")
    assert (await client.score(flac, model=SILERO))["scores"] == wav["scores"]


async def test_score_errors(server: Server, silero_model: str) -> None:
    client = LookbackClient(server.url)
    with pytest.raises(LookbackClientError) as info:
        await client.score(SPEECH, model="no-such-model")
    assert (info.value.code, info.value.status) == ("unknown_model", 404)
    with pytest.raises(LookbackClientError) as info:
        await client.score(SPEECH, model=SILERO, version="0.0.0")
    assert (info.value.code, info.value.status) == ("unknown_version", 404)


async def test_models(server: Server, silero_model: str) -> None:
    body = await LookbackClient(server.url).models()
    names = {m["name"] for m in body["models"]}
    assert SILERO in names
    assert body["provider"] == "CPUExecutionProvider"


@pytest.fixture(scope="module")
def keyed_server(silero_model: str) -> Iterator[Server]:
    with running_server(make_settings(models=[SILERO], default_model=SILERO, api_keys=["sekrit"])) as srv:
        yield srv


async def test_api_key(keyed_server: Server, speech_clip: np.ndarray) -> None:
    ok = LookbackClient(keyed_server.url, api_key="sekrit")
    assert (await ok.models())["default_model"] == SILERO
    assert (await ok.score(SPEECH))["model"] == SILERO
    msgs = await _collect(ok, frames_of(speech_clip[:2048]))
    assert msgs[-1]["steps"] == 4
    with pytest.raises(LookbackClientError) as info:
        await LookbackClient(keyed_server.url).models()
    assert (info.value.code, info.value.status) == ("unauthorized", 401)
    with pytest.raises(LookbackClientError) as info:
        await LookbackClient(keyed_server.url, api_key="wrong").score(SPEECH)
    assert info.value.status == 401
    # a refused WebSocket handshake is a client error too, with the body's code
    with pytest.raises(LookbackClientError) as info:
        await _collect(LookbackClient(keyed_server.url, api_key="wrong"), [])
    assert (info.value.code, info.value.status) == ("unauthorized", 401)


# -- helpers ---------------------------------------------------------------------------------


def test_ws_url() -> None:
    assert LookbackClient("http://h:1/").ws_url() == "ws://h:1/v1/stream"
    assert (
        LookbackClient("https://h").ws_url(model="m", version=None, results="events")
        == "wss://h/v1/stream?model=m&results=events"
    )


def test_frames_of() -> None:
    samples = np.arange(300, dtype=np.int16)
    msgs = frames_of(samples)
    assert [len(m) for m in msgs] == [256, 256, 256]
    assert np.frombuffer(msgs[-1], np.int16)[44:].tolist() == [0] * 84
    assert [len(m) for m in frames_of(samples, 2)] == [512, 256]
    assert frames_of(np.zeros(0, np.int16)) == []


def test_read_wav(tmp_path: Path) -> None:
    samples, rate = read_wav(SPEECH)
    assert rate == 16000 and samples.dtype == np.int16 and samples.ndim == 1
    stereo = tmp_path / "stereo.wav"
    sf.write(stereo, np.zeros((160, 2), np.int16), 16000)
    with pytest.raises(LookbackClientError) as info:
        read_wav(stereo)
    assert info.value.code == "bad_channels"
