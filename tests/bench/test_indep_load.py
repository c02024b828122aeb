"""The independent load generator measures a real server: every hop answered, in order."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import running_server

REPO = Path(__file__).resolve().parents[2]
WAV = REPO / "tests" / "fixtures" / "audio" / "silero_ref_speech.wav"


def test_it_streams_real_time_sessions_and_accounts_every_result(tmp_path: Path) -> None:
    out = tmp_path / "indep.json"
    with running_server() as srv:
        argv = [sys.executable, "-m", "tests.bench.indep_load", "--url", srv.ws, "--sessions", "4"]
        argv += ["--seconds", "1", "--warmup", "0.3", "--wav", str(WAV), "--json", str(out)]
        argv += ["--p99-ms", "1000"]  # a loaded CI machine: this checks accounting, not speed
        done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.exists(), done.stderr[-2000:]
    res = json.loads(out.read_text())
    assert done.returncode == 0, (done.stdout, done.stderr, res)
    assert res["passed"] and res["lost"] == 0 and res["errors"] == 0 and res["out_of_order"] == 0
    assert res["summaries"] == 4
    # every verified session's scores equal REST's for the bytes it sent (another graph: 1e-5)
    assert res["verified_sessions"] == 4 and res["verify_max_abs_diff"] <= 1e-5, res
    # 4 sessions x 125 results a second over the 1 s window, give or take the edges and a
    # loaded machine's late sends
    assert 250 <= res["results_measured"] <= 600, res
