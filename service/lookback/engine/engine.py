"""Engine: the transport-free data plane both the WebSocket and REST layers call.

It loads and warms the models and composes, per model, its graphs, state table, batched
step and micro-batcher (a ``ServedModel``); it opens streaming sessions, scores clips
and reports occupancy. Nothing here knows about HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncGenerator, AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from lookback.engine.batcher import MicroBatcher
from lookback.engine.compute import StepCompute
from lookback.engine.decoder import make_decoder
from lookback.engine.graph import CPU, run_warmup
from lookback.engine.offline import OfflineChunk, score_clip
from lookback.engine.pcm import Encoding
from lookback.engine.served import Occupancy, ServedModel
from lookback.engine.session import ResultSink, StreamSession
from lookback.engine.slabs import StateTable
from lookback.engine.store import StoreEntry, discover, open_graphs, open_multistep, version_key
from lookback.errors import ContractError, ModelNotFound
from lookback.metrics import Metrics
from lookback.settings import Settings

log = logging.getLogger("lookback.engine")


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. under taskset or a cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def inline_model_calls(mode: str, provider: str) -> bool:
    """Whether a model's calls run on the event loop instead of in an executor thread."""
    if mode == "auto":
        return provider == CPU and usable_cpus() == 1
    return mode == "inline"


