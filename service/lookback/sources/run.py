"""``lookback consume``: broker sources without the HTTP server (one engine, N sources)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from lookback.engine.engine import Engine
from lookback.metrics import Metrics
from lookback.settings import Settings
from lookback.sources import Source, open_source
from lookback.sources.monitor import MonitorServer

log = logging.getLogger("lookback.sources")


async def consume(settings: Settings, urls: list[str]) -> None:
    """Consume until SIGTERM/SIGINT, then commit what was read and hand devices back."""
    metrics = Metrics()
    engine = Engine(settings, metrics)
    await engine.start()
    sources: list[Source] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    monitor: MonitorServer | None = None
    if settings.consume_metrics_port:
        monitor = MonitorServer(
            metrics, sources, settings.consume_metrics_host, settings.consume_metrics_port
        )
        await monitor.start()  # /healthz answers (and /readyz says no) while the sources start
    try:
        for url in urls:
            src = open_source(url, engine, settings, metrics)
            await src.start()
            sources.append(src)
        where = f"; /metrics on port {monitor.port}" if monitor is not None else ""
        if monitor is not None:
            monitor.ready = True
        print(f"lookback consume: ready ({', '.join(s.name for s in sources)}){where}", flush=True)
        await stop.wait()
        log.info("stopping: committing what was read")
    finally:
        if monitor is not None:
            monitor.ready = False
        for src in sources:
            with contextlib.suppress(Exception):
                await src.stop()
        await engine.stop()
        if monitor is not None:
            await monitor.stop()
    scored = restored = 0.0
    for fam in metrics.registry.collect():
        for sample in fam.samples:
            if sample.name == "lookback_source_messages_total" and sample.labels.get("outcome") == "scored":
                scored += sample.value
            elif sample.name == "lookback_source_restores_total":
                restored += sample.value
    print(
        f"lookback consume: stopped ({scored:.0f} messages scored, {restored:.0f} devices restored)",
        flush=True,
    )


def main(settings: Settings, urls: list[str]) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    asyncio.run(consume(settings, urls or settings.sources))
