"""ServedModel: one loaded model version as the engine serves it.

The engine builds it in one go, in order: graphs, state table, the batched step over
them, the batcher over that step; nothing is attached afterwards. Sessions and offline
scoring get everything they need from here; the API layer only reads ``spec`` and goes
through the ``Engine`` for the rest.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from lookback.engine.batcher import Compute, MicroBatcher
from lookback.engine.compute import StepCompute
from lookback.engine.contract import Manifest
from lookback.engine.graph import OrtGraph
from lookback.engine.slabs import StateTable
from lookback.engine.step import FirstRow, Step
from lookback.errors import BadAudio


class Occupancy(NamedTuple):
    """How full a model is: sessions holding a slot, slots allocated, steps waiting."""

    used: int
    capacity: int
    backlog: int


@dataclass(eq=False)
class ServedModel:
    spec: Manifest
    path: Path  # the version folder
    step_compute: StepCompute
    table: StateTable
    batcher: MicroBatcher
    sequence: OrtGraph | None
    multistep: OrtGraph | None  # None: it did not prove bit-identical at load
    max_steps_per_call: int  # hops of one session one model call may take
    keep_events: int = 1000  # events a session keeps (settings.session_events_kept)

    @property
    def step(self) -> OrtGraph:
        """The step graph: one hop per call."""
        return self.step_compute.step

    @property
    def provider(self) -> str:
        return self.step.provider

    @property
    def compute(self) -> Compute:
        """The function the batcher runs per batch; replaceable (tests inject faults here)."""
        return self.batcher.compute

    @compute.setter
    def compute(self, fn: Compute) -> None:
        self.batcher.compute = fn

    def occupancy(self) -> Occupancy:
        return Occupancy(self.table.used, self.table.capacity, self.batcher.backlog)

    def submit(self, step: Step) -> None:
        """Queue a step built outside a session: a wrong length fails alone, not its batch."""
        n = self.spec.hop_samples * step.count
        p = step.payload
        if (len(p) != 2 * n) if isinstance(p, bytes) else (p.shape != (n,)):
            step.waiter.set_exception(
                BadAudio(f"a step must carry exactly {n} samples; refused before batching")
            )
            return
        self.batcher.submit(step)

    def submit_future(self, slot: int, index: int, payload: bytes | np.ndarray) -> asyncio.Future:
        """Submit one step and get a Future for its score row (tests, tools)."""
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self.submit(Step(slot, index, payload, FirstRow(fut), time.perf_counter()))
        return fut
