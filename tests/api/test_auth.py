"""API keys (REST: ``Authorization: Bearer`` only; WebSocket: header or ``?token=``), Origin.

WebSocket refusals are HTTP answers before the upgrade, so the ``websockets`` client
sees ``InvalidStatus`` with the status and the JSON body.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from lookback.protocol import Close
from tests.api.ws_util import END, run_session, score, stream_url
from tests.conftest import SILERO, Server, running_server
from tests.conftest import test_settings as make_settings

KEY = {"Authorization": "Bearer k1"}
KEY2 = {"Authorization": "Bearer k2"}
WRONG = {"Authorization": "Bearer nope"}


@pytest.fixture(scope="module")
def auth_server(silero_model: str) -> Iterator[Server]:
    settings = make_settings(
        models=[SILERO], default_model=SILERO, api_keys=["k1", "k2"], allowed_origins=["https://ok.example"]
    )
    with running_server(settings) as srv:
        yield srv


@pytest.fixture(scope="module")
def locked_metrics_server(silero_model: str) -> Iterator[Server]:
    settings = make_settings(
        models=[SILERO], default_model=SILERO, api_keys=["k1"], metrics_require_auth=True
    )
    with running_server(settings) as srv:
        yield srv


def _assert_unauthorized(r: httpx.Response) -> None:
    assert r.status_code == 401, r.text
    assert r.json()["error"]["code"] == "unauthorized"
    assert r.headers["www-authenticate"] == "Bearer"


# -- REST ----------------------------------------------------------------------------------------


def test_rest_requires_a_key(auth_server: Server, speech_wav: bytes) -> None:
    for headers in (
        {},
        WRONG,
        {"Authorization": "k1"},
        {"Authorization": "Basic azE6"},
        {"Authorization": "Bearer k1k2"},
    ):
        _assert_unauthorized(auth_server.get("/v1/models", headers=headers))
        _assert_unauthorized(score(auth_server.url, speech_wav, headers=headers))
    for headers in (KEY, KEY2, {"Authorization": "bearer k1"}):
        assert auth_server.get("/v1/models", headers=headers).status_code == 200
    r = score(auth_server.url, speech_wav, headers=KEY)
    assert r.status_code == 200 and r.json()["model"] == SILERO


def test_rest_refuses_the_query_token(auth_server: Server, speech_wav: bytes) -> None:
    """``?token=`` is for browsers' WebSockets only; REST keys stay out of URLs."""
    _assert_unauthorized(auth_server.get("/v1/models", params={"token": "k1"}))
    _assert_unauthorized(score(auth_server.url, speech_wav, token="k1"))


def test_health_is_open(auth_server: Server) -> None:
    assert auth_server.get("/healthz").status_code == 200
    assert auth_server.get("/readyz").status_code == 200
    assert auth_server.get("/metrics").status_code == 200  # metrics_require_auth is off


def test_metrics_can_require_the_key(locked_metrics_server: Server) -> None:
    srv = locked_metrics_server
    _assert_unauthorized(srv.get("/metrics"))
    _assert_unauthorized(srv.get("/metrics", headers=WRONG))
    _assert_unauthorized(srv.get("/metrics", params={"token": "k1"}))
    r = srv.get("/metrics", headers=KEY)
    assert r.status_code == 200 and "lookback_ready" in r.text
    assert srv.get("/healthz").status_code == 200
    assert srv.get("/readyz").status_code == 200


def test_auth_off_needs_no_key(server: Server, silero_model: str) -> None:
    assert not server.settings.auth_enabled
    assert server.get("/v1/models").status_code == 200
    assert server.get("/v1/models", headers=WRONG).status_code == 200  # ignored when off


# -- WebSocket --------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["header", "header-k2", "query"])
async def test_ws_accepts_the_key(auth_server: Server, how: str) -> None:
    if how == "query":
        s = await run_session(auth_server.ws, [END], token="k1")
    else:
        s = await run_session(auth_server.ws, [END], headers=KEY if how == "header" else KEY2)
    assert s.ready["model"] == SILERO
    assert s.close_code == Close.NORMAL


async def _refused(url: str, headers: dict[str, str] | None = None) -> InvalidStatus:
    with pytest.raises(InvalidStatus) as info:
        async with connect(url, compression=None, additional_headers=headers):
            pass
    return info.value


@pytest.mark.parametrize(
    ("query", "headers"),
    [
        ({}, None),
        ({"token": "nope"}, None),
        ({"token": ""}, None),
        ({}, WRONG),
        ({"token": "k1"}, WRONG),  # a wrong header is not rescued by the query
    ],
)
async def test_ws_refuses_without_the_key(
    auth_server: Server, query: dict[str, str], headers: dict[str, str] | None
) -> None:
    exc = await _refused(stream_url(auth_server.ws, **query), headers)
    assert exc.response.status_code == 401
    body = json.loads(bytes(exc.response.body or b""))
    assert body["error"]["code"] == "unauthorized"


async def test_ws_origin_allow_list(auth_server: Server) -> None:
    url = stream_url(auth_server.ws, token="k1")
    exc = await _refused(url, {"Origin": "https://evil.example"})
    assert exc.response.status_code == 403
    assert json.loads(bytes(exc.response.body or b""))["error"]["code"] == "origin_not_allowed"
    s = await run_session(auth_server.ws, [END], headers={"Origin": "https://ok.example"}, token="k1")
    assert s.close_code == Close.NORMAL
    s = await run_session(auth_server.ws, [END], token="k1")  # no Origin: not a browser
    assert s.close_code == Close.NORMAL


async def test_origin_is_checked_before_the_key(auth_server: Server) -> None:
    exc = await _refused(stream_url(auth_server.ws), {"Origin": "https://evil.example"})
    assert exc.response.status_code == 403
