"""StateTable: per-model slabs of session state, batch-first whatever the graph's axis."""

from __future__ import annotations

import numpy as np
import pytest

from lookback.engine.slabs import SlabSpec, StateTable
from lookback.errors import CapacityError

SPECS = [
    SlabSpec("conv", (3, 2), np.dtype(np.float32), 0.0, 0),
    SlabSpec("h", (2, 5), np.dtype(np.float32), 0.5, 1),  # graph layout [2, B, 5]
    SlabSpec("count", (4,), np.dtype(np.int64), 7, 0),
]


def table(initial: int = 2, maximum: int = 8) -> StateTable:
    return StateTable(SPECS, initial_capacity=initial, max_capacity=maximum)


def test_fresh_rows_hold_initial_values() -> None:
    t = table()
    assert t.slabs["conv"].shape == (2, 3, 2) and (t.slabs["conv"] == 0).all()
    assert t.slabs["h"].shape == (2, 2, 5) and (t.slabs["h"] == 0.5).all()
    assert t.slabs["count"].dtype == np.int64 and (t.slabs["count"] == 7).all()
    assert t.bytes_per_slot == 6 * 4 + 10 * 4 + 4 * 8


def test_bad_capacities_are_refused() -> None:
    with pytest.raises(ValueError):
        StateTable(SPECS, initial_capacity=0, max_capacity=4)
    with pytest.raises(ValueError):
        StateTable(SPECS, initial_capacity=4, max_capacity=2)


def test_release_resets_to_initial_including_non_zero() -> None:
    t = table()
    a, b = t.acquire(), t.acquire()
    assert {a, b} == {0, 1} and t.used == 2
    for name in t.slabs:
        t.slabs[name][a] = 99
        t.slabs[name][b] = 42
    t.release(a)
    assert t.used == 1
    assert (t.slabs["conv"][a] == 0).all()
    assert (t.slabs["h"][a] == 0.5).all()
    assert (t.slabs["count"][a] == 7).all()
    # the other session's row is untouched
    assert all((t.slabs[name][b] == 42).all() for name in t.slabs)
    # the freed slot is reused, and comes back clean
    assert t.acquire() == a
    assert (t.slabs["h"][a] == 0.5).all() and (t.slabs["count"][a] == 7).all()


def test_growth_preserves_rows_and_respects_max() -> None:
    t = table(initial=2, maximum=5)
    slots = [t.acquire(), t.acquire()]
    for i, s in enumerate(slots):
        t.slabs["h"][s] = i + 1.0
        t.slabs["count"][s] = 100 + i
    slots += [t.acquire()]  # grows 2 -> 4
    assert t.capacity == 4
    slots += [t.acquire()]
    slots += [t.acquire()]  # grows 4 -> 5 (capped at max)
    assert t.capacity == 5 and sorted(slots) == [0, 1, 2, 3, 4] and t.used == 5
    assert (t.slabs["h"][slots[0]] == 1.0).all() and (t.slabs["h"][slots[1]] == 2.0).all()
    assert list(t.slabs["count"][slots[:2], 0]) == [100, 101]
    # new rows start from the initial values
    assert (t.slabs["h"][slots[2:]] == 0.5).all() and (t.slabs["count"][slots[2:]] == 7).all()
    with pytest.raises(CapacityError) as info:
        t.acquire()
    assert info.value.code == "server_busy"
    assert t.used == 5  # a refused acquire takes nothing
    t.release(slots[3])
    assert t.acquire() == slots[3]


def test_gather_scatter_round_trip_with_batch_axis_1() -> None:
    t = table(initial=8)
    for s in range(8):
        t.acquire()
        t.slabs["h"][s] = np.arange(10, dtype=np.float32).reshape(2, 5) + 100 * s
        t.slabs["conv"][s] = s
    slots = np.array([5, 1, 6], dtype=np.intp)
    h = t.gather("h", slots)
    assert h.shape == (2, 3, 5) and h.flags.c_contiguous  # the graph's [2, B, 5]
    for j, s in enumerate(slots):
        np.testing.assert_array_equal(h[:, j, :], t.slabs["h"][s])
    conv = t.gather("conv", slots)
    assert conv.shape == (3, 3, 2) and (conv[:, 0, 0] == slots).all()
    # a model step writes new state in graph layout; scatter puts each column in its row
    before = t.slabs["h"].copy()
    t.scatter("h", slots, h * -1.0)
    for s in slots:
        np.testing.assert_array_equal(t.slabs["h"][s], -before[s])
    untouched = [s for s in range(8) if s not in slots]
    np.testing.assert_array_equal(t.slabs["h"][untouched], before[untouched])
    # gather(scatter(x)) == x
    new = np.random.default_rng(0).normal(size=(2, 3, 5)).astype(np.float32)
    t.scatter("h", slots, new)
    np.testing.assert_array_equal(t.gather("h", slots), new)


@pytest.mark.parametrize("scratch", [False, True])
def test_batch_axis_behind_size_1_dims_is_a_view(scratch: bool) -> None:
    """A GRU's [1, B, H]: the gathered rows keep their memory, in the graph's layout."""
    t = StateTable(
        [SlabSpec("h", (1, 5), np.dtype(np.float32), 0.0, batch_axis=1)], initial_capacity=8, max_capacity=8
    )
    for s in range(8):
        t.acquire()
        t.slabs["h"][s] = np.arange(5) + 10 * s
    slots = np.array([6, 0, 3], dtype=np.intp)
    out = np.empty((3, 1, 5), np.float32) if scratch else None
    h = t.gather("h", slots, out=out)
    assert h.shape == (1, 3, 5) and h.flags.c_contiguous
    if out is not None:
        assert np.shares_memory(h, out)
    np.testing.assert_array_equal(h[0], t.slabs["h"][slots, 0])
    new = -h.copy()
    t.scatter("h", slots, new)
    np.testing.assert_array_equal(t.gather("h", slots), new)
    assert (t.slabs["h"][[1, 2, 4, 5, 7]] >= 0).all()


def test_gather_returns_a_copy() -> None:
    t = table()
    s = t.acquire()
    rows = t.gather("conv", np.array([s]))
    rows += 1
    assert (t.slabs["conv"][s] == 0).all()
