"""Per-layer step == batch: whole batches, chunks and one hop at a time give the same numbers.

For random kernel sizes, dilations, strides and hops (hypothesis): the PyTorch layer on a
whole batch equals the same layer fed chunk by chunk with its declared state carried; and
its ONNX lowerings (one frame: Gemm; a fixed block of frames; the sequence graph at any
length, in random chunks) equal the PyTorch layer within 1e-5.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lookback.streaming import (
    GRU,
    LSTM,
    CausalConv1d,
    Delay,
    DepthwiseConv1d,
    Linear,
    ReLU,
    Residual,
    Sequential,
    StreamingLayer,
    Tanh,
)
from tests.streaming.support import TOL, layer_session, max_diff, random_chunks, run_layer, torch_chunks

HYP = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check_layer(layer: StreamingLayer, batch: int, steps: int, seed: int) -> None:
    """steps = model steps; each step is ``layer.stride`` frames."""
    layer.eval()
    rng = np.random.default_rng(seed)
    s = layer.stride
    t = steps * s
    x = rng.standard_normal((batch, t, layer.in_channels)).astype(np.float32)
    init = [
        torch.from_numpy(rng.standard_normal(d.full_shape(batch)).astype(np.float32) * 0.5)
        for d in layer.all_state_decls()
    ]
    with torch.no_grad():
        ref, ref_states = layer.forward_stateful(torch.from_numpy(x), init)
    ref_np = ref.numpy()
    assert ref_np.shape == (batch, steps, layer.out_channels)
    for d, st_ in zip(layer.all_state_decls(), ref_states, strict=True):
        assert list(st_.shape) == d.full_shape(batch)  # the declared state is the real one

    # torch, hop by hop and in random chunks, with the state carried
    for chunks in ([s] * steps, random_chunks(t, s, rng)):
        got, got_states = torch_chunks(layer, torch.from_numpy(x), init, chunks)
        assert max_diff(got.numpy(), ref_np) <= TOL
        for a, b in zip(got_states, ref_states, strict=True):
            assert max_diff(a.numpy(), b.numpy()) <= TOL

    states_np = [v.numpy() for v in init]
    # ONNX: the step lowering (s frames per step; s == 1 is the one-frame Gemm path)
    step = layer_session(layer, s)
    out, out_states = run_layer(step, x, states_np, s, [s] * steps)
    assert max_diff(out, ref_np) <= TOL
    for o, r in zip(out_states, ref_states, strict=True):
        assert max_diff(o, r.numpy()) <= TOL
    # ONNX: the sequence lowering in random chunks, and at once
    seq = layer_session(layer, None)
    for chunks in (random_chunks(t, s, rng), [t]):
        out, out_states = run_layer(seq, x, states_np, None, chunks)
        assert max_diff(out, ref_np) <= TOL
        for o, r in zip(out_states, ref_states, strict=True):
            assert max_diff(o, r.numpy()) <= TOL


@HYP
@given(
    kernel=st.integers(1, 5),
    dilation=st.integers(1, 4),
    stride=st.integers(1, 3),
    depthwise=st.booleans(),
    groups2=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_causal_conv(
    kernel: int, dilation: int, stride: int, depthwise: bool, groups2: bool, seed: int
) -> None:
    torch.manual_seed(seed)
    if depthwise:
        layer: CausalConv1d = CausalConv1d(6, 6, kernel, dilation=dilation, stride=stride, groups=6)
    else:
        layer = CausalConv1d(6, 4, kernel, dilation=dilation, stride=stride, groups=2 if groups2 else 1)
    check_layer(layer, batch=3, steps=7, seed=seed)


def test_causal_stride_aligns_on_the_newest_frame() -> None:
    """Output j of a stride-2 conv sees input frames up to 2j + 1, never frames after, and
    does see frame 2j + 1 (the newest one when the stream emits it)."""
    torch.manual_seed(0)
    layer = CausalConv1d(1, 1, 3, stride=2, bias=False).eval()
    with torch.no_grad():
        layer.conv.weight.fill_(1.0)
        x = torch.zeros(1, 8, 1)
        x[0, 5, 0] = 1.0  # frame 5 belongs to output 2 (frames 4, 5)
        y = layer(x)[0, :, 0]
    assert y.tolist() == [0.0, 0.0, 1.0, 1.0]  # outputs 2 (frames 3..5) and 3 (frames 5..7)


@HYP
@given(frames=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_delay(frames: int, seed: int) -> None:
    torch.manual_seed(seed)
    check_layer(Delay(5, frames), batch=2, steps=9, seed=seed)
    with torch.no_grad():
        x = torch.arange(10.0).view(1, 10, 1)
        assert Delay(1, frames)(x)[0, :, 0].tolist() == [0.0] * frames + list(range(10 - frames))


@pytest.mark.parametrize("cls", [GRU, LSTM])
@pytest.mark.parametrize("batch", [1, 5])
def test_recurrent(cls: type, batch: int) -> None:
    torch.manual_seed(batch)
    check_layer(cls(7, 9), batch=batch, steps=11, seed=batch)


@HYP
@given(kernel=st.integers(1, 4), dilation=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_residual_depthwise_pointwise(kernel: int, dilation: int, seed: int) -> None:
    torch.manual_seed(seed)
    block = Residual(DepthwiseConv1d(8, kernel, dilation=dilation), ReLU(), Linear(8, 8), Tanh())
    check_layer(block, batch=3, steps=8, seed=seed)


@HYP
@given(
    strides=st.lists(st.integers(1, 2), min_size=1, max_size=3),
    kernels=st.lists(st.integers(1, 4), min_size=3, max_size=3),
    dilations=st.lists(st.integers(1, 3), min_size=3, max_size=3),
    rnn=st.sampled_from(["gru", "lstm", "none"]),
    seed=st.integers(0, 2**16),
)
def test_random_stacks(
    strides: list[int], kernels: list[int], dilations: list[int], rnn: str, seed: int
) -> None:
    """Composed stacks: strided and dilated convs, a delay, residual blocks, an RNN."""
    torch.manual_seed(seed)
    layers: list[StreamingLayer] = []
    ch = 5
    for i, s in enumerate(strides):
        layers += [CausalConv1d(ch, 6, kernels[i], dilation=dilations[i], stride=s), ReLU()]
        ch = 6
    layers.append(Residual(DepthwiseConv1d(ch, kernels[-1], dilation=dilations[-1]), Tanh()))
    layers.append(Delay(ch, 1 + seed % 3))
    if rnn == "gru":
        layers.append(GRU(ch, 4))
    elif rnn == "lstm":
        layers.append(LSTM(ch, 4))
    stack = Sequential(*layers)
    check_layer(stack, batch=2, steps=5, seed=seed)


def test_state_declarations() -> None:
    conv = CausalConv1d(4, 3, 5, dilation=3)
    assert [(d.shape, d.batch_axis) for d in conv.state_decls()] == [((12, 4), 0)]
    assert CausalConv1d(4, 3, 1).state_decls() == []  # pointwise: no state
    lstm = LSTM(3, 8)
    assert [(d.suffix, d.shape, d.batch_axis) for d in lstm.state_decls()] == [
        ("_h", (1, 8), 1),
        ("_c", (1, 8), 1),
    ]
    stack = Sequential(CausalConv1d(4, 4, 3, dilation=2), Residual(DepthwiseConv1d(4, 3, dilation=4)))
    assert stack.receptive_field() == 1 + 4 + 8
    assert [d.shape for d in stack.all_state_decls()] == [(4, 4), (8, 4)]


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    hop=st.sampled_from([64, 128, 256]),
    window_mult=st.floats(1.0, 4.0),
    power=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_frontend(hop: int, window_mult: float, power: bool, seed: int) -> None:
    """The analysis window over any hop (whole hops: Reshape + MatMul; otherwise Conv):
    one window at a time == the sequence graph in random chunks == PyTorch."""
    from lookback.streaming import Frontend, mel_basis
    from lookback.streaming.graph import Graph
    from tests.streaming.support import session

    window = max(hop, int(hop * window_mult) // 8 * 8)
    rng = np.random.default_rng(seed)
    fe = Frontend(mel_basis(6, window=window, min_window=min(64, window)), hop, power=power, log=power)
    with torch.no_grad():
        fe.set_normalisation(rng.normal(-5, 2, fe.out_channels), rng.uniform(0.5, 3, fe.out_channels))
    steps = 9
    audio = (rng.standard_normal((2, fe.context + steps * hop)) * 0.1).astype(np.float32)
    with torch.no_grad():
        ref = fe(torch.from_numpy(audio)).numpy()  # [2, steps, F]
    assert ref.shape == (2, steps, fe.out_channels)
    graphs = {}
    for frames in (1, None):
        g = Graph()
        with torch.no_grad():
            y = fe.emit(g, "audio", frames)
        g.rename(y, "y")
        dims: list = ["B", window] if frames == 1 else ["B", "T"]
        out: list = ["B", fe.out_channels] if frames == 1 else ["B", "N", fe.out_channels]
        graphs[frames] = session(g.model([("audio", dims)], [("y", out)]))
    one = np.stack(
        [graphs[1].run(None, {"audio": audio[:, t * hop : t * hop + window]})[0] for t in range(steps)],
        axis=1,
    )
    scale = max(1.0, float(np.abs(ref).max()))
    assert max_diff(one, ref) <= TOL * scale
    t, parts = 0, []
    for c in random_chunks(steps, 1, rng):
        parts.append(graphs[None].run(None, {"audio": audio[:, t * hop : fe.context + (t + c) * hop]})[0])
        t += c
    assert max_diff(np.concatenate(parts, axis=1), ref) <= TOL * scale


def test_frontend_refuses_a_log_without_power() -> None:
    from lookback.streaming import Frontend, UnsupportedLayer, mel_basis

    with pytest.raises(UnsupportedLayer, match="log front end needs power=True"):
        Frontend(mel_basis(4), 128, power=False, log=True)


@pytest.mark.parametrize(
    ("kernel", "dilation", "stride", "kept"),
    [(2, 1, 2, 0), (1, 1, 3, 0), (3, 1, 3, 0), (9, 1, 2, 7), (3, 1, 2, 1), (3, 2, 4, 1), (4, 1, 1, 3)],
)
def test_strided_conv_keeps_only_the_frames_it_reads(
    kernel: int, dilation: int, stride: int, kept: int
) -> None:
    """A strided conv's next window starts ``stride - 1`` frames later than a stride-1
    conv's: it keeps ``max(0, (k - 1) * d - (s - 1))`` frames (kws_streaming's rule), and
    a patch down-sampler (k <= s, d = 1) keeps none."""
    torch.manual_seed(kernel)
    layer = CausalConv1d(3, 2, kernel, dilation=dilation, stride=stride)
    assert [d.shape for d in layer.state_decls()] == ([(kept, 3)] if kept else [])
    check_layer(layer, batch=2, steps=6, seed=kernel)
