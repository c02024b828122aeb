"""``lookback.api.direct_send``: the hand-over behind the writer's direct-send fast path.

A result sent straight from the batcher's callback steps the send coroutine by hand;
if it suspends (transport paused), the writer task must finish it exactly as a Task
would have: wait, resume, and pass failures and cancellations into it.
"""

from __future__ import annotations

import asyncio

import pytest

from lookback.api.direct_send import finish_coroutine, start


async def sender(gate: asyncio.Future[str], log: list[str]) -> str:
    try:
        got = await gate
        log.append(f"resumed with {got}")
        await asyncio.sleep(0)  # a bare yield on the way
        return got.upper()
    except BaseException as exc:
        log.append(f"saw {type(exc).__name__}")
        raise


def step(coro: object) -> object:
    return coro.send(None)  # type: ignore[attr-defined]


async def test_a_suspended_send_completes_in_the_finishing_task() -> None:
    gate: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    log: list[str] = []
    coro = sender(gate, log)
    yielded = step(coro)
    assert yielded is gate  # suspended on the transport's future
    task = asyncio.create_task(finish_coroutine(coro, yielded))
    await asyncio.sleep(0)
    assert not task.done()
    gate.set_result("sent")
    assert await task == "SENT"
    assert log == ["resumed with sent"]


async def test_a_failure_of_the_awaited_future_reaches_the_coroutine() -> None:
    gate: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    log: list[str] = []
    coro = sender(gate, log)
    task = asyncio.create_task(finish_coroutine(coro, step(coro)))
    gate.set_exception(ConnectionResetError("peer gone"))
    with pytest.raises(ConnectionResetError):
        await task
    assert log == ["saw ConnectionResetError"]


async def test_cancelling_the_writer_cancels_the_suspended_send() -> None:
    gate: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    log: list[str] = []
    coro = sender(gate, log)
    task = asyncio.create_task(finish_coroutine(coro, step(coro)))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert log == ["saw CancelledError"]
    assert gate.cancelled()


async def test_start_reports_a_send_that_completes_without_suspending() -> None:
    async def quick() -> str:
        return "done"

    assert start(quick()) == (True, None)


async def test_start_hands_back_the_future_of_a_send_that_must_wait() -> None:
    gate: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    coro = sender(gate, [])
    finished, yielded = start(coro)
    assert not finished and yielded is gate
    gate.set_result("ok")
    assert await finish_coroutine(coro, yielded) == "OK"
