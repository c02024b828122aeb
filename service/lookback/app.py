"""create_app(settings): the FastAPI app; its lifespan starts and stops the engine."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

from lookback import __version__, protocol
from lookback.api import rest, ws
from lookback.api.state import ServiceState
from lookback.engine.engine import Engine
from lookback.errors import LookbackError
from lookback.metrics import Metrics
from lookback.settings import Settings
from lookback.sources import open_sources

log = logging.getLogger("lookback")
WEB = Path(__file__).parent / "web"

DESCRIPTION = """Real-time inference server for streaming audio models.

Stream 128-sample PCM frames over the WebSocket `/v1/stream` (protocol in the README and
at `/protocol`), or score whole clips with `POST /v1/score`.
"""


def freeze_startup_heap() -> None:
    """Exclude what start-up loaded (libraries, models) from later full GC collections.

    Start-up leaves a large heap of long-lived objects (FastAPI, pydantic, numpy,
    onnxruntime). Python's full collections, which session churn and steady streaming
    trigger every few seconds, walked all of them: 30-60 ms with the event loop stopped,
    which at high load pushed every session's p99 past 20 ms. Frozen objects are still
    freed by reference counting; only the cycle detector skips them.
    """
    gc.collect()
    gc.freeze()


def create_app(
    settings: Settings | None = None, *, metrics: Metrics | None = None, engine: Engine | None = None
) -> FastAPI:
    settings = settings or Settings()
    metrics = metrics or Metrics()
    engine = engine or Engine(settings, metrics)
    svc = ServiceState(settings, engine, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        svc.start()
        if svc.resumer is not None:
            await svc.resumer.start(svc.connections)
        sources = open_sources(engine, settings, metrics, admit=lambda: (r := svc.refusal()) and r[0])
        for src in sources:  # broker sources share the engine (docs/sources.md)
            await src.start()
        if settings.gc_freeze:
            freeze_startup_heap()
        log.info("Lookback ready: %d model(s), provider %s", len(engine.models), engine.provider)
        try:
            yield
        finally:
            for src in sources:
                await src.stop()
            if not svc.draining:
                await svc.drain(settings.drain_grace_s)
            await svc.stop()
            if svc.resumer is not None:
                await svc.resumer.stop()
            await engine.stop()

    app = FastAPI(title="Lookback", version=__version__, description=DESCRIPTION, lifespan=lifespan)
    app.state.lookback = svc
    app.include_router(rest.router)
    app.include_router(ws.router)

    @app.exception_handler(LookbackError)
    async def _lookback_error(request: Request, exc: LookbackError) -> JSONResponse:
        metrics.error(exc.code)
        return rest.error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        metrics.error("bad_query")
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return rest.error_response(LookbackError(f"{where}: {first.get('msg', 'invalid')}", code="bad_query"))

    @app.get("/protocol", include_in_schema=False, response_class=PlainTextResponse)
    async def _protocol() -> str:
        """The WebSocket error and close codes, from the one definition in protocol.py."""
        return protocol.markdown_tables()

    if settings.demo_enabled and WEB.is_dir():
        app.mount("/demo", StaticFiles(directory=WEB, html=True), name="demo")

        @app.get("/", include_in_schema=False)
        async def _root() -> RedirectResponse:
            return RedirectResponse("/demo/")

    return app
