"""Four models written in plain PyTorch, WITHOUT any Lookback import, for ``convert``.

Each takes audio ``[B, context + N*hop]`` (float, int16/32768) and starts with a filterbank
``nn.Conv1d(1, 2F, 512, stride=128)`` (cos and sin rows: a learnable STFT/mel, or fixed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LogPower(nn.Module):
    """Filterbank ``[B, 2F, T]`` -> log band power ``[B, F, T]``."""

    def __init__(self, bands: int, eps: float = 1e-10) -> None:
        super().__init__()
        self.bands, self.eps = bands, eps

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        re, im = z[:, : self.bands], z[:, self.bands :]
        return torch.log(re * re + im * im + self.eps)


class PlainVAD(nn.Module):
    """The default model (lookback-vad/1) written in plain PyTorch: filterbank, log power,
    per-band affine, causal conv (k=3 via F.pad), ReLU, GRU, linear, sigmoid -> [B, N]."""

    def __init__(self, bands: int = 48, channels: int = 64, hidden: int = 64) -> None:
        super().__init__()
        self.filterbank = nn.Conv1d(1, 2 * bands, 512, stride=128, bias=False)
        self.power = LogPower(bands)
        self.shift = nn.Parameter(torch.zeros(bands))
        self.scale = nn.Parameter(torch.ones(bands))
        self.conv = nn.Conv1d(bands, channels, 3)
        self.gru = nn.GRU(channels, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        v = self.power(self.filterbank(audio.unsqueeze(1)))  # [B, F, T]
        v = (v - self.shift[:, None]) * self.scale[:, None]
        x = torch.relu(self.conv(F.pad(v, (2, 0))))
        y, _ = self.gru(x.transpose(1, 2))
        return torch.sigmoid(self.head(y)).squeeze(-1)  # [B, N]


class LstmVAD(nn.Module):
    """A 2-layer LSTM VAD, time-first (batch_first=False), BatchNorm on the features."""

    def __init__(self, bands: int = 32, hidden: int = 32) -> None:
        super().__init__()
        self.filterbank = nn.Conv1d(1, 2 * bands, 512, stride=128)
        self.power = LogPower(bands, 1e-6)
        self.norm = nn.BatchNorm1d(bands)
        self.lstm = nn.LSTM(bands, hidden, num_layers=2)
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(hidden, 1), nn.Sigmoid())

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.power(self.filterbank(audio.unsqueeze(1))))  # [B, F, T]
        y, _ = self.lstm(x.permute(2, 0, 1))  # [T, B, H]
        return self.head(y)  # [T, B, 1]


class TCBlock(nn.Module):
    """TC-ResNet block: two causal k=9 convs with BatchNorm; stride 2 with a 1x1 projection
    shortcut (Choi et al. 2019), made causal with left padding."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(cin, cout, 9, stride=stride, bias=False)
        self.bn1 = nn.BatchNorm1d(cout)
        self.conv2 = nn.Conv1d(cout, cout, 9, bias=False)
        self.bn2 = nn.BatchNorm1d(cout)
        self.proj = (
            nn.Sequential(nn.Conv1d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm1d(cout), nn.ReLU())
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(F.pad(x, (8, 0)))))
        y = self.bn2(self.conv2(F.pad(y, (8, 0))))
        return F.relu(y + self.proj(x))


class TCResNet8(nn.Module):
    """TC-ResNet8 over 40 log bands (bands as channels, convs over time), per-frame softmax
    over 12 keywords: a causal streaming version of the paper's model, hop 128 x 8."""

    def __init__(self, bands: int = 40, labels: int = 12, width: float = 1.0) -> None:
        super().__init__()
        c = [int(n * width) for n in (16, 24, 32, 48)]
        self.filterbank = nn.Conv1d(1, 2 * bands, 512, stride=128, bias=False)
        self.power = LogPower(bands, 1e-6)
        self.stem = nn.Conv1d(bands, c[0], 3, padding=2, bias=False)  # padding=2, cropped below
        self.blocks = nn.Sequential(TCBlock(c[0], c[1], 2), TCBlock(c[1], c[2], 2), TCBlock(c[2], c[3], 2))
        self.head = nn.Linear(c[3], labels)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        x = self.power(self.filterbank(audio.unsqueeze(1)))
        x = self.stem(x)[:, :, :-2]  # 'padding=(k-1)*d then crop': causal
        x = self.blocks(x)  # [B, 48, T/8]
        return torch.softmax(self.head(x.transpose(1, 2)), dim=-1)  # [B, N, 12]


class CRNN(nn.Module):
    """Conv2d over a log-mel (frequency x time, causal in time, a time stride of 2),
    frequency max-pooling, then a GRU and two sigmoid outputs."""

    def __init__(self, bands: int = 32, hidden: int = 32) -> None:
        super().__init__()
        self.filterbank = nn.Conv1d(1, 2 * bands, 512, stride=128, bias=False)
        self.power = LogPower(bands, 1e-6)
        self.conv1 = nn.Conv2d(1, 8, (3, 3), padding=(1, 0))
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, (3, 3), stride=(1, 2), padding=(1, 0))
        self.bn2 = nn.BatchNorm2d(16)
        self.pool = nn.MaxPool2d((2, 1))
        self.gru = nn.GRU(16 * (bands // 4), hidden, batch_first=True)
        self.head = nn.Linear(hidden, 2)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        x = self.power(self.filterbank(audio.unsqueeze(1))).unsqueeze(1)  # [B, 1, F, T]
        x = self.pool(F.relu(self.bn1(self.conv1(F.pad(x, (2, 0))))))
        x = self.pool(F.relu(self.bn2(self.conv2(F.pad(x, (2, 0))))))  # [B, 16, F/4, T/2]
        x = x.permute(0, 3, 1, 2)
        x = x.reshape(x.shape[0], x.shape[1], -1)  # [B, T/2, 16 * F/4]
        y, _ = self.gru(x)
        return torch.sigmoid(self.head(y))  # [B, N, 2]


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and BatchNorm statistics (as if trained), then eval mode."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)  # type: ignore[union-attr]
                m.running_var.uniform_(0.5, 2.0)  # type: ignore[union-attr]
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()
