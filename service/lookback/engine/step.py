"""Step: the unit of work a session hands to its model's batcher, and its Waiter.

A step carries ``count`` consecutive hops of one session and their PCM: one on the hot
path, up to ``max_steps_per_call`` when audio arrived faster than it was scored. Its
result is its ``count`` score rows in hop order: a list holding one list of Python floats
for a one-hop step, a float32 array ``[count, labels]`` for more (the batcher's rows,
handed over without a Python object per hop). The waiter has the
``asyncio.Future`` completion interface, so the session can be its own waiter on the
streaming hot path.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np


class Waiter(Protocol):
    def set_result(self, result: Any) -> None: ...
    def set_exception(self, exception: BaseException) -> None: ...


class Step:
    """``count`` hops of one session: PCM bytes (pcm_s16le) or float32 samples in [-1, 1)."""

    __slots__ = ("count", "index", "payload", "slot", "t_arrival", "t_ready", "taken", "waiter")

    def __init__(
        self,
        slot: int,
        index: int,
        payload: bytes | np.ndarray,
        waiter: Waiter,
        t_arrival: float,
        count: int = 1,
    ) -> None:
        self.slot = slot
        self.index = index  # the session's index of the first hop
        self.payload = payload
        self.waiter = waiter
        self.t_arrival = t_arrival  # when the first hop arrived
        self.count = count
        self.t_ready = 0.0
        self.taken = False  # a batch took it: from then on it cannot grow

    def extend(self, payload: bytes | np.ndarray, count: int = 1) -> None:
        """Append ``count`` more hops (only while no batch has taken the step)."""
        if isinstance(self.payload, bytes):
            self.payload += payload
        else:
            self.payload = np.concatenate([self.payload, payload])
        self.count += count


class FirstRow:
    """Waiter adapter: resolves a Future with the first (only) row of a one-hop step."""

    __slots__ = ("future",)

    def __init__(self, future: Any) -> None:
        self.future = future

    def set_result(self, rows: list[list[float]]) -> None:
        self.future.set_result(rows[0])

    def set_exception(self, exception: BaseException) -> None:
        self.future.set_exception(exception)
