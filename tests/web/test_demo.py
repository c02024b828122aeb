"""The browser demo (service/lookback/web/) in a real headless Chromium.

Chromium's fake capture device plays a speech WAV as the microphone; the page takes it
at the AudioContext's native rate (44.1 or 48 kHz) in an AudioWorklet and streams it as
``pcm_f32le`` with that ``sample_rate`` to a real Lookback server (``running_server``),
which resamples it; ``?resample=browser`` (the fallback for rates the server does not
take) has the browser resample to 16 kHz and sends ``pcm_s16le`` frames. The tests read
what the page showed through its ``window.lookbackDemo`` hooks, fail on any console
error, and save screenshots under ``tests/artifacts/``. Driver: Playwright's Python
package with Debian's ``/usr/bin/chromium`` (``playwright install`` is never needed).
Without Chromium or Playwright the tests fail when ``CI`` is set and skip loudly otherwise.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import websockets.sync.client as ws_client

from lookback.engine.resample import Resampler
from tests.conftest import (
    AUDIO,
    DEFAULT_MODEL,
    REPO,
    SILERO,
    STORE,
    Server,
    running_server,
)
from tests.conftest import test_settings as make_settings

ARTIFACTS = REPO / "tests" / "artifacts"
SPEECH = AUDIO / "silero_ref_speech.wav"  # 16 kHz mono, speech 0.5-3.4 s, 4.6-7.1 s, 8.3-9.1 s
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
]
API_KEY = "demo-test-key"


def _missing(reason: str) -> None:
    """Fail under CI, skip loudly elsewhere: the demo test never passes silently."""
    msg = f"BROWSER DEMO TEST NOT RUN: {reason}"
    if os.environ.get("CI"):
        pytest.fail(msg, pytrace=False)
    warnings.warn(msg, stacklevel=2)  # shows in the warnings summary, not only as an "s"
    pytest.skip(msg)


def _chromium() -> str:
    for path in (os.environ.get("LOOKBACK_CHROMIUM"), shutil.which("chromium"), "/usr/bin/chromium"):
        if path and os.access(path, os.X_OK):
            return path
    _missing("Chromium is not installed (`apt-get install chromium`, or `make system-deps`)")
    raise AssertionError  # unreachable


def _models() -> list[str]:
    """Silero always; the default model too once it is in the store."""
    found = [SILERO]
    if any((STORE / DEFAULT_MODEL).glob("*/model.json")):
        found.insert(0, DEFAULT_MODEL)
    return found


MODELS = _models()
MODEL_PARAMS = [pytest.param(m, marks=pytest.mark.silero) if m == SILERO else m for m in MODELS]


@pytest.fixture(scope="module")
def playwright_api() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("the playwright package is not installed (pip install -e '.[dev]')")
    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def browser(playwright_api: Any) -> Iterator[Any]:
    """Chromium with a fresh profile whose fake microphone plays the speech clip (looped)."""
    exe = _chromium()
    with tempfile.TemporaryDirectory(prefix="lookback-chromium-") as profile:
        ctx = playwright_api.chromium.launch_persistent_context(
            profile,
            executable_path=exe,
            headless=True,
            viewport={"width": 1100, "height": 900},
            args=[*CHROMIUM_ARGS, f"--use-file-for-fake-audio-capture={SPEECH}"],
            timeout=30_000,
        )
        try:
            yield ctx
        finally:
            ctx.close()


@pytest.fixture(scope="module")
def demo_server(silero_model: str) -> Iterator[Server]:
    with running_server(make_settings(default_model=MODELS[0], models=MODELS)) as srv:
        yield srv


class Page:
    """A demo page plus every console error and uncaught exception it produced."""

    def __init__(self, browser: Any, url: str, *, allowed_errors: tuple[str, ...] = ()) -> None:
        self.page = browser.new_page()
        self.errors: list[str] = []
        self.allowed = allowed_errors
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))
        self.page.goto(url)

    def _console(self, msg: Any) -> None:
        if msg.type == "error" and not any(a in msg.text for a in self.allowed):
            self.errors.append(f"console: {msg.text}")

    def demo(self) -> dict[str, Any]:
        value: dict[str, Any] = self.page.evaluate("() => JSON.parse(JSON.stringify(window.lookbackDemo))")
        return value

    def wait(self, js: str, timeout_s: float = 20.0) -> None:
        try:
            self.page.wait_for_function(js, timeout=timeout_s * 1000, polling=100)
        except Exception as exc:
            raise AssertionError(f"page never reached `{js}`: {self.demo()}") from exc

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / name
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def close(self) -> None:
        self.page.close()


@contextlib.contextmanager
def open_page(browser: Any, url: str, **kw: Any) -> Iterator[Page]:
    page = Page(browser, url, **kw)
    try:
        yield page
    finally:
        page.close()


def _pick(page: Page, model: str) -> str:
    """Wait for the model picker to be filled from /v1/models and choose ``model``."""
    page.wait("() => window.lookbackDemo.models !== null && document.querySelector('#model').value")
    keys: list[str] = page.page.eval_on_selector_all("#model option", "os => os.map(o => o.value)")
    key = next(k for k in keys if k.split("/")[0] == model)
    page.page.select_option("#model", key)
    return key


def _report(name: str, d: dict[str, Any]) -> None:
    lat = sorted(d["latencies"])
    p50 = lat[len(lat) // 2] if lat else float("nan")
    print(
        f"\n[{name}] state={d['state']} results={d['results']} frames={d['framesSent']} "
        f"events={[(e['event'], round(e['time'], 2)) for e in d['events']]} "
        f"latency p50={p50:.1f} ms (page p50={d['p50']}, p95={d['p95']}, n={len(lat)})"
    )


def _model_frames(samples: int, rate: int, model_rate: int = 16000) -> int:
    """Model-rate frames a session is fed from ``samples`` at ``rate`` once the stream ends:
    the resampler's outputs up to the last input instant, the last frame zero-padded."""
    if rate == model_rate:
        return -(-samples // 128)
    r = Resampler(rate, model_rate)
    released = -(-samples * r.up // r.down)
    return -(-released // 128)


def _mic_session(page: Page, model: str) -> tuple[str, dict[str, Any]]:
    """Start the microphone, wait for speech, scores and latencies, stop; what the page saw."""
    key = _pick(page, model)
    page.page.click("#start")
    # The fake microphone loops the clip: speech begins 0.5 s in.
    page.wait(
        "() => { const d = window.lookbackDemo; return d.state === 'streaming' && "
        "d.events.some(e => e.event === 'start') && d.latencies.length >= 10 && "
        "d.ready && d.results * d.ready.hop_samples >= 3 * d.ready.sample_rate }",
        25,
    )
    page.screenshot(f"demo-microphone-{model}.png")
    page.page.click("#stop")
    page.wait("() => window.lookbackDemo.state === 'closed' && window.lookbackDemo.summary", 10)
    d = page.demo()
    _report(f"microphone {key}", d)
    assert f"{d['ready']['model']}/{d['ready']['version']}" == key
    assert d["ready"]["frame_samples"] == 128 and d["ready"]["sample_rate"] == 16000
    assert d["results"] > 0 and d["results"] == d["summary"]["steps"], d["summary"]
    assert d["summary"]["failed_steps"] == 0
    # every sample taken reached the session: the frames the server counted are the ones
    # the page's audio makes at the rate it declared
    assert (
        d["summary"]["frames"]
        == d["framesTaken"]
        == _model_frames(d["samplesTaken"], d["wire"]["sampleRate"])
    )
    return key, d


@pytest.mark.parametrize("model", MODEL_PARAMS)
def test_microphone_streams_scores_and_events(browser: Any, demo_server: Server, model: str) -> None:
    """The native rate: float32 at the context's rate, resampled by the server."""
    with open_page(browser, demo_server.url + "/") as page:  # "/" redirects to /demo/
        assert page.page.url.endswith("/demo/")
        _, d = _mic_session(page, model)
        shot = ARTIFACTS / f"demo-microphone-{model}.png"
        wire = d["wire"]
        assert wire["encoding"] == "pcm_f32le" and wire["resampledBy"] == "server", wire
        assert wire["sampleRate"] in (44100, 48000), wire
        assert any(
            f"sending pcm_f32le at {wire['sampleRate']} Hz (the server resamples)" in line
            for line in d["log"]
        )
        starts = [e for e in d["events"] if e["event"] == "start" and e["label"] == "speech"]
        assert starts, d["events"]
        assert d["latencies"] and 0 < d["p50"] <= d["p95"] < 1000, (d["p50"], d["p95"])
        assert d["errors"] == [] and d["closes"] == [{"code": 1000, "reason": "normal", "clean": True}]
        assert page.page.inner_text("#events").count("speech start") == len(starts)
        assert "Session ended normally" in page.page.inner_text("#message")
        assert page.errors == [], page.errors
        assert shot.stat().st_size > 10_000


def test_microphone_resampled_by_the_browser_where_asked(browser: Any, demo_server: Server) -> None:
    """The fallback (a device rate the server does not take; forced here by
    ``?resample=browser``): a context at 16 kHz, pcm_s16le frames of 128 samples, as before."""
    with open_page(browser, demo_server.url + "/demo/?resample=browser") as page:
        _, d = _mic_session(page, MODELS[0])
        assert d["wire"] == {"encoding": "pcm_s16le", "sampleRate": 16000, "resampledBy": "browser"}
        assert d["summary"]["frames"] == d["framesSent"] == d["samplesTaken"] // 128
        assert any(e["event"] == "start" for e in d["events"]), d["events"]
        assert d["errors"] == [] and page.errors == [], (d["errors"], page.errors)


@pytest.mark.parametrize("model", MODEL_PARAMS)
def test_wav_file_streams_at_real_time(browser: Any, demo_server: Server, model: str, tmp_path: Path) -> None:
    """A dropped/chosen WAV (48 kHz stereo here) is resampled, downmixed and streamed in real time."""
    clip, rate = sf.read(str(SPEECH), dtype="float32")
    head = clip[: int(4.5 * rate)]  # one utterance (0.5-3.4 s) and the silence after it
    up = np.interp(np.arange(len(head) * 3) / 3, np.arange(len(head)), head).astype(np.float32)
    wav = tmp_path / "utterance-48k-stereo.wav"
    sf.write(str(wav), np.stack([up, up * 0.5], axis=1), 48000, subtype="PCM_16")
    with open_page(browser, demo_server.url + "/demo/") as page:
        _pick(page, model)
        page.page.set_input_files("#file", str(wav))
        page.wait("() => window.lookbackDemo.state === 'streaming'", 10)
        page.wait("() => window.lookbackDemo.state === 'closed' && window.lookbackDemo.summary", 15)
        d = page.demo()
        _report(f"file {model}", d)
        assert d["source"] == "file"
        assert d["wire"]["resampledBy"] == "server" and d["wire"]["encoding"] == "pcm_f32le", d["wire"]
        # Real-time pace through the worklet: the whole 4.5 s (16 kHz) arrives (duration
        # counts audio received, not padding); the render quanta round it up a little.
        assert 4.5 * 16000 <= d["summary"]["duration"] * 16000 <= 4.5 * 16000 + 2048
        assert d["results"] == d["summary"]["steps"]
        # One utterance, 0.5-3.4 s: it opens with a start near 0.5 s and its last end falls
        # before the clip does (a model may split it at a pause: starts and ends alternate).
        ev = d["events"]
        assert [e["label"] for e in ev] == ["speech"] * len(ev) and len(ev) >= 2, ev
        assert [e["event"] for e in ev] == ["start", "end"] * (len(ev) // 2), ev
        assert 0.2 < ev[0]["time"] < 1.2 and 3.0 < ev[-1]["time"] < 4.5, ev
        assert d["errors"] == [] and page.errors == [], (d["errors"], page.errors)
        page.screenshot(f"demo-file-{model}.png")


@pytest.mark.silero
def test_refusals_are_explained(browser: Any, silero_model: str) -> None:
    """401 from the pre-check names the API key; a refused handshake reads "busy or refused (1006)"."""
    settings = make_settings(default_model=SILERO, models=[SILERO], api_keys=[API_KEY], max_sessions=1)
    with (
        running_server(settings) as srv,
        open_page(
            browser, srv.url + "/demo/", allowed_errors=("status of 401", "WebSocket connection to")
        ) as page,
    ):
        page.wait("() => window.lookbackDemo.state === 'error'", 10)
        assert "API key" in page.page.inner_text("#message")
        assert page.demo()["errors"][-1]["code"] == "unauthorized"
        page.page.fill("#token", API_KEY)
        page.page.press("#token", "Tab")  # change event: the picker reloads with the key
        _pick(page, SILERO)
        # Hold the only session slot, so the browser's handshake gets a 503.
        url = f"{srv.ws}/v1/stream?model={SILERO}&token={API_KEY}"
        with ws_client.connect(url, open_timeout=10) as held:
            assert '"ready"' in str(held.recv(timeout=10))
            page.page.click("#start")
            page.wait("() => window.lookbackDemo.state === 'error'", 10)
            assert "server busy or refused (1006)" in page.page.inner_text("#message")
            assert page.demo()["closes"][-1]["code"] == 1006
        page.screenshot("demo-refused.png")
        assert page.errors == [], page.errors
