"""The parity harness: does a model directory stream, batch and score offline to the same numbers?

``lookback models check DIR`` runs it on any model directory, hand-written or exported; the
exporter runs it before it writes a manifest. Only ONNX Runtime and numpy: no torch.

Checks, each with a per-output report of the largest absolute difference (tolerance 1e-5 on
the outputs, ``STATE_TOL`` on the final states):

- ``manifest``/``files``/``signature``: the engine's own contract checks (the loader's).
- ``batched == solo``: clips of mixed lengths run hop by hop at batch 1..64, rows joining
  and leaving the batch, equal each row run alone; and one step from random states at
  batch 64 equals each row alone. Catches batch-dependent maths and a state whose batch
  axis is not where the manifest says.
- ``states live``: each state's output differs from its input after a step, and changing
  its input changes the step's results. Catches a state output that is not fed back (a
  pass-through) and a declared state the graph ignores.
- ``step == sequence``: the step graph hop by hop equals the sequence graph called on
  chunks cut at random places (states carried between chunks), per clip and batched.
  Catches a strided layer aligned differently in the two graphs, a dropped cache, any
  drift between the streaming twin and the offline model.
- ``reference``: the step graph's scores equal reference scores (``references``: what the
  original model gives on real clips) within the tolerance. Without reference scores and
  without a sequence graph, nothing above checks that the scores are RIGHT, only that the
  step graph agrees with itself (two same-shaped states swapped in the manifest pass every
  self-consistency check): the report is then UNVERIFIED, not PASS, unless the caller
  allows it. ``export`` adds the comparison with the PyTorch module itself.

The ``signature`` check opens the graphs exactly as the server does (``lookback.engine.
store``), the multi-step Loop graph included, so a model the check passes is one the
server loads.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lookback.engine.contract import Manifest, load_manifest
from lookback.engine.store import StoreEntry, open_graphs, open_multistep
from lookback.errors import LookbackError

TOL = 1e-5
#: States are internal values (a log front end's features, RNN cells): two correct lowerings
#: (Conv vs MatMul) differ there by rounding that a log amplifies in near-empty bands, while
#: their effect on the outputs stays far below TOL. A broken state differs by orders more.
STATE_TOL = 1e-3
NP_TYPES = {
    "float32": np.float32,
    "float16": np.float16,
    "int64": np.int64,
    "int32": np.int32,
    "int16": np.int16,
}


@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""
    diffs: dict[str, float] = field(default_factory=dict)
    #: not failed, but not verified either (``[skip]``): the report is not a PASS
    unverified: bool = False

    def line(self) -> str:
        mark = "skip" if self.unverified else "ok  " if self.ok else "FAIL"
        diffs = ", ".join(f"{k} {v:.2e}" for k, v in self.diffs.items())
        return f"[{mark}] {self.name}: {self.detail}" + (f" (max abs diff: {diffs})" if diffs else "")


@dataclass
class Report:
    model: str
    checks: list[Check] = field(default_factory=list)
    tol: float = TOL
    #: the caller accepts an unverified report (``--allow-unverified``)
    allow_unverified: bool = False

    @property
    def passed(self) -> bool:
        """No check failed (some may be unverified)."""
        return bool(self.checks) and all(c.ok for c in self.checks)

    @property
    def unverified(self) -> list[str]:
        return [c.name for c in self.checks if c.unverified]

    @property
    def ok(self) -> bool:
        """Every check passed, and the scores were verified (or the caller allowed not)."""
        return self.passed and (self.allow_unverified or not self.unverified)

    def failed(self) -> list[str]:
        return [c.name for c in self.checks if not c.ok]

    @property
    def verdict(self) -> str:
        if not self.passed:
            return "FAIL"
        if self.unverified:
            return "UNVERIFIED (allowed)" if self.allow_unverified else "UNVERIFIED"
        return "PASS"

    def text(self) -> str:
        head = f"{self.model}: {self.verdict} (tolerance: outputs {self.tol:g}, states {STATE_TOL:g})"
        return "\n".join([head] + ["  " + c.line() for c in self.checks])

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "ok": self.ok,
            "verdict": self.verdict,
            "unverified": self.unverified,
            "tolerance": self.tol,
            "checks": [
                {
                    "name": c.name,
                    "ok": c.ok,
                    "unverified": c.unverified,
                    "detail": c.detail,
                    "max_abs_diff": c.diffs,
                }
                for c in self.checks
            ],
        }


@dataclass
class Reference:
    """What the original model scores on a real clip: ``scores`` per output name,
    ``[N, labels]`` (or ``[N]``) for the clip's N whole hops, from the initial state, with
    the manifest's ``context_samples`` of zeros before the clip (as the engine feeds it)."""

    name: str
    clip: np.ndarray  # floats in [-1, 1)
    scores: dict[str, np.ndarray] | np.ndarray  # an array: the model's only output

    @classmethod
    def load(cls, clip_name: str, clip: np.ndarray, path: Path) -> Reference:
        """``.npy``: the scores of the model's only output; ``.npz``: one array per output name."""
        if Path(path).suffix == ".npz":
            with np.load(path) as npz:
                return cls(clip_name, clip, {k: npz[k] for k in npz.files})
        return cls(clip_name, clip, np.load(path))


