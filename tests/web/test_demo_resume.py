"""The browser demo resumes after its server restarts (Redis state store, real Chromium).

The fake microphone streams speech; the server gets SIGTERM (it snapshots the session to
Redis and closes it with 4100) and is started again on the same port; the page keeps the
audio buffered, reconnects with its resume token, replays, and goes on. The final summary
must account for every frame the page took, with results gap-free and never duplicated.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SILERO
from tests.fixtures_services import redis_server, start_lookback
from tests.support import free_port
from tests.web import test_demo
from tests.web.test_demo import _pick, _report, open_page

pytestmark = pytest.mark.silero
# the real Chromium of the demo tests (module-scoped fixtures, shared by name)
playwright_api = test_demo.playwright_api
browser = test_demo.browser


def test_demo_resumes_after_server_restart(browser: Any, tmp_path: Path, silero_model: str) -> None:
    port = free_port()
    env = {"LOOKBACK_MODELS": SILERO, "LOOKBACK_DEFAULT_MODEL": SILERO, "LOOKBACK_DRAIN_GRACE_S": "5"}
    with redis_server(tmp_path) as url:
        env["LOOKBACK_STATE_STORE"] = url
        proc = start_lookback(tmp_path, port, env)
        try:
            with open_page(
                browser, f"http://127.0.0.1:{port}/demo/", allowed_errors=("WebSocket connection to",)
            ) as page:
                _pick(page, SILERO)
                page.page.click("#start")
                page.wait(
                    "() => window.lookbackDemo.state === 'streaming' && window.lookbackDemo.results >= 40", 25
                )
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(30) == 0
                page.wait("() => window.lookbackDemo.closes.some(c => c.code === 4100)", 10)
                proc = start_lookback(tmp_path, port, env)
                before = page.demo()["results"]
                page.wait(
                    f"() => window.lookbackDemo.resumes >= 1 && window.lookbackDemo.results >= {before + 40}",
                    30,
                )
                page.page.click("#stop")
                page.wait("() => window.lookbackDemo.state === 'closed' && window.lookbackDemo.summary", 15)
                d = page.demo()
                _report("resume", d)
                assert d["resumes"] == 1 and d["gapFree"] is True
                assert d["results"] == d["summary"]["steps"]
                assert d["summary"]["frames"] == d["framesTaken"]
                assert d["errors"] == [] and page.errors == [], (d["errors"], page.errors)
                page.screenshot("demo-resumed.png")
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
