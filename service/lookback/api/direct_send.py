"""Finishing, in another task, a send coroutine that was first stepped by hand.

The WebSocket writer's fast path sends a result straight from the batcher's callback,
without a task switch: it calls ``coro.send(None)`` on ``ws.send(...)``. That completes at
once unless the transport is paused; if it suspends, the writer task takes the coroutine
over with ``finish_coroutine`` and drives it to the end exactly as a Task would.

What it replaces: ``asyncio.create_task(ws.send(...))`` per result (one task and one
loop iteration per message), or queueing every result for the writer task (a wake-up
and a task switch per message). Both cost capacity at full load; this path costs none
unless the client reads slowly.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


async def finish_coroutine(coro: Coroutine[Any, Any, Any], yielded: Any) -> Any:
    """Run ``coro`` to completion in the calling task, after a hand step yielded ``yielded``.

    ``yielded`` is the future the coroutine waits on (None for a bare yield). Do what a
    Task does: wait for it, then resume the coroutine, passing in a failure or a
    cancellation of ours.
    """
    while True:
        try:
            if yielded is None:
                await asyncio.sleep(0)
            else:
                # A Task clears this flag on the future its coroutine yielded before
                # waiting on it; awaiting it again with the flag set is refused.
                yielded._asyncio_future_blocking = False
                await yielded
        except BaseException as exc:  # the coroutine decides what a failure means
            try:
                yielded = coro.throw(exc)
            except StopIteration as stop:
                return stop.value
            continue
        try:
            yielded = coro.send(None)
        except StopIteration as stop:
            return stop.value


def start(coro: Coroutine[Any, Any, Any]) -> tuple[bool, Any]:
    """Step ``coro`` once: (True, None) when it finished, (False, yielded) when it waits.

    A failure of the first step propagates to the caller.
    """
    try:
        yielded = coro.send(None)
    except StopIteration:
        return True, None
    return False, yielded
