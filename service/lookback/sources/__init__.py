"""Broker sources: audio that arrives on a message broker, scored per device (docs/sources.md).

``open_sources`` builds one adapter per URL of ``LOOKBACK_SOURCES``; each owns a
``DeviceHub`` (the shared core) over the same engine as the WebSocket sessions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from lookback.metrics import Metrics
from lookback.settings import Settings
from lookback.sources.core import SourceOptions


class Source(Protocol):
    name: str

    async def start(self) -> None: ...

    async def stop(self) -> None:
        """Read no more, commit everything read, release what this consumer owned."""

    def alive(self) -> bool:
        """False once the source's background work has died (``/healthz`` fails)."""


def open_source(
    url: str,
    engine: Any,
    settings: Settings,
    metrics: Metrics,
    *,
    admit: Callable[[], str | None] | None = None,
) -> Source:
    opts = SourceOptions.from_settings(settings)
    if url.startswith(("redis://", "rediss://", "unix://")):
        from lookback.sources.redis_streams import RedisStreamsSource

        return RedisStreamsSource(
            url,
            engine,
            opts,
            metrics,
            lease_s=settings.source_lease_s,
            checkpoint_ttl_s=settings.source_checkpoint_ttl_s,
            admit=admit,
        )
    if url.startswith(("mqtt://", "mqtts://")):
        from lookback.sources.mqtt import MqttSource

        return MqttSource(url, engine, opts, metrics, settings=settings, admit=admit)
    if url.startswith("kafka://"):
        from lookback.sources.kafka import KafkaSource

        return KafkaSource(url, engine, opts, metrics, settings=settings, admit=admit)
    raise ValueError(f"a source must be a redis://, mqtt:// or kafka:// URL, not {url[:40]!r}")


def open_sources(
    engine: Any, settings: Settings, metrics: Metrics, *, admit: Callable[[], str | None] | None = None
) -> list[Source]:
    return [open_source(u, engine, settings, metrics, admit=admit) for u in settings.sources]
