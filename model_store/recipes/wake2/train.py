"""Train ``lookback-wake/2`` ("hey lookback") in two rounds with hard-negative mining, export it,
evaluate it on the held-out voices.

    python train.py --data ../data/wake2 --out ../runs/lookback-wake2/lookback-wake/2

Network (``lookback.streaming``): the default model's front end (48 mel bands, log power,
normalised), a causal strided conv (K=3, stride 2: one score per 256 samples), six residual
blocks of depthwise causal conv (K=3, dilations 1-32) + ReLU + pointwise conv at 96
channels, a pointwise head and a sigmoid: a receptive field of 255 front-end frames (2 s).

The loss (``wake_loss``): BCE per hop against a target that is 1 from 32 ms before to 300 ms
after the phrase ends, with no loss on the hops around that run (the phrase may or may not
be complete there), plus max-pool terms on each clip's highest negative hop and each phrase
clip's highest positive hop (``--maxpool``). Round 1 trains on clips mixed on the fly from
the training pools (a background thread); then every training
negative utterance is scored alone and the ones that score high are drawn for 30% of the
negatives of round 2 (hard-negative mining), which continues from round 1's weights. The
threshold is set on val (training voices, other utterances and mixes): the lowest with at
most ``--val-fa`` false alarms per hour. The held-out test set (voices and engines training
never had) is used only for the figures: detection over every test phrase utterance, false
alarms over >= 5 hours of negatives streamed back to back with the state carried.
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
from wake2data import CLIP, HOP, SR
from wake2mix import Pools, f32, make_clip

from lookback.streaming import (
    CausalConv1d,
    DepthwiseConv1d,
    Frontend,
    Linear,
    ReLU,
    Residual,
    StreamingModel,
    export,
    mel_basis,
)

CONTEXT = 384
DILATIONS = (1, 2, 4, 8, 16, 32)
CHANNELS = 96
LABEL = "hey_lookback"
NEG_OFF_HOPS = 6  # min_silence_ms 96 at 16 ms per hop
WEIGHTS = Path(__file__).resolve().parent / "lookback-wake-2.weights.npz"


def build_model(channels: int = CHANNELS) -> StreamingModel:
    body = [CausalConv1d(48, channels, 3, stride=2, name="down"), ReLU()]
    for i, d in enumerate(DILATIONS):
        body.append(
            Residual(
                DepthwiseConv1d(channels, 3, dilation=d, name=f"b{i}"), ReLU(), Linear(channels, channels)
            )
        )
    body += [ReLU(), Linear(channels, 1)]
    return StreamingModel(Frontend(mel_basis(48), 128), body, labels=[LABEL])


def batches(
    pools: Pools, batch: int, seed: int, p_pos: float = 0.35
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    while True:
        audio = np.zeros((batch, CONTEXT + CLIP), np.float32)
        target = np.zeros((batch, CLIP // HOP), np.float32)
        for b in range(batch):
            audio[b, CONTEXT:], target[b], _ = make_clip(rng, pools, rng.random() < p_pos, augment=True)
        yield audio, target


def prefetch(gen: Iterator, depth: int = 3) -> Iterator:
    q: queue.Queue = queue.Queue(depth)
    threading.Thread(target=lambda: [q.put(x) for x in gen], daemon=True).start()
    while True:
        yield q.get()


def detections(scores: np.ndarray, thr: float, neg: float, min_off: int = NEG_OFF_HOPS) -> list[int]:
    """Event starts as the engine makes them (on at ``thr``; off after ``min_off`` hops below
    ``neg``), visiting only the hops at or above ``min(thr, neg)``."""
    idx = np.flatnonzero(scores >= min(thr, neg))
    starts: list[int] = []
    active, last = False, -(10**9)
    for i in idx.tolist():
        if active and i - last - 1 >= min_off:
            active = False
        if not active and scores[i] >= thr:
            starts.append(i)
            active = True
        if active and scores[i] >= neg:
            last = i
    return starts


@torch.no_grad()
def score(model: StreamingModel, clips: list[np.ndarray], group: int = 64) -> list[np.ndarray]:
    """Each clip alone from the initial state (clips of one group padded to the longest)."""
    model.eval()
    out: list[np.ndarray] = []
    for g in range(0, len(clips), group):
        part = clips[g : g + group]
        n = max(c.size for c in part)
        n = -(-n // HOP) * HOP
        audio = np.zeros((len(part), CONTEXT + n), np.float32)
        for j, c in enumerate(part):
            audio[j, CONTEXT : CONTEXT + c.size] = c
        y = model(torch.from_numpy(audio))[..., 0].numpy()
        out += [y[j, : -(-c.size // HOP)] for j, c in enumerate(part)]
    model.train()
    return out


@torch.no_grad()
def score_stream(model: StreamingModel, audio: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """One long stream (the negatives back to back), carried state, as the server scores it."""
    model.eval()
    x = np.concatenate([np.zeros(CONTEXT, np.float32), audio[: audio.size // HOP * HOP]])
    states = model.initial_states(1)
    out, t, n = [], 0, (x.size - CONTEXT) // HOP
    while t < n:
        c = min(chunk, n - t)
        y, states = model.forward_stateful(
            torch.from_numpy(x[None, t * HOP : CONTEXT + (t + c) * HOP]), states
        )
        out.append(y[0, :, 0].numpy())
        t += c
    model.train()
    return np.concatenate(out)


def hit(scores: np.ndarray, end: int, thr: float, neg: float) -> bool:
    e = end // HOP
    return any(e - 19 <= s <= e + 31 for s in detections(scores, thr, neg))  # -300 ms .. +500 ms


def held_out(pools: Pools, seed: int, n_neg: int, n_pos: int | None = None) -> tuple[list, list]:
    """Phrase clips (one per pooled phrase utterance unless ``n_pos``) and negative clips."""
    rng = np.random.default_rng(seed)
    count = len(pools.pos) if n_pos is None else n_pos
    pos = [make_clip(rng, pools, True, pos_index=i % len(pools.pos)) for i in range(count)]
    neg = [make_clip(rng, pools, False) for _ in range(n_neg)]
    return pos, neg


def scores(model: StreamingModel, pos: list, neg: list) -> tuple[list[np.ndarray], np.ndarray]:
    """Each phrase clip alone; the negative clips as one stream."""
    return score(model, [a for a, _, _ in pos]), score_stream(model, np.concatenate([a for a, _, _ in neg]))


def _bucket_snr(snr: float | None) -> str:
    if snr is None:
        return "clean"
    return "20-30 dB" if snr >= 20 else "10-20 dB" if snr >= 10 else "0-10 dB"


def _bucket_speed(stretch: float) -> str:
    return (
        "fast (stretch < 0.87)" if stretch < 0.87 else "slow (stretch > 1.15)" if stretch > 1.15 else "normal"
    )


def evaluate(pos: list, neg: list, thr: float, scored: tuple, detail: bool = False) -> dict:
    neg_thr = round(thr - 0.15, 3)
    s_pos, s_neg = scored
    detected = [hit(s, m["end"], thr, neg_thr) for s, (_, _, m) in zip(s_pos, pos, strict=True)]
    fa = detections(s_neg, thr, neg_thr)
    hours = len(neg) * CLIP / SR / 3600
    r: dict = {
        "threshold": thr,
        "positives": len(pos),
        "detection_rate": round(float(np.mean(detected)), 4),
        "negative_hours": round(hours, 3),
        "false_alarms": len(fa),
        "false_alarms_per_hour": round(len(fa) / hours, 3),
    }
    if not detail:
        return r
    groups: dict[str, dict[str, list[int]]] = {
        "engine": {},
        "voice": {},
        "snr": {},
        "speed": {},
        "reverb": {},
    }
    for ok, (_, _, m) in zip(detected, pos, strict=True):
        keys = {
            "engine": m["engine"],
            "voice": f"{m['engine']}:{m['voice'].split('+')[0] if m['engine'] == 'espeak' else m['voice']}",
            "snr": _bucket_snr(m["snr"]),
            "speed": _bucket_speed(m["stretch"]),
            "reverb": "reverb" if m.get("reverb") else "dry",
        }
        for g, k in keys.items():
            groups[g].setdefault(k, [0, 0])
            groups[g][k][0] += int(ok)
            groups[g][k][1] += 1
    r["detection_by"] = {
        g: {k: {"detected": v[0], "clips": v[1], "rate": round(v[0] / v[1], 4)} for k, v in sorted(d.items())}
        for g, d in groups.items()
    }
    by_kind: dict[str, list[int]] = {}
    by_engine: dict[str, list[int]] = {}
    fa_set = np.asarray(fa, dtype=np.int64)
    per_clip = np.bincount(fa_set * HOP // CLIP, minlength=len(neg)) if fa else np.zeros(len(neg), np.int64)
    examples = []
    for i, (_, _, m) in enumerate(neg):
        by_kind.setdefault(m["kind"], [0, 0])
        by_kind[m["kind"]][0] += int(per_clip[i])
        by_kind[m["kind"]][1] += 1
        eng = m.get("engine", "none (noise, silence)")
        by_engine.setdefault(eng, [0, 0])
        by_engine[eng][0] += int(per_clip[i])
        by_engine[eng][1] += 1
        if per_clip[i] and m.get("index") is not None:
            examples.append(m["kind"])
    r["false_alarms_by_kind"] = {k: {"false_alarms": v[0], "clips": v[1]} for k, v in sorted(by_kind.items())}
    r["false_alarms_by_engine"] = {
        k: {"false_alarms": v[0], "clips": v[1]} for k, v in sorted(by_engine.items())
    }
    return r


DET_THRESHOLDS = np.unique(
    np.round(
        np.concatenate(
            [np.arange(0.3, 0.9, 0.05), np.arange(0.9, 0.99, 0.005), 1 - np.geomspace(0.01, 1e-4, 25)]
        ),
        5,
    )
)


def curve(pos: list, neg: list, scored: tuple) -> list[dict]:
    return [evaluate(pos, neg, float(t), scored) for t in DET_THRESHOLDS]


def curve_without(pos: list, neg: list, scored: tuple, kind: str) -> list[dict]:
    """The curve with the false alarms in (and the hours of) the ``kind`` clips left out of the
    same stream: what the near misses cost."""
    s_neg = scored[1]
    drop = np.array([m["kind"] == kind for _, _, m in neg])
    hours = float((~drop).sum()) * CLIP / SR / 3600
    rows = []
    for t in DET_THRESHOLDS:
        r = evaluate(pos, neg, float(t), scored)
        fa = [f for f in detections(s_neg, float(t), round(float(t) - 0.15, 3)) if not drop[f * HOP // CLIP]]
        r.update(
            negative_hours=round(hours, 3),
            false_alarms=len(fa),
            false_alarms_per_hour=round(len(fa) / hours, 3),
        )
        rows.append(r)
    return rows


def choose_threshold(rows: list[dict], max_fa_per_hour: float) -> dict:
    """The lowest threshold whose false alarms stay within ``max_fa_per_hour``; if none does,
    the one with the fewest."""
    ok = [r for r in rows if r["false_alarms_per_hour"] <= max_fa_per_hour]
    return ok[0] if ok else min(rows, key=lambda r: (r["false_alarms"], -r["detection_rate"]))


def wake_loss(logits: torch.Tensor, target: torch.Tensor, maxpool: float) -> torch.Tensor:
    """BCE per hop where the target is 0 or 1 (-1: no loss), plus ``maxpool`` x (BCE of each
    clip's highest negative hop against 0 + BCE of each phrase clip's highest positive hop
    against 1): an event needs one hop over the threshold, and so does a false alarm."""
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    keep = (target >= 0).float()
    frame = bce(logits, target.clamp(min=0), reduction="none")
    loss = (frame * keep).sum() / keep.sum()
    if maxpool <= 0:
        return loss
    peak_neg = logits.masked_fill(target != 0, -1e4).max(dim=1).values
    loss = loss + maxpool * bce(peak_neg, torch.zeros_like(peak_neg))
    rows = (target == 1).any(dim=1)
    if bool(rows.any()):
        peak_pos = logits.masked_fill(target != 1, -1e4)[rows].max(dim=1).values
        loss = loss + maxpool * bce(peak_pos, torch.ones_like(peak_pos))
    return loss


def train_round(
    model: StreamingModel,
    pools: Pools,
    steps: int,
    lr: float,
    batch: int,
    seed: int,
    log: list,
    maxpool: float = 0.0,
) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    warm = max(1, min(100, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, 0.5 * (1 + np.cos(np.pi * min(s / steps, 1.0))))
    )
    data = prefetch(batches(pools, batch, seed))
    t0, running = time.time(), 0.0
    for step in range(1, steps + 1):
        audio, target = next(data)
        loss = wake_loss(model.logits(torch.from_numpy(audio))[..., 0], torch.from_numpy(target), maxpool)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        running = 0.98 * running + 0.02 * loss.item() if step > 1 else loss.item()
        if step % 100 == 0:
            print(f"step {step} loss {running:.4f} {time.time() - t0:.0f} s", flush=True)
            log.append({"step": step, "loss": round(running, 5), "seconds": round(time.time() - t0, 1)})


def mine(model: StreamingModel, pools: Pools) -> np.ndarray:
    """Each training negative utterance alone (0.5 s of floor before it): its highest score.
    Returns sampling weights that favour the utterances the model nearly fires on."""
    rng = np.random.default_rng(5)
    clips = []
    for u in pools.neg:
        x = np.concatenate([np.zeros(SR // 2, np.float32), f32(u), np.zeros(SR // 4, np.float32)])
        x = x * 10 ** (rng.uniform(-30, -3) / 20) + rng.standard_normal(x.size).astype(np.float32) * 1e-4
        clips.append(x.astype(np.float32))
    top = np.array([float(s.max()) for s in score(model, clips)])
    w = 0.05 + np.minimum(top, 0.9) ** 2  # capped: near-copies of the phrase must not take over
    return w / w.sum(), top


def main() -> None:
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", type=Path, default=here.parent / "data" / "wake2")
    ap.add_argument("--run", type=Path, default=here.parent / "runs" / "lookback-wake2")
    candidate = here.parent / "runs" / "lookback-wake2" / "lookback-wake" / "2"  # not the served store
    ap.add_argument("--out", type=Path, default=candidate)
    ap.add_argument("--steps", type=int, default=2200, help="round 1")
    ap.add_argument("--steps2", type=int, default=1400, help="round 2 (after mining)")
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--maxpool", type=float, default=0.5, help="weight of the peak-hop loss terms")
    ap.add_argument("--val-fa", type=float, default=0.5, help="false alarms per hour allowed on val")
    ap.add_argument("--val-neg", type=int, default=2400, help="3 s negative clips in the val stream")
    ap.add_argument("--test-neg", type=int, default=6100, help="3 s negative clips in the test stream")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    args.run.mkdir(parents=True, exist_ok=True)
    train, val, test = (Pools(args.data, s) for s in ("train", "val", "test"))

    model = build_model()
    gen = batches(train, 32, args.seed + 1)
    with torch.no_grad():
        feats = np.concatenate(
            [model.frontend.raw(torch.from_numpy(next(gen)[0])).reshape(-1, 48).numpy() for _ in range(4)]
        )
    model.frontend.set_normalisation(feats.mean(axis=0), feats.std(axis=0))
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"model: {n_params} trainable parameters, receptive field {model.body.receptive_field()} frames")
    log: list = []
    t0 = time.time()
    train_round(model, train, args.steps, args.lr, args.batch, args.seed + 2, log, args.maxpool)
    t1 = time.time()
    weights, top = mine(model, train)
    mined = {
        "seconds": round(time.time() - t1, 1),
        "utterances": len(top),
        "above_0.5": int((top >= 0.5).sum()),
    }
    order = np.argsort(-top)[:15]
    mined["hardest"] = [
        {
            "text": train.neg_meta[i]["text"],
            "engine": train.neg_meta[i]["engine"],
            "score": round(float(top[i]), 3),
        }
        for i in order
    ]
    print(f"mined: {mined}", flush=True)
    train.neg_weights = weights
    if args.steps2:
        train_round(model, train, args.steps2, args.lr / 3, args.batch, args.seed + 3, log, args.maxpool)
    train_s = time.time() - t0
    model.eval()
    torch.save(model.state_dict(), args.run / "model.pt")

    t2 = time.time()
    val_pos, val_neg = held_out(val, 101, args.val_neg)
    val_scored = scores(model, val_pos, val_neg)
    val_curve = curve(val_pos, val_neg, val_scored)
    chosen = choose_threshold(val_curve, args.val_fa)
    thr = float(chosen["threshold"])
    print(f"threshold {thr}: val {chosen}", flush=True)
    test_pos, test_neg = held_out(test, 202, args.test_neg)
    test_scored = scores(model, test_pos, test_neg)
    test_r = evaluate(test_pos, test_neg, thr, test_scored, detail=True)
    test_r["curve"] = curve(test_pos, test_neg, test_scored)
    test_r["curve_without_near_misses"] = curve_without(test_pos, test_neg, test_scored, "near miss")
    test_r["at_0.9"] = evaluate(test_pos, test_neg, 0.9, test_scored, detail=True)
    print(
        f"test: { {k: test_r[k] for k in ('detection_rate', 'false_alarms_per_hour', 'negative_hours')} }",
        flush=True,
    )
    eval_s = time.time() - t2

    info = {
        "train_seconds": round(train_s, 1),
        "eval_seconds": round(eval_s, 1),
        "steps": [args.steps, args.steps2],
        "batch": args.batch,
        "maxpool": args.maxpool,
        "parameters": n_params,
        "receptive_field_frames": model.body.receptive_field(),
        "pools": {
            s: {"pos": len(p.pos), "neg": len(p.neg)}
            for s, p in (("train", train), ("val", val), ("test", test))
        },
        "mining": mined,
        "val": {**chosen, "max_fa_per_hour": args.val_fa, "negative_clips": len(val_neg)},
        "val_curve": val_curve,
        "test": test_r,
        "log": log,
        "torch": torch.__version__,
    }
    (args.run / "results.json").write_text(json.dumps(info, indent=1))
    desc = (
        'Wake-phrase detector for "hey lookback", trained from scratch by model_store/recipes/wake2 on '
        "synthetic speech from espeak-ng, Flite and Festival voices (the phrase against systematic near "
        "misses, hours of other speech, noise, babble, room reverb), two rounds with hard-negative mining. "
        "Network (lookback.streaming): the default model's 48-band log-mel front end, a causal conv K=3 "
        f"stride 2 (one step per 256 samples), 6 residual depthwise-separable causal convs at {CHANNELS} "
        f"channels (dilations 1-32), pointwise head, sigmoid; receptive field 2 s; {n_params} trainable "
        f"parameters. Held-out voices and engines: detection rate {test_r['detection_rate']} at "
        f"{test_r['false_alarms_per_hour']} false alarms per hour "
        f"({test_r['negative_hours']} h of negatives). "
        "One score per 256-sample hop (16 ms); an event starts when the phrase ends. "
        "See model_store/recipes/wake2/RESULTS.md."
    )
    report = export(
        model,
        args.out,
        name="lookback-wake",
        version="2",
        description=desc,
        license="MIT",
        events={
            "threshold": thr,
            "neg_threshold": round(thr - 0.15, 3),
            "min_silence_ms": 96,
            "speech_pad_ms": 0,
            "min_speech_ms": 0,
        },
        clips=[test_pos[0][0]],
    )
    print(report.text())
    np.savez(WEIGHTS, **{k: v.numpy() for k, v in model.state_dict().items() if k != "frontend.basis"})


def load_weights(path: Path | None = None) -> StreamingModel:
    """The shipped weights (the filterbank is rebuilt by ``mel_basis``, exactly)."""
    model = build_model()
    with np.load(path or WEIGHTS) as npz:
        state = {k: torch.from_numpy(npz[k].copy()) for k in npz.files}
    state["frontend.basis"] = model.frontend.basis.detach().clone()
    model.load_state_dict(state)
    return model.eval()


if __name__ == "__main__":
    main()
