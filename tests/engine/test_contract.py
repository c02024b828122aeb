"""The model contract: a manifest is checked against the real graph signature ORT reports.

Graphs are tiny hand-built ONNX models (``engine_graphs``) loaded through ONNX Runtime,
so the checks see exactly what the engine sees at load time. Every refusal must be a
ContractError whose message names the offending manifest field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnxruntime as ort
import pytest

from lookback.engine.contract import (
    GraphPort,
    Manifest,
    check_sequence_graph,
    check_step_graph,
    load_manifest,
)
from lookback.errors import ContractError
from tests.engine import engine_graphs as g
from tests.engine.engine_support import STORE

KNOWN_SILERO = (
    Path(__file__).resolve().parents[2] / "service/lookback/engine/known_models/silero-vad-6.2.3.json"
)


def ports(model_path: Path) -> tuple[list[GraphPort], list[GraphPort]]:
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return [GraphPort.of(i) for i in sess.get_inputs()], [GraphPort.of(o) for o in sess.get_outputs()]


def spec_of(manifest: dict[str, Any]) -> Manifest:
    return Manifest.model_validate(manifest)


def check_step(tmp_path: Path, sig: g.ToyGraph, manifest: dict[str, Any] | None = None) -> None:
    path = tmp_path / "model.onnx"
    g.save(sig, path)
    check_step_graph(spec_of(manifest or g.toy_manifest()), *ports(path))


def check_seq(tmp_path: Path, sig: g.ToyGraph, manifest: dict[str, Any] | None = None) -> None:
    path = tmp_path / "sequence.onnx"
    g.save(sig, path)
    check_sequence_graph(spec_of(manifest or g.toy_manifest(sequence=True)), *ports(path))


def refused(fn: Any, *args: Any, match: list[str]) -> str:
    with pytest.raises(ContractError) as info:
        fn(*args)
    msg = str(info.value)
    assert info.value.code == "model_contract"
    for part in match:
        assert part in msg, f"{part!r} not in {msg!r}"
    return msg


# --- good -----------------------------------------------------------------------------------


def test_good_toy_manifest_loads_and_validates(tmp_path: Path) -> None:
    folder = g.write_model(tmp_path, g.toy_manifest(sequence=True))
    spec = load_manifest(folder / "model.json")
    assert spec.key == "toy/1"
    assert spec.window_samples == g.CONTEXT + g.HOP and spec.frames_per_hop == 1
    assert [s.batch_axis for s in spec.states] == [0, 1]
    check_step_graph(spec, *ports(folder / "model.onnx"))
    check_sequence_graph(spec, *ports(folder / "sequence.onnx"))


def test_good_multi_label_and_rank1_outputs(tmp_path: Path) -> None:
    two = g.toy_manifest(labels=["speech", "music"])
    check_step(tmp_path, g.step_signature(labels=2), two)
    check_seq(
        tmp_path,
        g.sequence_signature(labels=2),
        {**g.toy_manifest(labels=["speech", "music"], sequence=True)},
    )
    rank1 = g.step_signature().with_(scores=[g.Port("score", "float32", ["B"])])
    check_step(tmp_path, rank1)


def test_silero_manifest_validates_against_the_real_silero_graph(silero_model: str) -> None:
    spec = load_manifest(KNOWN_SILERO)
    stored = STORE / "silero-vad" / "6.2.3"
    assert load_manifest(stored / "model.json") == spec
    check_step_graph(spec, *ports(stored / spec.graph.file))
    assert spec.states[0].batch_axis == 1 and spec.window_samples == 576


def test_silero_graph_refuses_a_manifest_that_gets_it_wrong(silero_model: str) -> None:
    base = json.loads(KNOWN_SILERO.read_text())
    path = STORE / "silero-vad" / "6.2.3" / base["graph"]["file"]
    ins, outs = ports(path)
    wrong_axis = json.loads(json.dumps(base))
    wrong_axis["states"][0].update(shape=[128, 2], batch_axis=0)  # [B, 128, 2]: not Silero's
    refused(check_step_graph, spec_of(wrong_axis), ins, outs, match=["states[0]", "state"])
    wrong_sr = json.loads(json.dumps(base))
    wrong_sr["constants"][0]["dtype"] = "int32"
    refused(check_step_graph, spec_of(wrong_sr), ins, outs, match=["constants[0].dtype", "sr"])
    no_sr = json.loads(json.dumps(base))
    no_sr["constants"] = []
    refused(check_step_graph, spec_of(no_sr), ins, outs, match=["['sr']", "not described"])


# --- step graph mismatches --------------------------------------------------------------------

STEP_MISMATCHES: dict[str, tuple[Any, list[str]]] = {
    "wrong audio input name": (
        lambda s: s.with_(audio=g.Port("x", "float32", ["B", 192])),
        ["audio_input.name", "does not have"],
    ),
    "wrong audio dtype": (
        lambda s: s.with_(audio=g.Port("audio", "float64", ["B", 192])),
        ["audio_input.name dtype mismatch", "tensor(double)"],
    ),
    "wrong audio rank": (
        lambda s: s.with_(audio=g.Port("audio", "float32", ["B", 1, 192])),
        ["audio_input.name rank mismatch"],
    ),
    "fixed audio batch axis": (
        lambda s: s.with_(audio=g.Port("audio", "float32", [1, 192])),
        ["audio_input.name batch axis 0", "must be dynamic"],
    ),
    "audio length without context": (
        lambda s: s.with_(audio=g.Port("audio", "float32", ["B", 128])),
        ["audio_input.name dimension 1 mismatch", "manifest implies 192", "graph has 128"],
    ),
    "wrong state shape": (
        lambda s: s.with_(
            states=[
                (g.Port("conv", "float32", ["B", 3, 5]), g.Port("conv_out", "float32", ["B", 3, 5])),
                s.states[1],
            ]
        ),
        ["states[0].input dimension 2 mismatch", "manifest implies 2", "graph has 5"],
    ),
    "state batch on the wrong axis": (
        lambda s: s.with_(
            states=[
                s.states[0],
                (g.Port("h", "float32", ["B", 1, 4]), g.Port("h_out", "float32", ["B", 1, 4])),
            ]
        ),
        ["states[1].input batch axis 1", "fixed (1)"],
    ),
    "fixed state batch axis": (
        lambda s: s.with_(
            states=[
                (g.Port("conv", "float32", [1, 3, 2]), g.Port("conv_out", "float32", [1, 3, 2])),
                s.states[1],
            ]
        ),
        ["states[0].input batch axis 0", "must be dynamic"],
    ),
    "wrong state dtype": (
        lambda s: s.with_(
            states=[
                s.states[0],
                (g.Port("h", "float16", [1, "B", 4]), g.Port("h_out", "float16", [1, "B", 4])),
            ]
        ),
        ["states[1].input dtype mismatch", "tensor(float16)"],
    ),
    "wrong state rank": (
        lambda s: s.with_(
            states=[
                (g.Port("conv", "float32", ["B", 6]), g.Port("conv_out", "float32", ["B", 6])),
                s.states[1],
            ]
        ),
        ["states[0].input rank mismatch"],
    ),
    "missing state output": (
        lambda s: s.with_(states=[(s.states[0][0], None), s.states[1]]),
        ["states[0].output", "does not have"],
    ),
    "missing state input": (lambda s: s.with_(states=[s.states[1]]), ["states[0].input", "does not have"]),
    "missing score output": (
        lambda s: s.with_(scores=[g.Port("prob", "float32", ["B", 1])]),
        ["outputs[0].name", "does not have"],
    ),
    "wrong score dtype": (
        lambda s: s.with_(scores=[g.Port("score", "float64", ["B", 1])]),
        ["outputs[0].name dtype mismatch"],
    ),
    "wrong label count": (
        lambda s: s.with_(scores=[g.Port("score", "float32", ["B", 2])]),
        ["outputs[0].name dimension 1 mismatch", "manifest implies 1", "graph has 2"],
    ),
    "score of rank 3": (
        lambda s: s.with_(scores=[g.Port("score", "float32", ["B", 1, 1])]),
        ["outputs[0].name rank mismatch"],
    ),
    "undeclared extra input": (
        lambda s: s.with_(extra_inputs=[g.Port("gain", "float32", ["B", 1])]),
        ["['gain']", "not described by the manifest"],
    ),
    "wrong constant dtype": (
        lambda s: s.with_(constants=[g.Port("sr", "float32", [])]),
        ["constants[0].dtype mismatch", "tensor(float)"],
    ),
    "wrong constant rank": (
        lambda s: s.with_(constants=[g.Port("sr", "int64", [1])]),
        ["constants[0].shape rank mismatch"],
    ),
    "missing constant": (lambda s: s.with_(constants=[]), ["constants[0].name", "does not have"]),
}


@pytest.mark.parametrize("case", sorted(STEP_MISMATCHES))
def test_step_graph_mismatch_is_refused_naming_the_field(tmp_path: Path, case: str) -> None:
    mutate, match = STEP_MISMATCHES[case]
    refused(check_step, tmp_path, mutate(g.step_signature()), match=match)


def test_b1t_layout_is_checked(tmp_path: Path) -> None:
    m = g.toy_manifest()
    m["audio_input"]["layout"] = "B1T"
    check_step(tmp_path, g.step_signature().with_(audio=g.Port("audio", "float32", ["B", 1, 192])), m)
    # BT graph under a B1T manifest: rank refused
    refused(check_step, tmp_path, g.step_signature(), m, match=["audio_input.name rank mismatch"])
    # [B, 2, T] is not [B, 1, T]
    refused(
        check_step,
        tmp_path,
        g.step_signature().with_(audio=g.Port("audio", "float32", ["B", 2, 192])),
        m,
        match=["audio_input.name dimension 1 mismatch"],
    )


# --- sequence graph mismatches ----------------------------------------------------------------

SEQ_MISMATCHES: dict[str, tuple[Any, list[str]]] = {
    "scores without a step axis": (
        lambda s: s.with_(sequence=False, scores=[g.Port("score", "float32", ["B"])]),
        ["outputs[0].sequence_name rank mismatch"],
    ),
    "wrong sequence state shape": (
        lambda s: s.with_(
            states=[
                s.states[0],
                (g.Port("h", "float32", [1, "B", 8]), g.Port("h_out", "float32", [1, "B", 8])),
            ]
        ),
        ["states[1].input dimension 2 mismatch"],
    ),
    "fixed sequence batch": (
        lambda s: s.with_(audio=g.Port("audio", "float32", [1, "T"])),
        ["audio_input.name batch axis 0", "must be dynamic"],
    ),
    "undeclared sequence input": (
        lambda s: s.with_(extra_inputs=[g.Port("steps", "int64", [])]),
        ["['steps']", "not described"],
    ),
    "missing sequence score": (
        lambda s: s.with_(scores=[g.Port("probs", "float32", ["B", "N"])]),
        ["outputs[0].sequence_name", "does not have"],
    ),
    "wrong sequence label count": (
        lambda s: s.with_(scores=[g.Port("score", "float32", ["B", "N", 3])]),
        ["outputs[0].sequence_name dimension 2 mismatch"],
    ),
}


@pytest.mark.parametrize("case", sorted(SEQ_MISMATCHES))
def test_sequence_graph_mismatch_is_refused_naming_the_field(tmp_path: Path, case: str) -> None:
    mutate, match = SEQ_MISMATCHES[case]
    refused(check_seq, tmp_path, mutate(g.sequence_signature()), match=match)


def test_sequence_names_may_differ_from_the_step_graph(tmp_path: Path) -> None:
    m = g.toy_manifest(sequence=True)
    m["sequence"]["audio_input"] = "pcm"
    m["outputs"][0]["sequence_name"] = "scores"
    sig = g.sequence_signature().with_(
        audio=g.Port("pcm", "float32", ["B", "T"]), scores=[g.Port("scores", "float32", ["B", "N"])]
    )
    check_seq(tmp_path, sig, m)
    # the step graph's audio name is not what the sequence graph has
    refused(check_seq, tmp_path, g.sequence_signature(), m, match=["audio_input.name", "does not have"])


# --- manifest-level errors --------------------------------------------------------------------


def write_json(tmp_path: Path, manifest: dict[str, Any]) -> Path:
    path = tmp_path / "model.json"
    path.write_text(json.dumps(manifest))
    return path


def edited(**changes: Any) -> dict[str, Any]:
    m = g.toy_manifest()
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node: Any = m
        for p in parents:
            node = node[int(p)] if p.isdigit() else node[p]
        node[last] = value
    return m


MANIFEST_ERRORS: dict[str, tuple[dict[str, Any], list[str]]] = {
    "hop not a multiple of frame": (
        edited(hop_samples=200),
        ["hop_samples (200) must be a multiple of frame_samples (128)"],
    ),
    "hop of zero": (edited(hop_samples=0), ["hop_samples"]),
    "negative context": (edited(context_samples=-1), ["context_samples"]),
    "batch_axis past the rank": (edited(states__0__batch_axis=3), ["states.0", "batch_axis 3 out of range"]),
    "negative batch_axis": (edited(states__1__batch_axis=-1), ["states.1.batch_axis"]),
    "non-positive state dim": (edited(states__0__shape=[3, 0]), ["states.0", "positive"]),
    "duplicate labels": (
        edited(outputs=[{"name": "score", "labels": ["speech", "speech"]}]),
        ["labels must be unique", "speech"],
    ),
    "duplicate labels across outputs": (
        edited(outputs=[{"name": "a", "labels": ["speech"]}, {"name": "b", "labels": ["speech"]}]),
        ["labels must be unique"],
    ),
    "no labels": (edited(outputs=[{"name": "score", "labels": []}]), ["outputs.0.labels"]),
    "no outputs": (edited(outputs=[]), ["outputs"]),
    "events.label unknown": (
        edited(events={"label": "music"}),
        ["events.label 'music' is not one of ['speech']"],
    ),
    "threshold out of range": (edited(events={"threshold": 1.5}), ["events.threshold"]),
    "duplicate input names": (
        edited(constants=[{"name": "audio", "dtype": "int64", "value": 1}]),
        ["graph input names must be unique"],
    ),
    "unknown dtype": (edited(states__0__dtype="float128"), ["states.0.dtype"]),
    "unknown field": (edited(hop=128), ["hop", "Extra inputs"]),
    "bad sha256": (edited(graph={"file": "model.onnx", "sha256": "abc"}), ["graph.sha256"]),
    "bad name": (edited(name="../evil"), ["name"]),
    "missing audio_input": (
        {k: v for k, v in g.toy_manifest().items() if k != "audio_input"},
        ["audio_input", "Field required"],
    ),
    "bad scale": (edited(audio_input={"name": "audio", "scale": "int8"}), ["audio_input.scale"]),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_ERRORS))
def test_manifest_error_is_refused_naming_the_field(tmp_path: Path, case: str) -> None:
    manifest, match = MANIFEST_ERRORS[case]
    path = write_json(tmp_path, manifest)
    msg = refused(load_manifest, path, match=match)
    assert str(path) in msg


def test_bad_json_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.json"
    path.write_text('{"name": "toy", "version": ')
    refused(load_manifest, path, match=["not valid JSON", str(path)])


def test_missing_manifest_is_refused(tmp_path: Path) -> None:
    refused(load_manifest, tmp_path / "nope" / "model.json", match=["manifest not found"])


def test_defaults_and_derived_fields() -> None:
    spec = spec_of(edited(events={"threshold": 0.6}))
    assert spec.events.end_threshold == pytest.approx(0.45)
    assert spec.event_label == "speech"
    assert spec_of(edited(events={"threshold": 0.1})).events.end_threshold == pytest.approx(0.01)
    assert spec_of(edited(events={"neg_threshold": 0.2})).events.end_threshold == 0.2
