"""A loaded model: manifest + graphs + state table, and the batched step computation.

``compute`` is the only code that touches ONNX inputs on the streaming path. It runs in
the batcher's executor thread: it builds the ``[B, context + hop]`` window from the
context slab and the steps' new samples, feeds gathered states, runs, scatters states
and the new context back, and returns one score row per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lookback.engine.contract import ModelSpec
from lookback.engine.guard import reset_non_finite
from lookback.engine.runtime import GraphRuntime
from lookback.engine.state import CONTEXT, SlabSpec, StateTable
from lookback.errors import BadAudio
from lookback.metrics import Metrics

if TYPE_CHECKING:
    from lookback.engine.batcher import MicroBatcher, Step

_S16 = np.dtype("<i2")
_NP_DTYPES = {
    "float32": np.float32,
    "float16": np.float16,
    "int64": np.int64,
    "int32": np.int32,
    "int16": np.int16,
}


def np_dtype(name: str) -> np.dtype:
    return np.dtype(_NP_DTYPES[name])


@dataclass
class ModelHandle:
    spec: ModelSpec
    path: Path
    step: GraphRuntime
    sequence: GraphRuntime | None
    table: StateTable
    metrics: Metrics
    batcher: MicroBatcher = field(init=False)
    # derived once, used per batch
    _constants: dict[str, np.ndarray] = field(init=False)
    _s16_scale: np.float32 = field(init=False)
    _f32_scale: np.float32 | None = field(init=False)
    _buffers: dict[str, np.ndarray] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        spec = self.spec
        self._constants = {c.name: np.full(c.shape, c.value, dtype=np_dtype(c.dtype)) for c in spec.constants}
        raw = spec.audio_input.scale == "raw"
        self._s16_scale = np.float32(1.0 if raw else 1.0 / 32768.0)
        self._f32_scale = np.float32(32768.0) if raw else None

    @property
    def provider(self) -> str:
        return self.step.provider

    @staticmethod
    def slab_specs(spec: ModelSpec) -> list[SlabSpec]:
        slabs = [
            SlabSpec(s.input, tuple(s.shape), np_dtype(s.dtype), s.initial, s.batch_axis) for s in spec.states
        ]
        if spec.context_samples:
            # Window-wide rows ([context | spare hop]) so a batch's windows are gathered with
            # one contiguous take; the last hop_samples columns are never read.
            slabs.append(SlabSpec(CONTEXT, (spec.window_samples,), np.dtype(np.float32), 0.0))
        return slabs

    # -- the batched step (executor thread) ---------------------------------------------
    def compute(self, batch: Sequence[Step]) -> np.ndarray:
        spec = self.spec
        n = len(batch)
        ctx, hop = spec.context_samples, spec.hop_samples
        window = self._scratch("window", n, (ctx + hop,))
        slots = np.array([s.slot for s in batch], dtype=np.intp)
        table = self.table
        with table.lock:
            if ctx:  # context rows are window-wide: one contiguous take, no temporary
                np.take(table.slabs[CONTEXT], slots, axis=0, out=window, mode="clip")
            self._fill_audio(window[:, ctx:], batch)
            feeds = dict(self._constants)
            feeds[spec.audio_input.name] = window if spec.audio_input.layout == "BT" else window[:, None, :]
            for st in spec.states:
                feeds[st.input] = table.gather(
                    st.input, slots, out=self._scratch(st.input, n, tuple(st.shape))
                )
            outs = dict(zip(self.step.output_names, self.step.run(feeds), strict=True))
            reset_non_finite(spec, outs, n)
            for st in spec.states:
                table.scatter(st.input, slots, outs[st.output])
            if ctx:
                table.slabs[CONTEXT][slots, :ctx] = window[:, -ctx:]
        return self._scores(outs, n)

    def _scratch(self, name: str, n: int, shape: tuple[int, ...]) -> np.ndarray:
        """A reusable [n, *shape] buffer: fresh megabyte arrays per batch cost page faults.

        Only the batcher's single executor thread calls ``compute``, so reuse is safe.
        """
        buf = self._buffers.get(name)
        if buf is None or buf.shape[0] < n:
            dtype = (
                np.float32
                if name == "window"
                else np_dtype(next(s.dtype for s in self.spec.states if s.input == name))
            )
            buf = np.empty((max(n, 2 * (0 if buf is None else buf.shape[0])), *shape), dtype)
            self._buffers[name] = buf
        return buf[:n]

    def _fill_audio(self, dest: np.ndarray, batch: Sequence[Step]) -> None:
        """Write each step's new samples into ``dest`` [n, hop], refusing a wrong length."""
        hop = self.spec.hop_samples
        payloads = [s.payload for s in batch]
        # join takes any buffer: a float32 payload (4 bytes a sample) makes the blob longer
        # than n int16 hops, so the length alone tells an all-int16 batch (the common case).
        blob = b"".join(payloads)  # type: ignore[arg-type]
        if len(blob) == len(payloads) * hop * 2 and type(payloads[0]) is bytes:
            np.multiply(
                np.frombuffer(blob, _S16).reshape(len(payloads), hop),
                self._s16_scale,
                out=dest,
                casting="unsafe",
            )
            return
        for i, p in enumerate(payloads):
            if isinstance(p, bytes):
                if len(p) != hop * 2:
                    raise BadAudio(f"a step must carry exactly {hop} samples ({hop * 2} bytes)")
                np.multiply(np.frombuffer(p, _S16), self._s16_scale, out=dest[i], casting="unsafe")
            else:
                if p.shape != (hop,):
                    raise BadAudio(f"a step must carry exactly {hop} samples, got {p.shape}")
                dest[i] = p if self._f32_scale is None else p * self._f32_scale

    def _scores(self, outs: dict[str, np.ndarray], n: int) -> np.ndarray:
        cols = [
            np.asarray(outs[o.name], dtype=np.float32).reshape(n, len(o.labels)) for o in self.spec.outputs
        ]
        return cols[0] if len(cols) == 1 else np.concatenate(cols, axis=1)

    # -- warm-up -------------------------------------------------------------------------
    def step_feeds(self, batch: int) -> dict[str, np.ndarray]:
        spec = self.spec
        audio = np.zeros((batch, spec.window_samples), np.float32)
        feeds = dict(self._constants)
        feeds[spec.audio_input.name] = audio if spec.audio_input.layout == "BT" else audio[:, None]
        for st in spec.states:
            shape = list(st.shape)
            shape.insert(st.batch_axis, batch)
            feeds[st.input] = np.full(shape, st.initial, dtype=np_dtype(st.dtype))
        return feeds

    def sequence_feeds(self, batch: int, steps: int) -> dict[str, np.ndarray]:
        assert self.spec.sequence is not None
        feeds = self.step_feeds(batch)
        del feeds[self.spec.audio_input.name]
        name = self.spec.sequence.audio_input or self.spec.audio_input.name
        audio = np.zeros((batch, self.spec.context_samples + steps * self.spec.hop_samples), np.float32)
        feeds[name] = audio if self.spec.audio_input.layout == "BT" else audio[:, None]
        return feeds
