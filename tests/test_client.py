"""``lookback.client.LookbackClient`` against a real running server."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf

from lookback.client import FRAME, LookbackClient, LookbackClientError, file_messages, frames_of, read_wav
from lookback.engine.pcm import encode_g711
from tests.api.ws_util import END, HOPS, require_model, run_session
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


# -- other rates and encodings: the client sends, the server resamples and decodes -----------


def _wav_at(tmp_path: Path, clip: np.ndarray, rate: int) -> Path:
    """The 16 kHz clip as a WAV at ``rate`` (linear interpolation: any input will do)."""
    n = len(clip) * rate // 16000
    x = np.interp(np.arange(n) * (16000 / rate), np.arange(len(clip)), clip.astype(np.float64))
    path = tmp_path / f"clip_{rate}.wav"
    sf.write(path, np.round(x).astype(np.int16), rate, subtype="PCM_16")
    return path


def _wire_bytes(path: Path, encoding: str) -> bytes:
    """The file in ``encoding``, built without the client: what a raw producer would send."""
    if encoding == "pcm_f32le":
        return sf.read(path, dtype="float32")[0].astype("<f4").tobytes()
    pcm = sf.read(path, dtype="int16")[0]
    return pcm.astype("<i2").tobytes() if encoding == "pcm_s16le" else encode_g711(pcm, encoding)


def _of(msgs: list[dict], *kinds: str) -> list[dict]:
    return [m for m in msgs if m["type"] in kinds]


@pytest.mark.parametrize(
    ("rate", "encoding"), [(48000, "pcm_s16le"), (44100, "pcm_f32le"), (8000, "mulaw"), (8000, "alaw")]
)
async def test_stream_at_the_files_rate_equals_the_raw_websocket(
    server: Server, silero_model: str, speech_clip: np.ndarray, tmp_path: Path, rate: int, encoding: str
) -> None:
    """A file streamed at its own rate (``sample_rate="native"``, 20 ms messages) gives the
    results (``==``) of the same bytes sent raw to ``/v1/stream?encoding=&sample_rate=`` in
    other cuts (37 samples a message): the server does the resampling either way."""
    path = _wav_at(tmp_path, speech_clip[: 16000 * 3], rate)
    audio = file_messages(path, encoding=encoding, sample_rate="native")
    assert audio.sample_rate == rate and audio.rate == rate
    width = {"pcm_s16le": 2, "pcm_f32le": 4}.get(encoding, 1)
    assert {len(m) for m in audio.messages[:-1]} == {rate // 50 * width}  # 20 ms each
    wire = _wire_bytes(path, encoding)
    assert b"".join(audio.messages) == wire
    client = LookbackClient(server.url)
    got = await _collect(client, audio.messages, model=SILERO, encoding=encoding, sample_rate=rate)
    step = 37 * width
    raw = await run_session(
        server.ws,
        [*(wire[i : i + step] for i in range(0, len(wire), step)), END],
        model=SILERO,
        encoding=encoding,
        sample_rate=rate,
    )
    results = _of(got, "result", "event")
    assert len(_of(got, "result")) == -(-3 * 16000 // HOPS[SILERO])
    assert results == _of(raw.messages, "result", "event")
    assert got[-1]["type"] == "summary" and got[-1]["steps"] == raw.messages[-1]["steps"]


async def test_stream_paces_other_rates_in_their_own_samples(
    server: Server, silero_model: str, speech_clip: np.ndarray, tmp_path: Path
) -> None:
    """realtime at 8 kHz µ-law: 0.25 s of audio takes about 0.25 s, not half or double."""
    path = _wav_at(tmp_path, speech_clip[:4000], 8000)
    audio = file_messages(path, encoding="mulaw", sample_rate=8000)
    client = LookbackClient(server.url)
    t0 = time.monotonic()
    msgs = await _collect(
        client, audio.messages, model=SILERO, encoding="mulaw", sample_rate=8000, realtime=True
    )
    assert 0.2 <= time.monotonic() - t0 < 2.0
    assert msgs[-1]["type"] == "summary"


async def test_score_a_file_at_its_own_rate_agrees_with_the_stream(
    server: Server, silero_model: str, speech_clip: np.ndarray, tmp_path: Path
) -> None:
    path = _wav_at(tmp_path, speech_clip[: 16000 * 3], 48000)
    client = LookbackClient(server.url)
    with pytest.raises(LookbackClientError) as info:
        await client.score(path, model=SILERO)
    assert info.value.code == "bad_sample_rate"
    rest = await client.score(path, model=SILERO, sample_rate="native")
    audio = file_messages(path, sample_rate="native")
    got = await _collect(client, audio.messages, model=SILERO, sample_rate=audio.sample_rate)
    streamed = [m["scores"]["speech"] for m in _of(got, "result")]
    assert len(rest["scores"]["speech"]) == len(streamed)
    assert np.allclose(rest["scores"]["speech"], streamed, rtol=0, atol=1e-5)


def test_file_messages_never_resamples_unasked(speech_clip: np.ndarray, tmp_path: Path) -> None:
    path = _wav_at(tmp_path, speech_clip[:1600], 48000)
    for rate in (None, 44100):
        with pytest.raises(LookbackClientError) as info:
            file_messages(path, sample_rate=rate)
        assert info.value.code == "bad_sample_rate"
    assert file_messages(path, sample_rate=48000).sample_rate == 48000
    odd = tmp_path / "odd.wav"
    sf.write(odd, np.zeros(1000, np.int16), 11025)
    with pytest.raises(LookbackClientError) as info:
        file_messages(odd, sample_rate="native")
    assert info.value.code == "bad_sample_rate"
    # 16 kHz PCM keeps whole frames (the server's rule at the model's rate); G.711 20 ms packets
    sixteen = file_messages(SPEECH, frames_per_message=4)
    assert sixteen.sample_rate is None and {len(m) for m in sixteen.messages[:-1]} == {4 * FRAME * 2}
    f32 = file_messages(SPEECH, encoding="pcm_f32le", sample_rate="native")
    assert f32.sample_rate is None and {len(m) for m in f32.messages} == {FRAME * 4}
    mu = file_messages(SPEECH, encoding="mulaw", message_ms=10)
    assert {len(m) for m in mu.messages[:-1]} == {160}
    assert (
        file_messages(path, sample_rate="native", message_ms=1).messages[0]
        == _wire_bytes(path, "pcm_s16le")[:96]
    )
    odd44 = _wav_at(tmp_path, speech_clip[:1600], 44100)
    with pytest.raises(LookbackClientError) as info:
        file_messages(odd44, sample_rate="native", message_ms=1)
    assert info.value.code == "bad_message_size"


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
