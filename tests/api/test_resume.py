"""Resume over the wire with the in-memory store: drop, reconnect with the token, same bits.

The reference is the clip streamed once over one connection. The resumed run drops the
connection abruptly mid-stream (no close frame), reconnects with ``?resume=TOKEN``,
replays its audio from ``replay_from_sample`` and drops duplicate results by step; the
merged transcript must equal the reference exactly (result texts compared as strings,
so every float is the same bits). Every refusal gets its own code and close code.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import orjson
import pytest
from websockets.exceptions import ConnectionClosed

from lookback.api.resume import ResumeState, key_fingerprint
from lookback.engine.snapshot import decode
from lookback.protocol import split_results
from lookback.state_store import Put
from tests.api.resume_util import Inbox
from tests.api.ws_util import wait_until, ws_connect
from tests.conftest import Server, running_server
from tests.conftest import test_settings as make_settings
from tests.support import read_clip

CLIP = read_clip("silero_ref_speech.wav")
PCM = CLIP[: len(CLIP) // 512 * 512].astype("<i2").tobytes()
MSG = 4 * 256  # four frames per message


@pytest.fixture(scope="module")
def srv(silero_model: str) -> Iterator[Server]:
    settings = make_settings(snapshot_interval_s=0.05, api_keys="k1,k2", resume_lease_s=1.0)
    with running_server(settings) as s:
        yield s


def url(srv: Server, key: str = "k1", **q: Any) -> str:
    extra = "".join(f"&{k}={v}" for k, v in q.items())
    return f"{srv.ws}/v1/stream?model=silero-vad&resumable=1&token={key}{extra}"


async def send_pcm(ws: Any, pcm: bytes, end: bool = True) -> None:
    for i in range(0, len(pcm), MSG):
        await ws.send(pcm[i : i + MSG])
    if end:
        await ws.send('{"type":"end"}')


async def collect(ws: Any, into: list[dict[str, Any]]) -> None:
    try:
        async for m in ws:
            into.append(orjson.loads(m))
    except ConnectionClosed:
        pass


def split(msgs: list[dict[str, Any]]) -> tuple[dict[int, str], list[dict[str, Any]]]:
    """Results by step as ``result`` texts (a results=batch message is split first)."""
    flat = [r for m in msgs for r in (split_results(m) if m["type"] == "results" else [m])]
    results = {m["step"]: orjson.dumps(m).decode() for m in flat if m["type"] == "result"}
    events = [m for m in msgs if m["type"] == "event"]
    return results, events


async def reference(srv: Server) -> list[dict[str, Any]]:
    async with ws_connect(url(srv)) as ws:
        msgs: list[dict[str, Any]] = []
        reader = asyncio.create_task(collect(ws, msgs))
        await send_pcm(ws, PCM)
        await reader
    return msgs


async def refusal(u: str) -> tuple[str, int | None]:
    async with ws_connect(u) as ws:
        msgs: list[dict[str, Any]] = []
        await collect(ws, msgs)
        return msgs[0]["code"], ws.close_code


async def resume(u: str) -> tuple[Any, dict[str, Any]]:
    """Connect with a resume token; a conflict (the server has not yet seen the drop) is retried."""
    deadline = time.monotonic() + 20
    while True:
        ws = await ws_connect(u)
        first = orjson.loads(await ws.recv())
        if first["type"] == "ready":
            return ws, first
        await ws.close()
        assert first["code"] == "resume_conflict", first
        assert time.monotonic() < deadline, "the original connection never let go"
        await asyncio.sleep(0.05)  # client backoff between resume attempts


@pytest.mark.parametrize("mode", ["all", "batch"])
async def test_dropped_connection_resumes_bit_identically(srv: Server, mode: str) -> None:
    """results=batch resumes too (its re-sent tail is one results message); its steps
    flattened equal the results=all reference, bit for bit."""
    ref = await reference(srv)
    ref_results, ref_events = split(ref)
    ref_summary = {k: v for k, v in ref[-1].items() if k != "session_id"}
    assert ref_events and ref[0]["resume_token"]
    for cut in (37, 260, 511):  # messages sent before the drop
        inbox = Inbox()
        got = inbox.msgs
        ws = await ws_connect(url(srv, results=mode))
        reader = asyncio.create_task(inbox.run(ws))
        await send_pcm(ws, PCM[: cut * MSG], end=False)
        await inbox.wait_for(lambda ms: any(m["type"] == "checkpoint" for m in ms))
        token = got[0]["resume_token"]
        ws.transport.abort()  # a dropped network: no close frame
        await reader
        results, events = split(got)
        nxt = max(results) + 1
        ws2, ready = await resume(url(srv, resume=token, next_step=nxt, sent=cut * MSG // 2))
        assert ready["resumed"] is True and ready["resume_token"] != token
        n = ready["replay_from_sample"]
        assert 0 < n <= cut * MSG // 2 and n % 128 == 0
        more: list[dict[str, Any]] = [ready]
        reader = asyncio.create_task(collect(ws2, more))
        await send_pcm(ws2, PCM[n * 2 :])
        await reader
        r2, e2 = split(more)
        if mode == "batch":
            assert not any(m["type"] == "result" for m in more)
        for step, text in r2.items():  # duplicates are re-sent identically
            assert results.setdefault(step, text) == text
        assert results == ref_results, f"cut {cut}"
        dup = len(events) - ready["events_sent"]
        assert dup >= 0
        assert events + e2[dup:] == ref_events
        summary = {k: v for k, v in more[-1].items() if k != "session_id"}
        assert summary == ref_summary
        # the token was single use
        assert await refusal(url(srv, resume=token)) == ("resume_token_used", 4464)


async def test_refusals_have_their_own_codes_and_leak_nothing(srv: Server) -> None:
    async with ws_connect(url(srv)) as ws:
        token = orjson.loads(await ws.recv())["resume_token"]
        sid = token.split(".")[0]
        await send_pcm(ws, PCM[: 20 * MSG], end=False)
        while orjson.loads(await ws.recv())["type"] != "checkpoint":
            pass  # the session is durable from its first checkpoint on
        # a second connection while the original is open: conflict; the original is unharmed
        assert await refusal(url(srv, resume=token)) == ("resume_conflict", 4465)
        # the same token with another key: forbidden, before any lookup
        assert await refusal(url(srv, "k2", resume=token)) == ("resume_forbidden", 4461)
        await send_pcm(ws, PCM[: 40 * MSG])
        msgs: list[dict[str, Any]] = []
        await collect(ws, msgs)
        assert msgs[-1]["type"] == "summary" and msgs[-1]["steps"] == 60 * MSG // 1024
    # ended normally: nothing to resume
    assert await refusal(url(srv, resume=token)) == ("resume_unknown", 4462)
    assert await refusal(url(srv, resume="garbage")) == ("resume_token_invalid", 4460)
    # two tokens: which one counts would be a guess, so neither does
    assert await refusal(url(srv, resume=token) + f"&resume={token}") == ("duplicate_query", 4400)
    for forged in (sid + "." + "A" * 32, token[:31] + "A" * 32):  # old shape; a known key id, wrong MACs
        assert await refusal(url(srv, resume=forged)) == ("resume_token_invalid", 4460)
    # another key gets the same answer whether the session exists or not
    resumer = srv.app.state.resumer  # type: ignore[attr-defined]
    ghost = ResumeState("B" * 22, "x", "")
    ghost.key_fp = key_fingerprint("k1")
    await resumer.issue(ghost)
    assert await refusal(url(srv, "k2", resume=ghost.token)) == ("resume_forbidden", 4461)
    assert await refusal(url(srv, "k1", resume=ghost.token)) == ("resume_unknown", 4462)
    m = srv.get("/metrics").text
    assert 'lookback_resumes_total{outcome="forbidden"}' in m


async def test_snapshot_of_a_changed_model_is_incompatible(srv: Server, default_model: str) -> None:
    """A snapshot whose graph hash is not the served one: refused, the token left unused."""
    svc = srv.app.state  # type: ignore[attr-defined]
    async with ws_connect(url(srv)) as ws:
        first = orjson.loads(await ws.recv())
        await send_pcm(ws, PCM[: 8 * MSG], end=False)
        await ws.send('{"type":"end"}')
        await collect(ws, [])
    handle = svc.engine.resolve("silero-vad")
    session = svc.engine.open_session(handle, None)
    snap = decode(session.snapshot({"results": "all"}))
    session.close()
    snap.graph_sha256 = "f" * 64
    state = ResumeState("C" * 22, "owner", key_fingerprint("k1"))
    await svc.resumer.issue(state)
    sealed = svc.resumer.seal(state, snap.encode())
    assert (await svc.resumer.store.sync([Put(state.sid, "owner", sealed, release=True)])) == [True]
    assert await refusal(url(srv, resume=state.token)) == ("resume_incompatible", 4466)
    # a snapshot of another format version, and a damaged one: each its own code
    good = snap.encode()
    for blob, code in (
        (good[:4] + struct.pack("<H", 0) + good[6:], "snapshot_version"),
        (good[: len(good) // 2], "snapshot_invalid"),
    ):
        st = ResumeState(code[-7:].rjust(22, "D"), "owner", key_fingerprint("k1"))
        await svc.resumer.issue(st)
        sealed = svc.resumer.seal(st, blob)
        assert (await svc.resumer.store.sync([Put(st.sid, "owner", sealed, release=True)])) == [True]
        assert await refusal(url(srv, resume=st.token)) == (code, 4466)
    assert svc.engine.resolve("silero-vad").table.used == 0  # nothing leaked
    assert first["resume_token"]


async def test_resume_is_opt_in(srv: Server) -> None:
    """Without ?resumable=1 a session is as before: no token, no checkpoints, no snapshots."""
    async with ws_connect(url(srv).replace("&resumable=1", "")) as ws:
        msgs: list[dict[str, Any]] = []
        reader = asyncio.create_task(collect(ws, msgs))
        await send_pcm(ws, PCM[: 200 * MSG])
        await reader
    assert "resume_token" not in msgs[0]
    assert {m["type"] for m in msgs} == {"ready", "result", "event", "summary"}


class _Sink:
    """The part of a connection a checkpoint round uses (``lookback.api.resume.Resumable``)."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.resume: ResumeState | None = None
        self.recent: Any = None
        self.session: Any = None
        self.results = "all"
        self.ready_extra: dict[str, Any] = {}
        self.sent: list[dict[str, Any]] = []

    @property
    def ended(self) -> bool:
        return False

    @property
    def end_reason(self) -> str | None:
        return None

    def on_result(self, index: int, time: float, scores: list[float], events: Any) -> None:
        pass

    def on_error(self, index: int, error: Exception) -> None:
        raise AssertionError(error)

    def send_message(self, text: str) -> None:
        self.sent.append(orjson.loads(text))

    def close_now(self, code: int, reason: str, message: str) -> None:
        raise AssertionError(reason)

    def close_after_queue(self, code: int, reason: str) -> None:
        raise AssertionError(reason)


