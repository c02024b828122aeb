"""StateTable: every session's lookback buffers and recurrent states, one slab per tensor.

All access to the slabs goes through the table: state rows (``gather``/``scatter``), the
audio context rows (``gather_context``/``store_context``), slots (``acquire``/``release``).

Rows are batch-first ``[capacity, *shape]`` whatever the model's own batch axis; a batch
gathers ``slab[slots]``, moves the batch axis where the graph wants it, runs, and
scatters back. One table per model means one allocation per tensor, not per client, and
a batch touches memory with vectorised fancy indexing instead of a Python loop.

Threading: slots are taken and released on the event loop; gathers and scatters run in
the batcher's executor thread. Rows of different sessions never overlap, so the only
conflict is growth (which reallocates the slabs); ``lock`` serialises growth with a
running batch.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lookback.engine.contract import Manifest, np_dtype
from lookback.errors import CapacityError

CONTEXT = "__context__"


@dataclass(frozen=True)
class SlabSpec:
    name: str
    shape: tuple[int, ...]  # without batch
    dtype: np.dtype
    initial: float
    batch_axis: int = 0


class StateTable:
    def __init__(self, specs: Sequence[SlabSpec], *, initial_capacity: int, max_capacity: int):
        if initial_capacity < 1 or max_capacity < initial_capacity:
            raise ValueError("need 1 <= initial_capacity <= max_capacity")
        self.specs = {s.name: s for s in specs}
        self.max_capacity = max_capacity
        self.capacity = initial_capacity
        self.lock = threading.Lock()
        self.slabs: dict[str, np.ndarray] = {
            s.name: np.full((initial_capacity, *s.shape), s.initial, dtype=s.dtype) for s in specs
        }
        # Free list as a stack: the most recently freed (and reset) slot is reused first.
        self._free: list[int] = list(range(initial_capacity - 1, -1, -1))
        self._used = 0

    @classmethod
    def for_model(cls, spec: Manifest, *, initial_capacity: int, max_capacity: int) -> StateTable:
        """One slab per declared state, plus the context rows when the model has context."""
        slabs = [
            SlabSpec(s.input, tuple(s.shape), np_dtype(s.dtype), s.initial, s.batch_axis) for s in spec.states
        ]
        if spec.context_samples:
            # Window-wide rows ([context | spare hop]) so a batch's windows are gathered with
            # one contiguous take; the last hop_samples columns are never read.
            slabs.append(SlabSpec(CONTEXT, (spec.window_samples,), np.dtype(np.float32), 0.0))
        return cls(slabs, initial_capacity=initial_capacity, max_capacity=max_capacity)

    @property
    def used(self) -> int:
        return self._used

    @property
    def bytes_per_slot(self) -> int:
        return sum(int(np.prod(s.shape)) * s.dtype.itemsize for s in self.specs.values())

    def acquire(self) -> int:
        if not self._free:
            self._grow()
        slot = self._free.pop()
        self._used += 1
        return slot

    def release(self, slot: int) -> None:
        """Reset the row to its initial value, then make it reusable (never stale state)."""
        for spec in self.specs.values():
            self.slabs[spec.name][slot] = spec.initial
        self._free.append(slot)
        self._used -= 1

    def row(self, name: str, slot: int) -> np.ndarray:
        """A copy of one session's row of one slab (batch-first layout), for a snapshot."""
        return self.slabs[name][slot].copy()

    def set_row(self, name: str, slot: int, value: np.ndarray) -> None:
        """Overwrite one session's row (restore); shape and dtype must match the slab's."""
        spec = self.specs[name]
        if value.shape != spec.shape or value.dtype != spec.dtype:
            raise ValueError(f"row {name}: {value.dtype}{value.shape} is not {spec.dtype}{spec.shape}")
        self.slabs[name][slot] = value

    def _grow(self) -> None:
        if self.capacity >= self.max_capacity:
            raise CapacityError(f"state table full ({self.capacity} sessions)")
        new_cap = min(self.capacity * 2, self.max_capacity)
        with self.lock:
            for spec in self.specs.values():
                old = self.slabs[spec.name]
                slab = np.full((new_cap, *spec.shape), spec.initial, dtype=spec.dtype)
                slab[: self.capacity] = old
                self.slabs[spec.name] = slab
            self._free = list(range(new_cap - 1, self.capacity - 1, -1)) + self._free
            self.capacity = new_cap

    def gather(self, name: str, slots: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Rows for ``slots`` in the graph's layout (batch axis moved into place)."""
        spec = self.specs[name]
        if out is None:
            rows = self.slabs[name][slots]
        else:
            rows = np.take(self.slabs[name], slots, axis=0, out=out, mode="clip")
        if spec.batch_axis:
            rows = _to_batch_axis(rows, spec.batch_axis)
        return rows

    def scatter(self, name: str, slots: np.ndarray, value: np.ndarray) -> None:
        spec = self.specs[name]
        if spec.batch_axis:
            value = _from_batch_axis(value, spec.batch_axis)
        self.slabs[name][slots] = value

    def gather_context(self, slots: np.ndarray, out: np.ndarray) -> None:
        """Each slot's audio context into the first columns of ``out`` [n, context + hop]:
        the rows are window-wide, so this is one contiguous take with no temporary."""
        np.take(self.slabs[CONTEXT], slots, axis=0, out=out, mode="clip")

    def store_context(self, slots: np.ndarray, tail: np.ndarray) -> None:
        """The last ``context`` samples each slot saw: the context of its next window."""
        self.slabs[CONTEXT][slots, : tail.shape[1]] = tail


def _to_batch_axis(rows: np.ndarray, axis: int) -> np.ndarray:
    """[B, *shape] -> the graph's layout, contiguous (ORT would copy a strided input).

    When every dim ahead of the batch axis is 1 (a GRU's [1, B, H]) the two layouts share
    their memory order, so a reshape does it: about 2 us less per call than moveaxis.
    """
    ahead = rows.shape[1 : axis + 1]
    if all(d == 1 for d in ahead):
        return rows.reshape(ahead + rows.shape[:1] + rows.shape[axis + 1 :])
    return np.ascontiguousarray(np.moveaxis(rows, 0, axis))


def _from_batch_axis(value: np.ndarray, axis: int) -> np.ndarray:
    if all(d == 1 for d in value.shape[:axis]):
        return value.reshape(value.shape[axis : axis + 1] + value.shape[:axis] + value.shape[axis + 1 :])
    return np.moveaxis(value, axis, 0)
