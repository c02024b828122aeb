"""The Lookback VAD network, written with Lookback's streaming layers (``lookback.streaming``).

    audio [B, 384 + N*128]
      -> Frontend: 48 mel-spaced bands 60-7600 Hz, Hann windows 128-512 samples right-aligned
         on the newest sample, log power, per-band affine normalisation  -> [B, N, 48]
      -> CausalConv1d(48 -> 64, K=3)  (state ``conv``: the last 2 feature frames, [B, 2, 48])
      -> ReLU -> GRU(64 -> 64)         (state ``h``: [1, B, 64], batch axis 1)
      -> Linear(64 -> 1) -> sigmoid    -> score [B, N]

One module serves training (whole batches of clips) and export: ``lookback.streaming.export``
writes the step graph (one hop: matrix products, time-major conv state, the GRU cell written
out), the sequence graph and model.json, and refuses to write them unless the parity harness
passes. The hand-written step module this recipe used to carry is gone: the exporter lowers
the same layers to the same fast ops.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lookback.streaming import GRU, CausalConv1d, Frontend, Linear, ReLU, StreamingModel, mel_basis

SAMPLE_RATE = 16000
HOP = 128
WINDOW = 512
CONTEXT = WINDOW - HOP  # 384
N_BANDS = 48
FMIN = 60.0
FMAX = 7600.0
KERNEL = 3
CONV_CHANNELS = 64
HIDDEN = 64
MIN_BAND_WINDOW = 128
LOG_EPS = 1e-10


def build_model(
    n_bands: int = N_BANDS, channels: int = CONV_CHANNELS, hidden: int = HIDDEN, kernel: int = KERNEL
) -> StreamingModel:
    frontend = Frontend(
        mel_basis(n_bands, WINDOW, SAMPLE_RATE, FMIN, FMAX, MIN_BAND_WINDOW), HOP, eps=LOG_EPS
    )
    body = [
        CausalConv1d(n_bands, channels, kernel, name="conv"),
        ReLU(),
        GRU(channels, hidden, name="h"),
        Linear(hidden, 1),
    ]
    return StreamingModel(frontend, body, labels=["speech"], sample_rate=SAMPLE_RATE)


WEIGHTS = Path(__file__).parent / "lookback-vad-1.weights.npz"


def save_weights(model: StreamingModel, path: Path = WEIGHTS) -> None:
    """The trained tensors (not the fixed filterbank, which ``mel_basis`` rebuilds exactly)."""
    np.savez(path, **{k: v.detach().numpy() for k, v in model.state_dict().items() if k != "frontend.basis"})


def load_weights(path: Path = WEIGHTS) -> StreamingModel:
    model = build_model()
    with np.load(path) as npz:
        state = {k: torch.from_numpy(npz[k].copy()) for k in npz.files}
    state["frontend.basis"] = model.frontend.basis.detach().clone()
    model.load_state_dict(state)
    return model.eval()


def weights_from_torch_onnx(model_dir: Path) -> StreamingModel:
    """Weights read back from a sequence graph written by torch's exporter.

    That is how ``lookback-vad-1.weights.npz`` was made, from the sequence.onnx that the
    recipe shipped before the streaming exporter (git b1c0c85): it holds every trained
    tensor in the module's layout (the GRU's in ONNX gate order z, r, h; the head
    transposed). The graphs written since carry the weights lowered (the normalisation
    folded into the power sum), so the .npz is the source of truth now.
    """
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(Path(model_dir) / "sequence.onnx"))
    init = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    gru = next(n for n in m.graph.node if n.op_type == "GRU")
    w, r, b = (init[name][0] for name in gru.input[1:4])
    head_w = next(init[i] for n in m.graph.node if n.op_type == "MatMul" for i in n.input if i in init)

    def torch_order(x: np.ndarray) -> np.ndarray:  # ONNX z, r, h -> torch r, z, n
        z, rr, h = np.split(x, 3, axis=0)
        return np.concatenate([rr, z, h], axis=0)

    model = build_model()
    body = model.body.layers
    state = {
        "frontend.basis": init["frontend.weight"][:, 0, :],
        "frontend.shift": init["norm_shift"].reshape(-1),
        "frontend.scale": init["norm_scale"].reshape(-1),
        "body.layers.0.conv.weight": init["conv.weight"],
        "body.layers.0.conv.bias": init["conv.bias"],
        "body.layers.2.rnn.weight_ih_l0": torch_order(w),
        "body.layers.2.rnn.weight_hh_l0": torch_order(r),
        "body.layers.2.rnn.bias_ih_l0": torch_order(b[: b.size // 2]),
        "body.layers.2.rnn.bias_hh_l0": torch_order(b[b.size // 2 :]),
        "body.layers.3.linear.weight": head_w.T,
        "body.layers.3.linear.bias": init["head.bias"],
    }
    assert isinstance(body[2], GRU)
    model.load_state_dict({k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in state.items()})
    return model.eval()


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def describe_frontend(n_bands: int = N_BANDS) -> str:
    return (
        f"{n_bands} mel-spaced bands {FMIN:.0f}-{FMAX:.0f} Hz, Hann windows "
        f"{MIN_BAND_WINDOW}-{WINDOW} samples, log power"
    )
