"""``results=batch``: one ``results`` message per model call, the same bits as ``results=all``.

Several concurrent sessions per mode stream clips in random message sizes (1 to 64
frames); each batch transcript, flattened with ``split_results``, must equal the
``results=all`` transcript of the same audio exactly: every result dict (floats
compared with ``==`` after the same JSON round trip), every event in order, the
summary. Events follow the ``results`` message of the hops that produced them.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import numpy as np
import orjson

from lookback.protocol import results_message, split_results
from tests.api.ws_util import END, HOPS, RATE, Session, frames, run_session
from tests.conftest import Server

SESSIONS = 4


def random_messages(clip: np.ndarray, rng: random.Random) -> list[bytes]:
    one = frames(clip, 1)
    out, i = [], 0
    while i < len(one):
        k = rng.randint(1, 64)
        out.append(b"".join(one[i : i + k]))
        i += k
    return out


def flatten(s: Session) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for m in s.messages:
        out.extend(split_results(m) if m["type"] == "results" else [m])
    return out


def strip(msgs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in m.items() if k != "session_id"} for m in msgs]


async def test_batch_equals_all_bit_for_bit(server: Server, model: str, speech_clip: np.ndarray) -> None:
    clips = [np.roll(speech_clip, 4096 * i)[: RATE * 4] for i in range(SESSIONS)]
    plans = [random_messages(c, random.Random(i)) for i, c in enumerate(clips)]
    runs = await asyncio.gather(
        *(
            run_session(server.ws, [*p, END], model=model, results=mode)
            for mode in ("all", "batch")
            for p in plans
        )
    )
    alls, batches = runs[:SESSIONS], runs[SESSIONS:]
    grouped = 0
    for a, b in zip(alls, batches, strict=True):
        assert a.errors == [] and b.errors == [] and b.close_code == a.close_code == 1000
        assert not any(m["type"] == "result" for m in b.messages), "batch mode sent a result"
        flat = flatten(b)
        results = [m for m in flat if m["type"] == "result"]
        assert results == a.results  # every step, time and float, exactly
        assert [m for m in flat if m["type"] == "event"] == a.events and a.events
        assert strip(flat[-1:]) == strip(a.messages[-1:])  # the summary
        batch_msgs = b.of("results")
        grouped += len(results) - len(batch_msgs)
        last_time = -1.0
        for i, m in enumerate(b.messages):
            if m["type"] == "results":
                assert m["times"][0] == (m["step"] + 1) * HOPS[model] / RATE
                assert all(len(v) == len(m["times"]) for v in m["scores"].values())
                assert list(m["scores"]) == b.ready["labels"]
                last_time = m["times"][-1]
            elif m["type"] == "event" and m is not b.messages[-1]:
                # after the results message of the hops that produced it (or a flush's tail)
                assert b.messages[i - 1]["type"] in ("results", "event")
                assert m["time"] <= last_time
    assert grouped > 0, "no results message carried several steps"


async def test_one_frame_per_message_batch_is_one_step_per_message(server: Server, model: str) -> None:
    clip = (np.sin(np.arange(RATE) / 9) * 3000).astype(np.int16)
    s = await run_session(server.ws, [*frames(clip, 1), END], model=model, results="batch")
    steps = [r["step"] for r in flatten(s) if r["type"] == "result"]
    assert steps == list(range(-(-RATE // HOPS[model]))) and s.close_code == 1000
    assert len(s.of("results")) <= len(steps)
    assert all(len(m["times"]) >= 1 for m in s.of("results"))


def test_results_message_is_columnar_and_splits_back() -> None:
    text = results_message(7, [0.5, 0.625], {"speech": [0.1, 0.2], "music": [0.3, 0.4]})
    msg = orjson.loads(text)
    assert msg == {
        "type": "results",
        "step": 7,
        "times": [0.5, 0.625],
        "scores": {"speech": [0.1, 0.2], "music": [0.3, 0.4]},
    }
    assert split_results(msg) == [
        {"type": "result", "step": 7, "time": 0.5, "scores": {"speech": 0.1, "music": 0.3}},
        {"type": "result", "step": 8, "time": 0.625, "scores": {"speech": 0.2, "music": 0.4}},
    ]
