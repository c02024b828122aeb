"""API-key checks: constant-time, keys never logged, ``?token=`` only for WebSockets.

Browsers cannot set headers on a WebSocket, so the stream endpoint also accepts the key
as a query parameter; REST insists on ``Authorization: Bearer`` so keys stay out of
access logs and proxies' URL caches.
"""

from __future__ import annotations

import hmac

from starlette.requests import HTTPConnection

from lookback.settings import Settings


def key_ok(settings: Settings, provided: str | None) -> bool:
    """True when auth is off, or ``provided`` equals one of the keys (constant time)."""
    if not settings.auth_enabled:
        return True
    if not provided:
        return False
    given = provided.encode()
    ok = False
    for key in settings.api_keys:  # compare against every key: no early exit to time
        ok |= hmac.compare_digest(given, key.get_secret_value().encode())
    return ok


def bearer(conn: HTTPConnection) -> str | None:
    header = conn.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value else None


def ws_key(conn: HTTPConnection) -> str | None:
    return bearer(conn) or conn.query_params.get("token")


def origin_ok(settings: Settings, conn: HTTPConnection) -> bool:
    """Browsers send Origin; non-browser clients usually do not and are not restricted."""
    if not settings.allowed_origins:
        return True
    origin = conn.headers.get("origin")
    return origin is None or origin in settings.allowed_origins
