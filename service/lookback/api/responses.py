"""The one HTTP error response: REST errors and pre-upgrade WebSocket refusals alike."""

from __future__ import annotations

from starlette.responses import JSONResponse

from lookback.protocol import error_body, spec_for

RETRY_AFTER_S = 1  # what a 503 asks a client to wait before it retries


def error_response(code: str, message: str, *, status: int | None = None) -> JSONResponse:
    """``{"error": {"code", "message"}}`` with the code's HTTP status (from protocol.py).

    A 401 names its scheme; a 503 says when to retry.
    """
    status = status or spec_for(code).http
    headers = {}
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if status == 503:
        headers["Retry-After"] = str(RETRY_AFTER_S)
    return JSONResponse(error_body(code, message), status_code=status, headers=headers or None)
