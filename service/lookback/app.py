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
from starlette.datastructures import State

from lookback import __version__, protocol
from lookback.api import rest, telephony, ws
from lookback.api.admission import Admission
from lookback.api.connection import Connections
from lookback.api.responses import error_response
from lookback.api.resume import Resumer
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


def _refused(admission: Admission) -> str | None:
    """Why a broker source must not open a new device session now (same rules as a WebSocket)."""
    refusal = admission.refusal()
    return refusal[0] if refusal is not None else None


async def drain(state: State, grace: float) -> None:
    """Refuse new work, then finish every open session with a summary and 1001 in ``grace``."""
    state.admission.draining = True
    state.metrics.ready.set(0)
    await state.connections.drain(grace)


def create_app(
    settings: Settings | None = None, *, metrics: Metrics | None = None, engine: Engine | None = None
) -> FastAPI:
    settings = settings or Settings()
    metrics = metrics or Metrics()
    engine = engine or Engine(settings, metrics)
    admission = Admission(settings, engine)
    connections = Connections(settings, metrics, engine)
    resumer = Resumer(settings, metrics) if settings.resume_enabled else None
    connections.resumer = resumer

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        connections.start()
        if resumer is not None:
            await resumer.start(connections)
        sources = open_sources(engine, settings, metrics, admit=lambda: _refused(admission))
        for src in sources:  # broker sources share the engine (docs/sources.md)
            await src.start()
        if settings.gc_freeze:
            freeze_startup_heap()
        log.info("Lookback ready: %d model(s), provider %s", len(engine.models), engine.provider)
        try:
            yield
        finally:
            for src in sources:  # commit what was read and hand devices back before the drain
                await src.stop()
            if not admission.draining:
                await drain(app.state, settings.drain_grace_s)
            await connections.stop()
            if resumer is not None:
                await resumer.stop()
            await engine.stop()

    app = FastAPI(title="Lookback", version=__version__, description=DESCRIPTION, lifespan=lifespan)
    # What routes need, each its own object (no god object): see lookback.api.
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.engine = engine
    app.state.admission = admission
    app.state.connections = connections
    app.state.resumer = resumer  # None when resume is off (docs/sessions.md)
    app.include_router(rest.router)
    app.include_router(ws.router)
    app.include_router(telephony.router)

    @app.exception_handler(LookbackError)
    async def _lookback_error(request: Request, exc: LookbackError) -> JSONResponse:
        metrics.error(exc.code)
        return error_response(exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        metrics.error("bad_query")
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error_response("bad_query", f"{where}: {first.get('msg', 'invalid')}")

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