def _session(path: Path) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 4  # a failing graph is reported by the check, not logged
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


class _Runner:
    """Feeds a graph the way the engine does: audio window, gathered states, constants."""

    def __init__(self, spec: Manifest, sess: Any, *, sequence: bool) -> None:
        self.spec, self.sess, self.sequence = spec, sess, sequence
        self.names = [o.name for o in sess.get_outputs()]
        self.audio_name = (
            spec.sequence.audio_input if sequence and spec.sequence else None
        ) or spec.audio_input.name
        self.out_names = [(o.sequence_name or o.name) if sequence else o.name for o in spec.outputs]
        self.consts = {c.name: np.full(c.shape, c.value, dtype=NP_TYPES[c.dtype]) for c in spec.constants}

    def initial(self, batch: int) -> dict[str, np.ndarray]:
        out = {}
        for st in self.spec.states:
            shape = list(st.shape)
            shape.insert(st.batch_axis, batch)
            out[st.input] = np.full(shape, st.initial, dtype=NP_TYPES[st.dtype])
        return out

    def run(
        self, audio: np.ndarray, states: dict[str, np.ndarray]
    ) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
        """audio [B, samples] -> per output [B, N, L] (N = 1 for the step graph), new states."""
        a = audio[:, None, :] if self.spec.audio_input.layout == "B1T" else audio
        got = dict(
            zip(self.names, self.sess.run(None, {self.audio_name: a, **states, **self.consts}), strict=True)
        )
        outs = []
        for name in self.out_names:
            y = np.asarray(got[name], np.float32)
            if not self.sequence:
                y = y[:, None]  # [B, 1] or [B, 1, L]
            outs.append(y if y.ndim == 3 else y[:, :, None])
        return outs, {st.input: got[st.output] for st in self.spec.states}


def _take(states: dict[str, np.ndarray], spec: Manifest, rows: Any) -> dict[str, np.ndarray]:
    axes = {st.input: st.batch_axis for st in spec.states}
    return {k: np.take(v, rows, axis=axes[k]) for k, v in states.items()}


def _put(dst: dict[str, np.ndarray], src: dict[str, np.ndarray], spec: Manifest, rows: Any) -> None:
    for st in spec.states:
        idx: list[Any] = [slice(None)] * dst[st.input].ndim
        idx[st.batch_axis] = rows
        dst[st.input][tuple(idx)] = src[st.input]


