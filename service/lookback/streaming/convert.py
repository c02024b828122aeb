"""``convert``: a stock ``torch.nn.Module`` (no Lookback import) -> its streaming twin.

The module is traced with ``torch.fx.symbolic_trace`` (a plain graph of the module's own calls:
``nn.Conv1d``, ``nn.GRU``, ``F.pad``, ``x.transpose``... stay what they are, so each can be
matched to its streaming form). Running the trace on clips of two lengths and two batch sizes
tells, for every value, which axis is time, which is the batch and how many input frames
one of its frames stands for. Then every operation that looks back in time gets an explicit
state, shaped like its input with the time axis cut to what it must remember:

- ``nn.Conv1d`` / ``nn.Conv2d`` over time, ``MaxPool``/``AvgPool`` 1-D/2-D over time: the
  causal left padding (``F.pad``, or ``padding=p`` followed by a crop of the last ``p``
  frames) becomes the state, ``P`` frames initialised with the padding's zeros;
- ``nn.GRU`` / ``nn.LSTM`` (``num_layers`` >= 1, ``batch_first`` or not): ``h`` (and ``c``).

Every other operation must work frame by frame (elementwise maths, ``Linear`` on a non-time
axis, BatchNorm in eval mode, LayerNorm over non-time axes, layout changes that keep the
time axis, concatenation along channels...); one that mixes frames is refused with the
reason and, for a non-causal layer, the look-ahead it would need.

The result is a ``StreamingModel`` (front end + one ``ConvertedBody`` layer) that the existing
exporter writes and checks; its ``forward`` is the original module's own batch forward, so
the exporter's ``onnx == torch`` check compares the streamed step graph with the model the
user trained, not with a re-implementation of it.

Audio in: the module takes audio ``[B, samples]`` and its first layer is a strided
``nn.Conv1d(1, D, window, stride=hop)`` (a learnable or fixed filterbank, ``torch.stft``/mel
written as a convolution): it becomes the front end (``context_samples = window - hop``).
Or pass a Lookback ``Frontend`` and the module takes its features (``[B, T, F]`` or, with
``layout="BCT"``, ``[B, F, T]``). Out: one score vector per hop, ``[B, N]``, ``[B, N, L]``
or ``[B, L, N]`` (the time axis is found, not assumed).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from lookback.streaming.graph import INT_MAX, Graph
from lookback.streaming.layers import StateDecl, StreamingLayer, UnsupportedLayer, _gates, _np
from lookback.streaming.model import Frontend, StreamingModel


class ConversionError(UnsupportedLayer):
    """The module cannot be streamed as written; the message names the operation and why."""


_RUN_BATCHES = (2, 3, 2)
_RUN_FRAMES = (96, 96, 192)  # front-end frames per run; strides must divide 96

_FUNCS: dict[Any, str] = {
    operator.add: "add",
    operator.sub: "sub",
    operator.mul: "mul",
    operator.truediv: "div",
    operator.neg: "neg",
    operator.pow: "pow",
    operator.getitem: "getitem",
    torch.add: "add",
    torch.sub: "sub",
    torch.mul: "mul",
    torch.div: "div",
    torch.neg: "neg",
    torch.pow: "pow",
    torch.relu: "relu",
    F.relu: "relu",
    torch.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid",
    torch.tanh: "tanh",
    F.tanh: "tanh",
    torch.log: "log",
    torch.exp: "exp",
    torch.sqrt: "sqrt",
    torch.abs: "abs",
    torch.clamp: "clamp",
    torch.cat: "cat",
    torch.concat: "cat",
    torch.flatten: "flatten",
    torch.transpose: "transpose",
    torch.permute: "permute",
    torch.unsqueeze: "unsqueeze",
    torch.squeeze: "squeeze",
    torch.reshape: "reshape",
    torch.softmax: "softmax",
    F.softmax: "softmax",
    torch.log_softmax: "log_softmax",
    F.log_softmax: "log_softmax",
    torch.mean: "mean",
    torch.sum: "sum",
    torch.amax: "amax",
    F.pad: "pad",
    F.dropout: "dropout",
    F.gelu: "gelu",
    F.elu: "elu",
    F.leaky_relu: "leaky_relu",
    F.silu: "silu",
    F.relu6: "relu6",
    F.hardtanh: "hardtanh",
    F.softplus: "softplus",
    F.max_pool1d: "max_pool",
    F.max_pool2d: "max_pool",
    F.avg_pool1d: "avg_pool",
    F.avg_pool2d: "avg_pool",
    F.adaptive_avg_pool1d: "adaptive_pool",
    F.adaptive_avg_pool2d: "adaptive_pool",
    F.adaptive_max_pool1d: "adaptive_pool",
    F.adaptive_max_pool2d: "adaptive_pool",
}

_MODULES: dict[type, str] = {
    nn.ReLU: "relu",
    nn.Sigmoid: "sigmoid",
    nn.Tanh: "tanh",
    nn.GELU: "gelu",
    nn.ELU: "elu",
    nn.LeakyReLU: "leaky_relu",
    nn.SiLU: "silu",
    nn.ReLU6: "relu6",
    nn.Hardtanh: "hardtanh",
    nn.Softplus: "softplus",
    nn.Dropout: "dropout",
    nn.Dropout1d: "dropout",
    nn.Dropout2d: "dropout",
    nn.Identity: "dropout",
    nn.Softmax: "softmax",
    nn.LogSoftmax: "log_softmax",
    nn.Flatten: "flatten",
    nn.Linear: "linear",
    nn.BatchNorm1d: "batchnorm",
    nn.BatchNorm2d: "batchnorm",
    nn.LayerNorm: "layernorm",
    nn.GroupNorm: "groupnorm",
    nn.Conv1d: "conv",
    nn.Conv2d: "conv",
    nn.MaxPool1d: "max_pool",
    nn.MaxPool2d: "max_pool",
    nn.AvgPool1d: "avg_pool",
    nn.AvgPool2d: "avg_pool",
    nn.GRU: "rnn",
    nn.LSTM: "rnn",
    nn.ConstantPad1d: "pad",
    nn.ConstantPad2d: "pad",
    nn.ZeroPad2d: "pad",
    nn.AdaptiveAvgPool1d: "adaptive_pool",
    nn.AdaptiveAvgPool2d: "adaptive_pool",
    nn.AdaptiveMaxPool1d: "adaptive_pool",
    nn.AdaptiveMaxPool2d: "adaptive_pool",
    nn.ConvTranspose1d: "unsupported",
    nn.ConvTranspose2d: "unsupported",
    nn.MultiheadAttention: "unsupported",
    nn.RNN: "unsupported",
}

_UNARY = {
    "relu": "Relu",
    "sigmoid": "Sigmoid",
    "tanh": "Tanh",
    "log": "Log",
    "exp": "Exp",
    "sqrt": "Sqrt",
    "abs": "Abs",
    "neg": "Neg",
    "softplus": "Softplus",
}
_BINARY = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div"}
_METHOD_ALIASES = {"contiguous": "dropout", "view": "reshape", "float": "dropout", "clip": "clamp"}
_LAYOUT = {"transpose", "permute", "unsqueeze", "squeeze", "reshape", "flatten"}
_FRAMEWISE = (
    set(_UNARY)
    | set(_BINARY)
    | {"pow", "clamp", "dropout", "gelu", "elu", "leaky_relu", "silu", "relu6", "hardtanh", "batchnorm"}
)


@dataclass
class _Meta:
    """What the three trace runs saw at one node."""

    values: list[Any]
    tensor: bool = False
    time: int | None = None  # time axis
    batch: int | None = None  # batch axis
    stride: int = 1  # front-end frames per frame of this value
    const: bool = False  # the same in every run and independent of the input

    @property
    def shape(self) -> list[int]:
        return list(self.values[0].shape)


@dataclass
class _Window:
    """A conv or pool over time, with the left padding that becomes its state."""

    node: fx.Node
    kind: str  # conv | max_pool | avg_pool
    tax: int  # time axis of its input
    kernel: int  # along time
    dilation: int
    stride: int
    past: int  # P: frames of state = causal left padding
    pads: list[int]  # non-time padding, ONNX order [begin..., end...] over spatial axes
    module: nn.Module | None = None
    opts: dict[str, Any] = field(default_factory=dict)
    state: str = ""


@dataclass
class _Rnn:
    node: fx.Node
    module: nn.GRU | nn.LSTM
    state: str = ""


def _args(node: fx.Node) -> Any:
    return node.args


def _module(gm: fx.GraphModule, node: fx.Node) -> Any:
    return gm.get_submodule(str(node.target))


def _kwargs(node: fx.Node) -> Any:
    return node.kwargs


def _shape_of(v: Any) -> tuple[int, ...] | None:
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    try:
        return bool(a == b)
    except Exception:
        return False


def _arg(node_args: Sequence[Any], kwargs: dict[str, Any], i: int, name: str, default: Any = None) -> Any:
    if len(node_args) > i:
        return node_args[i]
    return kwargs.get(name, default)


def _pairs(v: Any, n: int) -> list[int]:
    return list(v) if isinstance(v, (tuple, list)) else [int(v)] * n


class _Trace:
    """The fx graph, the role of every node and the three runs' values."""

    def __init__(self, module: nn.Module, frontend: Frontend | None, layout: str) -> None:
        self.module = module.eval()
        try:
            self.gm = fx.symbolic_trace(self.module)
        except Exception as exc:
            raise ConversionError(
                f"torch.fx cannot trace {type(module).__name__}: {exc} (data-dependent Python control "
                "flow such as `if x.sum() > 0` or loops over a tensor's length cannot be converted)"
            ) from exc
        self.gm.graph.eliminate_dead_code()
        self.gm.recompile()
        self.nodes = list(self.gm.graph.nodes)
        inputs = [n for n in self.nodes if n.op == "placeholder"]
        if len(inputs) != 1:
            raise ConversionError(
                f"the module takes {len(inputs)} inputs; a streaming model takes one (audio)"
            )
        self.input = inputs[0]
        self.layout = layout
        self.front_node: fx.Node | None = None
        self.frontend = frontend if frontend is not None else self._find_frontend()
        self.meta = self._runs()
        self.out_node = next(n for n in self.nodes if n.op == "output")

    # the front end ---------------------------------------------------------------------

    def _find_frontend(self) -> Frontend:
        for n in self.nodes:
            if n.op == "call_module" and isinstance(self.gm.get_submodule(str(n.target)), nn.Conv1d):
                conv = self.gm.get_submodule(str(n.target))
                assert isinstance(conv, nn.Conv1d)
                if conv.in_channels != 1:
                    break
                if conv.padding not in ((0,), 0) or conv.dilation != (1,) or conv.groups != 1:
                    raise ConversionError(
                        f"front end {n.target}: the filterbank conv over samples must have padding=0, "
                        "dilation=1 (the samples before the clip are the manifest's context)"
                    )
                self.front_node = n
                break
        if self.front_node is None:
            raise ConversionError(
                "no front end: the module's first layer over audio [B, samples] must be a strided "
                "nn.Conv1d(1, D, window, stride=hop) (a filterbank); or pass frontend=Frontend(...) "
                "and a module that takes its features"
            )
        conv = self.gm.get_submodule(str(self.front_node.target))
        assert isinstance(conv, nn.Conv1d)
        basis = _np(conv.weight)[:, 0, :]
        return Frontend(basis, conv.stride[0], power=False, log=False, normalise=False)

    def _pre_front(self) -> set[fx.Node]:
        """Nodes that only prepare the audio for the filterbank (the unsqueeze)."""
        if self.front_node is None:
            return set()
        out: set[fx.Node] = set()
        todo = [a for a in self.front_node.all_input_nodes]
        while todo:
            n = todo.pop()
            if n is self.input or n in out:
                continue
            if n.op not in ("call_method", "call_function") or not set(n.users) <= {self.front_node} | out:
                raise ConversionError(f"{n.name}: the audio is used before the front end other than by it")
            out.add(n)
            todo += n.all_input_nodes
        for user in self.input.users:
            if user is not self.front_node and user not in out:
                raise ConversionError(f"{user.name}: the raw audio is used outside the front end")
        return out

    # the three runs ---------------------------------------------------------------------

    def body_input(self, feats: torch.Tensor) -> torch.Tensor:
        """Front-end features [B, T, F] -> what the module's body receives."""
        if self.front_node is None:
            return feats.transpose(1, 2) if self.layout == "BCT" else feats
        conv = self.gm.get_submodule(str(self.front_node.target))
        assert isinstance(conv, nn.Conv1d)
        y = feats.transpose(1, 2)
        return y + conv.bias[:, None] if conv.bias is not None else y

    def module_input(self, audio: torch.Tensor) -> torch.Tensor:
        if self.front_node is not None:
            return audio
        return self.body_input(self.frontend(audio))

    def _runs(self) -> dict[fx.Node, _Meta]:
        gen = torch.Generator().manual_seed(0)
        runs: list[dict[fx.Node, Any]] = []
        fe = self.frontend
        for b, n in zip(_RUN_BATCHES, _RUN_FRAMES, strict=True):
            audio = torch.randn(b, fe.context + n * fe.hop, generator=gen) * 0.1
            env: dict[fx.Node, Any] = {}
            rec = _Recorder(self.gm, env)
            try:
                with torch.no_grad():
                    rec.run(self.module_input(audio))
            except Exception as exc:
                raise ConversionError(
                    f"the module fails on a clip of {n} frames at batch {b}: {str(exc).splitlines()[0]} "
                    "(a layer sized for a fixed number of frames, such as a Linear over time or a "
                    "flatten of the whole clip, cannot stream)"
                ) from exc
            runs.append(env)
        dep = self._dependents()
        raw = self._pre_front() | {self.input} if self.front_node is not None else set()
        meta: dict[fx.Node, _Meta] = {}
        for node in self.nodes:
            if node.op == "output":
                continue
            vals = [r[node] for r in runs]
            m = _Meta(vals)
            shapes = [_shape_of(v) for v in vals]
            if all(s is not None for s in shapes):
                m.tensor = True
                s0, s1, s2 = shapes
                assert s0 is not None and s1 is not None and s2 is not None
                if node in raw:
                    pass  # audio samples, not frames
                elif len(s0) == len(s1) == len(s2):
                    batch = [i for i in range(len(s0)) if s0[i] != s1[i]]
                    time = [i for i in range(len(s0)) if s0[i] != s2[i]]
                    m.batch = batch[0] if len(batch) == 1 else None
                    if batch and batch == time:
                        raise ConversionError(
                            f"{self.where(node)}: the batch axis is merged with another axis (e.g. "
                            "reshaped to [B*T, C]): every value must keep its own batch and time axes"
                        )
                    if len(time) == 1:
                        m.time = time[0]
                        dt = s2[m.time] - s0[m.time]
                        frames = _RUN_FRAMES[2] - _RUN_FRAMES[0]
                        if frames % dt:
                            raise ConversionError(
                                f"{self.where(node)}: {s0[m.time]} frames out of {_RUN_FRAMES[0]} input "
                                "frames: the time axis is merged with another one, or a stride does not "
                                "divide 96"
                            )
                        m.stride = frames // dt
            m.const = node not in dep and all(_same(vals[0], v) for v in vals[1:])
            if node not in dep and not m.const:
                m.const = True  # independent of the audio: e.g. a parameter, read as it is
            meta[node] = m
        return meta

    def _dependents(self) -> set[fx.Node]:
        out: set[fx.Node] = set()
        for n in self.nodes:
            if n is self.input or any(a in out for a in n.all_input_nodes):
                out.add(n)
        return out

    def where(self, node: fx.Node) -> str:
        target = (
            node.target if isinstance(node.target, str) else getattr(node.target, "__name__", node.target)
        )
        return f"{node.name} ({node.op} {target})"

    def opname(self, node: fx.Node) -> str:
        if node.op == "call_module":
            mod = self.gm.get_submodule(str(node.target))
            for cls in type(mod).__mro__:
                if cls in _MODULES:
                    return _MODULES[cls]
            return "unknown"
        if node.op == "call_function":
            return _FUNCS.get(node.target, "unknown")
        if node.op == "call_method":
            name = str(node.target)
            return _METHOD_ALIASES.get(name, name)
        return node.op


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, env: dict[fx.Node, Any]) -> None:
        super().__init__(gm)
        self.rec = env

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        self.rec[n] = out
        return out


