"""A tiny ONNX graph builder: the exporter writes nodes itself instead of tracing torch.

Tracing (``torch.onnx.export``) decides the graph's shapes, op choices and names for us, and
the default model's recipe had to patch its output dims and write a second module by hand to
get the fast step graph. Writing the nodes directly keeps every choice explicit: the batch
axis stays symbolic, states keep the layout the manifest declares, and one frame is lowered
to Gemm rather than Conv.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8  # ONNX Runtime 1.20+ reads IR 8 with opset 17
INT_MAX = 2**62


class Graph:
    """Nodes and initializers under construction; ``op`` returns the output name(s)."""

    def __init__(self, prefix: str = "") -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0
        self._consts: dict[tuple, str] = {}
        self.prefix = prefix

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{self.prefix}{hint}_{self._count}"

    def const(self, value: Any, hint: str = "c", dtype: Any = np.float32) -> str:
        arr = np.ascontiguousarray(np.asarray(value, dtype=dtype))
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key in self._consts:
            return self._consts[key]
        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(arr, name))
        self._consts[key] = name
        return name

    def ints(self, values: list[int]) -> str:
        return self.const(values, "i", np.int64)

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, **attrs: Any) -> Any:
        outs = [self.fresh(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, **attrs))
        return outs[0] if n_out == 1 else outs

    def rename(self, src: str, dst: str) -> None:
        """Give a graph output its public name: the producing node writes it directly
        (no Identity node on the step graph's path); a pass-through gets an Identity."""
        producer = next((n for n in self.nodes if src in n.output), None)
        if producer is None or any(dst in n.output for n in self.nodes):
            self.nodes.append(helper.make_node("Identity", [src], [dst]))
            return
        for node in self.nodes:
            for i, name in enumerate(node.input):
                if name == src:
                    node.input[i] = dst
            for i, name in enumerate(node.output):
                if name == src:
                    node.output[i] = dst

    # conveniences ------------------------------------------------------------------------

    def slice(self, x: str, start: int, end: int, axis: int, step: int = 1) -> str:
        return self.op(
            "Slice", [x, self.ints([start]), self.ints([end]), self.ints([axis]), self.ints([step])]
        )

    def unsqueeze(self, x: str, axis: int) -> str:
        return self.op("Unsqueeze", [x, self.ints([axis])])

    def squeeze(self, x: str, axis: int) -> str:
        return self.op("Squeeze", [x, self.ints([axis])])

    def concat(self, xs: list[str], axis: int) -> str:
        return xs[0] if len(xs) == 1 else self.op("Concat", xs, axis=axis)

    def model(
        self,
        inputs: list[tuple[str, list[Any]]],
        outputs: list[tuple[str, list[Any]]],
        doc: str = "",
    ) -> onnx.ModelProto:
        def info(name: str, dims: list[Any]) -> onnx.ValueInfoProto:
            return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)

        graph = helper.make_graph(
            self.nodes,
            "lookback",
            [info(n, d) for n, d in inputs],
            [info(n, d) for n, d in outputs],
            self.initializers,
        )
        m = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="lookback.streaming"
        )
        m.ir_version = IR_VERSION
        m.doc_string = doc
        onnx.checker.check_model(m)
        return m
