"""The analysis front end and ``StreamingModel``: audio in, one score vector per hop out.

The front end is the one layer that looks at raw samples. Its window is longer than its
hop, and the samples of the previous hops it needs are not a state of the graph: they are
the manifest's ``context_samples``, which the engine prepends to every hop (so the step
graph takes ``context + hop`` samples, the sequence graph ``context + N * hop``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from lookback.streaming.graph import INT_MAX, Graph
from lookback.streaming.layers import Sequential, StateDecl, StreamingLayer, UnsupportedLayer, _np


def _mel(f: np.ndarray) -> np.ndarray:
    return 1127.0 * np.log1p(f / 700.0)


def _imel(m: np.ndarray) -> np.ndarray:
    return 700.0 * np.expm1(m / 1127.0)


def mel_basis(
    n_bands: int = 48,
    window: int = 512,
    sample_rate: int = 16000,
    fmin: float = 60.0,
    fmax: float = 7600.0,
    min_window: int = 128,
) -> np.ndarray:
    """[2F, window]: Hann-windowed cos rows then sin rows at mel-spaced frequencies.

    Each band's window is as long as its bandwidth needs (long for the low bands, down to
    ``min_window`` for the high ones) and right-aligned on the newest sample, so every band
    answers with the shortest delay it can. This is the default model's filterbank.
    """
    freqs = _imel(np.linspace(_mel(np.array(fmin)), _mel(np.array(fmax)), n_bands))
    edges = np.concatenate([[freqs[0] - (freqs[1] - freqs[0])], freqs, [freqs[-1] + (freqs[-1] - freqs[-2])]])
    basis = np.zeros((2 * n_bands, window), dtype=np.float64)
    for i, f in enumerate(freqs):
        bandwidth = 0.5 * (edges[i + 2] - edges[i])
        length = int(np.clip(round(1.5 * sample_rate / bandwidth), min_window, window))
        n = np.arange(length)
        win = 0.5 - 0.5 * np.cos(2 * np.pi * (n + 0.5) / length)
        win /= win.sum()
        t = np.arange(window - length, window)
        basis[i, window - length :] = win * np.cos(2 * np.pi * f * t / sample_rate)
        basis[n_bands + i, window - length :] = win * np.sin(2 * np.pi * f * t / sample_rate)
    return basis.astype(np.float32)


class Frontend(nn.Module):
    """Linear analysis over a ``window`` of samples every ``hop``, then power, log, affine.

    ``basis [D, window]`` is the analysis (fixed by default). With ``power`` its rows are
    (re, im) halves and the output is ``re^2 + im^2`` per band; with ``log`` the log of
    that plus ``eps``; with ``normalise`` a trainable per-band ``(v - shift) * scale``.
    One frame is lowered to Gemm (``audio @ basis.T``), a sequence to one MatMul over
    frames cut from the audio by Reshape and Slice (no Conv), and the shift is folded into
    the power sum (``log(p) - s = log(p * e^-s)``).
    """

    def __init__(
        self,
        basis: np.ndarray,
        hop: int,
        power: bool = True,
        log: bool = True,
        eps: float = 1e-10,
        normalise: bool = True,
        trainable: bool = False,
    ) -> None:
        super().__init__()
        d, window = basis.shape
        if window < hop:
            raise UnsupportedLayer(f"front end window {window} is shorter than its hop {hop}")
        if log and not power:
            raise UnsupportedLayer(
                "a log front end needs power=True: the log of a signed projection is undefined"
            )
        if power and d % 2:
            raise ValueError("a power front end needs an even number of basis rows (re, im)")
        self.window, self.hop, self.power, self.log, self.eps = window, hop, power, log, eps
        self.out_channels = d // 2 if power else d
        self.basis = nn.Parameter(torch.from_numpy(np.asarray(basis, np.float32)), requires_grad=trainable)
        self.normalise = normalise
        self.shift = nn.Parameter(torch.zeros(self.out_channels), requires_grad=normalise)
        self.scale = nn.Parameter(torch.ones(self.out_channels), requires_grad=normalise)

    @property
    def context(self) -> int:
        return self.window - self.hop

    def raw(self, audio: torch.Tensor) -> torch.Tensor:
        """audio [B, context + T*hop] -> features before normalisation [B, T, F]."""
        z = nn.functional.conv1d(audio.unsqueeze(1), self.basis.unsqueeze(1), stride=self.hop)
        if self.power:
            f = self.out_channels
            z = z[:, :f] * z[:, :f] + z[:, f:] * z[:, f:]
        if self.log:
            z = torch.log(z + self.eps)
        return z.transpose(1, 2)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        v = self.raw(audio)
        return (v - self.shift) * self.scale if self.normalise else v

    def set_normalisation(self, mean: np.ndarray, std: np.ndarray) -> None:
        with torch.no_grad():
            self.shift.copy_(torch.from_numpy(np.asarray(mean, np.float32)))
            self.scale.copy_(torch.from_numpy((1.0 / np.maximum(std, 1e-3)).astype(np.float32)))

    def emit(self, g: Graph, audio: str, frames: int | None) -> str:
        basis = _np(self.basis)
        if frames == 1:
            z = g.op("MatMul", [audio, g.const(basis.T, "basisT")])  # [B, D]
        else:
            if self.window % self.hop:  # frames cannot be cut from whole hops: Conv
                z = g.op(
                    "Conv", [g.unsqueeze(audio, 1), g.const(basis[:, None, :], "basis")], strides=[self.hop]
                )
                z = g.op("Transpose", [z], perm=[0, 2, 1])
            else:
                m = self.window // self.hop
                blocks = g.op("Reshape", [audio, g.ints([0, -1, self.hop])])  # [B, m - 1 + T, hop]
                parts = [g.slice(blocks, i, -(m - 1 - i) if m - 1 - i else INT_MAX, axis=1) for i in range(m)]
                z = g.op("MatMul", [g.concat(parts, axis=2), g.const(basis.T, "basisT")])  # [B, T, D]
        shift = _np(self.shift).astype(np.float64) if self.normalise else np.zeros(self.out_channels)
        scale = _np(self.scale) if self.normalise else np.ones(self.out_channels, np.float32)
        if self.power:
            f = self.out_channels
            pairs = np.zeros((f, 2 * f), np.float64)
            pairs[np.arange(f), np.arange(f)] = 1.0
            pairs[np.arange(f), f + np.arange(f)] = 1.0
            gain = np.exp(-shift) if (self.log and self.normalise) else np.ones(f)
            pairs = (pairs * gain[:, None]).astype(np.float32)
            eps = (self.eps * gain if self.log else np.zeros(f)).astype(np.float32)
            zz = g.op("Mul", [z, z])
            if frames == 1:
                v = g.op("Gemm", [zz, g.const(pairs, "pairs"), g.const(eps, "eps")], transB=1)
            else:
                v = g.op("Add", [g.op("MatMul", [zz, g.const(pairs.T, "pairsT")]), g.const(eps, "eps")])
            if self.log:
                v = g.op("Log", [v])
            elif self.normalise:
                v = g.op("Sub", [v, g.const(shift.astype(np.float32), "shift")])
        else:
            v = z
            if self.log:
                v = g.op("Log", [g.op("Add", [v, g.const(np.float32(self.eps), "eps")])])
            if self.normalise:
                v = g.op("Sub", [v, g.const(shift.astype(np.float32), "shift")])
        if self.normalise:
            v = g.op("Mul", [v, g.const(scale, "scale")])
        return v


#: The wire frame: a model's hop must be whole frames of it (``export`` writes it to model.json).
FRAME_SAMPLES = 128

ACTIVATIONS = {"sigmoid": ("Sigmoid", torch.sigmoid), "none": ("Identity", lambda x: x)}


class StreamingModel(nn.Module):
    """Front end + body (streaming layers) + an output activation; one score vector per hop.

    ``hop_samples`` is the front end's hop times the body's total stride: a body that
    decimates time by s takes s front-end frames per model step.
    """

    def __init__(
        self,
        frontend: Frontend,
        body: StreamingLayer | Sequence[StreamingLayer],
        labels: Sequence[str],
        activation: str = "sigmoid",
        sample_rate: int = 16000,
    ) -> None:
        super().__init__()
        self.frontend = frontend
        self.body = body if isinstance(body, StreamingLayer) else Sequential(*body)
        self.labels = list(labels)
        if activation not in ACTIVATIONS:
            raise UnsupportedLayer(f"activation {activation!r}: supported {sorted(ACTIVATIONS)}")
        self.activation = activation
        self.sample_rate = sample_rate
        if self.body.in_channels and self.body.in_channels != frontend.out_channels:
            raise ValueError(
                f"front end gives {frontend.out_channels} channels, body expects {self.body.in_channels}"
            )
        if self.body.out_channels != len(self.labels):
            raise ValueError(f"body gives {self.body.out_channels} outputs for {len(self.labels)} labels")
        self.validate()

    def validate(self) -> None:
        """What the export or the server would refuse about the architecture, checked when
        the model is built, before any training: the hop in whole wire frames, unique state
        names outside the server's reserved ``lookback.`` namespace. Called by the
        constructor; call it again after changing layers in place."""
        if self.hop_samples % FRAME_SAMPLES:
            raise UnsupportedLayer(
                f"hop_samples {self.hop_samples} (front end hop {self.frontend.hop} x stride "
                f"{self.body.stride}) is not a multiple of the {FRAME_SAMPLES}-sample wire frame"
            )
        reserved = [n for n in self.state_names() if n.startswith("lookback.")]
        if reserved:
            raise ValueError(f"state names {reserved}: names starting with 'lookback.' are the server's")

    @property
    def hop_samples(self) -> int:
        return self.frontend.hop * self.body.stride

    @property
    def context_samples(self) -> int:
        return self.frontend.context

    def state_names(self) -> list[str]:
        """Graph names of the states, in order: the layer's ``name`` or kind + index."""
        names: list[str] = []
        counts: dict[str, int] = {}
        for layer in self.body.stateful_layers():
            base = layer.state_name
            if base is None:
                base = f"{layer.kind}{counts.get(layer.kind, 0)}"
                counts[layer.kind] = counts.get(layer.kind, 0) + 1
            names += [base + d.suffix for d in layer.state_decls()]
        if len(set(names)) != len(names):
            raise ValueError(f"state names must be unique, got {names}")
        return names

    def state_decls(self) -> list[StateDecl]:
        return self.body.all_state_decls()

    def initial_states(self, batch: int) -> list[torch.Tensor]:
        return self.body.initial_states(batch)

    def steps_of(self, audio: torch.Tensor) -> int:
        n, rem = divmod(audio.shape[-1] - self.context_samples, self.hop_samples)
        if rem or n < 0:
            raise ValueError(
                f"audio of {audio.shape[-1]} samples is not context {self.context_samples} + whole hops "
                f"of {self.hop_samples}"
            )
        return n

    def logits_stateful(
        self, audio: torch.Tensor, states: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """audio [B, context + N*hop] -> pre-activation [B, N, L] and the new states."""
        self.steps_of(audio)
        return self.body.forward_stateful(self.frontend(audio), states)

    def forward_stateful(
        self, audio: torch.Tensor, states: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        y, new = self.logits_stateful(audio, states)
        return ACTIVATIONS[self.activation][1](y), new

    def logits(self, audio: torch.Tensor) -> torch.Tensor:
        return self.logits_stateful(audio, self.initial_states(audio.shape[0]))[0]

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        return self.forward_stateful(audio, self.initial_states(audio.shape[0]))[0]

    def emit(self, g: Graph, audio: str, step: bool, states: list[str]) -> tuple[str, list[str]]:
        frames = self.body.stride if step else None
        x = self.frontend.emit(g, audio, frames)
        y, new = self.body.emit(g, x, frames, states)
        y = g.op(ACTIVATIONS[self.activation][0], [y])
        if not step and len(self.labels) == 1:
            y = g.squeeze(y, 2)  # [B, N]
        return y, new