class ConvertedBody(StreamingLayer):
    """The module's graph after the front end, with an explicit state per look-back op."""

    kind = "converted"

    def __init__(self, trace: _Trace) -> None:
        super().__init__("")
        self.trace = trace
        self.gm = trace.gm
        self.in_channels = trace.frontend.out_channels
        self.out_channels = 0  # the number of labels, set by ``convert``
        self.skip = trace._pre_front() | ({trace.front_node} if trace.front_node else set())
        self.windows: dict[fx.Node, _Window] = {}
        self.rnns: dict[fx.Node, _Rnn] = {}
        self.fused_pads: dict[fx.Node, list[int]] = {}  # pad node -> its time (left, right)
        self.crops: set[fx.Node] = set()
        self._decls: list[StateDecl] = []
        self._used: set[str] = set()
        self._analyse()
        out = trace.meta[self._out_value()]
        if not out.tensor or out.time is None or out.batch is None:
            raise ConversionError(
                "the output has no time axis: the module pools over the whole clip (one score per "
                "clip); a streaming model gives one score per hop"
            )
        self.stride = out.stride

    # analysis -------------------------------------------------------------------------------

    def _out_value(self) -> fx.Node:
        arg = _args(self.trace.out_node)[0]
        if not isinstance(arg, fx.Node):
            raise ConversionError("the module must return one tensor of scores")
        return arg

    def _names(self, node: fx.Node) -> str:
        """A state name from the module path (``convs.0`` -> ``convs_0``), unique."""
        base = str(node.target).replace(".", "_") if node.op == "call_module" else node.name
        name, i = base, 1
        while name in self._used:
            i += 1
            name = f"{base}{i}"
        self._used.add(name)
        return name

    def _analyse(self) -> None:
        tr, meta = self.trace, self.trace.meta
        for node in tr.nodes:
            if node in self.skip or node.op in ("placeholder", "output", "get_attr") or meta[node].const:
                continue
            op = tr.opname(node)
            ins = [a for a in node.all_input_nodes if meta[a].tensor and meta[a].time is not None]
            m = meta[node]
            timed_in = ins[0] if ins else None
            if op == "rnn":
                self._rnn(node)
                continue
            if op == "getitem" and isinstance(_args(node)[0], fx.Node) and _args(node)[0] in self.rnns:
                if _args(node)[1] != 0 and node.users:
                    raise ConversionError(
                        f"{tr.where(node)}: the RNN's final state h_n is the state after the WHOLE clip; "
                        "a stream never has it (use the per-frame output y)"
                    )
                continue
            if not m.tensor:
                continue  # sizes and other Python values: read where needed
            if timed_in is not None and m.time is None:
                raise ConversionError(self._global(node, op))
            if m.time is not None and m.batch is None:
                raise ConversionError(
                    f"{tr.where(node)}: the batch axis is merged with another axis (e.g. reshaped to "
                    "[B*T, C]): every value must keep its own batch axis"
                )
            if op == "unknown" or op == "unsupported":
                raise ConversionError(
                    f"{tr.where(node)}: not convertible ({self._target(node)}); supported: Conv1d/Conv2d, "
                    "pools, GRU/LSTM, Linear, BatchNorm, LayerNorm, activations, Dropout, pad, cat, "
                    "arithmetic and layout ops over non-time axes"
                )
            if timed_in is None:
                continue
            tax = meta[timed_in].time
            assert tax is not None
            if op == "pad":
                self._pad(node, tax)
            elif op in ("conv", "max_pool", "avg_pool"):
                self._window(node, op, tax)
            elif op == "getitem":
                self._getitem(node, tax)
            else:
                self._framewise(node, op, tax)

    def _target(self, node: fx.Node) -> str:
        if node.op == "call_module":
            return type(self.gm.get_submodule(str(node.target))).__name__
        return str(getattr(node.target, "__name__", node.target))

    def _global(self, node: fx.Node, op: str) -> str:
        return (
            f"{self.trace.where(node)}: {self._target(node)} reduces over the time axis (a global "
            "pooling over the clip): a stream has no end to pool to. Give one score per frame "
            "(e.g. a causal running pool, or score every frame and let the server's events decide)"
        )

    def _pad(self, node: fx.Node, tax: int) -> None:
        meta = self.trace.meta[_args(node)[0]]
        if node.op == "call_module":
            mod: Any = self.gm.get_submodule(str(node.target))
            pads, value = list(mod.padding), float(getattr(mod, "value", 0.0))
        else:
            pads = list(_arg(_args(node), _kwargs(node), 1, "pad"))
            mode = _arg(_args(node), _kwargs(node), 2, "mode", "constant")
            value = float(_arg(_args(node), _kwargs(node), 3, "value", 0.0) or 0.0)
            if mode != "constant":
                raise ConversionError(
                    f"{self.trace.where(node)}: {mode!r} padding; only zero padding streams"
                )
        rank = len(meta.shape)
        k = rank - 1 - tax  # F.pad lists the last axis first
        if 2 * k + 1 >= len(pads):
            return  # the time axis is not padded
        left, right = pads[2 * k], pads[2 * k + 1]
        if value != 0.0 and (left or right):
            raise ConversionError(f"{self.trace.where(node)}: padding time with {value}; only zeros stream")
        if right:
            raise ConversionError(
                f"{self.trace.where(node)}: pads {right} frame(s) on the RIGHT of the time axis: the layer "
                f"after it looks {right} frame(s) ahead (non-causal); pad on the left only"
            )
        users = list(node.users)
        if left and not all(self.trace.opname(u) in ("conv", "max_pool", "avg_pool") for u in users):
            raise ConversionError(
                f"{self.trace.where(node)}: time padding that does not feed a conv or pool "
                f"({', '.join(u.name for u in users)}): it would shift the stream"
            )
        self.fused_pads[node] = [left, right]

    def _window(self, node: fx.Node, op: str, tax: int) -> None:
        tr = self.trace
        src = _args(node)[0]
        assert isinstance(src, fx.Node)
        rank = len(tr.meta[src].shape)
        nsp = rank - 2
        if tax < 2:
            raise ConversionError(
                f"{tr.where(node)}: the time axis is axis {tax}, a conv/pool needs it spatial"
            )
        ti = tax - 2
        mod = self.gm.get_submodule(str(node.target)) if node.op == "call_module" else None
        if op == "conv":
            assert isinstance(mod, (nn.Conv1d, nn.Conv2d))
            if mod.padding_mode != "zeros":
                raise ConversionError(
                    f"{tr.where(node)}: padding_mode={mod.padding_mode!r}; only zeros stream"
                )
            if isinstance(mod.padding, str):
                total = (mod.kernel_size[ti] - 1) * mod.dilation[ti]
                if mod.padding == "same" and total:
                    raise ConversionError(
                        f"{tr.where(node)}: padding='same' centres the kernel: it looks {total - total // 2} "
                        f"frame(s) ahead (non-causal). Pad {total} frames on the left instead "
                        f"(F.pad(x, (..., {total}, 0)) or padding={total} and crop the last {total} outputs)"
                    )
                padding = [0] * nsp
            else:
                padding = list(mod.padding)
            kernel, dil, stride = list(mod.kernel_size), list(mod.dilation), list(mod.stride)
        else:
            a, kw = _args(node), _kwargs(node)
            if mod is not None:
                kernel = _pairs(mod.kernel_size, nsp)
                stride = _pairs(mod.stride or mod.kernel_size, nsp)
                padding = _pairs(mod.padding, nsp)
                dil = _pairs(getattr(mod, "dilation", 1), nsp)
                ceil = bool(mod.ceil_mode)
                include = bool(getattr(mod, "count_include_pad", True))
            else:
                kernel = _pairs(_arg(a, kw, 1, "kernel_size"), nsp)
                stride = _pairs(_arg(a, kw, 2, "stride") or kernel, nsp)
                padding = _pairs(_arg(a, kw, 3, "padding", 0), nsp)
                dil = _pairs(_arg(a, kw, 4, "dilation", 1) if op == "max_pool" else 1, nsp)
                ceil = bool(_arg(a, kw, 5 if op == "max_pool" else 4, "ceil_mode", False))
                include = bool(_arg(a, kw, 5, "count_include_pad", True)) if op == "avg_pool" else True
            if ceil:
                raise ConversionError(f"{tr.where(node)}: ceil_mode=True pools past the last frame")
            if any(padding):
                raise ConversionError(
                    f"{tr.where(node)}: a pool's own padding (-inf for max, excluded for avg) does not "
                    "stream; pad explicitly with F.pad(..., value=0) before it"
                )
        past = 0
        if src in self.fused_pads:
            past = self.fused_pads[src][0]
            if padding[ti]:
                raise ConversionError(f"{tr.where(node)}: padded twice over time (F.pad and padding=)")
        k, d, s = kernel[ti], dil[ti], stride[ti]
        reach = (k - 1) * d + 1
        if padding[ti]:
            users = list(node.users)
            p = padding[ti]
            crop = users[0] if len(users) == 1 else None
            if crop is None or not self._is_crop(crop, tr.meta[node].time, p) or s != 1:
                raise ConversionError(
                    f"{tr.where(node)}: padding={p} on the time axis pads both sides: without cropping the "
                    f"last {p} outputs (y[..., :-{p}]) the layer looks {p} frame(s) ahead (non-causal)"
                    + ("; with a stride, pad with F.pad on the left instead" if s != 1 else "")
                )
            self.crops.add(crop)
            past = p
        lookahead = reach - s - past
        if lookahead > 0:
            raise ConversionError(
                f"{tr.where(node)}: kernel {k} x dilation {d} with {past} frame(s) of left padding looks "
                f"{lookahead} frame(s) ahead (non-causal): pad {reach - s} frames on the left"
            )
        if past > reach - 1:
            raise ConversionError(
                f"{tr.where(node)}: {past} frames of left padding is more than the kernel reaches "
                f"({reach - 1}): it delays the output; pad exactly (kernel-1)*dilation"
            )
        pads = [0 if i == ti else padding[i] for i in range(nsp)] * 2
        w = _Window(node, op, tax, k, d, s, past, pads, mod)
        if op != "conv":
            w.opts = {"kernel": kernel, "stride": stride, "dilation": dil, "include": include}
        if past:
            w.state = self._names(node)
            shape = list(tr.meta[src].shape)
            bax = tr.meta[src].batch
            assert bax is not None
            shape[tax] = past
            del shape[bax]
            self._decls.append(StateDecl(w.state, tuple(shape), bax))
        self.windows[node] = w

    def _is_crop(self, node: fx.Node, tax: int | None, p: int) -> bool:
        if self.trace.opname(node) != "getitem" or tax is None:
            return False
        idx = _index_axes(_args(node)[1], len(self.trace.meta[_args(node)[0]].shape))
        if idx is None:
            return False
        for axis, item in idx:
            if axis == tax:
                if not (
                    isinstance(item, slice)
                    and item.start in (None, 0)
                    and item.stop == -p
                    and item.step in (None, 1)
                ):
                    return False
            elif not (isinstance(item, slice) and item == slice(None)):
                return False
        return True

    def _getitem(self, node: fx.Node, tax: int) -> None:
        if node in self.crops:
            return
        idx = _index_axes(_args(node)[1], len(self.trace.meta[_args(node)[0]].shape))
        if idx is None:
            raise ConversionError(
                f"{self.trace.where(node)}: indexing with a tensor or a Python value from shapes"
            )
        for axis, item in idx:
            if axis == tax and not (isinstance(item, slice) and item == slice(None)):
                raise ConversionError(
                    f"{self.trace.where(node)}: indexes the time axis ({item}): a stream only has the "
                    "frames so far (a crop after a conv with padding=p must be exactly [..., :-p])"
                )

    def _framewise(self, node: fx.Node, op: str, tax: int) -> None:
        tr, m = self.trace, self.trace.meta[node]
        a, kw = _args(node), _kwargs(node)
        src = a[0] if a and isinstance(a[0], fx.Node) else None
        rank = len(tr.meta[src].shape) if src is not None and tr.meta[src].tensor else 0

        def bad(why: str) -> ConversionError:
            return ConversionError(f"{tr.where(node)}: {why}")

        if op in _FRAMEWISE:
            if op == "batchnorm":
                mod = self.gm.get_submodule(str(node.target))
                assert isinstance(mod, nn.modules.batchnorm._BatchNorm)
                if tax == 1:
                    raise bad("BatchNorm over axis 1, which is time here: channels must be axis 1")
                if mod.running_mean is None:
                    raise bad("BatchNorm without running statistics normalises over the batch and clip")
            return
        if op == "linear":
            if tax == rank - 1:
                raise bad("Linear over the time axis mixes frames (transpose so channels are last)")
        elif op == "layernorm":
            mod = self.gm.get_submodule(str(node.target))
            assert isinstance(mod, nn.LayerNorm)
            if tax >= rank - len(mod.normalized_shape):
                raise bad("LayerNorm over the time axis normalises over the whole clip")
        elif op == "groupnorm":
            raise bad(
                "GroupNorm normalises over every axis after the channels, time included (a clip statistic)"
            )
        elif op in ("softmax", "log_softmax"):
            dim: Any = _module(self.gm, node).dim if node.op == "call_module" else _arg(a, kw, 1, "dim")
            if dim is None or dim % rank == tax:
                raise bad("softmax over the time axis needs the whole clip")
        elif op in ("mean", "sum", "amax"):
            dims = _arg(a, kw, 1, "dim")
            dims = [dims] if isinstance(dims, int) else dims
            if dims is None or any(int(d) % rank == tax for d in dims):
                raise ConversionError(self._global(node, op))
        elif op == "cat":
            dim = _arg(a, kw, 1, "dim", 0)
            tensors = a[0]
            r = len(tr.meta[tensors[0]].shape)
            if dim % r == m.time:
                raise bad("concatenation along time: a stream gets its frames in order, once")
        elif op in _LAYOUT:
            assert src is not None
            ins = tr.meta[src]
            if (
                m.time is None
                or ins.shape[tax] != m.shape[m.time]
                or (op in ("reshape", "flatten") and _before(ins, tax) != _before(m, m.time))
            ):
                raise bad("a reshape that merges the time axis with another axis")
        elif op == "adaptive_pool":
            raise ConversionError(self._global(node, op))
        elif op in ("size", "dim"):
            return
        else:
            raise bad(f"{op!r} is not known to work frame by frame")

    def _rnn(self, node: fx.Node) -> None:
        tr = self.trace
        mod = self.gm.get_submodule(str(node.target))
        assert isinstance(mod, (nn.GRU, nn.LSTM))
        if mod.bidirectional:
            raise ConversionError(
                f"{tr.where(node)}: a bidirectional {type(mod).__name__} reads the clip backwards from its "
                "end: its look-ahead is the whole clip. Use a unidirectional one"
            )
        if isinstance(mod, nn.LSTM) and mod.proj_size:
            raise ConversionError(f"{tr.where(node)}: LSTM proj_size is not converted")
        if (len(_args(node)) > 1 and _args(node)[1] is not None) or _kwargs(node).get("hx") is not None:
            raise ConversionError(
                f"{tr.where(node)}: an explicit initial state; the stream starts from zeros"
            )
        src = _args(node)[0]
        assert isinstance(src, fx.Node)
        tax = tr.meta[src].time
        if tax != (1 if mod.batch_first else 0):
            raise ConversionError(
                f"{tr.where(node)}: the RNN's time axis is {'1' if mod.batch_first else '0'} "
                f"(batch_first={mod.batch_first}) but the input's time axis is {tax}"
            )
        r = _Rnn(node, mod, self._names(node))
        shape = (mod.num_layers, mod.hidden_size)
        if isinstance(mod, nn.LSTM):
            self._decls += [StateDecl(r.state + "_h", shape, 1), StateDecl(r.state + "_c", shape, 1)]
        else:
            self._decls.append(StateDecl(r.state, shape, 1))
        self.rnns[node] = r

    # StreamingLayer --------------------------------------------------------------------------

    def state_decls(self) -> list[StateDecl]:
        return list(self._decls)

    def _order(self) -> list[fx.Node]:
        return [n for n in self.trace.nodes if n not in self.skip and n.op not in ("placeholder", "output")]

    def forward_stateful(
        self, x: torch.Tensor, states: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        tr = self.trace
        env: dict[fx.Node, Any] = {}
        feed = tr.body_input(x)
        env[tr.front_node or tr.input] = feed
        st = {d.suffix: s for d, s in zip(self._decls, states, strict=True)}
        new: dict[str, torch.Tensor] = {}
        for node in self._order():
            m = tr.meta[node]
            if m.const:
                env[node] = m.values[0]
                continue
            args = fx.node.map_arg(_args(node), lambda n: env[n])
            kwargs = fx.node.map_arg(_kwargs(node), lambda n: env[n])
            if node in self.windows:
                env[node] = self._torch_window(self.windows[node], args[0], st, new)
            elif node in self.rnns:
                env[node] = self._torch_rnn(self.rnns[node], args[0], st, new)
            elif node in self.fused_pads:
                env[node] = self._torch_pad(node, args, kwargs)
            elif node in self.crops:
                env[node] = args[0]
            else:
                env[node] = _call(self.gm, node, args, kwargs)
        y = self._to_bnl(env[self._out_value()])
        return y, [new[d.suffix] for d in self._decls]

    def _torch_pad(self, node: fx.Node, args: Any, kwargs: Any) -> torch.Tensor:
        x = args[0]
        tax = self.trace.meta[_args(node)[0]].time
        assert tax is not None
        if node.op == "call_module":
            pads = list(_module(self.gm, node).padding)
        else:
            pads = list(_arg(args, kwargs, 1, "pad"))
        k = x.dim() - 1 - tax
        if 2 * k < len(pads):
            pads[2 * k] = pads[2 * k + 1] = 0
        return F.pad(x, pads) if any(pads) else x

    def _torch_window(
        self, w: _Window, x: torch.Tensor, st: dict[str, torch.Tensor], new: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        buf = torch.cat([st[w.state], x], dim=w.tax) if w.past else x
        if w.past:
            new[w.state] = buf.narrow(w.tax, buf.shape[w.tax] - w.past, w.past)
        nsp = buf.dim() - 2
        # ONNX pads [b0, b1, e0, e1] -> F.pad's last-axis-first (b_last, e_last, ...)
        fpads: list[int] = []
        for i in reversed(range(nsp)):
            fpads += [w.pads[i], w.pads[nsp + i]]
        if any(fpads):
            buf = F.pad(buf, fpads)
        if w.kind == "conv":
            mod = w.module
            assert isinstance(mod, (nn.Conv1d, nn.Conv2d))
            conv: Any = F.conv1d if nsp == 1 else F.conv2d
            return conv(buf, mod.weight, mod.bias, mod.stride, 0, mod.dilation, mod.groups)
        o = w.opts
        if w.kind == "max_pool":
            fn: Any = F.max_pool1d if nsp == 1 else F.max_pool2d
            return fn(buf, o["kernel"], o["stride"], 0, o["dilation"])
        pool: Any = F.avg_pool1d if nsp == 1 else F.avg_pool2d
        return pool(buf, o["kernel"], o["stride"], 0)

    def _torch_rnn(
        self, r: _Rnn, x: torch.Tensor, st: dict[str, torch.Tensor], new: dict[str, torch.Tensor]
    ) -> Any:
        if isinstance(r.module, nn.LSTM):
            y, (h, c) = r.module(x, (st[r.state + "_h"], st[r.state + "_c"]))
            new[r.state + "_h"], new[r.state + "_c"] = h, c
            return y, (h, c)
        y, h = r.module(x, st[r.state])
        new[r.state] = h
        return y, h

    def _to_bnl(self, y: torch.Tensor) -> torch.Tensor:
        m = self.trace.meta[self._out_value()]
        assert m.time is not None and m.batch is not None
        rest = [i for i in range(y.dim()) if i not in (m.batch, m.time)]
        y = y.permute(m.batch, m.time, *rest)
        return y.reshape(y.shape[0], y.shape[1], -1)

    # ONNX --------------------------------------------------------------------------------------

    def emit(self, g: Graph, x: str, frames: int | None, states: list[str]) -> tuple[str, list[str]]:
        tr = self.trace
        if frames == 1:
            x = g.unsqueeze(x, 1)
        env: dict[fx.Node, Any] = {}
        if tr.front_node is not None:
            feed = g.op("Transpose", [x], perm=[0, 2, 1])
            conv = self.gm.get_submodule(str(tr.front_node.target))
            assert isinstance(conv, nn.Conv1d)
            if conv.bias is not None:
                feed = g.op("Add", [feed, g.const(_np(conv.bias)[:, None], "fe_bias")])
            env[tr.front_node] = feed
        else:
            env[tr.input] = g.op("Transpose", [x], perm=[0, 2, 1]) if tr.layout == "BCT" else x
        st = {d.suffix: s for d, s in zip(self._decls, states, strict=True)}
        new: dict[str, str] = {}
        e = _Emitter(self, g, env)
        for node in self._order():
            m = tr.meta[node]
            if m.const:
                env[node] = m.values[0]
                continue
            if node in self.windows:
                env[node] = e.window(self.windows[node], env[_args(node)[0]], st, new)
            elif node in self.rnns:
                env[node] = (e.rnn(self.rnns[node], env[_args(node)[0]], st, new), None)
            elif node in self.crops:
                env[node] = env[_args(node)[0]]
            elif not m.tensor:
                env[node] = None  # a size: reshapes read the traced shapes instead
            elif (
                node.op == "call_function"
                and node.target is operator.getitem
                and isinstance(
                    env.get(_args(node)[0]),
                    tuple,
                )
            ):
                env[node] = env[_args(node)[0]][_args(node)[1]]
            else:
                env[node] = e.node(node)
        out = self._out_value()
        m = tr.meta[out]
        assert m.time is not None and m.batch is not None
        rank = len(m.shape)
        rest = [i for i in range(rank) if i not in (m.batch, m.time)]
        y = env[out]
        perm = [m.batch, m.time, *rest]
        if perm != list(range(rank)):
            y = g.op("Transpose", [y], perm=perm)
        if rank != 3:
            y = g.op("Reshape", [y, g.ints([0, 0, -1])])
        if frames is not None:
            y = g.squeeze(y, 1)
        return y, [new[d.suffix] for d in self._decls]


def _before(m: _Meta, axis: int) -> int:
    """Values per frame before the time axis, batch excluded: a reshape must keep it."""
    return math.prod(s for i, s in enumerate(m.shape[:axis]) if i != m.batch)


def _call(gm: fx.GraphModule, node: fx.Node, args: Any, kwargs: Any) -> Any:
    if node.op == "call_function":
        fn: Any = node.target
        return fn(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], str(node.target))(*args[1:], **kwargs)
    if node.op == "call_module":
        return gm.get_submodule(str(node.target))(*args, **kwargs)
    if node.op == "get_attr":
        obj: Any = gm
        for part in str(node.target).split("."):
            obj = getattr(obj, part)
        return obj
    raise ConversionError(f"{node.name}: unexpected node {node.op}")


def _index_axes(index: Any, rank: int) -> list[tuple[int, Any]] | None:
    """``x[index]`` as (input axis, slice | int | None) pairs; None if not static."""
    items = list(index) if isinstance(index, tuple) else [index]
    if any(isinstance(i, (fx.Node, torch.Tensor)) for i in items):
        return None
    for i in items:
        if isinstance(i, slice) and any(isinstance(v, fx.Node) for v in (i.start, i.stop, i.step)):
            return None
    used = sum(1 for i in items if i is not None and i is not Ellipsis)
    out: list[tuple[int, Any]] = []
    axis = 0
    for i in items:
        if i is Ellipsis:
            axis += rank - used
            continue
        out.append((axis, i))
        if i is not None:
            axis += 1
    return out


class _Emitter:
    """ONNX nodes for the frame-by-frame operations; the time axis may be anywhere."""

    def __init__(self, body: ConvertedBody, g: Graph, env: dict[fx.Node, Any]) -> None:
        self.body, self.g, self.env, self.tr = body, g, env, body.trace

    def val(self, a: Any) -> Any:
        if isinstance(a, fx.Node):
            v = self.env[a]
            if isinstance(v, torch.Tensor):
                return self.g.const(_np(v), "k")
            if v is None:
                raise ConversionError(f"{a.name}: a value computed from the input's shape used as data")
            return v
        if isinstance(a, (int, float)) and not isinstance(a, bool):
            return self.g.const(np.float32(a), "k")
        if isinstance(a, torch.Tensor):
            return self.g.const(_np(a), "k")
        return a

    def rank(self, n: Any) -> int:
        return len(self.tr.meta[n].shape)

    def node(self, node: fx.Node) -> str:
        g, tr = self.g, self.tr
        op = tr.opname(node)
        a, kw = _args(node), _kwargs(node)
        mod: Any = self.body.gm.get_submodule(str(node.target)) if node.op == "call_module" else None
        x = a[0] if a else None
        if op in ("dropout", "pad") and node in self.body.fused_pads:
            return self._pad(node)
        if op == "pad":
            return self._pad(node)
        if op == "dropout":
            return self.val(x)
        if op in _UNARY:
            return g.op(_UNARY[op], [self.val(x)])
        if op in _BINARY:
            y = _arg(a, kw, 1, "other")
            alpha = kw.get("alpha", 1)
            yv = self.val(y)
            if alpha != 1:
                yv = g.op("Mul", [yv, self.val(alpha)])
            return g.op(_BINARY[op], [self.val(x), yv])
        if op == "pow":
            e = _arg(a, kw, 1, "exponent")
            xv = self.val(x)
            return g.op("Mul", [xv, xv]) if e == 2 else g.op("Pow", [xv, self.val(e)])
        if op == "clamp":
            lo, hi = _arg(a, kw, 1, "min"), _arg(a, kw, 2, "max")
            v = self.val(x)
            if lo is not None:
                v = g.op("Max", [v, self.val(float(lo))])
            if hi is not None:
                v = g.op("Min", [v, self.val(float(hi))])
            return v
        if op in ("relu6", "hardtanh"):
            lo, hi = (
                (0.0, 6.0)
                if op == "relu6"
                else (
                    (mod.min_val, mod.max_val)
                    if mod is not None
                    else (_arg(a, kw, 1, "min_val", -1.0), _arg(a, kw, 2, "max_val", 1.0))
                )
            )
            return g.op("Min", [g.op("Max", [self.val(x), self.val(float(lo))]), self.val(float(hi))])
        if op == "leaky_relu":
            slope = mod.negative_slope if mod is not None else _arg(a, kw, 1, "negative_slope", 0.01)
            return g.op("LeakyRelu", [self.val(x)], alpha=float(slope))
        if op == "elu":
            alpha = mod.alpha if mod is not None else _arg(a, kw, 1, "alpha", 1.0)
            return g.op("Elu", [self.val(x)], alpha=float(alpha))
        if op == "silu":
            v = self.val(x)
            return g.op("Mul", [v, g.op("Sigmoid", [v])])
        if op == "gelu":
            approx = mod.approximate if mod is not None else kw.get("approximate", "none")
            if approx != "none":
                raise ConversionError(f"{tr.where(node)}: gelu(approximate={approx!r}) is not converted")
            v = self.val(x)
            erf = g.op("Erf", [g.op("Mul", [v, self.val(1 / math.sqrt(2))])])
            return g.op("Mul", [g.op("Mul", [v, self.val(0.5)]), g.op("Add", [erf, self.val(1.0)])])
        if op in ("softmax", "log_softmax"):
            dim = mod.dim if mod is not None else _arg(a, kw, 1, "dim")
            return g.op("Softmax" if op == "softmax" else "LogSoftmax", [self.val(x)], axis=int(dim))
        if op in ("mean", "sum", "amax"):
            dims = _arg(a, kw, 1, "dim")
            dims = [dims] if isinstance(dims, int) else list(dims)
            keep = int(bool(_arg(a, kw, 2, "keepdim", False)))
            onnx_op = {"mean": "ReduceMean", "sum": "ReduceSum", "amax": "ReduceMax"}[op]
            r = self.rank(x)
            axes = [int(d) % r for d in dims]
            if onnx_op == "ReduceSum":
                return g.op(onnx_op, [self.val(x), g.ints(axes)], keepdims=keep)
            return g.op(onnx_op, [self.val(x)], axes=axes, keepdims=keep)
        if op == "cat":
            tensors = [self.val(t) for t in a[0]]
            dim = int(_arg(a, kw, 1, "dim", 0)) % self.rank(a[0][0])
            return g.op("Concat", tensors, axis=dim)
        if op == "linear":
            assert isinstance(mod, nn.Linear)
            y = g.op("MatMul", [self.val(x), g.const(_np(mod.weight).T, "wT")])
            return g.op("Add", [y, g.const(_np(mod.bias), "b")]) if mod.bias is not None else y
        if op == "batchnorm":
            assert isinstance(mod, nn.modules.batchnorm._BatchNorm)
            assert mod.running_mean is not None and mod.running_var is not None
            scale = 1.0 / torch.sqrt(mod.running_var + mod.eps)
            w = mod.weight if mod.weight is not None else torch.ones_like(scale)
            b = mod.bias if mod.bias is not None else torch.zeros_like(scale)
            mul = (w * scale).detach()
            add = (b - mod.running_mean * w * scale).detach()
            shape = [-1] + [1] * (self.rank(x) - 2)
            return g.op(
                "Add",
                [
                    g.op("Mul", [self.val(x), g.const(_np(mul).reshape(shape), "bn_w")]),
                    g.const(_np(add).reshape(shape), "bn_b"),
                ],
            )
        if op == "layernorm":
            assert isinstance(mod, nn.LayerNorm)
            shape = list(mod.normalized_shape)
            lw = _np(mod.weight) if mod.weight is not None else np.ones(shape, np.float32)
            lb = _np(mod.bias) if getattr(mod, "bias", None) is not None else np.zeros(shape, np.float32)
            return g.op(
                "LayerNormalization",
                [self.val(x), g.const(lw, "ln_w"), g.const(lb, "ln_b")],
                axis=-len(shape),
                epsilon=float(mod.eps),
            )
        if op == "transpose":
            r = self.rank(x)
            d0, d1 = int(_arg(a, kw, 1, "dim0")) % r, int(_arg(a, kw, 2, "dim1")) % r
            perm = list(range(r))
            perm[d0], perm[d1] = perm[d1], perm[d0]
            return g.op("Transpose", [self.val(x)], perm=perm)
        if op == "permute":
            dims = a[1:] if node.op == "call_method" else a[1]
            if node.op == "call_method" and len(dims) == 1 and isinstance(dims[0], (tuple, list)):
                dims = dims[0]
            r = self.rank(x)
            return g.op("Transpose", [self.val(x)], perm=[int(d) % r for d in dims])
        if op == "unsqueeze":
            d = int(_arg(a, kw, 1, "dim")) % (self.rank(x) + 1)
            return g.unsqueeze(self.val(x), d)
        if op == "squeeze":
            d = _arg(a, kw, 1, "dim")
            shape = self.tr.meta[cast(fx.Node, x)].shape
            dims = (
                [i for i, s in enumerate(shape) if s == 1]
                if d is None
                else ([int(d)] if isinstance(d, int) else list(d))
            )
            dims = [i % len(shape) for i in dims if shape[i % len(shape)] == 1]
            return g.op("Squeeze", [self.val(x), g.ints(dims)]) if dims else self.val(x)
        if op in ("reshape", "flatten"):
            return self._reshape(node)
        if op == "getitem":
            return self._getitem(node)
        raise ConversionError(f"{tr.where(node)}: no ONNX lowering for {op!r}")

    def _pad(self, node: fx.Node) -> str:
        a, kw = _args(node), _kwargs(node)
        x = a[0]
        if node.op == "call_module":
            mod: Any = self.body.gm.get_submodule(str(node.target))
            pads, value = list(mod.padding), float(getattr(mod, "value", 0.0))
        else:
            pads, value = list(_arg(a, kw, 1, "pad")), float(_arg(a, kw, 3, "value", 0.0) or 0.0)
        r = self.rank(x)
        tax = self.tr.meta[x].time
        begin, end = [0] * r, [0] * r
        for i in range(len(pads) // 2):
            axis = r - 1 - i
            if axis == tax:
                continue  # the time padding is the next layer's state
            begin[axis], end[axis] = pads[2 * i], pads[2 * i + 1]
        if not any(begin) and not any(end):
            return self.val(x)
        return self.g.op("Pad", [self.val(x), self.g.ints(begin + end), self.val(value)])

    def _reshape(self, node: fx.Node) -> str:
        src = _args(node)[0]
        mi, mo = self.tr.meta[src], self.tr.meta[node]
        shape = list(mo.shape)
        dyn = [i for i in (mo.batch, mo.time) if i is not None]
        for i in dyn:
            same = i == (mi.batch if i == mo.batch else mi.time) and i < len(mi.shape)
            shape[i] = 0 if same else -1
        if shape.count(-1) > 1:
            raise ConversionError(
                f"{self.tr.where(node)}: a reshape that moves both the batch and the time axis"
            )
        return self.g.op("Reshape", [self.val(src), self.g.ints(shape)])

    def _getitem(self, node: fx.Node) -> str:
        src = _args(node)[0]
        shape = self.tr.meta[src].shape
        idx = _index_axes(_args(node)[1], len(shape))
        if idx is None:
            raise ConversionError(f"{self.tr.where(node)}: indexing that is not static")
        v = self.val(src)
        squeeze, unsq = [], []
        out_axis = 0
        for axis, item in idx:
            if item is None:
                unsq.append(out_axis)
                out_axis += 1
                continue
            if isinstance(item, int):
                i = item % shape[axis]
                v = self.g.slice(v, i, i + 1, axis=axis)
                squeeze.append(axis)
                continue
            assert isinstance(item, slice)
            if item != slice(None):
                start = 0 if item.start is None else item.start
                stop = INT_MAX if item.stop is None else item.stop
                v = self.g.slice(v, start, stop, axis=axis, step=item.step or 1)
            out_axis += 1
        if squeeze:
            v = self.g.op("Squeeze", [v, self.g.ints(squeeze)])
        for u in unsq:
            v = self.g.unsqueeze(v, u)
        return v

    def window(self, w: _Window, x: str, st: dict[str, str], new: dict[str, str]) -> str:
        g = self.g
        buf = g.concat([st[w.state], x], axis=w.tax) if w.past else x
        if w.past:
            new[w.state] = g.slice(buf, -w.past, INT_MAX, axis=w.tax)
        if w.kind == "conv":
            mod = w.module
            assert isinstance(mod, (nn.Conv1d, nn.Conv2d))
            inputs = [buf, g.const(_np(mod.weight), "w")]
            if mod.bias is not None:
                inputs.append(g.const(_np(mod.bias), "b"))
            return g.op(
                "Conv",
                inputs,
                kernel_shape=list(mod.kernel_size),
                strides=list(mod.stride),
                dilations=list(mod.dilation),
                group=int(mod.groups),
                pads=w.pads,
            )
        o = w.opts
        if w.kind == "max_pool":
            return g.op(
                "MaxPool",
                [buf],
                kernel_shape=o["kernel"],
                strides=o["stride"],
                dilations=o["dilation"],
                pads=w.pads,
            )
        return g.op(
            "AveragePool",
            [buf],
            kernel_shape=o["kernel"],
            strides=o["stride"],
            pads=w.pads,
            count_include_pad=int(o["include"]),
        )

    def rnn(self, r: _Rnn, x: str, st: dict[str, str], new: dict[str, str]) -> str:
        g, mod = self.g, r.module
        lstm = isinstance(mod, nn.LSTM)
        seq = g.op("Transpose", [x], perm=[1, 0, 2]) if mod.batch_first else x
        order, n = ([0, 3, 1, 2], 4) if lstm else ([1, 0, 2], 3)
        hs, cs = [], []
        H = mod.hidden_size
        for layer in range(mod.num_layers):
            sfx = f"_l{layer}"
            w = g.const(_gates(getattr(mod, "weight_ih" + sfx), order, n)[None], "W")
            rr = g.const(_gates(getattr(mod, "weight_hh" + sfx), order, n)[None], "R")
            if mod.bias:
                b = np.concatenate(
                    [
                        _gates(getattr(mod, "bias_ih" + sfx), order, n),
                        _gates(getattr(mod, "bias_hh" + sfx), order, n),
                    ]
                )[None]
            else:
                b = np.zeros((1, 2 * n * H), np.float32)
            if lstm:
                h0 = g.slice(st[r.state + "_h"], layer, layer + 1, axis=0)
                c0 = g.slice(st[r.state + "_c"], layer, layer + 1, axis=0)
                y, h, c = g.op("LSTM", [seq, w, rr, g.const(b, "B"), "", h0, c0], n_out=3, hidden_size=H)
                cs.append(c)
            else:
                h0 = g.slice(st[r.state], layer, layer + 1, axis=0)
                y, h = g.op(
                    "GRU",
                    [seq, w, rr, g.const(b, "B"), "", h0],
                    n_out=2,
                    hidden_size=H,
                    linear_before_reset=1,
                )
            hs.append(h)
            seq = g.squeeze(y, 1)
        if lstm:
            new[r.state + "_h"], new[r.state + "_c"] = g.concat(hs, 0), g.concat(cs, 0)
        else:
            new[r.state] = g.concat(hs, 0)
        return g.op("Transpose", [seq], perm=[1, 0, 2]) if mod.batch_first else seq


class ConvertedModel(StreamingModel):
    """The streaming twin; ``forward`` is the ORIGINAL module's batch forward ([B, N, L]),
    so ``export``'s ``onnx == torch`` check compares the stream with what was trained."""

    def __init__(self, trace: _Trace, body: ConvertedBody, labels: Sequence[str], sample_rate: int) -> None:
        super().__init__(trace.frontend, body, labels, activation="none", sample_rate=sample_rate)
        self.trace = trace
        self.source = trace.module

    def reference(self, audio: torch.Tensor) -> torch.Tensor:
        """The original module on whole clips, as [B, N, L]."""
        self.steps_of(audio)
        y = self.source(self.trace.module_input(audio))
        assert isinstance(self.body, ConvertedBody)
        return self.body._to_bnl(y)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        return self.reference(audio)

    def latency_ms(self) -> float:
        """Worst-case wait from a sample's arrival to the score that first sees it."""
        return 1000.0 * self.hop_samples / self.sample_rate


def convert(
    module: nn.Module,
    *,
    labels: Sequence[str] | None = None,
    frontend: Frontend | None = None,
    layout: str = "BTC",
    sample_rate: int = 16000,
    hop: int | None = None,
) -> ConvertedModel:
    """Trace ``module`` (eval mode) and return its streaming twin, ready for ``export``.

    ``labels`` names the score columns (default ``score`` or ``score0..``); ``hop``, if
    given, is checked against the hop the module implies (front end hop x body strides).
    Raises ``ConversionError`` naming the first operation that cannot stream.
    """
    if layout not in ("BTC", "BCT"):
        raise ValueError("layout is 'BTC' ([B, T, F] features) or 'BCT' ([B, F, T])")
    trace = _Trace(module, frontend, layout)
    body = ConvertedBody(trace)  # names the first operation that cannot stream
    out = trace.meta[body._out_value()]
    width = math.prod(s for i, s in enumerate(out.shape) if i not in (out.time, out.batch))
    names = (
        list(labels)
        if labels is not None
        else (["score"] if width == 1 else [f"score{i}" for i in range(width)])
    )
    if len(names) != width:
        raise ValueError(f"the module gives {width} scores per frame, {len(names)} labels given")
    body.out_channels = len(names)
    model = ConvertedModel(trace, body, names, sample_rate)
    if hop is not None and model.hop_samples != hop:
        raise ConversionError(
            f"the module's hop is {model.hop_samples} samples (front end {trace.frontend.hop} x stride "
            f"{body.stride}), not {hop}"
        )
    return model.eval()


def load_module(ref: str, weights: str | None) -> nn.Module:
    """``path/to/file.py:build`` -> ``build()`` (a function or a class), with ``weights``
    (a ``state_dict`` saved by ``torch.save``; ``-`` or None keeps the module's own)."""
    import importlib.util
    import sys
    from pathlib import Path

    path, _, attr = ref.rpartition(":")
    if not path or not attr:
        raise ValueError(f"{ref!r}: expected path/to/module.py:build")
    file = Path(path).resolve()
    spec = importlib.util.spec_from_file_location(f"lookback_convert_{file.stem}", file)
    if spec is None or spec.loader is None:
        raise ValueError(f"{file}: not a Python file")
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(file.parent))  # the file's own imports of its neighbours
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(file.parent))
    module = getattr(mod, attr)()
    if not isinstance(module, nn.Module):
        raise ValueError(f"{ref} returned {type(module).__name__}, not a torch.nn.Module")
    if weights and weights != "-":
        state = torch.load(weights, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        module.load_state_dict(state)
    return module.eval()


def convert_command(ref: str, rest: Sequence[str], args: Any) -> int:
    """The CLI: exit 0 written and checked, 1 the parity harness refused it, 2 not convertible."""
    import sys
    from pathlib import Path

    from lookback.streaming.export import ExportError, export

    if len(rest) != 2:
        print(
            "usage: lookback models convert module.py:build WEIGHTS.pt|- OUT_DIR [--hop N]", file=sys.stderr
        )
        return 2
    weights, out = rest[0], Path(rest[1])
    labels = args.labels.split(",") if args.labels else None
    try:
        model = convert(load_module(ref, weights), labels=labels, hop=args.hop)
    except (ConversionError, ValueError, FileNotFoundError, AttributeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    name = args.model_name or out.resolve().parent.name
    try:
        report = export(model, out, name=name, version=out.name)
    except ExportError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    states = ", ".join(
        f"{n}{list(d.shape)}@{d.batch_axis}"
        for n, d in zip(model.state_names(), model.state_decls(), strict=True)
    )
    print(report.text())
    print(
        f"converted {ref} -> {out}: hop {model.hop_samples} samples "
        f"({1000 * model.hop_samples / model.sample_rate:g} ms), context {model.context_samples}, "
        f"states {states or '-'}, labels {model.labels}"
    )
    return 0
