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
from starlette.datastructures import State

from lookback import transport
from lookback.app import create_app, drain
from lookback.metrics import Metrics
from lookback.settings import Settings

log = logging.getLogger("lookback")
# ?token=<key> in a URL, and the whole value of an Authorization header in any scheme
# (Bearer, Basic, Token, none), as "authorization: v" or as a ('authorization', 'v') pair
_SECRETS = re.compile(
    r"([?&]token=)[^&\s\"']*|((?:proxy-)?authorization['\"]?\s*[:,=]\s*b?['\"]?)[^\r\n'\"]*",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    return _SECRETS.sub(lambda m: (m.group(1) or m.group(2)) + "***", text)


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
        if "token=" not in low and "authorization" not in low:
            return True
        if isinstance(record.args, tuple) and record.name == "uvicorn.access":
            # its formatter unpacks the args (client, method, path, ...): redact each one
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        else:
            record.msg, record.args = redact(msg), ()
        return True


def install_log_hygiene() -> None:
    """On uvicorn's loggers and on every handler, so records of other loggers that reach a
    handler (websockets' handshake lines at debug level) are redacted too."""
    hygiene = LogHygiene()
    for name in ("uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).addFilter(hygiene)
    for name in ("", "uvicorn", "uvicorn.error", "uvicorn.access"):
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(hygiene)


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
        """Sessions get most of the grace; uvicorn's own shutdown the rest, so the process
        exits within ``drain_grace_s`` even with clients that stopped reading."""
        loop = asyncio.get_running_loop()
        grace = self.settings.drain_grace_s
        deadline = loop.time() + grace
        reserve = min(2.0, grace / 4)
        state = _find_state(self.config.loaded_app)
        try:
            if state is not None:
                await drain(state, grace - reserve)
        finally:
            self.config.timeout_graceful_shutdown = max(0.1, deadline - loop.time() - 0.5)  # type: ignore[assignment]
            self.should_exit = True


def _find_state(app: object) -> State | None:
    """The Lookback app's state, looking through middleware wrappers."""
    for _ in range(8):
        state = getattr(app, "state", None)
        if isinstance(state, State) and hasattr(state, "admission"):
            return state
        app = getattr(app, "app", None)
        if app is None:
            return None
    return None


def uvicorn_config(
    app: Any, settings: Settings, *, port: int | None = None, metrics: Metrics | None = None
) -> uvicorn.Config:
    """The uvicorn configuration Lookback runs under (the bench's echo ceiling uses it too).

    With the sansio WebSocket implementation (the default) the HTTP and WebSocket
    protocols are ``lookback.transport``'s guarded ones: head timeout and size bounds, a
    connection limit that spares health checks, WebSocket send timeouts.
    """
    guarded = settings.ws_impl == "websockets-sansio"
    http_cls, ws_cls = transport.protocols(settings, metrics)
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port if port is None else port,
        log_level=settings.log_level,
        http=http_cls if guarded else "auto",
        ws=ws_cls if guarded else settings.ws_impl,
        ws_max_size=settings.max_message_bytes * 4,
        ws_max_queue=32,
        ws_per_message_deflate=settings.ws_per_message_deflate,
        ws_ping_interval=settings.ws_ping_interval_s,
        # not limit_concurrency: it answers a plain 503 to /healthz too (see lookback.transport)
        limit_concurrency=None if guarded else settings.connection_limit,
        timeout_keep_alive=settings.keep_alive_timeout_s,
        timeout_graceful_shutdown=max(1, int(settings.drain_grace_s)),
        access_log=settings.log_level == "debug",
        lifespan="on",
    )


def serve(settings: Settings) -> int:
    """Run one server process until a signal; the process exit code (``--workers N``:
    ``lookback.workers.serve`` supervises N of these)."""
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    metrics = Metrics()
    config = uvicorn_config(create_app(settings, metrics=metrics), settings, metrics=metrics)
    install_log_hygiene()  # after Config, which (re)configures uvicorn's loggers
    DrainingServer(config, settings).run()
    return 0
