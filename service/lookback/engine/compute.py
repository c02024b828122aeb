"""StepCompute: the batched model step, the function a model's MicroBatcher calls.

It is the only code that builds ONNX inputs on the streaming path. It runs in the
batcher's executor thread: it builds the ``[B, context + k * hop]`` windows from the
table's context rows and the steps' new samples, feeds the gathered states, runs the
graph, scatters states and the new context back, and returns one score row per hop.
It knows the table and the graphs, never the batcher or the session.

A batch of one-hop steps (the hot path) is one call of the step graph. When steps carry
several hops, the batch is split into the fewest calls of the multi-step graph
(``multistep.py``) of two groupings: by exact hop count (all steps of 10 hops in one
``[B, 10]`` call: the usual case, every client sending the same message size), or by
powers of two (a step of 5 hops runs its first 4 in the ``[B, 4]`` call with every
other step that has a 4 in its count, then its last one in the ``[B, 1]`` call, largest
group first), which bounds a batch of mixed counts to ``log2(max_steps_per_call) + 1``
calls. Each session's hops run in order either way, and the multi-step graph gives the
same bits as k single steps, so no grouping changes any row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from lookback.engine.contract import Manifest, np_dtype
from lookback.engine.graph import OrtGraph
from lookback.engine.guard import reset_non_finite
from lookback.engine.multistep import AUDIO, STEPS, scores_out, state_in, state_out
from lookback.engine.pcm import ModelInput
from lookback.engine.slabs import StateTable
from lookback.engine.step import Step
from lookback.errors import BadAudio


class StepCompute:
    def __init__(
        self, spec: Manifest, step: OrtGraph, table: StateTable, multistep: OrtGraph | None = None
    ) -> None:
        self.spec = spec
        self.step = step
        self.multistep = multistep
        self.table = table
        self.input = ModelInput(spec.audio_input.scale, spec.audio_input.layout)
        self.constants = {c.name: np.full(c.shape, c.value, dtype=np_dtype(c.dtype)) for c in spec.constants}
        self._buffers: dict[str, np.ndarray] = {}
        self.n_labels = len(spec.labels)  # Manifest.labels builds a list on every call
        # where each state and score output sits in a run's result list (no dict per call)
        pos = {name: i for i, name in enumerate(step.output_names)}
        self._state_pos = [pos[st.output] for st in spec.states]
        self._score_pos = [(pos[o.name], len(o.labels)) for o in spec.outputs]
        if multistep is not None:
            mpos = {name: i for i, name in enumerate(multistep.output_names)}
            self._multi_state_pos = [mpos[state_out(st.output)] for st in spec.states]
            self._multi_score_pos = [(mpos[scores_out(o.name)], len(o.labels)) for o in spec.outputs]

    def __call__(self, batch: Sequence[Step]) -> np.ndarray:
        n = len(batch)
        total = 0
        for s in batch:
            total += s.count
        if total != n:
            return self._multi(batch, total)
        spec = self.spec
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
            outs = self.step.run(feeds)
            new_states, scores = reset_non_finite(
                spec, [outs[i] for i in self._state_pos], self._scores(outs, n), n
            )
            for st, value in zip(spec.states, new_states, strict=True):
                table.scatter(st.input, slots, value)
            if ctx:
                table.store_context(slots, window[:, -ctx:])
        return scores

    def _multi(self, batch: Sequence[Step], total: int) -> np.ndarray:
        """Steps of several hops: one call per distinct count, or per power of two present
        in the counts, whichever is fewer calls."""
        spec = self.spec
        hop = spec.hop_samples
        slots = np.array([s.slot for s in batch], dtype=np.intp)
        k = batch[0].count
        if all(s.count == k for s in batch):  # the usual case: one call, audio straight in
            return self._run_group(slots, k, lambda dest: self._fill_audio(dest, batch))
        counts = np.array([s.count for s in batch], dtype=np.intp)
        first = np.cumsum(counts) - counts  # each step's first row in ``samples`` and the result
        samples = self._scratch("samples", total, (hop,), np.dtype(np.float32))
        self._fill_hops(samples, batch)
        scores = np.empty((total, self.n_labels), np.float32)
        distinct = set(counts.tolist())
        if len(distinct) <= int(np.bitwise_or.reduce(counts)).bit_count():
            for k in sorted(distinct, reverse=True):
                rows = np.flatnonzero(counts == k) if len(distinct) > 1 else np.arange(len(batch))
                hops = first[rows][:, None] + np.arange(k)  # [m, k] sample rows
                scores[hops.ravel()] = self._run_group(slots[rows], k, _take(samples, hops))
            return scores
        done = np.zeros_like(counts)  # hops of each step already run
        k = 1 << (int(counts.max()).bit_length() - 1)
        while k:
            rows = np.flatnonzero(counts & k)
            if rows.size:
                hops = (first[rows] + done[rows])[:, None] + np.arange(k)  # [m, k] sample rows
                scores[hops.ravel()] = self._run_group(slots[rows], k, _take(samples, hops))
                done[rows] += k
            k >>= 1
        return scores

    def _run_group(self, slots: np.ndarray, k: int, fill: Callable[[np.ndarray], None]) -> np.ndarray:
        """k hops for each of ``slots``: scores [m * k, labels], row i * k + j = slot i, hop j.

        ``fill(dest)`` writes the hops' audio into ``dest`` [m, k, hop] (a view of the
        windows' new samples), after the context is in place.
        """
        spec = self.spec
        m = len(slots)
        ctx, hop = spec.context_samples, spec.hop_samples
        window = self._scratch(f"window{k}", m, (ctx + k * hop,), np.dtype(np.float32))
        table = self.table
        with table.lock:
            if ctx:
                table.gather_context(slots, window[:, : ctx + hop])
            fill(window[:, ctx:].reshape(m, k, hop))
            feeds = dict(self.constants)
            audio = self.input.layout(window)
            if k == 1:
                feeds[spec.audio_input.name] = audio
                for st in spec.states:
                    feeds[st.input] = table.gather(st.input, slots)
                outs = self.step.run(feeds)
                new_states = [outs[i] for i in self._state_pos]
                scores = self._scores(outs, m)
            else:
                assert self.multistep is not None, "a multi-hop step needs the multi-step graph"
                feeds[STEPS] = np.array(k, np.int64)
                feeds[AUDIO] = audio
                for st in spec.states:
                    feeds[state_in(st.input)] = table.gather(st.input, slots)
                outs = self.multistep.run(feeds)
                new_states = [outs[i] for i in self._multi_state_pos]
                cols = [np.asarray(outs[i], np.float32).reshape(k, m, n) for i, n in self._multi_score_pos]
                per_hop = cols[0] if len(cols) == 1 else np.concatenate(cols, axis=2)
                scores = per_hop.transpose(1, 0, 2).reshape(m * k, -1)
            new_states, scores = reset_non_finite(spec, new_states, scores, m)
            for st, value in zip(spec.states, new_states, strict=True):
                table.scatter(st.input, slots, value)
            if ctx:
                table.store_context(slots, window[:, -ctx:])
        return scores

    def _fill_hops(self, dest: np.ndarray, batch: Sequence[Step]) -> None:
        """Every step's hops into ``dest`` [total hops, hop], in step order."""
        if self._put_joined(dest, batch):
            return
        row = 0
        for s in batch:
            self._put(dest[row : row + s.count], s.payload)
            row += s.count

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
        """Step i's new samples into ``dest[i]`` ([hop], or [k, hop] for steps of k hops)."""
        if self._put_joined(dest, batch):
            return
        for i, s in enumerate(batch):
            self._put(dest[i], s.payload)

    def _put_joined(self, dest: np.ndarray, batch: Sequence[Step]) -> bool:
        """The common case, every payload int16: all of ``dest`` in one conversion.

        Payload lengths were checked at submission, and a float32 payload (4 bytes a
        sample) makes the joined blob longer than ``dest`` in int16, so the length and the
        first payload's type tell an all-int16 batch.
        """
        payloads = [s.payload for s in batch]
        blob = b"".join(payloads)  # type: ignore[arg-type]
        if len(blob) != dest.size * 2 or type(payloads[0]) is not bytes:
            return False
        self.input.put_s16(dest, blob)
        return True

    def _put(self, dest: np.ndarray, payload: bytes | np.ndarray) -> None:
        """One step's samples into ``dest`` (any shape of as many), refusing a wrong length."""
        n = dest.size
        if isinstance(payload, bytes):
            if len(payload) != n * 2:
                raise BadAudio(f"a step must carry exactly {n} samples ({n * 2} bytes)")
            self.input.put_s16(dest, payload)
        else:
            if payload.shape != (n,):
                raise BadAudio(f"a step must carry exactly {n} samples, got {payload.shape}")
            self.input.put_f32(dest, payload)

    def _scores(self, outs: list[np.ndarray], n: int) -> np.ndarray:
        cols = [np.asarray(outs[i], dtype=np.float32).reshape(n, labels) for i, labels in self._score_pos]
        return cols[0] if len(cols) == 1 else np.concatenate(cols, axis=1)

    def multistep_agrees(self, batch: int = 3, steps: int = 5, seed: int = 0) -> bool:
        """Whether the multi-step graph gives exactly (``==``) what ``steps`` single steps
        give, scores and states, on random audio and states: checked at load, because a
        runtime that optimised the loop body differently would change numbers silently."""
        assert self.multistep is not None
        spec = self.spec
        ctx, hop = spec.context_samples, spec.hop_samples
        rng = np.random.default_rng(seed)
        audio = (rng.standard_normal((batch, ctx + steps * hop)) * 0.1).astype(np.float32)
        states = {
            k: (v + rng.standard_normal(v.shape) * 0.1).astype(v.dtype) if v.dtype.kind == "f" else v
            for k, v in initial_states(spec, batch).items()
        }
        feeds = dict(self.constants)
        feeds[STEPS] = np.array(steps, np.int64)
        feeds[AUDIO] = self.input.layout(audio)
        feeds.update({state_in(k): v for k, v in states.items()})
        multi = dict(zip(self.multistep.output_names, self.multistep.run(feeds), strict=True))
        single: list[dict[str, np.ndarray]] = []
        for i in range(steps):
            feeds = dict(self.constants)
            feeds[spec.audio_input.name] = self.input.layout(audio[:, i * hop : i * hop + ctx + hop])
            feeds.update(states)
            single.append(dict(zip(self.step.output_names, self.step.run(feeds), strict=True)))
            states = {st.input: single[-1][st.output] for st in spec.states}
        for o in spec.outputs:
            want = np.stack([np.asarray(s[o.name]) for s in single])
            if not np.array_equal(np.asarray(multi[scores_out(o.name)]).reshape(want.shape), want):
                return False
        return all(np.array_equal(multi[state_out(st.output)], states[st.input]) for st in spec.states)

    # -- warm-up -------------------------------------------------------------------------
    def step_feeds(self, batch: int) -> dict[str, np.ndarray]:
        """Zero audio and initial states for ``batch`` rows of the step graph."""
        spec = self.spec
        feeds = dict(self.constants)
        feeds[spec.audio_input.name] = self.input.layout(np.zeros((batch, spec.window_samples), np.float32))
        feeds.update(initial_states(spec, batch))
        return feeds

    def multistep_feeds(self, batch: int, steps: int) -> dict[str, np.ndarray]:
        """Zero audio and initial states for ``batch`` rows of ``steps`` hops, multi-step graph."""
        spec = self.spec
        feeds = dict(self.constants)
        feeds[STEPS] = np.array(steps, np.int64)
        audio = np.zeros((batch, spec.context_samples + steps * spec.hop_samples), np.float32)
        feeds[AUDIO] = self.input.layout(audio)
        feeds.update({state_in(k): v for k, v in initial_states(spec, batch).items()})
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


def _take(samples: np.ndarray, hops: np.ndarray) -> Callable[[np.ndarray], None]:
    """A ``fill`` for ``_run_group``: rows ``hops`` [m, k] of ``samples`` [total, hop]."""

    def fill(dest: np.ndarray) -> None:
        dest[...] = samples[hops]

    return fill