async def test_a_checkpoint_round_is_spread_over_ticks_and_visits_each_session_once() -> None:
    """One burst of every session's snapshot stalls the event loop: ``checkpoint(t, n)``
    snapshots only the sessions whose turn is tick t, and n ticks visit each exactly once."""
    from lookback.api.resume import Resumer
    from lookback.engine.engine import Engine
    from lookback.metrics import Metrics

    settings = make_settings(snapshot_interval_s=3600)  # only the ticks this test runs
    engine = Engine(settings)
    await engine.start()
    resumer = Resumer(settings, Metrics())
    try:
        handle = engine.resolve(None, None)
        conns = [_Sink(handle) for _ in range(12)]
        for c in conns:
            c.session = engine.open_session(handle, c)
            c.resume = await resumer.new_state(None)
            c.session.push(np.zeros(handle.spec.frame_samples, "<i2").tobytes())
            await c.session.wait_idle()
        await resumer.start(conns)
        written = [await resumer.checkpoint(t, 4) for t in range(4)]
        assert sum(written) == len(conns)
        assert max(written) < len(conns)  # no tick snapshots everyone
        assert all(len(c.sent) == 1 and c.sent[0]["type"] == "checkpoint" for c in conns)
        assert await resumer.checkpoint() == 0  # nothing advanced: leases renewed, no snapshot
    finally:
        await resumer.stop()
        for c in conns:
            c.session.close()
        await engine.stop()


