"""The model contract: ``model.json``, validated before and against the ONNX graph.

A model is declared, not coded. The manifest tells the engine how to build the
audio input (context + hop), which tensors are recurrent state (and where their
batch axis is), which constants to feed, and which outputs are scores. Checking it
against the graph's real signature at load time turns the classic silent failure
(a window fed without its context) into a refusal that names the field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lookback.errors import ContractError

DType = Literal["float32", "float16", "int64", "int32", "int16"]

#: The dtypes a manifest may name: numpy's dtype and ORT's type string for each.
DTYPES: dict[str, tuple[np.dtype, str]] = {
    "float32": (np.dtype(np.float32), "tensor(float)"),
    "float16": (np.dtype(np.float16), "tensor(float16)"),
    "int64": (np.dtype(np.int64), "tensor(int64)"),
    "int32": (np.dtype(np.int32), "tensor(int32)"),
    "int16": (np.dtype(np.int16), "tensor(int16)"),
}


def np_dtype(name: str) -> np.dtype:
    return DTYPES[name][0]


def ort_type(name: str) -> str:
    return DTYPES[name][1]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GraphFile(_Strict):
    file: str = Field(description="ONNX file name, relative to the version folder")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class AudioInput(_Strict):
    name: str
    dtype: Literal["float32"] = "float32"
    scale: Literal["int16/32768", "raw"] = Field(
        "int16/32768",
        description="int16/32768: samples in [-1, 1); raw: int16 values as floats",
    )
    layout: Literal["BT", "B1T"] = Field("BT", description="[B, context+hop] or [B, 1, context+hop]")


class StateSpec(_Strict):
    input: str
    output: str
    shape: list[int] = Field(description="shape without the batch dimension")
    batch_axis: int = Field(0, ge=0)
    dtype: DType = "float32"
    initial: float = 0.0

    @model_validator(mode="after")
    def _axis_in_range(self) -> StateSpec:
        if self.batch_axis > len(self.shape):
            raise ValueError(
                f"batch_axis {self.batch_axis} out of range for a state of rank {len(self.shape) + 1}"
            )
        if any(d <= 0 for d in self.shape):
            raise ValueError("state shape dimensions must be positive")
        return self

    @property
    def full_shape_rank(self) -> int:
        return len(self.shape) + 1


class ConstantSpec(_Strict):
    name: str
    dtype: DType = "int64"
    shape: list[int] = Field(default_factory=list, description="[] for a scalar")
    value: float | int


class OutputSpec(_Strict):
    name: str
    labels: list[str] = Field(min_length=1)
    sequence_name: str | None = Field(
        None, description="name of this output in the sequence graph, when it differs"
    )


class EventSpec(_Strict):
    """Threshold + hysteresis + minimum durations, as in Silero's VADIterator."""

    label: str | None = Field(None, description="label events are made for; default first label")
    threshold: float = Field(0.5, gt=0.0, lt=1.0)
    neg_threshold: float | None = Field(None, description="end threshold; default threshold-0.15")
    min_silence_ms: float = Field(100.0, ge=0)
    speech_pad_ms: float = Field(30.0, ge=0)
    min_speech_ms: float = Field(0.0, ge=0)

    @property
    def end_threshold(self) -> float:
        if self.neg_threshold is not None:
            return self.neg_threshold
        return max(self.threshold - 0.15, 0.01)


class SequenceGraph(GraphFile):
    """N steps per call for offline scoring: audio [B, context + N*hop] -> scores [B, N(, L)]."""

    audio_input: str | None = Field(None, description="default: the step graph's audio input name")
    max_steps: int = Field(2048, ge=1, description="steps per call; bounds offline memory")


