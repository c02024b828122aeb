"""The multi-step graph: a model's step graph wrapped in an ONNX ``Loop`` over k hops.

Built at load from the step graph alone, so no model author writes anything. The loop
body is the step graph itself: the same nodes and the same initializers (moved inside
the body, so ONNX Runtime optimises the body exactly as it optimises the step graph:
an initializer left in the outer scope is an implicit input to the body and would keep
fusions that need constant weights from firing, changing the arithmetic). Each
iteration slices its window ``[context + hop]`` out of one long audio input, the states
are loop-carried, and every score output becomes a scan output, one row per hop.

Signature (``B`` rows, ``k`` hops, ``T = context + k * hop``)::

    inputs   STEPS int64 scalar (k), AUDIO [B, T] (or [B, 1, T]),
             ``state_in(name)`` per state (the step graph's layout), the constants
    outputs  ``state_out(name)`` per state (after the last hop),
             ``scores_out(name)`` per score output: [k, B, ...]

Bit-identity with k single-step calls is not assumed: ``tests/engine/test_multistep.py``
checks it for every shipped model, at several batch sizes, k and cut points.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from lookback.engine.contract import Manifest
from lookback.errors import ContractError

STEPS = "lookback.steps"
AUDIO = "lookback.audio"
_PREFIX = "lookback."


def state_in(name: str) -> str:
    return f"{_PREFIX}in.{name}"


def state_out(name: str) -> str:
    return f"{_PREFIX}out.{name}"


def scores_out(name: str) -> str:
    return f"{_PREFIX}scan.{name}"


def build_multistep(step_graph: bytes, spec: Manifest) -> bytes:
    """Serialized multi-step model for ``spec``'s step graph (bytes, ready for ORT)."""
    model = onnx.load_from_string(step_graph)
    g = model.graph
    names = {v.name for v in [*g.input, *g.output, *g.value_info]}
    names |= {o for n in g.node for o in n.output} | {i.name for i in g.initializer}
    if any(n.startswith(_PREFIX) for n in names):
        raise ContractError(f"{spec.key}: graph names must not start with {_PREFIX!r} (reserved)")
    ports = {v.name: v for v in g.input}
    outs = {v.name: v for v in g.output}
    audio = ports[spec.audio_input.name]
    ctx, hop = spec.context_samples, spec.hop_samples
    i64 = TensorProto.INT64

    def const(name: str, value: int) -> onnx.NodeProto:
        return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, i64, [1], [value]))

    iter_ = f"{_PREFIX}iter"
    cond_in, cond_out = f"{_PREFIX}cond", f"{_PREFIX}cond_out"
    # window i = audio[..., i*hop : i*hop + context + hop]
    slicing = [
        const(f"{_PREFIX}hop", hop),
        const(f"{_PREFIX}width", ctx + hop),
        const(f"{_PREFIX}axis", -1),
        helper.make_node("Unsqueeze", [iter_, f"{_PREFIX}axis"], [f"{_PREFIX}i1"]),
        helper.make_node("Mul", [f"{_PREFIX}i1", f"{_PREFIX}hop"], [f"{_PREFIX}start"]),
        helper.make_node("Add", [f"{_PREFIX}start", f"{_PREFIX}width"], [f"{_PREFIX}end"]),
        helper.make_node(
            "Slice",
            [AUDIO, f"{_PREFIX}start", f"{_PREFIX}end", f"{_PREFIX}axis"],
            [spec.audio_input.name],
        ),
        helper.make_node("Identity", [cond_in], [cond_out]),
    ]
    body_inputs = [
        helper.make_tensor_value_info(iter_, i64, []),
        helper.make_tensor_value_info(cond_in, TensorProto.BOOL, []),
        *(ports[s.input] for s in spec.states),
    ]
    body_outputs = [
        helper.make_tensor_value_info(cond_out, TensorProto.BOOL, []),
        *(outs[s.output] for s in spec.states),
        *(outs[o.name] for o in spec.outputs),
    ]
    body = helper.make_graph(
        slicing + list(g.node),
        "step",
        body_inputs,
        body_outputs,
        initializer=list(g.initializer),
        value_info=[audio, *g.value_info],
    )
    body.sparse_initializer.extend(g.sparse_initializer)

    elem = audio.type.tensor_type.elem_type
    rank = len(audio.type.tensor_type.shape.dim)
    audio_shape: list[str | int] = ["B", "T"] if rank == 2 else ["B", 1, "T"]
    inputs = [
        helper.make_tensor_value_info(STEPS, i64, []),
        helper.make_tensor_value_info(AUDIO, elem, audio_shape),
    ]
    for s in spec.states:
        p = ports[s.input]
        inputs.append(helper.make_tensor_value_info(state_in(s.input), p.type.tensor_type.elem_type, None))
    inputs += [ports[c.name] for c in spec.constants]
    outputs = []
    for s in spec.states:
        o = outs[s.output]
        outputs.append(helper.make_tensor_value_info(state_out(s.output), o.type.tensor_type.elem_type, None))
    for o in spec.outputs:
        outputs.append(helper.make_tensor_value_info(scores_out(o.name), TensorProto.FLOAT, None))
    loop = helper.make_node(
        "Loop",
        [STEPS, "", *(state_in(s.input) for s in spec.states)],
        [*(state_out(s.output) for s in spec.states), *(scores_out(o.name) for o in spec.outputs)],
        body=body,
    )
    graph = helper.make_graph([loop], f"{spec.name}-multistep", inputs, outputs)
    out = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    out.functions.extend(model.functions)
    return out.SerializeToString()
