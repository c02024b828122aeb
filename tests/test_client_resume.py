"""LookbackClient resumes by itself: a TCP relay between client and server drops every
connection mid-stream, twice; the client reconnects with its token, replays and drops
duplicates, and what it yields equals the uninterrupted stream exactly."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import soundfile as sf

from lookback.client import LookbackClient, file_messages, frames_of
from tests.conftest import Server, running_server
from tests.conftest import test_settings as make_settings


class Relay:
    """A real TCP forwarder on a free port; ``cut()`` drops every open connection (RST)."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        ur, uw = await asyncio.open_connection("127.0.0.1", self.target)
        self.writers += [w, uw]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(r, uw), pipe(ur, w))

    def cut(self) -> None:
        for w in self.writers:
            w.transport.abort()
        self.writers.clear()

    async def stop(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()


@pytest.fixture(scope="module")
def srv(silero_model: str) -> Iterator[Server]:
    with running_server(make_settings(snapshot_interval_s=0.05)) as s:
        yield s


@pytest.mark.parametrize(("encoding", "rate"), [("pcm_s16le", None), ("mulaw", 8000), ("pcm_f32le", 48000)])
async def test_client_resumes_transparently(
    srv: Server, speech_clip: np.ndarray, tmp_path: Path, encoding: str, rate: int | None
) -> None:
    """Also in another wire form: checkpoints and the replay count the client's own samples
    (8 kHz µ-law bytes, 48 kHz floats), and the server's resampler state is in the snapshot."""
    if rate is None:
        messages = frames_of(speech_clip, 4)
    else:  # the clip at that rate (any audio will do), in 20 ms messages
        x = np.interp(
            np.arange(len(speech_clip) * rate // 16000) * (16000 / rate),
            np.arange(len(speech_clip)),
            speech_clip,
        )
        sf.write(tmp_path / "clip.wav", np.round(x).astype(np.int16), rate, subtype="PCM_16")
        messages = file_messages(tmp_path / "clip.wav", encoding=encoding, sample_rate=rate).messages
    form: dict[str, Any] = {"encoding": encoding, "sample_rate": rate}
    ref = [m async for m in LookbackClient(srv.url).stream(messages, model="silero-vad", **form)]
    relay = Relay(srv.port)
    await relay.start()
    client = LookbackClient(f"http://127.0.0.1:{relay.port}")

    async def source() -> AsyncIterator[bytes]:
        for i, m in enumerate(messages):
            if i in (100, 250):
                await asyncio.sleep(0.2)  # let a checkpoint land, so part is durable, part replayed
                relay.cut()
            yield m

    try:
        got = [m async for m in client.stream(source(), model="silero-vad", **form)]
    finally:
        await relay.stop()
    assert client.resumes == 2
    strip = ("session_id", "resume_token")

    def norm(ms: list[dict]) -> list[bytes]:
        return [orjson.dumps({k: v for k, v in m.items() if k not in strip}) for m in ms]

    assert norm(got[1:]) == norm(ref[1:])  # results, events and summary, bit for bit
    assert sum(m["type"] == "result" for m in got) == ref[-1]["steps"]


async def test_client_retries_a_rotated_secret_briefly_then_says_so(
    silero_model: str, speech_clip: np.ndarray
) -> None:
    """A resume answered resume_secret_rotated (no replica holds the token's secret) is
    retried a few times, as another replica may yet re-offer it, then raised with its code."""
    from lookback.client import MAX_ROTATED_TRIES, LookbackClientError

    messages = frames_of(speech_clip, 4)
    first = make_settings(snapshot_interval_s=0.05, resume_secret="a" * 32)
    second = make_settings(snapshot_interval_s=0.05, resume_secret="b" * 32)
    with running_server(first) as one, running_server(second) as two:
        relay = Relay(one.port)
        await relay.start()
        client = LookbackClient(f"http://127.0.0.1:{relay.port}")

        async def source() -> AsyncIterator[bytes]:
            for i, m in enumerate(messages):
                if i == 100:
                    await asyncio.sleep(0.2)  # a checkpoint lands: the token is durable
                    relay.target = two.port  # the session's replica is gone; the other never knew it
                    relay.cut()
                yield m

        try:
            with pytest.raises(LookbackClientError) as err:
                async for _ in client.stream(source(), model="silero-vad"):
                    pass
        finally:
            await relay.stop()
        assert err.value.code == "resume_secret_rotated"
        m = two.get("/metrics").text
        assert f'lookback_resumes_total{{outcome="rotated"}} {MAX_ROTATED_TRIES + 1}.0' in m
