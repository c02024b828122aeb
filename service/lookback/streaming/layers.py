"""Streaming-aware PyTorch layers: trained on whole clips, exported one hop at a time.

Every layer maps a sequence of feature frames ``x [B, T, C]`` (time-major: batch, time,
channels) to ``y [B, T / stride, C']`` and declares the state it needs when the same
computation runs one hop at a time (``state_decls``: shape without batch, batch axis,
initial value). ``forward_stateful(x, states)`` is the training/reference computation
from any states; ``forward(x)`` starts from the initial states, as a stream does.

``emit(g, x, frames, states)`` writes the layer's ONNX nodes. ``frames`` is the number of
frames per model step at this layer's input: ``1`` gives the one-frame lowering used by the
step graph (rank-2 ``[B, C]`` tensors, Gemm instead of Conv, states appended and dropped as
whole time-major rows), a larger int a fixed block (a step graph above a strided layer),
``None`` the sequence graph (any number of frames). The same maths, so the graphs agree
with each other and with ``forward_stateful`` to rounding.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from lookback.streaming.graph import INT_MAX, Graph


class UnsupportedLayer(TypeError):
    """A module the exporter cannot stream; the message names it and the alternative."""


@dataclass(frozen=True)
class StateDecl:
    """One state tensor of a layer: ``suffix`` is appended to the layer's state name."""

    suffix: str
    shape: tuple[int, ...]  # without the batch dimension
    batch_axis: int
    initial: float = 0.0

    def full_shape(self, batch: int) -> list[int]:
        shape = list(self.shape)
        shape.insert(self.batch_axis, batch)
        return shape


def _np(t: object) -> np.ndarray:
    assert isinstance(t, torch.Tensor)
    return t.detach().cpu().numpy().astype(np.float32)


def _rnn(m: nn.Module, name: str) -> torch.Tensor:
    t = getattr(m, name)
    assert isinstance(t, torch.Tensor)
    return t


