"""Security: constant-time key checks, no key text in logs, ``?token=`` for the WebSocket
only, and the browser Origin allow-list (403 before the upgrade)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import httpx
import orjson
import pytest

from lookback.api import auth
from lookback.server import LogHygiene
from tests.api.ws_util import SILERO_Q, refused, ws_connect
from tests.conftest import spawn_server
from tests.conftest import test_settings as make_settings

KEYS = ["right-key-Q1x9", "second-key-Q2y8"]
WRONG = [f"wrong-key-W{i}z7" for i in range(1, 6)]
ORIGINS = ["https://app.example", "https://other.example:8443"]


class _Counting:
    """Stands in for hmac.compare_digest: records each call, answers like the original."""

    def __init__(self, real: Callable[[bytes, bytes], bool]) -> None:
        self.real = real
        self.calls: list[tuple[type, type]] = []

    def __call__(self, a: bytes, b: bytes) -> bool:
        self.calls.append((type(a), type(b)))
        return self.real(a, b)


def test_key_ok_semantics(monkeypatch: pytest.MonkeyPatch) -> None:
    off = make_settings()
    assert not off.auth_enabled
    for given in (None, "", "anything", KEYS[0]):
        assert auth.key_ok(off, given)  # auth off: every request passes

    on = make_settings(api_keys=KEYS)
    for key in KEYS:
        assert auth.key_ok(on, key)
    for given in (
        None,
        "",
        " ",
        KEYS[0][:-1],
        KEYS[0] + "x",
        " " + KEYS[0],
        KEYS[0].upper(),
        KEYS[0] + KEYS[1],
        "right-key-Q1x9\n",
        "ключ",
        WRONG[0],
    ):
        assert not auth.key_ok(on, given), given

    # constant time: every check goes through hmac.compare_digest on bytes, once per
    # configured key, whether the key matches the first, the last or none (no early exit)
    counting = _Counting(auth.hmac.compare_digest)
    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    for given, ok in ((KEYS[0], True), (KEYS[1], True), (WRONG[0], False), ("x", False), ("y" * 500, False)):
        counting.calls.clear()
        assert auth.key_ok(on, given) is ok
        assert counting.calls == [(bytes, bytes)] * len(KEYS), given


def test_log_hygiene_redacts_query_tokens() -> None:
    rec = logging.LogRecord(
        "uvicorn.error",
        logging.INFO,
        __file__,
        1,
        '%s - "WebSocket %s" %d',
        ("127.0.0.1:1", "/v1/stream?model=m&token=s3cret&x=1&TOKEN=again", 401),
        None,
    )
    assert LogHygiene().filter(rec)
    assert rec.getMessage() == '127.0.0.1:1 - "WebSocket /v1/stream?model=m&token=***&x=1&TOKEN=***" 401'
    for header in ("< authorization: Bearer s3cret", "< Authorization: s3cret"):
        rec = logging.LogRecord("uvicorn.error", logging.DEBUG, __file__, 1, "%s", (header,), None)
        assert LogHygiene().filter(rec)
        assert "s3cret" not in rec.getMessage() and rec.getMessage().endswith("***")


async def test_keys_origins_and_logs_on_a_real_server(tmp_path: Path, silero_model: str) -> None:
    """One `lookback serve` at log level debug (access log on): wrong keys, right keys,
    ``?token=`` on REST and on the WebSocket, browser Origins. Afterwards the whole log
    holds none of the key strings, right or wrong."""
    env = {
        "LOOKBACK_MODELS": "silero-vad",
        "LOOKBACK_DEFAULT_MODEL": "silero-vad",
        "LOOKBACK_API_KEYS": ",".join(KEYS),
        "LOOKBACK_ALLOWED_ORIGINS": ",".join(ORIGINS),
        "LOOKBACK_LOG_LEVEL": "debug",
    }
    with spawn_server(tmp_path, **env) as srv:
        base = f"{srv.ws}/v1/stream?{SILERO_Q}"
        bearer = {"Authorization": f"Bearer {KEYS[0]}"}

        async def accepted(url: str, **kw: object) -> None:
            async with ws_connect(url, **kw) as ws:
                assert orjson.loads(await ws.recv())["type"] == "ready"
                await ws.send('{"type":"end"}')
                assert orjson.loads(await ws.recv())["type"] == "summary"

        async def denied(status: int, code: str, url: str, **kw: object) -> None:
            got, _, body = await refused(url, **kw)
            assert (got, orjson.loads(body)["error"]["code"]) == (status, code), url

        # WebSocket: a key by header or by ?token= (browsers cannot set headers)
        await denied(401, "unauthorized", base)
        await denied(401, "unauthorized", f"{base}&token={WRONG[0]}")
        await denied(401, "unauthorized", base, additional_headers={"Authorization": f"Bearer {WRONG[1]}"})
        await accepted(f"{base}&token={KEYS[0]}")
        await accepted(base, additional_headers={"Authorization": f"Bearer {KEYS[1]}"})
        # Origin: a listed browser origin passes, an unlisted one is 403 before the upgrade
        # (even with the right key), and a client that sends no Origin is not a browser
        await accepted(f"{base}&token={KEYS[0]}", origin=ORIGINS[0])
        await accepted(f"{base}&token={KEYS[1]}", origin=ORIGINS[1])
        await accepted(f"{base}&token={KEYS[0]}")
        for bad in (
            "https://evil.example",
            "https://app.example.evil.example",
            "null",
            "http://app.example",
            "https://other.example",
        ):
            await denied(403, "origin_not_allowed", f"{base}&token={KEYS[0]}", origin=bad)

        # REST: Authorization: Bearer only; ?token= is refused even with the right key
        async with httpx.AsyncClient(base_url=srv.url, timeout=10) as client:
            for params, headers, status in (
                (None, None, 401),
                (None, {"Authorization": f"Bearer {WRONG[2]}"}, 401),
                ({"token": KEYS[0]}, None, 401),
                ({"token": WRONG[3]}, None, 401),
                (None, bearer, 200),
            ):
                r = await client.get("/v1/models", params=params, headers=headers)
                assert r.status_code == status, (params, headers)
            r = await client.post(
                "/v1/score", params={"token": KEYS[1]}, content=b"RIFF", headers={"Content-Type": "audio/wav"}
            )
            assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        srv.terminate()
        assert srv.proc.wait(30) == 0

    log = srv.log.read_text()
    assert "token=***" in log  # the handshake lines are there, redacted
    assert "/v1/models" in log  # and so is the access log
    for secret in (*KEYS, *WRONG[:4]):
        assert secret not in log, f"{secret!r} leaked into the log"
    assert "Traceback" not in log
