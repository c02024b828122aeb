"""Reading the data shards written by datagen.py: memory-mapped, never loaded whole."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HOP = 128
CONTEXT = 384


@dataclass(frozen=True)
class Clip:
    audio: np.ndarray  # int16 view into a memmap
    labels: np.ndarray  # uint8 view, one per hop
    meta: dict


class Split:
    """All clips of one split, as views into memory-mapped shards."""

    def __init__(self, root: Path, split: str) -> None:
        self.name = split
        self.clips: list[Clip] = []
        shards = sorted((root / split).glob("shard_*.json"))
        if not shards:
            raise FileNotFoundError(f"no shards under {root / split}; run datagen.py first")
        for index in shards:
            stem = str(index)[: -len(".json")]
            audio = np.load(f"{stem}.audio.npy", mmap_mode="r")
            labels = np.load(f"{stem}.labels.npy", mmap_mode="r")
            for meta in json.loads(index.read_text())["clips"]:
                a0, n = meta["offset"], meta["samples"]
                self.clips.append(Clip(audio[a0 : a0 + n], labels[a0 // HOP : (a0 + n) // HOP], meta))

    @property
    def frames(self) -> int:
        return sum(c.labels.size for c in self.clips)

    def __len__(self) -> int:
        return len(self.clips)


def crop(clip: Clip, first: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Audio [384 + n*128] float32 for hops first..first+n-1 (zero context before 0)."""
    a0 = first * HOP - CONTEXT
    out = np.zeros(CONTEXT + n * HOP, np.float32)
    src = clip.audio[max(a0, 0) : (first + n) * HOP]
    out[out.size - src.size :] = src
    return out / 32768.0, np.asarray(clip.labels[first : first + n], np.float32)


def batches(
    split: Split, batch: int, frames: int, seed: int, gain_db: tuple[float, float] = (-45.0, 0.0)
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Endless random crops: audio [batch, 384 + frames*128], labels [batch, frames].

    Crops start anywhere, including hop 0 (zero context, as at the start of a stream),
    and get a random gain (peak level -46..-1 dBFS) and polarity.
    """
    rng = np.random.default_rng(seed)
    while True:
        audio = np.zeros((batch, CONTEXT + frames * HOP), np.float32)
        labels = np.zeros((batch, frames), np.float32)
        for b in range(batch):
            clip = split.clips[int(rng.integers(len(split)))]
            first = int(rng.integers(0, clip.labels.size - frames + 1))
            a, lab = crop(clip, first, frames)
            g = 10 ** (rng.uniform(*gain_db) / 20) * (1 if rng.random() < 0.5 else -1)
            audio[b] = np.clip(a * g, -1.0, 32767 / 32768)
            labels[b] = lab
        yield audio, labels