class StreamingLayer(nn.Module):
    """Base class: a layer over feature frames with declared per-hop state."""

    in_channels: int
    out_channels: int
    stride: int = 1
    kind: str = "layer"

    def __init__(self, name: str | None = None) -> None:
        super().__init__()
        self.state_name = name

    def state_decls(self) -> list[StateDecl]:
        return []

    def stateful_layers(self) -> list[StreamingLayer]:
        return [self] if self.state_decls() else []

    def all_state_decls(self) -> list[StateDecl]:
        return [d for layer in self.stateful_layers() for d in layer.state_decls()]

    def initial_states(self, batch: int) -> list[torch.Tensor]:
        return [torch.full(d.full_shape(batch), d.initial) for d in self.all_state_decls()]

    def forward_stateful(
        self, x: torch.Tensor, states: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_stateful(x, self.initial_states(x.shape[0]))[0]

    def emit(self, g: Graph, x: str, frames: int | None, states: list[str]) -> tuple[str, list[str]]:
        raise NotImplementedError

    def receptive_field(self) -> int:
        """Input frames one output frame depends on (not counting recurrence)."""
        return 1


def _out_frames(frames: int | None, stride: int) -> int | None:
    return None if frames is None else frames // stride


class Elementwise(StreamingLayer):
    """A stateless per-value function (ReLU, Tanh, Sigmoid, Identity)."""

    onnx_op = "Identity"

    def fn(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def __init__(self, channels: int = 0) -> None:
        super().__init__()
        self.in_channels = self.out_channels = channels

    def forward_stateful(
        self, x: torch.Tensor, states: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self.fn(x), []

    def emit(self, g: Graph, x: str, frames: int | None, states: list[str]) -> tuple[str, list[str]]:
        return g.op(self.onnx_op, [x]), []


class ReLU(Elementwise):
    onnx_op, kind = "Relu", "relu"

    def fn(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x)


class Tanh(Elementwise):
    onnx_op, kind = "Tanh", "tanh"

    def fn(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x)


class Sigmoid(Elementwise):
    onnx_op, kind = "Sigmoid", "sigmoid"

    def fn(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x)


class Dropout(Elementwise):
    """Dropout while training, the identity in the exported graphs."""

    kind = "dropout"

    def __init__(self, p: float = 0.1) -> None:
        super().__init__()
        self.drop = nn.Dropout(p)

    def forward_stateful(
        self, x: torch.Tensor, states: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self.drop(x), []


class Linear(StreamingLayer):
    """Per-frame affine map (a pointwise, kernel-1 convolution): Gemm on one frame."""

    kind = "linear"

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.linear = nn.Linear(in_channels, out_channels, bias=bias)

    def forward_stateful(
        self, x: torch.Tensor, states: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self.linear(x), []

    def emit(self, g: Graph, x: str, frames: int | None, states: list[str]) -> tuple[str, list[str]]:
        w = _np(self.linear.weight)  # [out, in]
        b = _np(self.linear.bias) if self.linear.bias is not None else np.zeros(w.shape[0], np.float32)
        if frames == 1:
            return g.op("Gemm", [x, g.const(w, "w"), g.const(b, "b")], transB=1), []
        return g.op("Add", [g.op("MatMul", [x, g.const(w.T, "wT")]), g.const(b, "b")]), []


Pointwise = Linear


class CausalConv1d(StreamingLayer):
    """Causal 1-D convolution over frames: any kernel, dilation, stride and groups.

    With ``stride`` s > 1 the layer decimates time and each output is aligned on the NEWEST
    frame of its group of s: output j sees input frames up to ``j*s + s - 1``, which is what
    a stream has when the group's last frame arrives. (``nn.Conv1d(stride=s)`` with left
    padding aligns on the oldest frame and would lag the stream by s - 1 frames: the classic
    misaligned causal stride.)

    State: the input frames of earlier steps the next window reads, time-major ``[P, C]``
    (batch axis 0), oldest first: ``P = max(0, (kernel - 1) * dilation - (stride - 1))``
    (kws_streaming's rule). The window reaches ``(kernel - 1) * dilation`` frames back, but
    the next step brings ``stride`` new frames, so a strided conv keeps s - 1 fewer, and a
    patch down-sampler (kernel <= stride, dilation 1) keeps none.
    """

    kind = "conv"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        dilation: int = 1,
        stride: int = 1,
        groups: int = 1,
        bias: bool = True,
        name: str | None = None,
    ) -> None:
        super().__init__(name)
        if kernel_size < 1 or dilation < 1 or stride < 1:
            raise ValueError("kernel_size, dilation and stride must be >= 1")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.dilation, self.stride, self.groups = kernel_size, dilation, stride, groups
        self.conv = nn.Conv1d(
            in_channels, out_channels, kernel_size, dilation=dilation, stride=stride, groups=groups, bias=bias
        )

    @property
    def past(self) -> int:
        """How far back one window reaches: ``(kernel - 1) * dilation`` frames."""
        return (self.kernel_size - 1) * self.dilation

    def kept(self) -> int:
        """Frames carried to the next step (the state's length)."""
        return max(0, self.past - (self.stride - 1))

    def state_decls(self) -> list[StateDecl]:
        return [StateDecl("", (self.kept(), self.in_channels), 0)] if self.kept() else []

    def receptive_field(self) -> int:
        return self.past + 1

    def offset(self) -> int:
        """Where the first window starts in [state, x]: its last frame is the newest of the
        first group of ``stride`` frames."""
        return self.kept() + self.stride - 1 - self.past

    def forward_stateful(
        self, x: torch.Tensor, states: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if x.shape[1] % self.stride:
            raise ValueError(f"{x.shape[1]} frames is not a multiple of the stride {self.stride}")
        keep = self.kept()
        full = torch.cat([states[0], x], dim=1) if keep else x
        y = self.conv(full[:, self.offset() :].transpose(1, 2)).transpose(1, 2)
        new = [full[:, full.shape[1] - keep :]] if keep else []
        return y, new

    def _bias(self) -> np.ndarray:
        return _np(self.conv.bias) if self.conv.bias is not None else np.zeros(self.out_channels, np.float32)

    def _dense(self) -> np.ndarray:
        """Weight as [out, K * in], index k * in + c (time-major window), groups expanded."""
        w = _np(self.conv.weight)  # [out, in / groups, K]
        out, per, k = w.shape
        dense = np.zeros((out, k, self.in_channels), np.float32)
        per_out = out // self.groups
        for o in range(out):
            grp = o // per_out
            dense[o, :, grp * per : (grp + 1) * per] = w[o].T
        return dense.reshape(out, k * self.in_channels)

    def _depthwise(self) -> bool:
        return self.groups == self.in_channels == self.out_channels and self.groups > 1

    def emit(self, g: Graph, x: str, frames: int | None, states: list[str]) -> tuple[str, list[str]]:
        k, d, s, p, keep = self.kernel_size, self.dilation, self.stride, self.past, self.kept()
        if frames == 1 and s == 1:  # one frame: the window is [state, x], one Gemm (keep == p)
            if not p:
                return g.op(
                    "Gemm", [x, g.const(self._dense(), "w"), g.const(self._bias(), "b")], transB=1
                ), []
            full = g.concat([states[0], g.unsqueeze(x, 1)], axis=1)  # [B, P + 1, C]
            window = g.slice(full, 0, INT_MAX, axis=1, step=d) if d > 1 else full  # [B, K, C]
            if self._depthwise():
                w = _np(self.conv.weight)[:, 0, :].T  # [K, C]
                y = g.op("ReduceSum", [g.op("Mul", [window, g.const(w, "w")]), g.ints([1])], keepdims=0)
                y = g.op("Add", [y, g.const(self._bias(), "b")])
            else:
                flat = g.op("Reshape", [window, g.ints([0, -1])])
                y = g.op("Gemm", [flat, g.const(self._dense(), "w"), g.const(self._bias(), "b")], transB=1)
            return y, [g.slice(full, 1, INT_MAX, axis=1)]
        if frames is not None and frames % s:
            raise UnsupportedLayer(f"{frames} frames per step is not a multiple of the conv stride {s}")
        full = g.concat([states[0], x], axis=1) if keep else x  # [B, keep + T, C]
        taps = []
        for i in range(k):
            tail = p - i * d  # frames after this tap's last window position
            taps.append(g.slice(full, self.offset() + i * d, -tail if tail else INT_MAX, axis=1, step=s))
        if self._depthwise():
            w = _np(self.conv.weight)[:, 0, :].T  # [K, C]
            y = g.op("Mul", [taps[0], g.const(w[0], "w")])
            for i in range(1, k):
                y = g.op("Add", [y, g.op("Mul", [taps[i], g.const(w[i], "w")])])
            y = g.op("Add", [y, g.const(self._bias(), "b")])
        else:
            stacked = g.concat(taps, axis=2)  # [B, T / s, K * C]
            w_t = g.const(self._dense().T, "wT")
            y = g.op("Add", [g.op("MatMul", [stacked, w_t]), g.const(self._bias(), "b")])
        if frames is not None and frames // s == 1:
            y = g.squeeze(y, 1)  # one frame left: the layers above take the fast path
        return y, ([g.slice(full, -keep, INT_MAX, axis=1)] if keep else [])


class DepthwiseConv1d(CausalConv1d):
    """One causal filter per channel (groups = channels)."""

    def __init__(
        self, channels: int, kernel_size: int, dilation: int = 1, bias: bool = True, name: str | None = None
    ) -> None:
        super().__init__(
            channels, channels, kernel_size, dilation=dilation, groups=channels, bias=bias, name=name
        )


class Delay(StreamingLayer):
    """Output frame t is input frame t - ``frames``: aligns a branch with a slower one.

    State: the last ``frames`` input frames, time-major ``[D, C]``, batch axis 0.
    """

    kind = "delay"

    def __init__(self, channels: int, frames: int, name: str | None = None) -> None:
        super().__init__(name)
        if frames < 1:
            raise ValueError("a Delay needs frames >= 1")
        self.in_channels = self.out_channels = channels
        self.frames = frames

    def state_decls(self) -> list[StateDecl]:
        return [StateDecl("", (self.frames, self.in_channels), 0)]

    def forward_stateful(
        self, x: torch.Tensor, states: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        full = torch.cat([states[0], x], dim=1)
        return full[:, : x.shape[1]], [full[:, x.shape[1] :]]

    def emit(self, g: Graph, x: str, frames: int | None, states: list[str]) -> tuple[str, list[str]]:
        d = self.frames
        if frames == 1:
            full = g.concat([states[0], g.unsqueeze(x, 1)], axis=1)
            return g.squeeze(g.slice(full, 0, 1, axis=1), 1), [g.slice(full, 1, INT_MAX, axis=1)]
        full = g.concat([states[0], x], axis=1)
        return g.slice(full, 0, -d, axis=1), [g.slice(full, -d, INT_MAX, axis=1)]


def _gates(w: object, order: list[int], n: int) -> np.ndarray:
    """Reorder the n gate blocks of a torch RNN weight/bias (rows) into ONNX's order."""
    assert isinstance(w, torch.Tensor)
    blocks = torch.chunk(w.detach(), n, dim=0)
    return _np(torch.cat([blocks[i] for i in order], dim=0))


class GRU(StreamingLayer):
    """One-layer GRU. State ``h [1, H]`` with batch axis 1 (torch's ``[1, B, H]``).

    One frame: the cell written out as two Gemms and its gates (faster than ORT's GRU op for
    one time step at batch 32 and up); a sequence: the ONNX GRU op.
    """

    kind = "gru"

    def __init__(self, in_channels: int, hidden: int, name: str | None = None) -> None:
        super().__init__(name)
        self.in_channels, self.out_channels, self.hidden = in_channels, hidden, hidden
        self.rnn = nn.GRU(in_channels, hidden, batch_first=True)

    def state_decls(self) -> list[StateDecl]:
        return [StateDecl("", (1, self.hidden), 1)]

    def forward_stateful(
        self, x: torch.Tensor, states: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        y, h = self.rnn(x, states[0])
        return y, [h]

    def emit(self, g: Graph, x: str, frames: int | None, states: list[str]) -> tuple[str, list[str]]:
        r, H = self.rnn, self.hidden
        if frames == 1:
            h0 = g.squeeze(states[0], 0)
            gx = g.op(
                "Gemm",
                [
                    x,
                    g.const(_np(_rnn(r, "weight_ih_l0")), "w_ih"),
                    g.const(_np(_rnn(r, "bias_ih_l0")), "b_ih"),
                ],
                transB=1,
            )
            gh = g.op(
                "Gemm",
                [
                    h0,
                    g.const(_np(_rnn(r, "weight_hh_l0")), "w_hh"),
                    g.const(_np(_rnn(r, "bias_hh_l0")), "b_hh"),
                ],
                transB=1,
            )
            split = g.ints([2 * H, H])
            gx_rz, gx_n = g.op("Split", [gx, split], n_out=2, axis=1)
            gh_rz, gh_n = g.op("Split", [gh, split], n_out=2, axis=1)
            rz = g.op("Sigmoid", [g.op("Add", [gx_rz, gh_rz])])
            rg, u = g.op("Split", [rz, g.ints([H, H])], n_out=2, axis=1)
            n = g.op("Tanh", [g.op("Add", [gx_n, g.op("Mul", [rg, gh_n])])])
            h1 = g.op("Add", [n, g.op("Mul", [u, g.op("Sub", [h0, n])])])  # (1 - u) n + u h0
            return h1, [g.unsqueeze(h1, 0)]
        order = [1, 0, 2]  # torch r, z, n -> ONNX z, r, h
        w = g.const(_gates(r.weight_ih_l0, order, 3)[None], "W")
        rr = g.const(_gates(r.weight_hh_l0, order, 3)[None], "R")
        b = g.const(
            np.concatenate([_gates(r.bias_ih_l0, order, 3), _gates(r.bias_hh_l0, order, 3)])[None], "B"
        )
        seq = g.op("Transpose", [x], perm=[1, 0, 2])
        y, h = g.op("GRU", [seq, w, rr, b, "", states[0]], n_out=2, hidden_size=H, linear_before_reset=1)
        y = g.op("Transpose", [g.squeeze(y, 1)], perm=[1, 0, 2])
        if frames == 1:  # pragma: no cover - frames == 1 takes the cell path above
            y = g.squeeze(y, 1)
        return y, [h]


class LSTM(StreamingLayer):
    """One-layer LSTM. States ``h`` and ``c``, each ``[1, H]`` with batch axis 1."""

    kind = "lstm"

    def __init__(self, in_channels: int, hidden: int, name: str | None = None) -> None:
        super().__init__(name)
        self.in_channels, self.out_channels, self.hidden = in_channels, hidden, hidden
        self.rnn = nn.LSTM(in_channels, hidden, batch_first=True)

    def state_decls(self) -> list[StateDecl]:
        return [StateDecl("_h", (1, self.hidden), 1), StateDecl("_c", (1, self.hidden), 1)]

    def forward_stateful(
        self, x: torch.Tensor, states: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        y, (h, c) = self.rnn(x, (states[0], states[1]))
        return y, [h, c]

    def emit(self, g: Graph, x: str, frames: int | None, states: list[str]) -> tuple[str, list[str]]:
        r, H = self.rnn, self.hidden
        if frames == 1:
            h0, c0 = g.squeeze(states[0], 0), g.squeeze(states[1], 0)
            gx = g.op(
                "Gemm",
                [
                    x,
                    g.const(_np(_rnn(r, "weight_ih_l0")), "w_ih"),
                    g.const(_np(_rnn(r, "bias_ih_l0")), "b_ih"),
                ],
                transB=1,
            )
            gh = g.op(
                "Gemm",
                [
                    h0,
                    g.const(_np(_rnn(r, "weight_hh_l0")), "w_hh"),
                    g.const(_np(_rnn(r, "bias_hh_l0")), "b_hh"),
                ],
                transB=1,
            )
            i, f, gg, o = g.op("Split", [g.op("Add", [gx, gh]), g.ints([H] * 4)], n_out=4, axis=1)
            c1 = g.op(
                "Add",
                [
                    g.op("Mul", [g.op("Sigmoid", [f]), c0]),
                    g.op("Mul", [g.op("Sigmoid", [i]), g.op("Tanh", [gg])]),
                ],
            )
            h1 = g.op("Mul", [g.op("Sigmoid", [o]), g.op("Tanh", [c1])])
            return h1, [g.unsqueeze(h1, 0), g.unsqueeze(c1, 0)]
        order = [0, 3, 1, 2]  # torch i, f, g, o -> ONNX i, o, f, c
        w = g.const(_gates(r.weight_ih_l0, order, 4)[None], "W")
        rr = g.const(_gates(r.weight_hh_l0, order, 4)[None], "R")
        b = g.const(
            np.concatenate([_gates(r.bias_ih_l0, order, 4), _gates(r.bias_hh_l0, order, 4)])[None], "B"
        )
        seq = g.op("Transpose", [x], perm=[1, 0, 2])
        y, h, c = g.op("LSTM", [seq, w, rr, b, "", states[0], states[1]], n_out=3, hidden_size=H)
        y = g.op("Transpose", [g.squeeze(y, 1)], perm=[1, 0, 2])
        return y, [h, c]


def _check_layer(m: nn.Module) -> StreamingLayer:
    if not isinstance(m, StreamingLayer):
        raise UnsupportedLayer(
            f"{type(m).__module__}.{type(m).__name__} is not a streaming layer: build the model from "
            "lookback.streaming layers (Frontend, CausalConv1d, DepthwiseConv1d, Linear, GRU, LSTM, "
            "Delay, Residual, Sequential, ReLU, Tanh, Sigmoid, Dropout)"
        )
    return m


class Sequential(StreamingLayer):
    """Layers in order; frame rates and channels are checked at construction."""

    kind = "seq"

    def __init__(self, *layers: nn.Module) -> None:
        super().__init__()
        if not layers:
            raise ValueError("Sequential needs at least one layer")
        self.layers = nn.ModuleList([_check_layer(m) for m in layers])
        chans = [m for m in self.members if m.in_channels]  # elementwise layers take any width
        for a, b in itertools.pairwise(chans):
            if a.out_channels != b.in_channels:
                raise ValueError(
                    f"{type(a).__name__} gives {a.out_channels} channels, "
                    f"{type(b).__name__} expects {b.in_channels}"
                )
        self.in_channels = chans[0].in_channels if chans else 0
        self.out_channels = chans[-1].out_channels if chans else 0
        self.stride = math.prod(m.stride for m in self.members)

    @property
    def members(self) -> list[StreamingLayer]:
        return [m for m in self.layers if isinstance(m, StreamingLayer)]

    def stateful_layers(self) -> list[StreamingLayer]:
        return [s for m in self.members for s in m.stateful_layers()]

    def receptive_field(self) -> int:
        rf, scale = 1, 1
        for m in self.members:
            rf += (m.receptive_field() - 1) * scale
            scale *= m.stride
        return rf

    def forward_stateful(
        self, x: torch.Tensor, states: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        new: list[torch.Tensor] = []
        i = 0
        for m in self.members:
            n = len(m.all_state_decls())
            x, out = m.forward_stateful(x, states[i : i + n])
            new += out
            i += n
        return x, new

    def emit(self, g: Graph, x: str, frames: int | None, states: list[str]) -> tuple[str, list[str]]:
        new: list[str] = []
        i = 0
        for m in self.members:
            n = len(m.all_state_decls())
            x, out = m.emit(g, x, frames, states[i : i + n])
            new += out
            i += n
            frames = _out_frames(frames, m.stride)
        return x, new


class Residual(StreamingLayer):
    """``x + inner(x)``, or ``shortcut(x) + inner(x)`` with a projection shortcut.

    Without a shortcut the inner layers must keep the frame rate and the width. A block
    that strides or changes the width (ResNet's down-sampling block) takes a projection:
    ``shortcut=CausalConv1d(cin, cout, 1, stride=s)`` (a strided 1x1 conv: no state), which
    must have the inner layers' stride and widths. States: the inner layers', then the
    shortcut's.
    """

    kind = "residual"

    def __init__(self, *layers: nn.Module, shortcut: StreamingLayer | None = None) -> None:
        super().__init__()
        self.inner = Sequential(*layers)
        self.shortcut = _check_layer(shortcut) if shortcut is not None else None
        inner = self.inner
        if self.shortcut is None:
            if inner.stride != 1 or inner.in_channels != inner.out_channels:
                cin, cout, s = inner.in_channels, inner.out_channels, inner.stride
                projection = f"shortcut=CausalConv1d({cin}, {cout}, 1, stride={s})"
                what = (
                    "Residual around a strided layer: the branches would have different rates"
                    if s != 1
                    else f"Residual needs equal widths, inner maps {cin} -> {cout}"
                )
                raise UnsupportedLayer(f"{what}; give it a projection shortcut: Residual(..., {projection})")
        else:
            sc = self.shortcut
            if (sc.stride, sc.in_channels, sc.out_channels) != (
                inner.stride,
                inner.in_channels,
                inner.out_channels,
            ):
                raise UnsupportedLayer(
                    f"Residual shortcut maps {sc.in_channels} -> {sc.out_channels} at stride {sc.stride}, "
                    f"the inner layers {inner.in_channels} -> {inner.out_channels} at stride {inner.stride}"
                )
        self.in_channels, self.out_channels, self.stride = inner.in_channels, inner.out_channels, inner.stride

    def stateful_layers(self) -> list[StreamingLayer]:
        extra = self.shortcut.stateful_layers() if self.shortcut is not None else []
        return self.inner.stateful_layers() + extra

    def receptive_field(self) -> int:
        rf = self.inner.receptive_field()
        return max(rf, self.shortcut.receptive_field()) if self.shortcut is not None else rf

    def forward_stateful(
        self, x: torch.Tensor, states: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        n = len(self.inner.all_state_decls())
        y, new = self.inner.forward_stateful(x, states[:n])
        if self.shortcut is None:
            return x + y, new
        skip, more = self.shortcut.forward_stateful(x, states[n:])
        return skip + y, new + more

    def emit(self, g: Graph, x: str, frames: int | None, states: list[str]) -> tuple[str, list[str]]:
        n = len(self.inner.all_state_decls())
        y, new = self.inner.emit(g, x, frames, states[:n])
        if self.shortcut is None:
            return g.op("Add", [x, y]), new
        skip, more = self.shortcut.emit(g, x, frames, states[n:])
        return g.op("Add", [skip, y]), new + more
