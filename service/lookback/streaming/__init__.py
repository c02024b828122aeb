"""Streaming-aware PyTorch layers and the exporter to Lookback's model directory.

Needs torch (the ``train`` extra). The server never imports this package: it serves the
ONNX files and ``model.json`` that ``export`` writes.
"""

from lookback.streaming.export import ExportError, build_graphs, compare_torch, export
from lookback.streaming.layers import (
    GRU,
    LSTM,
    CausalConv1d,
    Delay,
    DepthwiseConv1d,
    Dropout,
    Linear,
    Pointwise,
    ReLU,
    Residual,
    Sequential,
    Sigmoid,
    StateDecl,
    StreamingLayer,
    Tanh,
    UnsupportedLayer,
)
from lookback.streaming.model import Frontend, StreamingModel, mel_basis

__all__ = [
    "GRU",
    "LSTM",
    "CausalConv1d",
    "Delay",
    "DepthwiseConv1d",
    "Dropout",
    "ExportError",
    "Frontend",
    "Linear",
    "Pointwise",
    "ReLU",
    "Residual",
    "Sequential",
    "Sigmoid",
    "StateDecl",
    "StreamingLayer",
    "StreamingModel",
    "Tanh",
    "UnsupportedLayer",
    "build_graphs",
    "compare_torch",
    "export",
    "mel_basis",
]
