"""The ``lookback`` command line: protocol, models, stream, score.

Most commands run in-process through ``lookback.cli.main`` against a running server;
one test drives the installed ``lookback`` script against a ``lookback serve``
subprocess, the way a user would.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import soundfile as sf

from lookback.cli import main
from lookback.engine.pcm import encode_g711
from lookback.protocol import CLOSE_CODES, ERRORS
from tests.api.ws_util import END, HOPS, manifest, require_model, run_session
from tests.conftest import (
    AUDIO,
    DEFAULT_MODEL,
    REPO,
    SILERO,
    STORE,
    Server,
    running_server,
    spawn_server,
)
from tests.conftest import test_settings as make_settings

SPEECH = AUDIO / "silero_ref_speech.wav"
EVENT_LINE = re.compile(r"^\s*(\d+\.\d{3})s\s+speech (start|end)$", re.M)


def _lookback() -> list[str]:
    script = Path(sys.executable).parent / "lookback"
    assert script.is_file(), f"the `lookback` console script is not installed next to {sys.executable}"
    return [str(script)]


def test_protocol_tables(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["protocol"]) == 0
    out = capsys.readouterr().out
    for code, spec in ERRORS.items():
        row = next((line for line in out.splitlines() if line.startswith(f"| `{code}` |")), None)
        assert row is not None, code
        assert f"| {spec.http} |" in row
        assert (f"closes {int(spec.close)}" if spec.close is not None else "stays open") in row
    for close in CLOSE_CODES:
        assert f"| {int(close)} |" in out


def test_protocol_via_the_console_script() -> None:
    out = subprocess.run(
        [*_lookback(), "protocol"], capture_output=True, text=True, check=True, cwd=REPO, timeout=60
    ).stdout
    assert all(f"`{code}`" in out for code in ERRORS)


@pytest.mark.parametrize("name", [SILERO, DEFAULT_MODEL])
def test_models_json(capsys: pytest.CaptureFixture[str], name: str) -> None:
    require_model(name)
    assert main(["models", "--json", "--model-store", str(STORE)]) == 0
    rows = {r["key"].split("/")[0]: r for r in json.loads(capsys.readouterr().out)}
    row = rows[name]
    assert row["status"] == "ok", row["status"]
    assert row["provider"] == "CPUExecutionProvider"
    assert row["contract"]["hop_samples"] == HOPS[name]
    assert row["contract"]["version"] == manifest(name)["version"]


def test_models_lists_both(capsys: pytest.CaptureFixture[str]) -> None:
    require_model(DEFAULT_MODEL)
    require_model(SILERO)
    assert main(["models", "--model-store", str(STORE)]) == 0
    out = capsys.readouterr().out
    for name in (SILERO, DEFAULT_MODEL):
        assert re.search(rf"^{re.escape(name)}/\S+: ok on CPUExecutionProvider$", out, re.M), out


def test_models_empty_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--model-store", str(tmp_path)]) == 1
    assert "no models" in capsys.readouterr().out


def _rest_events(server: Server, model: str) -> list[tuple[str, str]]:
    r = httpx.post(
        f"{server.url}/v1/score",
        params={"model": model},
        content=SPEECH.read_bytes(),
        headers={"content-type": "audio/wav"},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    return [(f"{e['time']:.3f}", e["event"]) for e in r.json()["events"]]


def test_stream_prints_events(server: Server, silero_model: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["stream", str(SPEECH), "--url", server.url, "--model", SILERO, "--frames-per-message", "4"])
        == 0
    )
    out = capsys.readouterr().out
    events = EVENT_LINE.findall(out)
    assert events and events[0][1] == "start" and events[1][1] == "end"
    assert events == _rest_events(server, SILERO)
    assert re.search(r"^summary: \d+ frames, \d+ steps, \d+ events$", out, re.M)


def test_stream_all_prints_results(
    server: Server, silero_model: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["stream", str(SPEECH), "--url", server.url, "--model", SILERO, "--all"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert lines and all(m["type"] == "result" for m in lines)
    assert [m["step"] for m in lines] == list(range(len(lines)))


def test_stream_default_model(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    require_model(DEFAULT_MODEL)
    assert main(["stream", str(SPEECH), "--url", server.url]) == 0
    events = EVENT_LINE.findall(capsys.readouterr().out)
    assert events and events == _rest_events(server, DEFAULT_MODEL)


def test_stream_and_score_a_file_at_its_own_rate(
    server: Server, silero_model: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An 8 kHz WAV: refused unless --sample-rate names its rate; streamed as µ-law it prints
    the events a raw ``/v1/stream?encoding=mulaw&sample_rate=8000`` session gets."""
    pcm, _ = sf.read(SPEECH, dtype="int16")
    wav = tmp_path / "call.wav"
    sf.write(wav, pcm[::2], 8000, subtype="PCM_16")  # any 8 kHz audio will do
    assert main(["stream", str(wav), "--url", server.url, "--model", SILERO]) == 2
    assert "error [bad_sample_rate]" in capsys.readouterr().err
    argv = ["stream", str(wav), "--url", server.url, "--model", SILERO, "--encoding", "mulaw"]
    assert main([*argv, "--sample-rate", "native"]) == 0
    events = EVENT_LINE.findall(capsys.readouterr().out)
    wire = encode_g711(pcm[::2], "mulaw")
    raw = asyncio.run(
        run_session(
            server.ws,
            [wire[i : i + 160] for i in range(0, len(wire), 160)] + [END],
            model=SILERO,
            encoding="mulaw",
            sample_rate=8000,
        )
    )
    assert events and events == [
        (f"{m['time']:.3f}", m["event"]) for m in raw.messages if m["type"] == "event"
    ]
    assert main(["score", str(wav), "--url", server.url, "--model", SILERO, "--sample-rate", "8000"]) == 0
    assert EVENT_LINE.findall(capsys.readouterr().out)
    assert main(["score", str(wav), "--url", server.url, "--model", SILERO, "--sample-rate", "48000"]) == 2
    assert "error [bad_sample_rate]" in capsys.readouterr().err


