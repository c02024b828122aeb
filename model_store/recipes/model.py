"""The Lookback VAD network: a fixed filterbank front end, a causal conv, a GRU, a sigmoid.

One module serves training, the step graph and the sequence graph. It maps

    audio [B, 384 + N*128], conv [B, K-1, F], h [1, B, H]
        -> score [B, N], conv_out [B, K-1, F], h_out [1, B, H]

where ``conv`` holds the last K-1 normalised feature frames, oldest first (time-major,
so the step graph appends a frame and drops one with contiguous row copies), and the
step graph is the same maths with N = 1. Nothing in ``forward`` depends on data
values, so the exported graphs are plain dataflow (plus the ONNX GRU op).

Front end: ``F`` mel-spaced centre frequencies between ``FMIN`` and ``FMAX``. For each,
a cosine and a sine at that frequency under a Hann window, right-aligned in the
512-sample window (ending at the newest sample) and as long as the band needs:
512 samples for the low bands, down to 128 for the wide high bands, so every band
measures about one mel band's worth of spectrum with the shortest delay it can.
The 2F windowed sinusoids are the kernel of a Conv1d(1, 2F, 512, stride 128):
on [B, 1, 512] it gives one frame, on [B, 1, 384 + N*128] it gives N frames.
Power re^2 + im^2, log(power + eps), then a per-band affine normalisation
(initialised from training statistics, then trained).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

SAMPLE_RATE = 16000
HOP = 128
WINDOW = 512
CONTEXT = WINDOW - HOP  # 384
N_BANDS = 48
FMIN = 60.0
FMAX = 7600.0
KERNEL = 3  # causal conv over feature frames: cache K-1 = 2 frames
CONV_CHANNELS = 64
HIDDEN = 64
MIN_BAND_WINDOW = 128
LOG_EPS = 1e-10


def _mel(f: np.ndarray) -> np.ndarray:
    return 1127.0 * np.log1p(f / 700.0)


def _imel(m: np.ndarray) -> np.ndarray:
    return 700.0 * np.expm1(m / 1127.0)


def band_frequencies(n_bands: int = N_BANDS) -> np.ndarray:
    return _imel(np.linspace(_mel(np.array(FMIN)), _mel(np.array(FMAX)), n_bands))


def filterbank_basis(n_bands: int = N_BANDS) -> np.ndarray:
    """[2F, 512] float32: Hann-windowed cos rows then sin rows, right-aligned."""
    freqs = band_frequencies(n_bands)
    edges = np.concatenate([[freqs[0] - (freqs[1] - freqs[0])], freqs, [freqs[-1] + (freqs[-1] - freqs[-2])]])
    basis = np.zeros((2 * n_bands, WINDOW), dtype=np.float64)
    for i, f in enumerate(freqs):
        bandwidth = 0.5 * (edges[i + 2] - edges[i])  # spacing to the neighbours
        # Hann equivalent noise bandwidth is 1.5 fs / L: match it to the band spacing.
        length = int(np.clip(round(1.5 * SAMPLE_RATE / bandwidth), MIN_BAND_WINDOW, WINDOW))
        n = np.arange(length)
        win = 0.5 - 0.5 * np.cos(2 * np.pi * (n + 0.5) / length)
        win /= win.sum()  # unit DC gain: a full-scale sinusoid gives |X| = 0.5
        t = np.arange(WINDOW - length, WINDOW)  # right-aligned: ends at the newest sample
        basis[i, WINDOW - length :] = win * np.cos(2 * np.pi * f * t / SAMPLE_RATE)
        basis[n_bands + i, WINDOW - length :] = win * np.sin(2 * np.pi * f * t / SAMPLE_RATE)
    return basis.astype(np.float32)


class LookbackVAD(nn.Module):
    def __init__(
        self,
        n_bands: int = N_BANDS,
        channels: int = CONV_CHANNELS,
        hidden: int = HIDDEN,
        kernel: int = KERNEL,
    ) -> None:
        super().__init__()
        self.n_bands = n_bands
        self.kernel = kernel
        self.hidden = hidden
        self.frontend = nn.Conv1d(1, 2 * n_bands, WINDOW, stride=HOP, bias=False)
        with torch.no_grad():
            self.frontend.weight.copy_(torch.from_numpy(filterbank_basis(n_bands)).unsqueeze(1))
        self.frontend.weight.requires_grad_(False)
        self.norm_shift = nn.Parameter(torch.zeros(1, n_bands, 1))
        self.norm_scale = nn.Parameter(torch.ones(1, n_bands, 1))
        self.conv = nn.Conv1d(n_bands, channels, kernel)
        self.gru = nn.GRU(channels, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def features(self, audio: torch.Tensor) -> torch.Tensor:
        """audio [B, 384 + N*128] -> log band powers [B, F, N] (before normalisation)."""
        z = self.frontend(audio.unsqueeze(1))
        re, im = z[:, : self.n_bands], z[:, self.n_bands :]
        return torch.log(re * re + im * im + LOG_EPS)

    def logits(
        self, audio: torch.Tensor, conv: torch.Tensor, h: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feat = (self.features(audio) - self.norm_shift) * self.norm_scale  # [B, F, N]
        full = torch.cat([conv.transpose(1, 2), feat], dim=2)  # [B, F, K-1+N]
        conv_out = full[:, :, full.shape[2] - (self.kernel - 1) :].transpose(1, 2)
        y = torch.relu(self.conv(full))  # [B, C, N]
        out, h_out = self.gru(y.transpose(1, 2), h)  # [B, N, H], [1, B, H]
        return self.head(out).squeeze(2), conv_out, h_out  # [B, N]

    def forward(
        self, audio: torch.Tensor, conv: torch.Tensor, h: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logit, conv_out, h_out = self.logits(audio, conv, h)
        return torch.sigmoid(logit), conv_out, h_out

    def initial_states(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.zeros(batch, self.kernel - 1, self.n_bands), torch.zeros(1, batch, self.hidden))

    def set_normalisation(self, mean: np.ndarray, std: np.ndarray) -> None:
        with torch.no_grad():
            self.norm_shift.copy_(torch.from_numpy(mean.astype(np.float32)).view(1, -1, 1))
            self.norm_scale.copy_(
                torch.from_numpy((1.0 / np.maximum(std, 1e-3)).astype(np.float32)).view(1, -1, 1)
            )


class StepGraph(nn.Module):
    """The trained network's one-hop computation, written for ONNX Runtime's fast kernels.

    Same maths and weights as ``LookbackVAD`` with N = 1, but every layer is a matrix
    product (ONNX Gemm/MatMul) instead of a Conv: on one input frame the filterbank is
    ``audio @ W.T``, re^2 + im^2 is ``(z * z) @ P.T`` with the log's eps as the bias, and
    the causal conv over [state, new frame] is one Gemm over the flattened [K, F] window.
    ORT's CPU Conv pays im2col and a per-row loop for these shapes; as Gemm the step
    graph runs about 3x faster at every batch size (RESULTS.md). The normalisation's
    shift is folded into P and eps (log(x) - s = log(x * exp(-s))).

    Two more choices measured with ORT 1.31 on one core (RESULTS.md): the conv state is
    time-major, so appending the new frame and dropping the oldest (Concat, Slice) copy
    whole rows instead of one float per band (ORT's Slice on a last axis of 3 cost more
    than the conv itself); and the GRU cell is written out as two Gemms and its gates,
    which at batch 32 and up runs faster than ORT's GRU op for a single time step.
    Scores differ from the Conv form by rounding only (< 1e-5), and a row's result
    never depends on its batch. The state tensors mean what they mean in
    ``LookbackVAD``, so the sequence graph and this one can hand a session to each other.
    """

    def __init__(self, model: LookbackVAD) -> None:
        super().__init__()
        f = model.n_bands
        self.register_buffer("basis", model.frontend.weight.detach()[:, 0, :].clone())  # [2F, W]
        pairs = torch.zeros(f, 2 * f, dtype=torch.float64)
        pairs[torch.arange(f), torch.arange(f)] = 1.0
        pairs[torch.arange(f), f + torch.arange(f)] = 1.0
        gain = torch.exp(-model.norm_shift.detach().view(f).double())  # the shift, folded in
        self.register_buffer("pairs", (pairs * gain[:, None]).float())  # [F, 2F]
        self.register_buffer("eps", (LOG_EPS * gain).float())
        self.register_buffer("scale", model.norm_scale.detach().view(1, f).clone())
        conv = model.conv  # weight [C, F, K] -> [C, K * F], matching the time-major window
        self.register_buffer(
            "conv_w", conv.weight.detach().permute(0, 2, 1).reshape(conv.out_channels, -1).clone()
        )
        self.register_buffer("conv_b", conv.bias.detach().clone())
        gru = model.gru  # PyTorch gate order: r, z, n
        self.hidden = gru.hidden_size
        for name in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
            self.register_buffer(name, getattr(gru, name).detach().clone())
        self.head = model.head

    def forward(
        self, audio: torch.Tensor, conv: torch.Tensor, h: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z = nn.functional.linear(audio, self.basis)  # [B, 2F]
        power = nn.functional.linear(z * z, self.pairs, self.eps)  # (re^2 + im^2 + eps) e^-shift
        feat = torch.log(power) * self.scale  # [B, F], normalised
        full = torch.cat([conv, feat.unsqueeze(1)], dim=1)  # [B, K, F]
        y = torch.relu(nn.functional.linear(full.flatten(1), self.conv_w, self.conv_b))
        h0 = h[0]  # [B, H]
        gx = nn.functional.linear(y, self.weight_ih_l0, self.bias_ih_l0)  # [B, 3H]
        gh = nn.functional.linear(h0, self.weight_hh_l0, self.bias_hh_l0)
        gx_rz, gx_n = torch.split(gx, [2 * self.hidden, self.hidden], dim=1)
        gh_rz, gh_n = torch.split(gh, [2 * self.hidden, self.hidden], dim=1)
        r, u = torch.split(torch.sigmoid(gx_rz + gh_rz), [self.hidden, self.hidden], dim=1)
        n = torch.tanh(gx_n + r * gh_n)
        h1 = n + u * (h0 - n)  # (1 - u) * n + u * h0
        return torch.sigmoid(self.head(h1)), full[:, 1:], h1.unsqueeze(0)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def describe_frontend(n_bands: int = N_BANDS) -> str:
    f = band_frequencies(n_bands)
    return (
        f"{n_bands} mel-spaced bands {f[0]:.0f}-{f[-1]:.0f} Hz, Hann windows "
        f"{MIN_BAND_WINDOW}-{WINDOW} samples, log power"
    )


if __name__ == "__main__":  # pragma: no cover - a quick look
    m = LookbackVAD()
    print(describe_frontend(), count_parameters(m), "parameters")
    print(np.round(band_frequencies(), 0))