class Manifest(_Strict):
    """``model.json``: everything the engine needs to serve one model version."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    version: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
    description: str = ""
    license: str | None = None
    sample_rate: int = Field(gt=0)
    frame_samples: int = Field(128, gt=0)
    hop_samples: int = Field(gt=0)
    context_samples: int = Field(0, ge=0)
    graph: GraphFile
    audio_input: AudioInput
    states: list[StateSpec] = Field(default_factory=list)
    constants: list[ConstantSpec] = Field(default_factory=list)
    outputs: list[OutputSpec] = Field(min_length=1)
    events: EventSpec = Field(default_factory=lambda: EventSpec())
    sequence: SequenceGraph | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        if self.hop_samples % self.frame_samples:
            raise ValueError(
                f"hop_samples ({self.hop_samples}) must be a multiple of frame_samples ({self.frame_samples})"
            )
        labels = self.labels
        if len(set(labels)) != len(labels):
            raise ValueError(f"output labels must be unique, got {labels}")
        if self.events.label is not None and self.events.label not in labels:
            raise ValueError(f"events.label {self.events.label!r} is not one of {labels}")
        names = [self.audio_input.name] + [s.input for s in self.states]
        names += [c.name for c in self.constants]
        if len(set(names)) != len(names):
            raise ValueError(f"graph input names must be unique, got {names}")
        outs = [o.name for o in self.outputs] + [s.output for s in self.states]
        if len(set(outs)) != len(outs):  # two states fed from one output: ORT refuses the Loop
            raise ValueError(f"graph output names must be unique, got {outs}")
        return self

    @property
    def window_samples(self) -> int:
        return self.context_samples + self.hop_samples

    @property
    def frames_per_hop(self) -> int:
        return self.hop_samples // self.frame_samples

    @property
    def labels(self) -> list[str]:
        return [label for out in self.outputs for label in out.labels]

    @property
    def event_label(self) -> str:
        return self.events.label or self.labels[0]

    @property
    def key(self) -> str:
        return f"{self.name}/{self.version}"


def load_manifest(path: Path) -> Manifest:
    """Parse and validate ``model.json``; every failure is a ContractError naming the field."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ContractError(f"{path}: manifest not found") from exc
    except json.JSONDecodeError as exc:
        raise ContractError(f"{path}: not valid JSON: {exc}") from exc
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        raise ContractError(f"{path}: {_describe(exc)}") from exc


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


# --- checking the manifest against the graph -------------------------------------------


class GraphPort:
    """Name, shape and type of one graph input or output, as ORT reports it."""

    def __init__(self, name: str, shape: list[Any], type: str) -> None:
        self.name = name
        self.shape = list(shape) if shape is not None else []
        self.type = type

    @classmethod
    def of(cls, arg: Any) -> GraphPort:
        return cls(arg.name, arg.shape, arg.type)


def _is_dynamic(dim: Any) -> bool:
    return dim is None or isinstance(dim, str) or (isinstance(dim, int) and dim < 0)


def _check_port(
    where: str,
    port: GraphPort | None,
    field: str,
    *,
    rank: int,
    dtype: str,
    batch_axis: int,
    fixed: dict[int, int],
) -> None:
    if port is None:
        raise ContractError(f"{where}: {field} names a tensor the graph does not have")
    if port.type != ort_type(dtype):
        raise ContractError(
            f"{where}: {field} dtype mismatch: manifest says {dtype} ({ort_type(dtype)}), "
            f"graph has {port.type} for {port.name!r}"
        )
    if len(port.shape) != rank:
        raise ContractError(
            f"{where}: {field} rank mismatch: manifest implies rank {rank}, "
            f"graph has {port.shape} for {port.name!r}"
        )
    if rank and not _is_dynamic(port.shape[batch_axis]):
        raise ContractError(
            f"{where}: {field} batch axis {batch_axis} of {port.name!r} is fixed "
            f"({port.shape[batch_axis]}); it must be dynamic for batching"
        )
    for axis, size in fixed.items():
        dim = port.shape[axis]
        if not _is_dynamic(dim) and dim != size:
            raise ContractError(
                f"{where}: {field} dimension {axis} mismatch: manifest implies {size}, "
                f"graph has {dim} for {port.name!r}"
            )


