"""``lookback serve --workers 2``: real supervisor and worker processes on one free port.

Sessions land on both workers (each ``ready`` names its worker); ``/metrics`` from any
worker adds up what every session did; SIGTERM to the supervisor drains both workers with
summaries and exits 0; a worker killed with SIGKILL leaves the other serving and comes
back (counted); scores through two workers equal a solo in-process server's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError
from websockets.asyncio.client import ClientConnection

from lookback.settings import Settings
from lookback.workers import Board, ScoreGate, resolve_workers, share, worker_settings
from tests.api.ws_util import SILERO_Q, Transcript, metric, read_all, stream_clip, wait_until, ws_connect
from tests.conftest import AUDIO as FIXTURES
from tests.conftest import Spawned, read_clip, running_server, spawn_server
from tests.conftest import test_settings as make_settings
from tests.deploy.conftest import dashboard_exprs, metric_names

CLIP = read_clip("silero_ref_speech.wav")
FRAME_BYTES = 256
SILERO_KEY = "silero-vad/6.2.3"
WAV = {"content-type": "audio/wav"}
MAX_TRIES = 24  # sessions opened at most to see both workers (the kernel picks)
ENV = {"LOOKBACK_WORKERS": "2", "LOOKBACK_MODELS": "silero-vad,lookback-vad", "LOOKBACK_LOG_LEVEL": "info"}


def frames_of(n: int) -> bytes:
    need = n * FRAME_BYTES
    pcm = CLIP.tobytes()
    return (pcm * (need // len(pcm) + 1))[:need]


@dataclass
class Live:
    ws: ClientConnection
    transcript: Transcript
    reader: asyncio.Task[Transcript]

    @property
    def worker(self) -> int:
        return int(orjson.loads(self.transcript.messages[0])["worker"])


@contextlib.asynccontextmanager
async def sessions_on_both(url: str) -> AsyncIterator[list[Live]]:
    """Open sessions (kept open) until both workers hold at least one."""
    async with contextlib.AsyncExitStack() as stack:
        out: list[Live] = []
        while {s.worker for s in out} != {0, 1}:
            assert len(out) < MAX_TRIES, f"every session landed on worker {out[0].worker}"
            ws = await stack.enter_async_context(ws_connect(url))
            t = Transcript()
            live = Live(ws, t, asyncio.create_task(read_all(ws, t)))
            await wait_until(lambda: bool(t.messages), what="ready")  # noqa: B023
            out.append(live)
        yield out


def readyz(srv: Spawned) -> httpx.Response:
    return httpx.get(srv.url + "/readyz", timeout=10)


def metrics(srv: Spawned) -> str:
    r = httpx.get(srv.url + "/metrics", timeout=10)
    r.raise_for_status()
    return r.text


async def poll(pred: Any, what: str, within: float = 30.0) -> None:
    """Poll a blocking check from a thread (HTTP to the server), never a fixed sleep."""
    deadline = time.monotonic() + within
    while not await asyncio.to_thread(pred):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory: pytest.TempPathFactory, silero_model: str) -> Iterator[Spawned]:
    with spawn_server(tmp_path_factory.mktemp("workers"), **ENV) as srv:
        yield srv
        srv.terminate()
        assert srv.proc.wait(30) == 0


# -- pure helpers -------------------------------------------------------------------------------


def test_limits_are_shared_out_not_multiplied() -> None:
    s = make_settings(max_sessions=1001, max_concurrent_scores=3, max_queued_scores=8, intra_op_threads=0)
    parts = [worker_settings(s, i, 2, 2, gpu=False) for i in range(2)]
    assert [p.max_sessions for p in parts] == [501, 500]
    # offline limits are server-wide counters (ScoreGate), not divided
    assert [(p.max_concurrent_scores, p.max_queued_scores) for p in parts] == [(3, 8), (3, 8)]
    assert all(p.intra_op_threads == 1 and p.workers == 1 for p in parts)
    # one CPU per worker: CPU model calls inline; on a GPU the engine's own choice stands
    assert parts[0].model_calls == "thread"  # test_settings pins thread explicitly
    auto = make_settings(model_calls="auto")
    assert worker_settings(auto, 0, 2, 2, gpu=False).model_calls == "inline"
    assert worker_settings(auto, 0, 2, 2, gpu=True).model_calls == "auto"
    assert worker_settings(auto, 0, 2, 8, gpu=False).model_calls == "auto"
    assert worker_settings(auto, 0, 2, 8, gpu=False).intra_op_threads == 1
    assert sum(share(7, 3, i) for i in range(3)) == 7
    assert 1 <= resolve_workers("auto") <= len(os.sched_getaffinity(0))


def test_workers_setting_and_auto(tmp_path: Path) -> None:
    assert Settings(_env_file=None, workers="3").workers == 3
    assert Settings(_env_file=None, workers="auto").workers == "auto"
    with pytest.raises(ValidationError):
        Settings(_env_file=None, workers=0)
    # auto counts the CPUs this process may use (its affinity), not the host's
    code = (
        "import os; os.sched_setaffinity(0, {0}); "
        "from lookback.workers import resolve_workers; print(resolve_workers('auto'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"


async def test_score_gate_counts_offline_clips_over_every_worker(tmp_path: Path) -> None:
    Board(tmp_path / "b", 2)
    settings = make_settings(max_concurrent_scores=1, max_queued_scores=1)
    boards = [Board(tmp_path / "b"), Board(tmp_path / "b")]  # each worker maps the file
    g0, g1 = (ScoreGate(b, i, settings) for i, b in enumerate(boards))
    assert g0.admit() and g1.admit()
    assert not g0.admit() and not g1.admit(), "2 places per server, not per worker"
    order: list[str] = []

    async def score(gate: ScoreGate, name: str, hold: asyncio.Event | None) -> None:
        async with gate.running():
            order.append(f"{name} runs")
            if hold is not None:
                await hold.wait()
        order.append(f"{name} done")

    hold = asyncio.Event()
    first = asyncio.create_task(score(g0, "w0", hold))
    await wait_until(lambda: order == ["w0 runs"], what="w0 running")
    second = asyncio.create_task(score(g1, "w1", None))
    await asyncio.sleep(0)
    assert order == ["w0 runs"], "one clip scores at a time over the whole server"
    hold.set()
    await asyncio.gather(first, second)
    assert order == ["w0 runs", "w0 done", "w1 runs", "w1 done"]
    g0.release()
    assert g1.admit()
    boards[0].clear(1)  # worker 1 died: the supervisor frees its places
    assert g0.admit()


def test_board_is_shared_through_the_file(tmp_path: Path) -> None:
    a = Board(tmp_path / "b", 2)
    b = Board(tmp_path / "b")
    a.set(0, 2, 123)
    assert not b.all_ready()
    a.set(1, 2, 124)
    assert b.all_ready() and b.pid(1) == 124
    a.set(1, 3)
    assert b.any_draining() and not b.all_ready()
    assert [r["state"] for r in b.describe()] == ["ready", "draining"]


# -- real servers --------------------------------------------------------------------------------


async def test_sessions_land_on_both_workers_and_metrics_sum_them(two_workers: Spawned) -> None:
    srv = two_workers
    body = readyz(srv).json()
    assert [w["state"] for w in body["workers"]] == ["ready", "ready"]
    assert len({w["pid"] for w in body["workers"]}) == 2
    before = metrics(srv)
    url = f"{srv.ws}/v1/stream?{SILERO_Q}"
    async with sessions_on_both(url) as live:
        plan = [37 + 5 * i for i in range(len(live))]
        for s, n in zip(live, plan, strict=True):
            pcm = frames_of(n)
            for i in range(0, len(pcm), 3 * FRAME_BYTES):
                await s.ws.send(pcm[i : i + 3 * FRAME_BYTES])
            await s.ws.send('{"type":"end"}')
        await asyncio.wait_for(asyncio.gather(*(s.reader for s in live)), 60)
    summaries = [s.transcript.summary for s in live]
    assert [s["frames"] for s in summaries] == plan
    steps = sum(s["steps"] for s in summaries)
    assert steps == sum(-(-n // 4) for n in plan)
    want = {
        "lookback_sessions_started_total": len(live),
        "lookback_frames_received_total": sum(plan),
        "lookback_steps_total": steps,
        "lookback_frame_to_result_seconds_count": steps,
        "lookback_queue_wait_seconds_count": steps,
    }

    def delta() -> dict[str, float]:
        now = metrics(srv)
        return {k: metric(now, k, model=SILERO_KEY) - metric(before, k, model=SILERO_KEY) for k in want}

    def settled() -> bool:
        text = metrics(srv)
        return delta() == want and metric(text, "lookback_sessions_active", model=SILERO_KEY) == 0

    await poll(settled, f"metrics to add up to {want}")
    text = metrics(srv)
    assert metric(text, "lookback_sessions_ended_total", model=SILERO_KEY, reason="normal") >= len(live)
    assert metric(text, "lookback_ready") == 1  # livemin over the workers, not their sum
    assert metric(text, "lookback_workers", state="ready") == 2
    workers = [s.worker for s in live]
    print(f"{len(live)} sessions over workers {workers}: metrics {delta()}")


def label_keys(text: str, names: set[str]) -> dict[str, set[frozenset[str]]]:
    """Per sample name in ``names``: the label-key sets its samples carry."""
    out: dict[str, set[frozenset[str]]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name in names:
                out.setdefault(s.name, set()).add(frozenset(s.labels))
    return out


async def bad_request(base_ws: str) -> None:
    """A session refused for an unknown model: counted in the refusal and error metrics."""
    t = Transcript()
    async with ws_connect(f"{base_ws}/v1/stream?model=no-such-model") as ws:
        await read_all(ws, t)
    assert t.error_codes() == ["unknown_model"]


async def test_scores_through_two_workers_equal_a_solo_server(two_workers: Spawned) -> None:
    """Streaming and REST scores equal a solo server's, and so does the metric schema."""
    pcm = CLIP.tobytes()
    wav = (FIXTURES / "silero_ref_speech.wav").read_bytes()
    queries = (SILERO_Q, "model=lookback-vad")
    with running_server(make_settings(models=["silero-vad", "lookback-vad"])) as solo:
        ref = {q: await stream_clip(solo.ws, pcm, query=q) for q in queries}
        await bad_request(solo.ws)
        async with httpx.AsyncClient(timeout=60) as client:
            ref_score = (await client.post(solo.url + "/v1/score", content=wav, headers=WAV)).json()
            solo_metrics = (await client.get(solo.url + "/metrics")).text
    await bad_request(two_workers.ws)
    async with httpx.AsyncClient(timeout=60) as client:
        for _ in range(4):  # the kernel places each request: several, so both workers score
            r = await client.post(two_workers.url + "/v1/score", content=wav, headers=WAV)
            assert r.json() == ref_score
    seen: dict[str, set[int]] = {q: set() for q in queries}
    for _ in range(6):
        runs = await asyncio.gather(
            *(stream_clip(two_workers.ws, pcm, query=q) for q in queries for _ in range(3))
        )
        for i, t in enumerate(runs):
            q = queries[i // 3]
            seen[q].add(int(t.parsed()[0]["worker"]))
            assert t.close_code == 1000
            assert t.messages[1:] == ref[q].messages[1:], f"{q}: worker differs from solo"
            assert ref[q].summary["steps"] > 50
        if all(w == {0, 1} for w in seen.values()):
            break
    assert all(w == {0, 1} for w in seen.values()), seen
    # the Grafana dashboard's series exist with the single-process label names (no pid)
    wanted = set().union(*(metric_names(e) for e in dashboard_exprs()))
    wanted = {n for n in wanted if ":" not in n}  # recording rules are Prometheus's
    # the broker sources row needs a source: a server without one has none of its series
    # (tests/sources/test_consume_monitoring.py reads them from a real consumer)
    wanted = {n for n in wanted if not n.startswith("lookback_source_")}
    ours, theirs = label_keys(metrics(two_workers), wanted), label_keys(solo_metrics, wanted)
    assert set(ours) == wanted, sorted(wanted - set(ours))
    assert ours == theirs


async def test_sigkill_of_one_worker_leaves_the_other_serving_and_it_restarts(
    tmp_path: Path, silero_model: str
) -> None:
    with spawn_server(tmp_path, **ENV) as srv:
        url = f"{srv.ws}/v1/stream?{SILERO_Q}"
        pids = {w["worker"]: w["pid"] for w in readyz(srv).json()["workers"]}
        async with sessions_on_both(url) as live:
            victim = next(s for s in live if s.worker == 0)
            survivors = [s for s in live if s.worker == 1]
            os.kill(pids[0], signal.SIGKILL)
            dead = [s for s in live if s.worker == 0]
            await asyncio.wait_for(asyncio.gather(*(s.reader for s in dead)), 20)  # gone with it
            assert all(s.transcript.close_code != 1000 for s in dead) and victim in dead
            # the survivors keep streaming while worker 0 is down and comes back
            plan = [41 + i for i in range(len(survivors))]
            for s, n in zip(survivors, plan, strict=True):
                await s.ws.send(frames_of(n))

            def restarted() -> bool:
                r = readyz(srv)
                w0 = r.json()["workers"][0]
                return r.status_code == 200 and w0["pid"] not in (0, pids[0]) and w0["state"] == "ready"

            await poll(restarted, "worker 0 restarted and ready", within=60)
            text = metrics(srv)
            assert metric(text, "lookback_worker_restarts_total") == 1
            live_open = sum(1 for s in live if not s.reader.done())
            assert live_open == len(survivors)

            def not_stale() -> bool:  # the dead worker's sessions no longer count as active
                return metric(metrics(srv), "lookback_sessions_active", model=SILERO_KEY) == live_open

            await poll(not_stale, "lookback_sessions_active without the dead worker's sessions")
            for s in survivors:
                await s.ws.send('{"type":"end"}')
            await asyncio.wait_for(asyncio.gather(*(s.reader for s in survivors)), 30)
        for s, n in zip(survivors, plan, strict=True):
            assert s.transcript.close_code == 1000
            assert s.transcript.summary["frames"] == n and s.transcript.summary["failed_steps"] == 0
        # the restarted worker serves new sessions
        async with sessions_on_both(url) as again:
            assert {s.worker for s in again} == {0, 1}
        srv.terminate()
        assert await asyncio.to_thread(srv.proc.wait, 30) == 0
        log = srv.log.read_text()
        assert "worker 0" in log and "died" in log


async def test_sigterm_drains_every_worker_and_exits_0(tmp_path: Path, silero_model: str) -> None:
    grace = 15.0
    env = {**ENV, "LOOKBACK_DRAIN_GRACE_S": str(grace), "LOOKBACK_MAX_PENDING_STEPS": "4096"}
    with spawn_server(tmp_path, **env) as srv:
        url = f"{srv.ws}/v1/stream?{SILERO_Q}"
        async with sessions_on_both(url) as live:
            plan = [41 + i for i in range(len(live))]  # mid-hop ends: the drain pads them
            for s, n in zip(live, plan, strict=True):
                await s.ws.send(frames_of(n))
                await s.ws.send('{"type":"barrier"}')  # its error reply proves every frame was read
            await wait_until(
                lambda: all(s.transcript.error_codes() == ["unknown_type"] for s in live),
                what="every frame read",
            )
            t_term = time.monotonic()
            srv.terminate()
            await asyncio.wait_for(asyncio.gather(*(s.reader for s in live)), grace)
        code = await asyncio.to_thread(srv.proc.wait, grace)
        took = time.monotonic() - t_term
        log = srv.log.read_text()
        assert code == 0, log
        assert took < grace
        for s, n in zip(live, plan, strict=True):
            t = s.transcript
            assert (t.close_code, t.close_reason) == (1001, "draining")
            assert t.summary["frames"] == n and t.summary["steps"] == -(-n // 4)
            assert t.summary["failed_steps"] == 0 and t.parsed()[-1]["type"] == "summary"
        per_worker = {w: sum(1 for s in live if s.worker == w) for w in (0, 1)}
        for w, count in per_worker.items():
            assert re.search(rf"\[worker {w}\] [\w.]+: draining {count} open sessions", log), log
        assert "every worker drained" in log and "Traceback" not in log
        print(f"drain: sessions per worker {per_worker}; supervisor exit 0 after {took:.2f}s")


def test_batch_histogram_in_multiprocess_mode_matches_a_native_one(tmp_path: Path) -> None:
    """Array-fed histograms of two processes merge exactly like native ones (bucket, count, sum)."""
    code = """
import numpy as np, sys
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from lookback.metrics import LATENCY_BUCKETS, BatchHistogram
seed = int(sys.argv[1])
r = CollectorRegistry()
ours = BatchHistogram("ours_seconds", "doc", ["model"], LATENCY_BUCKETS, r, fold_every=5, multiprocess=True)
native = Histogram("native_seconds", "doc", ["model"], buckets=LATENCY_BUCKETS, registry=r)
rng = np.random.default_rng(seed)
for i in range(40):
    values = np.concatenate([rng.exponential(0.01, rng.integers(0, 9)), np.asarray(LATENCY_BUCKETS[: i % 3])])
    ours.observe_many(values, "m")
    for v in values:
        native.labels("m").observe(float(v))
ours.flush()
if seed == 2:
    out = CollectorRegistry()
    MultiProcessCollector(out)
    print(generate_latest(out).decode())
"""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    for seed in (1, 2):
        out = subprocess.run(
            [sys.executable, "-c", code, str(seed)], env=env, capture_output=True, text=True, check=True
        ).stdout
    ours: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    native: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for fam in text_string_to_metric_families(out):
        for s in fam.samples:
            key = (s.name.split("_seconds")[1], tuple(sorted(s.labels.items())))
            (ours if s.name.startswith("ours") else native)[key] = round(s.value, 9)
    assert ours and ours == native
    assert ours[("_count", (("model", "m"),))] > 100


def test_a_worker_that_cannot_start_stops_the_server(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "LOOKBACK_MODEL_STORE": str(tmp_path),  # empty store: every worker refuses to start
        "LOOKBACK_PORT": "0",
        "LOOKBACK_WORKERS": "2",
    }
    out = subprocess.run(
        [sys.executable, "-m", "lookback.cli", "serve"], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 1, out.stderr[-3000:]
    assert "failed to start" in out.stderr and "no models to serve" in out.stderr


async def test_a_dead_workers_resumable_session_resumes_on_the_same_port(
    tmp_path: Path, silero_model: str
) -> None:
    """With a shared store (Redis), a resumable session of a SIGKILLed worker resumes through
    the server's port on a live worker, and the merged results equal an uninterrupted run's."""
    from tests.api.resume_util import Inbox
    from tests.fixtures_services import redis_server
    from tests.test_failover import MSG, PCM, collect, resume, send_pcm, split

    env = {**ENV, "LOOKBACK_SNAPSHOT_INTERVAL_S": "0.1", "LOOKBACK_RESUME_LEASE_S": "1.0"}
    with (
        redis_server(tmp_path) as redis_url,
        spawn_server(tmp_path, LOOKBACK_STATE_STORE=redis_url, **env) as srv,
    ):
        base = f"{srv.ws}/v1/stream?model=silero-vad"
        ref: list[dict[str, Any]] = []
        async with ws_connect(base + "&resumable=1") as ws:
            reader = asyncio.create_task(collect(ws, ref))
            await send_pcm(ws, PCM)
            await reader
        ref_results, ref_events = split(ref)

        pids = {w["worker"]: w["pid"] for w in readyz(srv).json()["workers"]}
        inbox = Inbox()
        ws = await ws_connect(base + "&resumable=1")
        reader = asyncio.create_task(inbox.run(ws))
        cut = 150
        await send_pcm(ws, PCM[: cut * MSG], end=False)
        durable = cut * MSG // 2
        await inbox.wait_for(
            lambda ms: any(m["type"] == "checkpoint" and m["samples"] == durable for m in ms)
        )
        worker = inbox.msgs[0]["worker"]
        os.kill(pids[worker], signal.SIGKILL)
        await reader
        token = next(m["resume_token"] for m in reversed(inbox.msgs) if m.get("resume_token"))
        results, events = split(inbox.msgs)

        ws2, ready = await resume(f"{base}&resume={token}&next_step={max(results) + 1}")
        assert ready["resumed"] is True and ready["replay_from_sample"] == durable
        more: list[dict[str, Any]] = [ready]
        reader = asyncio.create_task(collect(ws2, more))
        await send_pcm(ws2, PCM[durable * 2 :])
        await reader
        r2, e2 = split(more)
        for step, text in r2.items():
            assert results.setdefault(step, text) == text, f"step {step} re-sent differently"
        assert results == ref_results
        assert events + e2[len(events) - ready["events_sent"] :] == ref_events
        assert more[-1]["type"] == "summary" and more[-1]["steps"] == ref[-1]["steps"]
        srv.terminate()
        code = await asyncio.to_thread(srv.proc.wait, 30)
        assert code == 0, srv.log.read_text()[-3000:]


async def test_sigterm_while_a_worker_restarts_still_drains_and_exits_0(
    tmp_path: Path, silero_model: str
) -> None:
    """A worker still loading when SIGTERM comes dies of it before its server can drain:
    it held no sessions, so the supervisor counts that a clean stop (exit 0), as it does a
    crash earlier in the worker's slot."""
    with spawn_server(tmp_path, **ENV) as srv:
        pids = {w["worker"]: w["pid"] for w in readyz(srv).json()["workers"]}
        os.kill(pids[0], signal.SIGKILL)

        def restarting() -> bool:
            try:  # a connection queued on the killed worker's reuseport socket is reset
                return bool(readyz(srv).json()["workers"][0]["state"] == "starting")
            except httpx.TransportError:
                return False

        await poll(restarting, "worker 0 restarting")
        srv.terminate()
        code = await asyncio.to_thread(srv.proc.wait, 30)
        assert code == 0, srv.log.read_text()[-3000:]
