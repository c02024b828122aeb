"""Step: the unit of work a session hands to its model's batcher, and its Waiter.

A step carries one hop of one session and its PCM; its result is the hop's score row.
The waiter has the
``asyncio.Future`` completion interface, so a plain Future works (tests, tools) and the
session can be its own waiter on the streaming hot path.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np


class Waiter(Protocol):
    def set_result(self, result: Any) -> None: ...
    def set_exception(self, exception: BaseException) -> None: ...


class Step:
    """One hop of one session: PCM bytes (pcm_s16le) or float32 samples in [-1, 1)."""

    __slots__ = ("index", "payload", "slot", "t_arrival", "t_ready", "waiter")

    def __init__(
        self, slot: int, index: int, payload: bytes | np.ndarray, waiter: Waiter, t_arrival: float
    ) -> None:
        self.slot = slot
        self.index = index
        self.payload = payload
        self.waiter = waiter
        self.t_arrival = t_arrival
        self.t_ready = 0.0
