"""Helpers for resume tests: a message inbox that can be awaited on a condition."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import orjson
from websockets.exceptions import ConnectionClosed


class Inbox:
    """Every message of one connection, parsed; ``wait_for`` wakes on each new one."""

    def __init__(self, first: list[dict[str, Any]] | None = None) -> None:
        self.msgs: list[dict[str, Any]] = list(first or [])
        self._changed = asyncio.Event()

    async def run(self, ws: Any) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for m in ws:
                self.msgs.append(orjson.loads(m))
                self._changed.set()
        self._changed.set()

    async def wait_for(self, pred: Callable[[list[dict[str, Any]]], bool], within: float = 30) -> None:
        async with asyncio.timeout(within):
            while not pred(self.msgs):
                self._changed.clear()
                await self._changed.wait()
