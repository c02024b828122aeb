"""Sessions at every client rate and encoding: the same bits however the audio is cut.

A client at another rate (or in G.711) sends any whole number of samples a message; the
session decodes and resamples them (engine/decoder.py) before forming frames and steps.
The scores must not depend on the message boundaries (1, 7, 10 and 37 frames a message,
a frame being 128 samples at the client's rate, and random cut points): exact ``==``
against one-frame messages. Snapshots taken mid-stream restore bit-identically, and REST
scoring (the offline path fed by the same decoder) agrees with the stream.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator

import numpy as np
import pytest

from lookback.engine.decoder import make_decoder
from lookback.engine.engine import Engine
from lookback.engine.served import ServedModel
from lookback.engine.session import StreamSession
from lookback.errors import BadAudio
from tests.engine.engine_support import Collect, running_engine, score_offline, speech
from tests.engine.rate_support import RATES, at_rate, cuts, encode

ENCODING_BYTES = {"pcm_s16le": 2, "pcm_f32le": 4, "mulaw": 1, "alaw": 1}


async def stream_wire(
    engine: Engine, handle: ServedModel, data: bytes, encoding: str, rate: int, lengths: list[int]
) -> tuple[Collect, StreamSession]:
    sink = Collect()
    session = engine.open_session(handle, sink, encoding=encoding, sample_rate=rate)  # type: ignore[arg-type]
    pos = 0
    for k in lengths:
        chunk = data[pos : pos + k]
        pos += k
        await session.wait_for_room(len(chunk))
        session.push(chunk)
    assert pos == len(data)
    session.flush()
    await session.wait_idle()
    session.finish()
    sink.events = list(session.events)
    assert not sink.errors, sink.errors
    return sink, session


def same(a: Collect, b: Collect) -> None:
    assert a.indices == b.indices
    assert a.times == b.times
    assert np.array_equal(a.scores.view(np.uint32), b.scores.view(np.uint32))
    assert a.events == b.events


@pytest.mark.parametrize("rate", RATES)
async def test_scores_do_not_depend_on_message_boundaries_at_any_rate(default_model: str, rate: int) -> None:
    clip = speech()[: 16000 * 4]
    data = encode(at_rate(clip, rate), "pcm_s16le")
    async with running_engine(default_model, max_pending_steps=256) as engine:
        handle = engine.resolve(default_model)
        ref, session = await stream_wire(engine, handle, data, "pcm_s16le", rate, cuts(len(data), 2, [128]))
        session.close()
        assert len(ref.indices) == -(-len(data) // 2 * 16000 // rate // 128) or rate == 16000
        assert ref.events, "the clip must produce events for the check to mean something"
        rng = random.Random(rate)
        unit = 128 if rate == 16000 else 1  # PCM at the model's rate: whole 128-sample frames
        plans = [[k * 128] for k in (1, 7, 10, 37)] + [
            [rng.randint(1, 900 // unit) * unit for _ in range(50)]
        ]
        for plan in plans:
            sink, session = await stream_wire(
                engine, handle, data, "pcm_s16le", rate, cuts(len(data), 2, plan)
            )
            session.close()
            same(sink, ref)


@pytest.mark.parametrize(
    ("encoding", "rate"),
    [
        (e, r)
        for e in ("mulaw", "alaw", "pcm_f32le")
        for r in (8000, 16000, 48000)
        if (e, r) != ("pcm_f32le", 16000)
    ],
)
async def test_every_encoding_is_chunking_invariant(default_model: str, encoding: str, rate: int) -> None:
    clip = speech()[: 16000 * 3]
    data = encode(at_rate(clip, rate), encoding)
    bps = ENCODING_BYTES[encoding]
    async with running_engine(default_model, max_pending_steps=256) as engine:
        handle = engine.resolve(default_model)
        ref, session = await stream_wire(engine, handle, data, encoding, rate, cuts(len(data), bps, [1]))
        session.close()
        rng = random.Random(7)
        for plan in ([7 * 128], [37 * 128], [rng.randint(1, 700) for _ in range(40)]):
            sink, session = await stream_wire(
                engine, handle, data, encoding, rate, cuts(len(data), bps, plan)
            )
            session.close()
            same(sink, ref)


async def test_g711_at_the_model_rate_equals_its_decoded_pcm(default_model: str) -> None:
    """A µ-law stream at 16 kHz scores as the int16 values G.711 assigns its codes."""
    from lookback.engine.pcm import G711

    clip = speech()[: 16000 * 3]
    codes = encode(at_rate(clip, 16000), "mulaw")
    pcm = G711["mulaw"][np.frombuffer(codes, np.uint8)].astype("<i2").tobytes()
    async with running_engine(default_model) as engine:
        handle = engine.resolve(default_model)
        a, s1 = await stream_wire(engine, handle, codes, "mulaw", 16000, cuts(len(codes), 1, [160]))
        b, s2 = await stream_wire(engine, handle, pcm, "pcm_s16le", 16000, cuts(len(pcm), 2, [128]))
        s1.close()
        s2.close()
        same(a, b)


@pytest.mark.parametrize(("encoding", "rate"), [("mulaw", 8000), ("pcm_f32le", 44100), ("pcm_s16le", 48000)])
async def test_snapshots_restore_the_decoder_bit_identically(
    any_model: str, encoding: str, rate: int
) -> None:
    clip = speech()[: 16000 * 4]
    data = encode(at_rate(clip, rate), encoding)
    bps = ENCODING_BYTES[encoding]
    async with running_engine(any_model) as engine:
        handle = engine.resolve(any_model)
        ref, session = await stream_wire(engine, handle, data, encoding, rate, cuts(len(data), bps, [160]))
        session.close()
        rng = random.Random(3)
        sink = Collect()
        session = engine.open_session(handle, sink, encoding=encoding, sample_rate=rate)  # type: ignore[arg-type]
        sent = 0
        for k in cuts(len(data), bps, [rng.randint(1, 500) for _ in range(64)]):
            await session.wait_for_room(k)
            session.push(data[sent : sent + k])
            sent += k
            if rng.random() < 0.15:
                await session.wait_idle()
                blob = session.snapshot({"results": "all"})
                restored = StreamSession.restore(handle, sink, blob)
                session.close()
                session = restored
                assert session.client_samples == sent // bps  # where a resumed client restarts
                assert session.decoder is not None and session.decoder.encoding == encoding
        session.flush()
        await session.wait_idle()
        session.finish()
        sink.events = list(session.events)
        session.close()
        same(sink, ref)


@pytest.mark.parametrize(("encoding", "rate"), [("mulaw", 8000), ("alaw", 8000), ("pcm_s16le", 48000)])
async def test_offline_scoring_through_the_same_decoder_agrees_with_the_stream(
    default_model: str, encoding: str, rate: int
) -> None:
    clip = speech()[: 16000 * 4]
    data = encode(at_rate(clip, rate), encoding)
    bps = ENCODING_BYTES[encoding]
    async with running_engine(default_model) as engine:
        handle = engine.resolve(default_model)
        spec = handle.spec
        ref, session = await stream_wire(engine, handle, data, encoding, rate, cuts(len(data), bps, [333]))
        session.close()
        dec = make_decoder(encoding, rate, spec.sample_rate, spec.frame_samples)
        assert dec is not None

        async def chunks() -> AsyncIterator[np.ndarray]:
            for k in range(0, len(data), 4096):
                yield dec.feed(dec.check(data[k : k + 4096]))
            yield dec.flush()

        scores, events = await score_offline(engine, handle, chunks())
        assert scores.shape == ref.scores.shape
        np.testing.assert_allclose(scores, ref.scores, atol=1e-5, rtol=0)
        assert [(e.event, e.sample) for e in events] == [(e.event, e.sample) for e in ref.events]


async def test_partial_samples_and_unsupported_rates_are_refused(default_model: str) -> None:
    async with running_engine(default_model) as engine:
        handle = engine.resolve(default_model)
        session = engine.open_session(handle, Collect(), encoding="pcm_s16le", sample_rate=8000)
        with pytest.raises(BadAudio) as exc:
            session.push(b"\x00\x01\x02")
        assert exc.value.code == "partial_sample"
        assert session.decoder is not None and session.decoder.received == 0  # refused whole
        session.push(b"\x00\x00" * 3)  # any whole number of samples
        assert session.decoder.received == 3
        session.close()
        f32 = engine.open_session(handle, Collect(), encoding="pcm_f32le", sample_rate=48000)
        with pytest.raises(BadAudio) as exc:
            f32.push(np.array([0.1, 9.0], "<f4").tobytes())
        assert exc.value.code == "audio_out_of_range"
        f32.close()
        with pytest.raises(BadAudio) as exc:
            engine.open_session(handle, Collect(), encoding="pcm_s16le", sample_rate=11025)
        assert exc.value.code == "bad_sample_rate"
        plain = engine.open_session(handle, Collect(), encoding="pcm_s16le")
        assert plain.decoder is None  # no sample_rate: the model's rate, nothing resampled
        plain.close()


async def test_a_damaged_decoder_state_is_refused_as_invalid(default_model: str) -> None:
    from lookback.engine import snapshot
    from lookback.errors import SnapshotError

    async with running_engine(default_model) as engine:
        handle = engine.resolve(default_model)
        session = engine.open_session(handle, Collect(), encoding="mulaw", sample_rate=8000)
        session.push(bytes(range(256)) * 3)
        await session.wait_idle()
        snap = session.snapshot_value()
        session.close()
        assert snap.decoder is not None and snap.samples == 768
        good = snapshot.decode(snap.encode())
        StreamSession.restore(handle, Collect(), good).close()
        damaged = [
            {**snap.decoder, "received": 767},  # disagrees with the state blob
            {**snap.decoder, "sample_rate": 11025},
            {**snap.decoder, "encoding": "pcm_u8"},
            {**snap.decoder, "state": "!!"},
            {**snap.decoder, "state": snap.decoder["state"][:-8]},
            {"encoding": "mulaw"},
        ]
        for bad in damaged:
            snap.decoder = bad
            with pytest.raises(SnapshotError) as exc:
                StreamSession.restore(handle, Collect(), snapshot.decode(snap.encode()))
            assert exc.value.code == "snapshot_invalid", bad
        assert handle.table.used == 0  # no slot leaked by a refused restore