def check_step_graph(spec: Manifest, inputs: list[GraphPort], outputs: list[GraphPort]) -> None:
    """Refuse a step graph whose signature does not match the manifest."""
    where = f"{spec.key} {spec.graph.file}"
    ins = {p.name: p for p in inputs}
    outs = {p.name: p for p in outputs}
    _check_audio(where, spec, ins, time=spec.window_samples)
    _check_states(where, spec, ins, outs)
    _check_constants(where, spec, ins)
    for i, out in enumerate(spec.outputs):
        port = outs.get(out.name)
        rank = len(port.shape) if port is not None else 2
        if rank not in (1, 2):
            raise ContractError(f"{where}: outputs[{i}].name rank mismatch: expected [B] or [B, L]")
        fixed = {1: len(out.labels)} if rank == 2 else {}
        _check_port(where, port, f"outputs[{i}].name", rank=rank, dtype="float32", batch_axis=0, fixed=fixed)
    _check_no_extra_inputs(where, spec, ins)


def check_sequence_graph(spec: Manifest, inputs: list[GraphPort], outputs: list[GraphPort]) -> None:
    """Refuse a sequence graph whose signature does not match the manifest."""
    assert spec.sequence is not None
    where = f"{spec.key} {spec.sequence.file}"
    ins = {p.name: p for p in inputs}
    outs = {p.name: p for p in outputs}
    _check_audio(where, spec, ins, time=None, name=spec.sequence.audio_input)
    _check_states(where, spec, ins, outs)
    _check_constants(where, spec, ins)
    for i, out in enumerate(spec.outputs):
        name = out.sequence_name or out.name
        port = outs.get(name)
        rank = len(port.shape) if port is not None else 2
        if rank not in (2, 3):
            raise ContractError(
                f"{where}: outputs[{i}].sequence_name rank mismatch: expected [B, N] or [B, N, L]"
            )
        fixed = {2: len(out.labels)} if rank == 3 else {}
        _check_port(
            where, port, f"outputs[{i}].sequence_name", rank=rank, dtype="float32", batch_axis=0, fixed=fixed
        )
    _check_no_extra_inputs(where, spec, ins, audio=spec.sequence.audio_input)


def _check_audio(
    where: str,
    spec: Manifest,
    ins: dict[str, GraphPort],
    *,
    time: int | None,
    name: str | None = None,
) -> None:
    rank = 2 if spec.audio_input.layout == "BT" else 3
    fixed: dict[int, int] = {}
    if time is not None:
        fixed[rank - 1] = time
    if rank == 3:
        fixed[1] = 1
    _check_port(
        where,
        ins.get(name or spec.audio_input.name),
        "audio_input.name",
        rank=rank,
        dtype=spec.audio_input.dtype,
        batch_axis=0,
        fixed=fixed,
    )


def _check_states(where: str, spec: Manifest, ins: dict[str, GraphPort], outs: dict[str, GraphPort]) -> None:
    for i, st in enumerate(spec.states):
        full = list(st.shape)
        full.insert(st.batch_axis, -1)
        fixed = {ax: d for ax, d in enumerate(full) if ax != st.batch_axis}
        for field, port in (
            (f"states[{i}].input", ins.get(st.input)),
            (f"states[{i}].output", outs.get(st.output)),
        ):
            _check_port(
                where,
                port,
                field,
                rank=st.full_shape_rank,
                dtype=st.dtype,
                batch_axis=st.batch_axis,
                fixed=fixed,
            )


def _check_constants(where: str, spec: Manifest, ins: dict[str, GraphPort]) -> None:
    for i, c in enumerate(spec.constants):
        port = ins.get(c.name)
        if port is None:
            raise ContractError(f"{where}: constants[{i}].name names a tensor the graph does not have")
        if port.type != ort_type(c.dtype):
            raise ContractError(
                f"{where}: constants[{i}].dtype mismatch: manifest says {c.dtype}, "
                f"graph has {port.type} for {port.name!r}"
            )
        if len(port.shape) != len(c.shape):
            raise ContractError(
                f"{where}: constants[{i}].shape rank mismatch: manifest says {c.shape}, "
                f"graph has {port.shape} for {port.name!r}"
            )


def _check_no_extra_inputs(
    where: str, spec: Manifest, ins: dict[str, GraphPort], audio: str | None = None
) -> None:
    known = {
        audio or spec.audio_input.name,
        *(s.input for s in spec.states),
        *(c.name for c in spec.constants),
    }
    extra = sorted(set(ins) - known)
    if extra:
        raise ContractError(
            f"{where}: graph inputs {extra} are not described by the manifest "
            "(audio_input, states or constants)"
        )
