"""Prometheus metrics on an injectable registry (never the global one).

Per-step histograms (queue wait, frame-to-result latency) are observed a whole batch at
a time with numpy: prometheus-client's ``observe`` takes a lock and ~1 us per call,
which at tens of thousands of steps per second would cost a noticeable share of a core.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Sequence

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.004,
    0.006,
    0.008,
    0.010,
    0.015,
    0.020,
    0.030,
    0.050,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


class BatchHistogram(Collector):
    """A labelled histogram fed with arrays; exported like a native Histogram.

    Arrays are only queued on the hot path and bucketed ``fold_every`` values at a time
    (or at scrape): numpy's per-call cost would otherwise be paid per batch, about 8 us,
    which at batches of 20 steps is most of a microsecond per step.
    """

    def __init__(
        self,
        name: str,
        doc: str,
        labelnames: Sequence[str],
        buckets: Sequence[float],
        registry: CollectorRegistry,
        *,
        fold_every: int = 8192,
        multiprocess: bool = False,
    ) -> None:
        self.name, self.doc, self.labelnames = name, doc, tuple(labelnames)
        self.bounds = np.asarray(buckets, dtype=np.float64)
        self.fold_every = fold_every
        self._series: dict[tuple[str, ...], list] = {}
        self._pending: dict[tuple[str, ...], list[np.ndarray]] = {}
        self._pending_n = 0
        self._lock = threading.Lock()  # a scrape may come from another thread
        # Under --workers N a scrape reads every worker's files, not this object: folds go
        # into a native Histogram's shared values instead (see Metrics, multiprocess).
        self._native: Histogram | None = None
        if multiprocess:
            self._native = Histogram(name, doc, labelnames, buckets=buckets, registry=registry)
        else:
            registry.register(self)

    def observe_many(self, values: np.ndarray, *labels: str) -> None:
        """Record ``values`` (the caller must not modify the array afterwards)."""
        if values.size == 0:
            return
        with self._lock:
            queued = self._pending.get(labels)
            if queued is None:
                queued = self._pending[labels] = []
            queued.append(values)
            self._pending_n += values.size
            if self._pending_n >= self.fold_every:
                self._fold()

    def observe(self, value: float, *labels: str) -> None:
        self.observe_many(np.asarray([value], dtype=np.float64), *labels)

    def flush(self) -> None:
        """Fold what is queued now (multiprocess mode: other workers' scrapes cannot)."""
        with self._lock:
            self._fold()

    def _fold(self) -> None:
        for labels, arrays in self._pending.items():
            values = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
            if self._native is not None:
                self._fold_native(labels, values)
                continue
            series = self._series.get(labels)
            if series is None:
                series = self._series[labels] = [np.zeros(self.bounds.size + 1, np.int64), 0.0]
            idx = np.searchsorted(self.bounds, values, side="left")
            series[0] += np.bincount(idx, minlength=self.bounds.size + 1)
            series[1] += float(values.sum())
        self._pending.clear()
        self._pending_n = 0

    def _fold_native(self, labels: tuple[str, ...], values: np.ndarray) -> None:
        """Add a bucketed array to the native histogram: one shared-value write per bucket.

        Uses the Histogram child's per-bucket values (non-cumulative, as ``observe`` keeps
        them), so the exposition and the multiprocess collector treat it as their own.
        """
        assert self._native is not None
        child = self._native.labels(*labels) if labels else self._native
        counts = np.bincount(
            np.searchsorted(self.bounds, values, side="left"), minlength=self.bounds.size + 1
        )
        for i in np.flatnonzero(counts):
            child._buckets[int(i)].inc(float(counts[i]))
        child._sum.inc(float(values.sum()))

    def collect(self) -> Iterable[HistogramMetricFamily]:
        if self._native is not None:
            return
        with self._lock:
            self._fold()
            snapshot = [(labels, counts.copy(), total) for labels, (counts, total) in self._series.items()]
        fam = HistogramMetricFamily(self.name, self.doc, labels=self.labelnames)
        for labels, counts, total in snapshot:
            cum = np.cumsum(counts)
            buckets = [(_fmt(b), int(c)) for b, c in zip(self.bounds, cum[:-1], strict=True)]
            buckets.append(("+Inf", int(cum[-1])))
            fam.add_metric(list(labels), buckets, total)
        yield fam

    def describe(self) -> Iterable[HistogramMetricFamily]:
        yield HistogramMetricFamily(self.name, self.doc, labels=self.labelnames)


def _fmt(b: float) -> str:
    return repr(float(b))


def multiprocess_dir() -> str | None:
    """The shared metrics folder when prometheus-client runs in multiprocess mode.

    prometheus-client picks its value storage when it is imported, from
    ``PROMETHEUS_MULTIPROC_DIR``; ``lookback serve --workers N`` sets it before it starts
    the workers, so every worker writes its values to files there.
    """
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    return path if path and values.ValueClass is not values.MutexValue else None


# lookback_resumes_total{outcome}: lookback.api.resume maps every refusal code to one of these
RESUME_OUTCOMES = (
    "ok",
    "invalid",
    "forbidden",
    "unknown",
    "expired",
    "used",
    "conflict",
    "incompatible",
    "unavailable",
    "rotated",
    "error",
)


class Metrics:
    """Every metric Lookback exports. Label values are bounded: model keys, reasons, codes.

    Multiprocess mode (``--workers N``): values live in files shared by every worker, and
    ``registry`` is the one a scrape reads: it merges every worker's files, so any worker
    answers for the whole server. Gauges say how to merge: sessions, backlog and slots sum
    over live workers; ready is the minimum (1 only when every live worker is ready).
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.multiprocess = registry is None and multiprocess_dir() is not None
        if self.multiprocess:
            from prometheus_client.multiprocess import MultiProcessCollector

            # the metric objects register here only for their name checks; scrapes read files
            r = CollectorRegistry(auto_describe=True)
            self.registry = CollectorRegistry()
            MultiProcessCollector(self.registry, multiprocess_dir())
        else:
            self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
            r = self.registry
        self.sessions_active = Gauge(
            "lookback_sessions_active",
            "Open streaming sessions",
            ["model"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.sessions_started = Counter(
            "lookback_sessions_started_total", "Streaming sessions accepted", ["model"], registry=r
        )
        self.sessions_ended = Counter(
            "lookback_sessions_ended_total",
            "Streaming sessions ended, by reason",
            ["model", "reason"],
            registry=r,
        )
        self.sessions_refused = Counter(
            "lookback_sessions_refused_total",
            "Connections refused before a session started (shed load, auth, bad request)",
            ["reason"],
            registry=r,
        )
        self.frames = Counter(
            "lookback_frames_received_total", "128-sample frames accepted", ["model"], registry=r
        )
        self.steps = Counter("lookback_steps_total", "Model steps run (hops scored)", ["model"], registry=r)
        self.batches = Counter(
            "lookback_batches_total", "Model calls made by the micro-batcher", ["model"], registry=r
        )
        self.batch_failures = Counter(
            "lookback_batch_failures_total",
            "Model calls that raised; all their steps failed",
            ["model"],
            registry=r,
        )
        self.batch_size = Histogram(
            "lookback_batch_size",
            "Steps per batch (a session may bring several hops)",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.model_run = Histogram(
            "lookback_model_run_seconds",
            "Wall time of one batched model call (gather, run, scatter)",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.model_cpu_share = Gauge(
            "lookback_model_cpu_share",
            "Share of the process's CPU spent in model calls (gather, run, scatter), last window",
            ["model"],
            registry=r,
            multiprocess_mode="liveall",
        )
        self.process_busy = Gauge(
            "lookback_process_busy_ratio",
            "Process CPU seconds per wall second over the last window (1 = one core)",
            ["model"],
            registry=r,
            multiprocess_mode="liveall",
        )
        self.batch_wait_budget = Gauge(
            "lookback_batch_wait_budget_seconds",
            "How long a small batch may wait to fill now (adaptive: grows with load)",
            ["model"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.queue_wait = BatchHistogram(
            "lookback_queue_wait_seconds",
            "Time a ready step waited for its batch to start",
            ["model"],
            LATENCY_BUCKETS,
            r,
            multiprocess=self.multiprocess,
        )
        self.frame_latency = BatchHistogram(
            "lookback_frame_to_result_seconds",
            "From arrival of the frame that completed a step to its result handed to the transport",
            ["model"],
            LATENCY_BUCKETS,
            r,
            multiprocess=self.multiprocess,
        )
        self.backlog = Gauge(
            "lookback_backlog_steps",
            "Ready steps waiting for the batcher",
            ["model"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.slots = Gauge(
            "lookback_state_slots",
            "State-table rows",
            ["model", "kind"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.errors = Counter(
            "lookback_errors_total", "Errors sent to clients, by code", ["code"], registry=r
        )
        self.bytes_in = Counter(
            "lookback_bytes_received_total", "Audio bytes received", ["transport"], registry=r
        )
        self.bytes_out = Counter("lookback_bytes_sent_total", "Result bytes sent", ["transport"], registry=r)
        self.offline_clips = Counter(
            "lookback_offline_clips_total", "Clips scored offline", ["model"], registry=r
        )
        self.offline_seconds = Counter(
            "lookback_offline_audio_seconds_total", "Audio seconds scored offline", ["model"], registry=r
        )
        self.model_info = Gauge(
            "lookback_model_info",
            "Loaded models: version and active execution provider",
            ["model", "version", "provider"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.ready = Gauge(
            "lookback_ready", "1 when models are loaded and warm", registry=r, multiprocess_mode="livemin"
        )
        self.snapshots = Counter(
            "lookback_snapshots_written_total",
            "Session snapshots written to the state store, by reason",
            ["reason"],
            registry=r,
        )
        self.snapshot_bytes = Counter(
            "lookback_snapshot_bytes_total", "Bytes of session snapshots written", registry=r
        )
        self.snapshot_write = Histogram(
            "lookback_snapshot_write_seconds",
            "Wall time of one checkpoint round's store write (all sessions, one round trip)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.resumes = Counter(
            "lookback_resumes_total",
            "Resume attempts by outcome (ok, expired, unknown, forbidden, conflict, incompatible, ...)",
            ["outcome"],
            registry=r,
        )
        self.replayed_samples = Counter(
            "lookback_replayed_samples_total",
            "Audio samples clients re-sent after a resume (as they report with ?sent=)",
            registry=r,
        )
        self.sessions_migrated = Counter(
            "lookback_sessions_migrated_total",
            "Sessions snapshotted on drain and closed with 4100 to resume on another replica",
            registry=r,
        )
        self.store_up = Gauge(
            "lookback_state_store_up",
            "1 while the session state store is reachable",
            ["kind"],
            registry=r,
            multiprocess_mode="livemax",
        )
        # -- broker sources (docs/sources.md) --
        self.source_messages = Counter(
            "lookback_source_messages_total",
            "Broker messages by outcome (scored, rejected) and rejection reason",
            ["source", "outcome", "reason"],
            registry=r,
        )
        self.source_devices = Gauge(
            "lookback_source_devices_active",
            "Devices with an open worker on this consumer",
            ["source"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.source_sessions = Counter(
            "lookback_source_sessions_total",
            "Device sessions opened, and ended by reason (end, idle, gap)",
            ["source", "reason"],
            registry=r,
        )
        self.source_gaps = Counter(
            "lookback_source_gaps_total",
            "Sequence gaps by the policy applied",
            ["source", "policy"],
            registry=r,
        )
        self.source_gap_messages = Counter(
            "lookback_source_gap_messages_total", "Messages missing in sequence gaps", ["source"], registry=r
        )
        self.source_restores = Counter(
            "lookback_source_restores_total",
            "Device sessions restored from a checkpoint (restart, rebalance, claim)",
            ["source"],
            registry=r,
        )
        self.source_admission_waits = Counter(
            "lookback_source_admission_waits_total",
            "Times a new device session waited for admission (capacity, backlog)",
            ["source", "reason"],
            registry=r,
        )
        self.source_groups_recreated = Counter(
            "lookback_source_groups_recreated_total",
            "Redis consumer groups made again after their partition stream (or the group) was deleted",
            ["source"],
            registry=r,
        )
        self.source_bytes = Counter(
            "lookback_source_bytes_total",
            "Audio bytes of the broker messages fed to device sessions",
            ["source"],
            registry=r,
        )
        self.source_steps = Counter(
            "lookback_source_steps_total",
            "Steps scored and published for broker devices",
            ["source"],
            registry=r,
        )
        self.source_lag = Gauge(
            "lookback_source_lag_messages",
            "Messages behind the end of each partition (Kafka: high watermark - position; "
            "Redis: the consumer group's lag on the partition stream)",
            ["source", "partition"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.source_fetch_pauses = Counter(
            "lookback_source_fetch_pauses_total",
            "Times a Kafka consumer paused fetching its partitions because the core was saturated",
            ["source"],
            registry=r,
        )
        self.source_rebalances = Counter(
            "lookback_source_rebalances_total",
            "Partitions this consumer was assigned, had revoked (handed over) or lost",
            ["source", "change"],
            registry=r,
        )
        self.source_commit_seconds = Histogram(
            "lookback_source_commit_seconds",
            "Publish + checkpoint + acknowledge of one consumed message",
            ["source"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.source_latency = Histogram(
            "lookback_source_publish_latency_seconds",
            "From the producer's timestamp in a message to its results published (clocks must agree)",
            ["source"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

        # Series that exist from the start (at 0), so the dashboard's rate() and the alerts
        # see them before the first resume or snapshot.
        for outcome in RESUME_OUTCOMES:
            self.resumes.labels(outcome)
        for reason in ("checkpoint", "disconnect", "drain"):
            self.snapshots.labels(reason)

    def flush(self) -> None:
        """Fold the array-fed histograms now (multiprocess: before another worker scrapes)."""
        self.queue_wait.flush()
        self.frame_latency.flush()

    def error(self, code: str) -> None:
        self.errors.labels(code).inc()
