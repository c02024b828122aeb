"""Snapshots: cut a stream anywhere, restore into a fresh slot, and get the same bits.

The reference is the clip streamed once, uninterrupted and alone. The same clip is then
streamed with snapshot -> bytes -> restore at random frame counts (mid-hop for Silero,
whose hop is 4 frames), each time into a new session in another slot, alone or with
other sessions streaming in the same batches; scores, step indices, times and events
must equal the reference exactly.
"""

from __future__ import annotations

import asyncio
import random
import struct
import zlib

import numpy as np
import pytest

from lookback.engine import snapshot
from lookback.engine.engine import Engine
from lookback.engine.session import StreamSession
from lookback.errors import SnapshotError
from tests.engine.engine_support import (
    Collect,
    push_all,
    random_bursts,
    running_engine,
    speech,
    stream_clip,
    to_s16,
    varied_clips,
    whole_frames,
)


def bits(rows: list[np.ndarray]) -> np.ndarray:
    return np.stack(rows).view(np.uint32)


async def stream_with_cuts(
    engine: Engine, name: str, clip: np.ndarray, cuts: list[int], rng: random.Random
) -> tuple[Collect, StreamSession]:
    """Stream ``clip`` with a snapshot/restore round trip after each frame count in ``cuts``."""
    handle = engine.resolve(name)
    sink = Collect()
    session = engine.open_session(handle, sink)
    data = to_s16(whole_frames(clip))
    fb = session.frame_bytes
    pos = 0
    for cut in [*cuts, len(data) // fb]:
        seg = data[pos * fb : cut * fb]
        await push_all(session, seg, random_bursts(cut - pos, 6, rng))
        pos = cut
        if cut * fb == len(data):
            break
        await session.wait_idle()
        blob = session.snapshot({"results": "all"})
        old = session  # still open: the restored session lands in another slot
        session = StreamSession.restore(handle, sink, blob)
        old.close()
        assert session.slot != old.slot
        assert session.frames == cut
    session.flush()
    await session.wait_idle()
    session.finish()
    return sink, session


async def background(engine: Engine, name: str, stop: asyncio.Event) -> int:
    """Another session streaming in bursts until ``stop``: shares the batches."""
    handle = engine.resolve(name)
    clips = varied_clips(2, 4.0, seed=7)
    steps = 0
    while not stop.is_set():
        for clip in clips:
            sink = await stream_clip(engine, handle, clip, frames_per_push=8)
            steps += len(sink.indices)
            if stop.is_set():
                break
    return steps


@pytest.mark.parametrize("max_steps", [16, 1], ids=["multistep", "one-hop"])
@pytest.mark.parametrize("batched", [False, True], ids=["alone", "batched"])
async def test_restore_is_bit_identical(any_model: str, batched: bool, max_steps: int) -> None:
    """Snapshots cut between bursts of several hops, so with multi-step on a cut falls
    between calls that carried many hops each; the result must not tell."""
    clip = speech()
    n_frames = len(whole_frames(clip)) // 128
    async with running_engine(any_model, max_steps_per_call=max_steps) as engine:
        assert engine.resolve(any_model).max_steps_per_call == max_steps
        handle = engine.resolve(any_model)
        ref = await stream_clip(engine, handle, clip, frames_per_push=1)
        assert ref.events, "the clip must produce events for the check to mean something"
        for seed in range(3):
            rng = random.Random(seed * 31 + batched)
            cuts = sorted(rng.sample(range(1, n_frames), 3))
            stop = asyncio.Event()
            others = [
                asyncio.create_task(background(engine, any_model, stop)) for _ in range(3 if batched else 0)
            ]
            try:
                sink, session = await stream_with_cuts(engine, any_model, clip, cuts, rng)
            finally:
                stop.set()
                other_steps = await asyncio.gather(*others)
            session.close()
            if batched:
                assert all(n > 0 for n in other_steps)
            assert sink.indices == ref.indices, f"cuts {cuts}"
            assert sink.times == ref.times
            assert np.array_equal(bits(sink.rows), bits(ref.rows)), f"scores differ after cuts {cuts}"
            assert list(session.events) == ref.events, f"events differ after cuts {cuts}"
        if batched:
            m, key = engine.metrics, handle.spec.key
            assert m.steps.labels(key)._value.get() > m.batches.labels(key)._value.get(), "no batch > 1"


async def test_snapshot_of_one_model_never_restores_into_another(
    silero_model: str, default_model: str
) -> None:
    clip = speech()[: 128 * 128]
    async with running_engine("lookback-vad", "silero-vad") as engine:
        vad, silero = engine.resolve("lookback-vad"), engine.resolve("silero-vad")
        session = engine.open_session(vad, Collect())
        await push_all(session, to_s16(whole_frames(clip)), [4] * 32)
        await session.wait_idle()
        blob = session.snapshot()
        session.close()
        used = silero.table.used
        with pytest.raises(SnapshotError) as err:
            StreamSession.restore(silero, Collect(), blob)
        assert err.value.code == "resume_incompatible" and "graph" in err.value.message
        assert silero.table.used == used  # nothing leaked
        # same name, same rows, but a different graph hash: refused as well
        snap = snapshot.decode(blob)
        snap.graph_sha256 = "0" * 64
        with pytest.raises(SnapshotError) as err:
            StreamSession.restore(vad, Collect(), snap.encode())
        assert err.value.code == "resume_incompatible"
        assert StreamSession.restore(vad, Collect(), blob).frames == session.frames


async def test_busy_session_is_not_snapshotted(default_model: str) -> None:
    async with running_engine("lookback-vad") as engine:
        session = engine.open_session(engine.resolve("lookback-vad"), Collect())
        session.push(bytes(256 * 8))
        with pytest.raises(SnapshotError) as err:
            session.snapshot()
        assert "in flight" in err.value.message
        await session.wait_idle()
        assert snapshot.decode(session.snapshot()).steps == 8
        session.close()


def _blob() -> bytes:
    snap = snapshot.Snapshot(
        model="m",
        version="1",
        graph_sha256="a" * 64,
        encoding="pcm_s16le",
        steps=3,
        frames=13,
        frame_samples=128,
        padded_samples=0,
        failed_steps=0,
        detector=(True, False, 0, 1024),
        events=[("start", "speech", 1024)],
        partial=bytes(256),
        rows={"h": np.arange(6, dtype=np.float32).reshape(2, 3)},
        options={"results": "events"},
    )
    return snap.encode()


def test_round_trip_keeps_every_field() -> None:
    snap = snapshot.decode(_blob())
    assert (snap.steps, snap.frames, snap.samples, snap.detector) == (3, 13, 13 * 128, (True, False, 0, 1024))
    assert snap.events == [("start", "speech", 1024)] and snap.options == {"results": "events"}
    assert np.array_equal(snap.rows["h"], np.arange(6, dtype=np.float32).reshape(2, 3))
    assert snap.encode() == _blob()


@pytest.mark.parametrize(
    ("mangle", "code"),
    [
        (lambda b: b[: len(b) // 2], "snapshot_invalid"),
        (lambda b: b[:5], "snapshot_invalid"),
        (lambda b: b"", "snapshot_invalid"),
        (lambda b: b"GARBAGE!" * 20, "snapshot_invalid"),
        (lambda b: b[:40] + bytes([b[40] ^ 1]) + b[41:], "snapshot_invalid"),
        (lambda b: b[:4] + struct.pack("<H", 0) + b[6:], "snapshot_version"),
        (lambda b: b[:4] + struct.pack("<H", 99) + b[6:], "snapshot_version"),
    ],
    ids=["half", "prefix", "empty", "garbage", "bitflip", "older-format", "newer-format"],
)
def test_damaged_snapshots_are_refused_clearly(mangle: object, code: str) -> None:
    with pytest.raises(SnapshotError) as err:
        snapshot.decode(mangle(_blob()))  # type: ignore[operator]
    assert err.value.code == code


def test_consistent_crc_but_lying_header_is_refused() -> None:
    b = _blob()
    body = b[:-4].replace(b'"frames":13', b'"frames":-1')
    with pytest.raises(SnapshotError):
        snapshot.decode(body + struct.pack("<I", zlib.crc32(body)))


def _edit_header(blob: bytes, old: bytes, new: bytes) -> bytes:
    """``blob`` with a header field rewritten and the CRC made consistent again."""
    (hlen,) = struct.unpack_from("<I", blob, 6)
    header = blob[10 : 10 + hlen].replace(old, new)
    assert header != blob[10 : 10 + hlen], old
    body = blob[:6] + struct.pack("<I", len(header)) + header + blob[10 + hlen : -4]
    return body + struct.pack("<I", zlib.crc32(body))


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (b'"frames":13', b'"frames":4611686018427387904'),  # 2^62: JSON parses it, nothing else should
        (b'"steps":3', b'"steps":9007199254740993'),
        (b'"encoding":"pcm_s16le"', b'"encoding":"pcm_u8"'),
        (b'"failed_steps":0', b'"failed_steps":4'),
        (b'"events":[["start"', b'"events":[["middle"'),
        (b'"events_truncated":0', b'"events_truncated":-3'),
    ],
    ids=["huge-frames", "huge-steps", "encoding", "failed>steps", "event-kind", "negative-truncated"],
)
def test_header_fields_out_of_range_are_refused(old: bytes, new: bytes) -> None:
    """A CRC says nothing about sense: every field is range-checked, a clear error, no crash."""
    with pytest.raises(SnapshotError) as err:
        snapshot.decode(_edit_header(_blob(), old, new))
    assert err.value.code == "snapshot_invalid"


async def test_counts_that_disagree_with_the_model_are_refused(default_model: str) -> None:
    """steps and frames are tied by the hop: an edited step count never restores."""
    async with running_engine("lookback-vad") as engine:
        handle = engine.resolve("lookback-vad")
        session = engine.open_session(handle, Collect())
        session.push(bytes(256 * 8))
        await session.wait_idle()
        snap = snapshot.decode(session.snapshot())
        session.close()
        used = handle.table.used
        for field, value in (("steps", 7), ("frames", 9), ("detector", (True, False, 0, 10**9))):
            bad = snapshot.decode(snap.encode())
            setattr(bad, field, value)
            with pytest.raises(SnapshotError) as err:
                StreamSession.restore(handle, Collect(), bad.encode())
            assert err.value.code == "snapshot_invalid", field
        assert handle.table.used == used
        assert StreamSession.restore(handle, Collect(), snap.encode()).steps_done == 8


KEYS = {"AAAAAAAA": b"k" * 32, "BBBBBBBB": b"j" * 32}


def test_a_sealed_snapshot_opens_only_for_its_session() -> None:
    blob = _blob()
    sealed = snapshot.seal(blob, KEYS["AAAAAAAA"], "AAAAAAAA", "sid-a|fp-a")
    assert snapshot.unseal(sealed, KEYS, "sid-a|fp-a") == blob
    refusals = [
        (sealed, "sid-b|fp-a", "snapshot_invalid"),  # moved to another session's entry
        (sealed, "sid-a|fp-b", "snapshot_invalid"),  # another API key
        (sealed[:-1] + bytes([sealed[-1] ^ 1]), "sid-a|fp-a", "snapshot_invalid"),  # edited
        (sealed[:50], "sid-a|fp-a", "snapshot_invalid"),  # truncated
        (sealed[:4] + b"CCCCCCCC" + sealed[12:], "sid-a|fp-a", "resume_secret_rotated"),
        (blob, "sid-a|fp-a", "snapshot_version"),  # format 1 was stored unsealed
    ]
    for data, context, code in refusals:
        with pytest.raises(SnapshotError) as err:
            snapshot.unseal(data, KEYS, context)
        assert err.value.code == code, (context, code)


def test_format_1_snapshots_are_refused_by_version() -> None:
    b = _blob()
    body = b[:4] + struct.pack("<H", 1) + b[6:-4]
    with pytest.raises(SnapshotError) as err:
        snapshot.decode(body + struct.pack("<I", zlib.crc32(body)))
    assert err.value.code == "snapshot_version" and snapshot.FORMAT_VERSION == 2


async def test_events_and_snapshots_stay_bounded_on_a_long_stream(default_model: str) -> None:
    """session_events_kept bounds a session's events: the snapshot of a stream six clips
    long is the size of one two clips long, and the older events are counted, not lost silently."""
    clip = to_s16(whole_frames(speech()))
    async with running_engine("lookback-vad") as engine:
        ref = await stream_clip(engine, engine.resolve("lookback-vad"), speech(), flush=False)
        per_clip = len(ref.events)
        assert per_clip >= 2
    async with running_engine("lookback-vad", session_events_kept=3) as engine:
        handle = engine.resolve("lookback-vad")
        session = engine.open_session(handle, Collect())
        sizes = []
        for _ in range(6):
            n = len(clip) // session.frame_bytes
            await push_all(session, clip, [8] * (n // 8) + [n % 8] * (n % 8 > 0))
            await session.wait_idle()
            sizes.append(len(session.snapshot()))
        assert len(session.events) == 3
        assert session.events.total >= 6 * per_clip - 6  # a clip boundary may join two segments
        snap = snapshot.decode(session.snapshot())
        assert len(snap.events) == 3 and snap.events_truncated == session.events.truncated > 0
        assert sizes[-1] - sizes[1] < 32, sizes  # only the counters' digits may grow
        restored = StreamSession.restore(handle, Collect(), snap)
        assert restored.events.truncated == session.events.truncated
        assert list(restored.events) == list(session.events)
        restored.close()
        session.close()
