"""Query strings: one value per parameter, on REST and the WebSocket alike."""

from __future__ import annotations

from starlette.requests import Request

from lookback.errors import RequestError


def check_unique_query(items: list[tuple[str, str]]) -> None:
    """A parameter given twice is refused (``duplicate_query``): which one counts would be
    a guess, and a proxy or a client library may pick differently from the server."""
    seen: set[str] = set()
    for key, _ in items:
        if key in seen:
            raise RequestError(f"query parameter {key[:40]!r} given more than once", code="duplicate_query")
        seen.add(key)


def unique_query(request: Request) -> None:
    """The REST router's dependency form of ``check_unique_query``."""
    check_unique_query(request.query_params.multi_items())
