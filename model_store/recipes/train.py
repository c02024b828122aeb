"""Train the Lookback VAD on the shards from datagen.py; keep the best checkpoint on val.

    python train.py --data data --out runs/lookback-vad --steps 3000

Batches of random crops (``--batch`` x ``--frames`` hops) come from a generator over
memory-mapped shards, prepared in a background thread. Every ``--eval-every`` steps
the model scores the whole val clips from zero state (as a stream would) and the
checkpoint with the best val F1 (at its best threshold) is kept, with that threshold.
"""

from __future__ import annotations

import argparse
import json
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from model import HOP, build_model, count_parameters, describe_frontend
from shards import Split, batches
from sklearn.metrics import roc_auc_score

from lookback.streaming import StreamingModel


def prefetch(gen: Iterator, depth: int = 4) -> Iterator:
    q: queue.Queue = queue.Queue(depth)

    def work() -> None:
        for item in gen:
            q.put(item)

    threading.Thread(target=work, daemon=True).start()
    while True:
        yield q.get()


@torch.no_grad()
def score_split(model: StreamingModel, split: Split, group: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Stream every clip from zero state; return (scores, labels) over all frames."""
    model.eval()
    scores, labels = [], []
    order = sorted(range(len(split)), key=lambda i: split.clips[i].labels.size)
    for g in range(0, len(order), group):
        clips = [split.clips[i] for i in order[g : g + group]]
        n = max(c.labels.size for c in clips)
        audio = np.zeros((len(clips), 384 + n * HOP), np.float32)
        for b, c in enumerate(clips):
            audio[b, 384 : 384 + c.audio.size] = np.asarray(c.audio, np.float32) / 32768.0
        s = model(torch.from_numpy(audio))[..., 0]
        for b, c in enumerate(clips):
            scores.append(s[b, : c.labels.size].numpy())
            labels.append(np.asarray(c.labels))
    model.train()
    return np.concatenate(scores), np.concatenate(labels)


def f1_at(scores: np.ndarray, labels: np.ndarray, threshold: float) -> float:
    pred = scores >= threshold
    tp = float(np.sum(pred & (labels > 0)))
    fp = float(np.sum(pred & (labels == 0)))
    fn = float(np.sum(~pred & (labels > 0)))
    return 2 * tp / max(2 * tp + fp + fn, 1.0)


def best_threshold(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    grid = np.round(np.arange(0.20, 0.81, 0.01), 2)
    f1s = [f1_at(scores, labels, float(t)) for t in grid]
    i = int(np.argmax(f1s))
    return float(grid[i]), float(f1s[i])


def plateau_threshold(
    scores: np.ndarray, labels: np.ndarray, slack: float = 0.002
) -> tuple[float, float, float]:
    """The threshold closest to 0.5 whose F1 is within ``slack`` of the best one.

    Val F1 is flat over a wide range of thresholds; within that plateau a threshold
    near 0.5 (a calibrated probability's natural cut) transfers best to other data.
    Returns (threshold, its F1, the best F1).
    """
    grid = np.round(np.arange(0.20, 0.81, 0.01), 2)
    f1s = np.array([f1_at(scores, labels, float(t)) for t in grid])
    ok = np.flatnonzero(f1s >= f1s.max() - slack)
    i = int(ok[np.argmin(np.abs(grid[ok] - 0.5))])
    return float(grid[i]), float(f1s[i]), float(f1s.max())


def normalisation(split: Split, seed: int, n_batches: int = 8) -> tuple[np.ndarray, np.ndarray]:
    model = build_model()
    gen = batches(split, 32, 256, seed)
    feats = []
    with torch.no_grad():
        for _ in range(n_batches):
            audio, _ = next(gen)
            feats.append(
                model.frontend.raw(torch.from_numpy(audio)).reshape(-1, model.frontend.out_channels).numpy()
            )
    f = np.concatenate(feats)
    return f.mean(axis=0), f.std(axis=0)


def main() -> None:
    here = Path(__file__).parent
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", type=Path, default=here / "data")
    ap.add_argument("--out", type=Path, default=here / "runs" / "lookback-vad")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--frames", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    train, val = Split(args.data, "train"), Split(args.data, "val")
    print(f"train: {len(train)} clips, {train.frames} hops; val: {len(val)} clips, {val.frames} hops")

    model = build_model()
    model.frontend.set_normalisation(*normalisation(train, args.seed + 1))
    print(f"model: {count_parameters(model)} parameters; front end: {describe_frontend()}")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    warm = min(200, args.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, 0.5 * (1 + np.cos(np.pi * min(s / args.steps, 1.0))))
    )
    loss_fn = torch.nn.BCEWithLogitsLoss()
    gen = prefetch(batches(train, args.batch, args.frames, args.seed + 2))

    best: dict = {"f1": -1.0}
    t0 = time.time()
    running = 0.0
    for step in range(1, args.steps + 1):
        audio, labels = next(gen)
        logit = model.logits(torch.from_numpy(audio))[..., 0]
        loss = loss_fn(logit, torch.from_numpy(labels))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        running = 0.98 * running + 0.02 * loss.item() if step > 1 else loss.item()
        if step % 100 == 0:
            print(
                f"step {step} loss {running:.4f} lr {sched.get_last_lr()[0]:.2e} {time.time() - t0:.0f} s",
                flush=True,
            )
        if step % args.eval_every == 0 or step == args.steps:
            scores, lab = score_split(model, val)
            thr, f1 = best_threshold(scores, lab)
            auc = float(roc_auc_score(lab, scores))
            print(
                f"  val: AUC {auc:.4f} best F1 {f1:.4f} at {thr:.2f} (F1@0.5 {f1_at(scores, lab, 0.5):.4f})",
                flush=True,
            )
            if f1 > best["f1"]:
                best = {"f1": f1, "auc": auc, "threshold": thr, "step": step}
                torch.save(model.state_dict(), args.out / "best.pt")
    elapsed = time.time() - t0
    info = {
        "best_val": best,
        "steps": args.steps,
        "batch": args.batch,
        "frames": args.frames,
        "lr": args.lr,
        "seed": args.seed,
        "train_seconds": round(elapsed, 1),
        "train_clips": len(train),
        "train_hours": round(train.frames * HOP / 16000 / 3600, 2),
        "parameters": count_parameters(model),
        "torch": torch.__version__,
    }
    (args.out / "train.json").write_text(json.dumps(info, indent=1))
    print(f"train: done in {elapsed:.0f} s; best val {best}")


if __name__ == "__main__":
    main()