def run_steps(
    step: _Runner, clips: list[np.ndarray], states: dict[str, np.ndarray] | None = None
) -> tuple[list[list[np.ndarray]], dict[str, np.ndarray]]:
    """The step graph hop by hop over clips of different lengths in one batch.

    Each clip is ``context + n*hop`` samples; rows leave the batch when their clip ends, so
    the batch composition changes as it would in the server. Returns per clip, per output
    ``[n, L]``, and the final states (batch = all clips).
    """
    spec = step.spec
    hop, ctx = spec.hop_samples, spec.context_samples
    n = [(c.size - ctx) // hop for c in clips]
    states = step.initial(len(clips)) if states is None else {k: v.copy() for k, v in states.items()}
    outs: list[list[list[np.ndarray]]] = [[[] for _ in spec.outputs] for _ in clips]
    for t in range(max(n, default=0)):
        rows = np.array([i for i in range(len(clips)) if n[i] > t])
        audio = np.stack([clips[i][t * hop : t * hop + ctx + hop] for i in rows])
        ys, new = step.run(audio, _take(states, spec, rows))
        _put(states, new, spec, rows)
        for j, i in enumerate(rows):
            for k, y in enumerate(ys):
                outs[i][k].append(y[j, 0])
    return [[np.asarray(o, np.float32).reshape(n[i], -1) for o in outs[i]] for i in range(len(clips))], states


def run_sequence(
    seq: _Runner, audio: np.ndarray, chunks: list[int], states: dict[str, np.ndarray] | None = None
) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
    """The sequence graph over audio [B, context + N*hop] in chunks of the given hop counts."""
    spec = seq.spec
    hop, ctx = spec.hop_samples, spec.context_samples
    states = seq.initial(audio.shape[0]) if states is None else states
    parts: list[list[np.ndarray]] = [[] for _ in spec.outputs]
    t = 0
    for c in chunks:
        ys, states = seq.run(audio[:, t * hop : ctx + (t + c) * hop], states)
        for k, y in enumerate(ys):
            if y.shape[1] != c:
                raise ValueError(f"sequence graph gave {y.shape[1]} steps for a chunk of {c}")
            parts[k].append(y)
        t += c
    return [np.concatenate(p, axis=1) for p in parts], states


def _chunks(n: int, rng: np.random.Generator) -> list[int]:
    out: list[int] = []
    while sum(out) < n:
        out.append(int(rng.choice([1, 2, 3, int(rng.integers(1, 12)), int(rng.integers(1, 80))])))
    out[-1] -= sum(out) - n
    return [c for c in out if c > 0]


def _max(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return float("inf")
    if not a.size:
        return 0.0
    d = np.abs(a.astype(np.float64) - b.astype(np.float64))
    return float("inf") if not np.all(np.isfinite(d)) else float(d.max())


def random_clips(spec: Manifest, count: int, max_hops: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Audio the harness can make itself: noise at many levels, tones, clicks and silence."""
    hop, ctx, sr = spec.hop_samples, spec.context_samples, spec.sample_rate
    clips = []
    for i in range(count):
        n = int(rng.integers(1, max_hops + 1)) if i else max_hops
        size = n * hop
        t = np.arange(size) / sr
        kind = i % 4
        if kind == 0:
            x = rng.standard_normal(size) * 10 ** rng.uniform(-3.5, -0.5)
        elif kind == 1:
            f = rng.uniform(80, sr / 2.5)
            x = 0.3 * np.sin(2 * np.pi * f * t * (1 + t)) + rng.standard_normal(size) * 1e-3
        elif kind == 2:
            x = np.zeros(size)
            x[rng.integers(0, size, 1 + size // 2000)] = rng.uniform(-0.9, 0.9)
        else:
            x = rng.standard_normal(size) * 0.05 * (np.sin(2 * np.pi * 3 * t) > 0)
        clips.append(np.concatenate([np.zeros(ctx), x]).astype(np.float32))
    return clips


def _prepare(spec: Manifest, clip: np.ndarray) -> np.ndarray:
    """A real clip (floats in [-1, 1)) as the engine would feed it: zero context, whole hops."""
    n = clip.size // spec.hop_samples * spec.hop_samples
    return np.concatenate([np.zeros(spec.context_samples, np.float32), clip[:n].astype(np.float32)])


def check_model_dir(
    path: Path,
    clips: list[np.ndarray] | None = None,
    *,
    references: list[Reference] | None = None,
    allow_unverified: bool = False,
    batch_sizes: tuple[int, ...] = (1, 7, 64),
    max_hops: int = 48,
    seed: int = 0,
    tol: float = TOL,
) -> Report:
    """Run every check on a model directory; never raises for a broken model, reports it."""
    path = Path(path)
    report = Report(str(path), tol=tol, allow_unverified=allow_unverified)
    try:
        spec = load_manifest(path / "model.json")
    except LookbackError as exc:
        report.checks.append(Check("manifest", False, str(exc)))
        return report
    report.model = f"{spec.key} ({path})"
    report.checks.append(Check("manifest", True, f"hop {spec.hop_samples}, context {spec.context_samples}"))
    graphs = [("graph", spec.graph)] + ([("sequence", spec.sequence)] if spec.sequence else [])
    for field_name, g in graphs:
        f = path / g.file
        if not f.is_file():
            report.checks.append(Check("files", False, f"{field_name}.file {g.file!r} is missing"))
            return report
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        if digest != g.sha256:
            report.checks.append(
                Check("files", False, f"{field_name}.sha256 mismatch for {g.file}: file {digest}")
            )
            return report
    report.checks.append(Check("files", True, "sha256 of " + ", ".join(g.file for _, g in graphs)))
    try:  # exactly what the server opens: both graphs and the multi-step Loop graph
        stored = StoreEntry(spec, path)
        cpu: dict[str, Any] = {"providers": "cpu", "intra_op_threads": 1, "inter_op_threads": 1}
        step_graph, seq_graph = open_graphs(stored, **cpu)
        open_multistep(stored, **cpu)
    except Exception as exc:  # ContractError or ORT refusing the file
        report.checks.append(Check("signature", False, " ".join(str(exc).split())[:600]))
        return report
    report.checks.append(
        Check(
            "signature", True, "graphs match the manifest and open as the server opens them (multi-step too)"
        )
    )

    step = _Runner(spec, step_graph.session, sequence=False)
    seq = _Runner(spec, seq_graph.session, sequence=True) if seq_graph is not None else None
    rng = np.random.default_rng(seed)
    labels = [o.name for o in spec.outputs]
    groups: list[list[np.ndarray]] = []
    for b in batch_sizes:
        group = random_clips(spec, b, max_hops, rng)
        if clips and b == max(batch_sizes):  # real clips ride in the biggest batch
            group = group[: max(0, b - len(clips))] + [_prepare(spec, c) for c in clips][:b]
        groups.append(group)
    for name, check in (
        ("batched == solo", _check_batched),
        ("states live", _check_states_live),
        ("step == sequence", _check_sequence),
    ):
        try:
            report.checks.append(check(step, seq, groups, labels, rng, tol))
        except Exception as exc:  # a graph that fails to run is a failed check
            msg = " ".join(str(exc).split())[:400]
            report.checks.append(
                Check(name, False, f"the graph fails to run with the manifest's inputs: {msg}")
            )
    try:
        report.checks.append(_check_reference(step, seq, references or [], tol))
    except Exception as exc:
        msg = " ".join(str(exc).split())[:400]
        report.checks.append(Check("reference", False, f"the graph fails to run on the clips: {msg}"))
    return report


NO_REFERENCE = (
    "no reference to verify the scores against: the checks above show the step graph agrees "
    "with itself, not that its scores are right (two same-shaped states swapped in model.json, "
    "a wrong initial state or input scale all pass them). Give the original model's scores: "
    "--clip CLIP.wav --reference SCORES.npy (or export from PyTorch, or ship a sequence graph)"
)


def _check_reference(step: _Runner, seq: _Runner | None, references: list[Reference], tol: float) -> Check:
    """The step graph hop by hop on each reference clip == the reference scores."""
    if not references:
        if seq is not None:
            return Check("reference", True, "the sequence graph (see step == sequence); no reference scores")
        return Check("reference", True, NO_REFERENCE, unverified=True)
    spec = step.spec
    names = [o.name for o in spec.outputs]
    got, _ = run_steps(step, [_prepare(spec, r.clip) for r in references])
    diffs: dict[str, float] = dict.fromkeys(names, 0.0)
    bad: list[str] = []
    for ref, outs in zip(references, got, strict=True):
        scores = ref.scores if isinstance(ref.scores, dict) else {names[0]: ref.scores}
        if set(scores) != set(names):
            return Check("reference", False, f"{ref.name}: reference outputs {sorted(scores)}, model {names}")
        for k, name in enumerate(names):
            want = np.asarray(scores[name], np.float32)
            want = want.reshape(want.shape[0], -1) if want.ndim else want
            if want.shape != outs[k].shape:
                return Check(
                    "reference",
                    False,
                    f"{ref.name}: reference {name!r} has shape {list(want.shape)}, the model gives "
                    f"{list(outs[k].shape)} (one row per whole hop of {spec.hop_samples} samples)",
                )
            d = _max(outs[k], want)
            diffs[name] = max(diffs[name], d)
            if d > tol:
                bad.append(ref.name)
    if bad:
        return Check(
            "reference",
            False,
            f"the step graph's scores differ from the reference on {', '.join(sorted(set(bad)))}",
            diffs,
        )
    clips = ", ".join(r.name for r in references)
    return Check("reference", True, f"step graph hop by hop == reference scores on {clips}", diffs)


def _within(diffs: dict[str, float], tol: float, state_tol: float = STATE_TOL) -> bool:
    return all(v <= (state_tol if k.startswith("state ") else tol) for k, v in diffs.items())


def _diffs(labels: list[str], a: list[list[np.ndarray]], b: list[list[np.ndarray]]) -> dict[str, float]:
    return {
        name: max((_max(x[k], y[k]) for x, y in zip(a, b, strict=True)), default=0.0)
        for k, name in enumerate(labels)
    }


def _check_batched(
    step: _Runner,
    seq: _Runner | None,
    groups: list[list[np.ndarray]],
    labels: list[str],
    rng: Any,
    tol: float,
) -> Check:
    spec = step.spec
    diffs: dict[str, float] = dict.fromkeys(labels, 0.0)
    for group in groups:
        if len(group) < 2:
            continue
        batched, _ = run_steps(step, group)
        picks = sorted(
            {0, 1, len(group) - 1, *rng.choice(len(group), min(6, len(group)), replace=False).tolist()}
        )
        alone = [run_steps(step, [group[i]])[0][0] for i in picks]
        for k, v in _diffs(labels, [batched[i] for i in picks], alone).items():
            diffs[k] = max(diffs[k], v)
    # one step from random states: every row of a batch of 64 equals that row alone
    b = 64
    states = {k: (v + rng.standard_normal(v.shape) * 0.5).astype(v.dtype) for k, v in step.initial(b).items()}
    audio = np.stack([c[: spec.window_samples] for c in random_clips(spec, b, 1, rng)])
    ys, new = step.run(audio, states)
    for i in range(b):
        ys1, new1 = step.run(audio[i : i + 1], _take(states, spec, [i]))
        for j, name in enumerate(labels):
            diffs[name] = max(diffs[name], _max(ys[j][i : i + 1], ys1[j]))
        for st in spec.states:
            d = _max(np.take(new[st.input], [i], axis=st.batch_axis), new1[st.input])
            diffs[f"state {st.input}"] = max(diffs.get(f"state {st.input}", 0.0), d)
    ok = _within(diffs, tol)
    sizes = ", ".join(str(len(g)) for g in groups)
    detail = (
        f"rows of batches of {sizes} (mixed lengths) and one step at batch 64 from random states "
        "equal the rows run alone"
    )
    if not ok:
        bad = [k for k, v in diffs.items() if v > (STATE_TOL if k.startswith("state ") else tol)]
        detail = (
            f"a row's result depends on its batch ({', '.join(bad)}): batch-dependent maths or a "
            "state's batch axis is not where the manifest says"
        )
    return Check("batched == solo", ok, detail, diffs)


def _check_states_live(
    step: _Runner,
    seq: _Runner | None,
    groups: list[list[np.ndarray]],
    labels: list[str],
    rng: Any,
    tol: float,
) -> Check:
    spec = step.spec
    if not spec.states:
        return Check("states live", True, "no states declared")
    clip = random_clips(spec, 1, 4, rng)[0]
    hop, win = spec.hop_samples, spec.window_samples
    windows = [
        np.stack([clip[t * hop : t * hop + win]] * 2) * np.array([[1.0], [0.5]], np.float32) for t in range(3)
    ]
    states = step.initial(2)
    # warm the states up: two hops of audio, so they are not at their initial value
    for t in range(2):
        _, states = step.run(windows[t], states)
    audio = windows[2]
    base_y, base_s = step.run(audio, states)
    problems = []
    for st in spec.states:
        if np.array_equal(base_s[st.input], states[st.input]):
            problems.append(
                f"state {st.input!r}: output {st.output!r} equals its input (not updated, not fed back)"
            )
        bumped = dict(states)
        bumped[st.input] = (states[st.input] + rng.standard_normal(states[st.input].shape) * 0.5).astype(
            states[st.input].dtype
        )
        y, s = step.run(audio, bumped)
        changed = any(not np.array_equal(a, b) for a, b in zip(y, base_y, strict=True)) or any(
            not np.array_equal(s[k], base_s[k]) for k in s
        )
        if not changed:
            problems.append(f"state {st.input!r}: the graph ignores it (changing it changes nothing)")
    if problems:
        return Check("states live", False, "; ".join(problems))
    names = ", ".join(f"{st.input}->{st.output}" for st in spec.states)
    return Check("states live", True, f"every state is read and updated ({names})")


def _check_sequence(
    step: _Runner,
    seq: _Runner | None,
    groups: list[list[np.ndarray]],
    labels: list[str],
    rng: Any,
    tol: float,
) -> Check:
    if seq is None:
        return Check("step == sequence", True, "no sequence graph (offline scoring runs the step graph)")
    spec = step.spec
    diffs: dict[str, float] = dict.fromkeys(labels, 0.0)
    n_calls = 0
    for group in groups:
        ref, ref_states = run_steps(step, group)
        for i, clip in enumerate(group):  # each clip alone, chunked at random places
            n = ref[i][0].shape[0]
            got, got_states = run_sequence(seq, clip[None], _chunks(n, rng))
            n_calls += 1
            for k, name in enumerate(labels):
                diffs[name] = max(diffs[name], _max(got[k][0], ref[i][k]))
            for st in spec.states:
                d = _max(got_states[st.input], _take(ref_states, spec, [i])[st.input])
                diffs[f"state {st.input}"] = max(diffs.get(f"state {st.input}", 0.0), d)
        # the whole group in one batch, cropped to its shortest clip, with shared random chunks
        n = min(r[0].shape[0] for r in ref)
        audio = np.stack([c[: spec.context_samples + n * spec.hop_samples] for c in group])
        got, _ = run_sequence(seq, audio, _chunks(n, rng))
        for k, name in enumerate(labels):
            diffs[name] = max(diffs[name], max(_max(got[k][i], ref[i][k][:n]) for i in range(len(group))))
    ok = _within(diffs, tol)
    detail = (
        f"step graph hop by hop == sequence graph in random chunks ({n_calls} clips, batched and alone)"
        if ok
        else "the step graph and the sequence graph disagree: a state not carried the same way, "
        "a strided layer aligned differently, or different maths"
    )
    return Check("step == sequence", ok, detail, diffs)