def test_score_prints_events(server: Server, silero_model: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["score", str(SPEECH), "--url", server.url, "--model", SILERO]) == 0
    out = capsys.readouterr().out
    assert EVENT_LINE.findall(out) == _rest_events(server, SILERO)
    version = manifest(SILERO)["version"]
    assert re.search(rf"^\d+ steps, \d+ events \({SILERO}/{re.escape(version)}\)$", out, re.M)
    assert main(["score", str(SPEECH), "--url", server.url, "--model", SILERO, "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["model"] == SILERO and body["events"]


def test_server_refusal_is_a_clean_error(
    server: Server, silero_model: str, capsys: pytest.CaptureFixture[str]
) -> None:
    for command in ("score", "stream"):
        assert main([command, str(SPEECH), "--url", server.url, "--model", "no-such-model"]) == 2
        err = capsys.readouterr().err
        assert "error [unknown_model]" in err and "Traceback" not in err


def test_wrong_api_key_is_a_clean_error(silero_model: str, capsys: pytest.CaptureFixture[str]) -> None:
    settings = make_settings(models=[SILERO], default_model=SILERO, api_keys=["k1"])
    with running_server(settings) as srv:
        for command in ("score", "stream"):
            argv = [command, str(SPEECH), "--url", srv.url, "--api-key", "wrong"]
            assert main(argv) == 2, command
            assert "error [unauthorized]" in capsys.readouterr().err
        assert main(["score", str(SPEECH), "--url", srv.url, "--api-key", "k1"]) == 0
        assert EVENT_LINE.findall(capsys.readouterr().out)


@pytest.mark.slow
def test_console_scripts_against_a_spawned_server(tmp_path: Path, silero_model: str) -> None:
    """``lookback serve`` in a subprocess, ``lookback stream`` and ``score`` against it."""
    env = {"LOOKBACK_MODELS": SILERO, "LOOKBACK_DEFAULT_MODEL": SILERO}
    with spawn_server(tmp_path, **env) as srv:
        streamed = subprocess.run(
            [*_lookback(), "stream", str(SPEECH), "--url", srv.url],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
        )
        scored = subprocess.run(
            [*_lookback(), "score", str(SPEECH), "--url", srv.url],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
        )
    assert streamed.returncode == 0, streamed.stderr
    assert scored.returncode == 0, scored.stderr
    events = EVENT_LINE.findall(streamed.stdout)
    assert events and events[0][1] == "start"
    assert EVENT_LINE.findall(scored.stdout) == events
