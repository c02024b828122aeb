"""StepCompute: the batched model step, the function a model's MicroBatcher calls.

It is the only code that builds ONNX inputs on the streaming path. It runs in the
batcher's executor thread: it builds the ``[B, context + hop]`` windows from the
table's context rows and the steps' new samples, feeds the gathered states, runs the
step graph, scatters states and the new context back, and returns one score row per
step. It knows the table and the graph, never the batcher or the session.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lookback.engine.contract import Manifest, np_dtype
from lookback.engine.graph import OrtGraph
from lookback.engine.pcm import ModelInput
from lookback.engine.slabs import StateTable
from lookback.engine.step import Step
from lookback.errors import BadAudio


class StepCompute:
    def __init__(self, spec: Manifest, step: OrtGraph, table: StateTable) -> None:
        self.spec = spec
        self.step = step
        self.table = table
        self.input = ModelInput(spec.audio_input.scale, spec.audio_input.layout)
        self.constants = {c.name: np.full(c.shape, c.value, dtype=np_dtype(c.dtype)) for c in spec.constants}
        self._buffers: dict[str, np.ndarray] = {}

    def __call__(self, batch: Sequence[Step]) -> np.ndarray:
        spec = self.spec
        n = len(batch)
        ctx, hop = spec.context_samples, spec.hop_samples
        window = self._scratch("window", n, (ctx + hop,), np.dtype(np.float32))
        slots = np.array([s.slot for s in batch], dtype=np.intp)
        table = self.table
        with table.lock:
            if ctx:
                table.gather_context(slots, window)
            self._fill_audio(window[:, ctx:], batch)
            feeds = dict(self.constants)
            feeds[spec.audio_input.name] = self.input.layout(window)
            for st in spec.states:
                scratch = self._scratch(st.input, n, tuple(st.shape), np_dtype(st.dtype))
                feeds[st.input] = table.gather(st.input, slots, out=scratch)
            outs = dict(zip(self.step.output_names, self.step.run(feeds), strict=True))
            for st in spec.states:
                table.scatter(st.input, slots, outs[st.output])
            if ctx:
                table.store_context(slots, window[:, -ctx:])
        return self._scores(outs, n)

    def _scratch(self, name: str, n: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A reusable [n, *shape] buffer: fresh megabyte arrays per batch cost page faults.

        Only the batcher's single executor thread calls this object, so reuse is safe.
        """
        buf = self._buffers.get(name)
        if buf is None or buf.shape[0] < n:
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
            self.input.put_s16(dest, blob)
            return
        for i, p in enumerate(payloads):
            if isinstance(p, bytes):
                if len(p) != hop * 2:
                    raise BadAudio(f"a step must carry exactly {hop} samples ({hop * 2} bytes)")
                self.input.put_s16(dest[i], p)
            else:
                if p.shape != (hop,):
                    raise BadAudio(f"a step must carry exactly {hop} samples, got {p.shape}")
                self.input.put_f32(dest[i], p)

    def _scores(self, outs: dict[str, np.ndarray], n: int) -> np.ndarray:
        cols = [
            np.asarray(outs[o.name], dtype=np.float32).reshape(n, len(o.labels)) for o in self.spec.outputs
        ]
        return cols[0] if len(cols) == 1 else np.concatenate(cols, axis=1)

    # -- warm-up -------------------------------------------------------------------------
    def step_feeds(self, batch: int) -> dict[str, np.ndarray]:
        """Zero audio and initial states for ``batch`` rows of the step graph."""
        spec = self.spec
        feeds = dict(self.constants)
        feeds[spec.audio_input.name] = self.input.layout(np.zeros((batch, spec.window_samples), np.float32))
        feeds.update(initial_states(spec, batch))
        return feeds

    def sequence_feeds(self, batch: int, steps: int) -> dict[str, np.ndarray]:
        spec = self.spec
        assert spec.sequence is not None
        feeds = dict(self.constants)
        name = spec.sequence.audio_input or spec.audio_input.name
        audio = np.zeros((batch, spec.context_samples + steps * spec.hop_samples), np.float32)
        feeds[name] = self.input.layout(audio)
        feeds.update(initial_states(spec, batch))
        return feeds


def initial_states(spec: Manifest, batch: int) -> dict[str, np.ndarray]:
    """Every state at its initial value, for ``batch`` rows in the graph's own layout."""
    out = {}
    for st in spec.states:
        shape = list(st.shape)
        shape.insert(st.batch_axis, batch)
        out[st.input] = np.full(shape, st.initial, dtype=np_dtype(st.dtype))
    return out
