"""Run the app under uvicorn with a graceful drain on SIGTERM/SIGINT.

uvicorn's own shutdown closes every WebSocket at once with 1012; a streaming server
must first finish what it accepted. The first signal therefore marks the service
draining (``/readyz`` 503, new sessions 503), scores every open session's buffered
audio, sends its summary and closes it with 1001, and only then lets uvicorn exit.
A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import re
import signal
from types import FrameType
from typing import Any

import uvicorn

from lookback.api.state import ServiceState
from lookback.app import create_app
from lookback.settings import Settings
from lookback.workers import resolve_workers, supervise

log = logging.getLogger("lookback")
_SECRETS = re.compile(r"([?&]token=|authorization:\s*(?:bearer\s+)?)[^&\s\"]*", re.IGNORECASE)


class LogHygiene(logging.Filter):
    """Keeps API keys out of uvicorn's log lines, and one deliberate refusal out of ERROR.

    uvicorn logs every WebSocket handshake with its query string, and browsers send the
    key as ``?token=``; at debug level the handshake's headers are logged too, with
    ``Authorization``. Both values are replaced by ``***``. uvicorn 0.54's sansio protocol
    also logs "ASGI callable returned without completing handshake" at ERROR after every
    HTTP refusal before the upgrade (our 401/403/503; upstream PR #3138): dropped, so
    alerts on ERROR lines mean real errors, not load shedding.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if "returned without completing handshake" in msg:
            return False
        low = msg.lower()
        if "token=" not in low and "authorization:" not in low:
            return True
        if isinstance(record.args, tuple) and record.name == "uvicorn.access":
            # its formatter unpacks the args (client, method, path, ...): redact each one
            record.args = tuple(_SECRETS.sub(r"\1***", a) if isinstance(a, str) else a for a in record.args)
        else:
            record.msg, record.args = _SECRETS.sub(r"\1***", msg), ()
        return True


def install_log_hygiene() -> None:
    hygiene = LogHygiene()
    for name in ("uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).addFilter(hygiene)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, settings: Settings) -> None:
        super().__init__(config)
        self.settings = settings
        self._drain_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain_task is not None or self._loop is None:
            super().handle_exit(sig, frame)  # second signal: stop now
            return
        log.info("received %s: draining", signal.Signals(sig).name)
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        app = self.config.loaded_app
        svc = _find_state(app)
        try:
            if svc is not None:
                await svc.drain(self.settings.drain_grace_s)
        finally:
            self.should_exit = True


def _find_state(app: object) -> ServiceState | None:
    """The ServiceState of the app, looking through middleware wrappers."""
    for _ in range(8):
        state = getattr(getattr(app, "state", None), "lookback", None)
        if state is not None:
            return state
        app = getattr(app, "app", None)
        if app is None:
            return None
    return None


def uvicorn_config(app: Any, settings: Settings, *, port: int | None = None) -> uvicorn.Config:
    """The uvicorn configuration Lookback runs under (the bench's echo ceiling uses it too)."""
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port if port is None else port,
        log_level=settings.log_level,
        ws=settings.ws_impl,
        ws_max_size=settings.max_message_bytes * 4,
        ws_max_queue=32,
        ws_per_message_deflate=settings.ws_per_message_deflate,
        ws_ping_interval=settings.ws_ping_interval_s,
        limit_concurrency=settings.max_sessions + settings.max_queued_scores + 64,
        timeout_graceful_shutdown=max(1, int(settings.drain_grace_s)),
        access_log=settings.log_level == "debug",
        lifespan="on",
    )


def serve(settings: Settings) -> int:
    """Run the server until a signal; the process exit code. ``workers > 1``: a supervisor."""
    workers = resolve_workers(settings.workers)
    if workers > 1:
        logging.basicConfig(
            level=settings.log_level.upper(),
            format="%(asctime)s %(levelname)s [supervisor] %(name)s: %(message)s",
        )
        return supervise(settings, workers)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config = uvicorn_config(create_app(settings), settings)
    install_log_hygiene()  # after Config, which (re)configures uvicorn's loggers
    DrainingServer(config, settings).run()
    return 0