async def dropped_session(srv: Server, key: str = "k1", frames: int = 20) -> str:
    """A durable session whose connection then dropped and was let go: its token."""
    inbox = Inbox()
    ws = await ws_connect(url(srv, key))
    reader = asyncio.create_task(inbox.run(ws))
    await send_pcm(ws, PCM[: frames * MSG], end=False)
    await inbox.wait_for(lambda ms: any(m["type"] == "checkpoint" for m in ms))
    ws.transport.abort()
    await reader
    table = srv.app.state.engine.resolve("silero-vad").table  # type: ignore[attr-defined]
    deadline = time.monotonic() + 10
    while table.used:  # the server notices the drop, writes a final snapshot, frees the slot
        assert time.monotonic() < deadline, "the dropped connection kept its slot"
        await asyncio.sleep(0.02)
    return str(inbox.msgs[0]["resume_token"])


async def finish(ws: Any) -> dict[str, Any]:
    await ws.send('{"type":"end"}')
    msgs: list[dict[str, Any]] = []
    await collect(ws, msgs)
    return msgs[-1]


async def test_bad_resume_parameters_cost_neither_the_session_nor_a_slot(srv: Server) -> None:
    """sent= and next_step= are checked before the token is used: each bad value is
    bad_query, no slot stays taken, and the same token still resumes afterwards."""
    token = await dropped_session(srv)
    table = srv.app.state.engine.resolve("silero-vad").table  # type: ignore[attr-defined]
    for bad in (
        {"sent": 2**64},
        {"next_step": 2**64},
        {"sent": "\u00b2"},  # str.isdigit() says yes, int() says no
        {"next_step": "\u0661\u0662"},  # Arabic-Indic digits: not a plain number either
        {"next_step": "-1"},
        {"sent": "1e3"},
    ):
        assert await refusal(url(srv, resume=token, **bad)) == ("bad_query", 4400), bad
        assert table.used == 0, bad
    ws, ready = await resume(url(srv, resume=token, next_step=1, sent=20 * MSG // 2))
    assert ready["resumed"] is True and ready["replay_from_sample"] > 0
    summary = await finish(ws)
    assert summary["type"] == "summary" and summary["events_truncated"] == 0
    await wait_until(lambda: table.used == 0, what="the slot freed once the session closed")


async def test_a_snapshot_moved_to_another_session_is_refused(srv: Server) -> None:
    """Swap two sessions' snapshots in the store (keys k1 and k2): each is sealed to its
    own session and key, so neither restores, and both resume once put back."""
    svc = srv.app.state  # type: ignore[attr-defined]
    a, b = await dropped_session(srv, "k1", 20), await dropped_session(srv, "k2", 30)
    snaps = svc.resumer.store._snaps  # the memory store's entries, as Redis would hold them
    sa, sb = a.split(".")[0], b.split(".")[0]
    snaps[sa], snaps[sb] = snaps[sb], snaps[sa]
    assert await refusal(url(srv, "k1", resume=a)) == ("snapshot_invalid", 4466)
    assert await refusal(url(srv, "k2", resume=b)) == ("snapshot_invalid", 4466)
    assert svc.engine.resolve("silero-vad").table.used == 0
    snaps[sa], snaps[sb] = snaps[sb], snaps[sa]
    for key, token, frames in (("k1", a, 20), ("k2", b, 30)):
        ws, ready = await resume(url(srv, key, resume=token))
        assert ready["replay_from_sample"] == frames * MSG // 2
        assert (await finish(ws))["type"] == "summary"


async def test_a_configured_secret_is_shared_and_a_rotated_one_is_told_apart() -> None:
    """Two replicas with the same LOOKBACK_RESUME_SECRET and separate stores accept each
    other's tokens and snapshots; another secret answers resume_secret_rotated, not forged."""
    from lookback.api.resume import Resumer
    from lookback.errors import LookbackError
    from lookback.metrics import Metrics

    one, two = (Resumer(make_settings(resume_secret="s" * 32), Metrics()) for _ in range(2))
    other = Resumer(make_settings(resume_secret="t" * 32), Metrics())
    for r in (one, two, other):
        await r.start([])
    try:
        st = await one.new_state("k1")
        assert st.token is not None
        assert await two.verify(st.token, "k1") == st.sid
        blob = b"the bytes of a snapshot"
        assert two._unseal(one.seal(st, blob), st.sid, st.key_fp) == blob
        with pytest.raises(LookbackError) as err:
            await other.verify(st.token, "k1")
        assert err.value.code == "resume_secret_rotated"
        i = len(st.sid) + 1 + 8  # the issuer MAC's first character, after the key id
        forged = st.token[:i] + ("A" if st.token[i] != "A" else "B") + st.token[i + 1 :]
        with pytest.raises(LookbackError) as err:
            await two.verify(forged, "k1")
        assert err.value.code == "resume_token_invalid"
    finally:
        for r in (one, two, other):
            await r.stop()


async def test_a_resampled_g711_session_resumes_bit_identically(srv: Server) -> None:
    """8 kHz µ-law (a phone call): the resampler's state is in the snapshot, checkpoints and
    ``replay_from_sample`` count the client's 8 kHz samples, and the merged results equal an
    uninterrupted run bit for bit."""
    from tests.engine.rate_support import at_rate, encode

    mu = encode(at_rate(CLIP[: 16000 * 6], 8000), "mulaw")
    q: dict[str, Any] = {"encoding": "mulaw", "sample_rate": 8000}

    async def send(ws: Any, audio: bytes, end: bool = True) -> None:
        for i in range(0, len(audio), 160):  # 20 ms packets
            await ws.send(audio[i : i + 160])
        if end:
            await ws.send('{"type":"end"}')

    async with ws_connect(url(srv, **q)) as ws:
        ref: list[dict[str, Any]] = []
        reader = asyncio.create_task(collect(ws, ref))
        await send(ws, mu)
        await reader
    ref_results, ref_events = split(ref)
    assert ref_events and ref[0]["encoding"] == "mulaw"
    inbox = Inbox()
    ws = await ws_connect(url(srv, **q))
    reader = asyncio.create_task(inbox.run(ws))
    await send(ws, mu[: 160 * 137], end=False)
    await inbox.wait_for(lambda ms: any(m["type"] == "checkpoint" and m["samples"] > 8000 for m in ms))
    checkpoints = [m["samples"] for m in inbox.msgs if m["type"] == "checkpoint"]
    assert all(0 < c <= 160 * 137 for c in checkpoints)  # client (8 kHz) samples
    token = inbox.msgs[0]["resume_token"]
    ws.transport.abort()
    await reader
    results, events = split(inbox.msgs)
    ws2, ready = await resume(url(srv, resume=token, next_step=max(results) + 1, **q))
    n = ready["replay_from_sample"]
    assert 8000 < n <= 160 * 137
    more: list[dict[str, Any]] = [ready]
    reader = asyncio.create_task(collect(ws2, more))
    await send(ws2, mu[n:])  # 1 byte a sample: sample n is byte n
    await reader
    r2, e2 = split(more)
    for step, text in r2.items():
        assert results.setdefault(step, text) == text
    assert results == ref_results
    assert events + e2[len(events) - ready["events_sent"] :] == ref_events
    assert {k: v for k, v in more[-1].items() if k != "session_id"} == {
        k: v for k, v in ref[-1].items() if k != "session_id"
    }