class Engine:
    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.models: dict[str, ServedModel] = {}
        self.failed: dict[str, str] = {}  # model key (or store folder) -> why it is not served
        self._versions: dict[str, list[str]] = {}  # name -> versions, newest first
        self._offline = ThreadPoolExecutor(settings.max_concurrent_scores, thread_name_prefix="offline")
        self.ready = False

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Load every selected model; one that fails is logged and listed in ``failed`` and
        the others serve. Refuses to start only when no model loads at all."""
        broken: dict[str, str] = {}
        stored = self._select(discover(self.settings.model_store, broken), broken)
        wanted = self.settings.models
        self.failed.update(
            (k, v) for k, v in broken.items() if not wanted or {k, k.split("/")[0]} & set(wanted)
        )
        if not stored and not self.failed:
            raise ContractError(
                f"no models to serve in {self.settings.model_store} (wanted: {self.settings.models or 'all'})"
            )
        for sm in stored:
            try:
                handle = await asyncio.to_thread(self._load, sm)
            except Exception as exc:  # one bad model directory must not stop the others
                log.error("model %s failed to load and is not served: %s", sm.spec.key, exc)
                self.failed[sm.spec.key] = str(exc)
                continue
            await handle.batcher.start()
            self.models[handle.spec.key] = handle
            self._versions.setdefault(handle.spec.name, []).append(handle.spec.version)
            self.metrics.model_info.labels(handle.spec.key, handle.spec.version, handle.provider).set(1)
            log.info(
                "model %s ready on %s (hop %d, context %d, %s, up to %d hops per call, model calls %s)",
                handle.spec.key,
                handle.provider,
                handle.spec.hop_samples,
                handle.spec.context_samples,
                "sequence graph" if handle.sequence else "step graph only",
                handle.max_steps_per_call,
                "inline" if handle.batcher.inline else "in a thread",
            )
        if not self.models:
            why = "; ".join(f"{k}: {v}" for k, v in self.failed.items())
            raise ContractError(f"no model in {self.settings.model_store} could be loaded: {why}")
        for versions in self._versions.values():
            versions.sort(key=version_key, reverse=True)
        if self.settings.default_model not in self._versions:
            log.warning(
                "the default model %r is not loaded (loaded: %s): a client that names no model is refused",
                self.settings.default_model,
                sorted(self._versions),
            )
        self.ready = True
        self.metrics.ready.set(1)

    async def stop(self) -> None:
        self.ready = False
        self.metrics.ready.set(0)
        for handle in self.models.values():
            await handle.batcher.stop()
        self._offline.shutdown(wait=False, cancel_futures=True)

    def _select(self, stored: list[StoreEntry], broken: dict[str, str]) -> list[StoreEntry]:
        wanted = self.settings.models
        if not wanted:
            return stored
        chosen = []
        for sm in stored:
            if sm.spec.name in wanted or sm.spec.key in wanted:
                chosen.append(sm)
        missing = [w for w in wanted if not any(w in (s.spec.name, s.spec.key) for s in chosen)]
        missing = [w for w in missing if not any(w in (k, k.split("/")[0]) for k in broken)]  # failed
        if missing:
            raise ModelNotFound(f"models {missing} not found in {self.settings.model_store}")
        return chosen

    def _load(self, sm: StoreEntry) -> ServedModel:
        """Graphs, then the table, the batched step over both, the batcher over that step."""
        s = self.settings
        threads = {"intra_op_threads": s.intra_op_threads, "inter_op_threads": s.inter_op_threads}
        step, seq = open_graphs(sm, providers=s.providers, **threads)
        multistep = open_multistep(sm, providers=s.providers, **threads)
        capacity = s.max_sessions + s.max_concurrent_scores + s.max_queued_scores
        table = StateTable.for_model(
            sm.spec, initial_capacity=min(s.initial_slots, capacity), max_capacity=capacity
        )
        step_compute = StepCompute(sm.spec, step, table, multistep)
        run_warmup(step, step_compute.step_feeds, s.warmup_batch_sizes)
        max_steps = s.max_steps_per_call
        if step_compute.multistep_agrees():
            run_warmup(multistep, lambda b: step_compute.multistep_feeds(b, 2), s.warmup_batch_sizes)
        else:  # never serve numbers that depend on how steps were grouped
            log.warning(
                "model %s: the multi-step graph does not give the step graph's exact numbers "
                "on %s; running one hop per call",
                sm.spec.key,
                step.provider,
            )
            step_compute.multistep = None
            max_steps = 1
        if seq is not None:
            run_warmup(seq, lambda b: step_compute.sequence_feeds(1, b), [1, 64])
        batcher = MicroBatcher(
            step_compute,
            lambda: table.used,
            label=sm.spec.key,
            metrics=self.metrics,
            max_batch_size=s.max_batch_size,
            max_wait_ms=s.max_wait_ms,
            inline=inline_model_calls(s.model_calls, step.provider),
            adaptive_wait=s.adaptive_wait,
            fill_rows=s.batch_fill_rows,
        )
        return ServedModel(
            sm.spec,
            sm.path,
            step_compute,
            table,
            batcher,
            seq,
            step_compute.multistep,
            max_steps,
            self.settings.session_events_kept,
        )

    # -- lookup ----------------------------------------------------------------------------
    def resolve(self, name: str | None = None, version: str | None = None) -> ServedModel:
        name = name or self.settings.default_model
        versions = self._versions.get(name)
        if not versions:
            raise ModelNotFound(f"model {name!r} is not loaded; loaded: {sorted(self._versions)}")
        if version is None or version == "latest":
            version = versions[0]
        handle = self.models.get(f"{name}/{version}")
        if handle is None:
            raise ModelNotFound(
                f"model {name!r} has no version {version!r}; loaded: {versions}", code="unknown_version"
            )
        return handle

    @property
    def backlog(self) -> int:
        """Ready steps waiting for a batch, over all models (load-shedding signal)."""
        return sum(h.batcher.backlog for h in self.models.values())

    def occupancy(self) -> dict[str, Occupancy]:
        """Per model key: sessions holding a slot, slots allocated, steps waiting."""
        return {key: h.occupancy() for key, h in self.models.items()}

    @property
    def provider(self) -> str:
        providers = {h.provider for h in self.models.values()}
        return ",".join(sorted(providers)) if providers else "none"

    def describe(self) -> list[dict[str, Any]]:
        out = []
        for key, h in self.models.items():
            d = h.spec.model_dump(mode="json")
            d.update(
                key=key,
                provider=h.provider,
                sequence_graph=h.sequence is not None,
                latest=self._versions[h.spec.name][0] == h.spec.version,
                sessions=h.table.used,
                state_bytes_per_session=h.table.bytes_per_slot,
            )
            out.append(d)
        return out

    # -- work ------------------------------------------------------------------------------
    def open_session(
        self,
        handle: ServedModel,
        sink: ResultSink,
        *,
        encoding: Encoding = "pcm_s16le",
        sample_rate: int | None = None,
    ) -> StreamSession:
        """``sample_rate``: the client's, when it differs from the model's (None: the model's)."""
        spec = handle.spec
        decoder = make_decoder(
            encoding,
            sample_rate,
            spec.sample_rate,
            spec.frame_samples,
            max_amplitude=self.settings.max_float_amplitude,
        )
        return StreamSession(
            handle,
            sink,
            encoding=encoding,
            max_pending_steps=self.settings.max_pending_steps,
            decoder=decoder,
        )

    def score(
        self, handle: ServedModel, chunks: AsyncIterator[np.ndarray]
    ) -> AsyncGenerator[OfflineChunk, None]:
        return score_clip(handle, chunks, executor=self._offline, max_steps=self.settings.offline_chunk_steps)
