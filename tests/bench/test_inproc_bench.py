"""The in-process data-plane bench drives today's connection and engine (its API changes
would otherwise show only when someone runs the bench)."""

from __future__ import annotations

import argparse

from tests.bench.inproc_bench import CALLS, REPO, _run


def test_each_measurement_runs_on_this_tree() -> None:
    args = argparse.Namespace(sessions=4, seconds=0.3, n=2000)
    rows = _run(REPO, "rows", args)
    assert 0 < rows["input_us"] < 1000 and 0 < rows["result_us"] < 1000
    for kind in ("loop1", "loop10"):
        assert _run(REPO, kind, args)["us_per_message"] > 0
    calls = _run(REPO, "call", args)
    assert set(calls) == {f"{n}x{k}_us" for n, k in CALLS}
    assert all(0 < us < 100_000 for us in calls.values())
