"""A null twin of a model: the same contract (inputs, states, outputs), almost no arithmetic.

The bench runs Lookback on it to split a session's cost in two: everything the server does
per step except the model's math (WebSocket stack, push, batching, state gathers and
scatters, one ONNX Runtime call per batch, results) against the math itself. States pass
through unchanged (``Identity``), so the engine moves exactly the bytes it moves for the
real model; every score is 0 (the window's last sample times 0), so no event fires and the
client gets one result per step, as from a model hearing no speech.

    python -m tests.bench.null_model --store DIR [--model lookback-vad]
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def make_null_model(model: str, dest_store: Path, *, source_store: Path | None = None) -> str:
    """Write ``null-<model>/1`` into ``dest_store``; returns its name."""
    import onnx
    from onnx import TensorProto, helper

    src = sorted((source_store or REPO / "model_store").joinpath(model).glob("*/model.json"))
    if not src:
        raise FileNotFoundError(f"{model} is not in the model store")
    spec = json.loads(src[-1].read_text())
    if spec["audio_input"].get("layout", "BT") != "BT":
        raise ValueError("the null model is written for a [batch, time] audio input")
    window = spec["context_samples"] + spec["hop_samples"]
    dtypes = {
        "float32": TensorProto.FLOAT,
        "float16": TensorProto.FLOAT16,
        "int64": TensorProto.INT64,
        "int32": TensorProto.INT32,
    }

    def batched(shape: list[int], axis: int) -> list[int | str]:
        dims: list[int | str] = list(shape)
        dims.insert(axis, "batch")
        return dims

    audio = spec["audio_input"]["name"]
    inputs = [helper.make_tensor_value_info(audio, TensorProto.FLOAT, ["batch", window])]
    outputs, nodes = [], []
    for st in spec["states"]:
        dims = batched(st["shape"], st.get("batch_axis", 0))
        dt = dtypes[st.get("dtype", "float32")]
        inputs.append(helper.make_tensor_value_info(st["input"], dt, dims))
        outputs.append(helper.make_tensor_value_info(st["output"], dt, dims))
        nodes.append(helper.make_node("Identity", [st["input"]], [st["output"]]))
    inits = []
    for out in spec["outputs"]:
        n = len(out["labels"])
        starts, ends = f"{out['name']}_starts", f"{out['name']}_ends"
        last, zero = f"{out['name']}_last", f"{out['name']}_zero"
        inits += [
            helper.make_tensor(starts, TensorProto.INT64, [1], [window - n]),
            helper.make_tensor(ends, TensorProto.INT64, [1], [window]),
            helper.make_tensor(f"{out['name']}_axes", TensorProto.INT64, [1], [1]),
            helper.make_tensor(zero, TensorProto.FLOAT, [], [0.0]),
        ]
        nodes += [
            helper.make_node("Slice", [audio, starts, ends, f"{out['name']}_axes"], [last]),
            helper.make_node("Mul", [last, zero], [out["name"]]),
        ]
        outputs.append(helper.make_tensor_value_info(out["name"], TensorProto.FLOAT, ["batch", n]))
    for c in spec.get("constants", []):
        inputs.append(helper.make_tensor_value_info(c["name"], dtypes[c["dtype"]], c["shape"]))
    graph = helper.make_graph(nodes, "null", inputs, outputs, initializer=inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.checker.check_model(proto)

    name = f"null-{spec['name']}"
    folder = dest_store / name / "1"
    folder.mkdir(parents=True, exist_ok=True)
    blob = proto.SerializeToString()
    (folder / "model.onnx").write_bytes(blob)
    spec.pop("sequence", None)  # offline falls back to steps; the bench streams only
    spec.update(
        name=name,
        version="1",
        license="MIT",
        description=f"Null twin of {spec['name']} for benchmarks: same contract, "
        "states passed through, every score 0.",
        graph={"file": "model.onnx", "sha256": hashlib.sha256(blob).hexdigest()},
    )
    (folder / "model.json").write_text(json.dumps(spec, indent=2))
    return name


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="lookback-vad")
    ap.add_argument("--store", type=Path, required=True, help="model store to write into")
    a = ap.parse_args()
    print(make_null_model(a.model, a.store))
