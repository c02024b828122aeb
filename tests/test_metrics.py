"""BatchHistogram: array-fed, folded lazily, exported exactly like a native Histogram."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from lookback.metrics import LATENCY_BUCKETS, BatchHistogram


def _exposition(registry: CollectorRegistry) -> dict[str, float]:
    """Sample -> value; sums rounded, as numpy adds in another order than one by one."""
    out = {}
    for line in generate_latest(registry).decode().splitlines():
        if line.startswith("#") or "_created" in line:
            continue
        name, value = line.rsplit(" ", 1)
        out[name] = round(float(value), 12) if "_sum" in name else float(value)
    return out


@pytest.mark.parametrize("fold_every", [1, 7, 8192])
def test_matches_a_native_histogram_across_folds_and_scrapes(fold_every: int) -> None:
    ours_reg, native_reg = CollectorRegistry(), CollectorRegistry()
    ours = BatchHistogram("lat_seconds", "doc", ["model"], LATENCY_BUCKETS, ours_reg, fold_every=fold_every)
    native = Histogram("lat_seconds", "doc", ["model"], buckets=LATENCY_BUCKETS, registry=native_reg)
    rng = np.random.default_rng(1)
    edges = np.asarray(LATENCY_BUCKETS[:5])  # values exactly on a bound count as <= bound
    for i in range(60):
        label = ("a", "b", "c")[i % 3]
        values = np.concatenate([rng.exponential(0.01, rng.integers(0, 12)), edges[: i % 3]])
        ours.observe_many(values, label)
        for v in values:
            native.labels(label).observe(float(v))
        if i % 17 == 0:  # a scrape in the middle folds what is queued
            assert _exposition(ours_reg) == _exposition(native_reg)
    assert _exposition(ours_reg) == _exposition(native_reg)
    ours.observe(0.003, "a")
    native.labels("a").observe(0.003)
    assert _exposition(ours_reg) == _exposition(native_reg)


def test_queued_values_are_bounded() -> None:
    h = BatchHistogram("x_seconds", "doc", ["model"], LATENCY_BUCKETS, CollectorRegistry(), fold_every=100)
    for _ in range(50):
        h.observe_many(np.full(9, 0.001), "m")
        assert h._pending_n < 100
