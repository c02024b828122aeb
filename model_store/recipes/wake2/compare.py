"""lookback-wake/1 on the wake2 held-out test set (the same clips, the same scoring): the baseline.

python compare.py   # after run.sh; writes ../runs/lookback-wake2/v1_on_wake2_test.json
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch
from train import curve, evaluate, held_out, scores
from wake2mix import Pools

HERE = Path(__file__).resolve().parent


def main() -> None:
    torch.set_num_threads(1)
    sys.path.insert(0, str(HERE.parent / "wake"))
    spec = importlib.util.spec_from_file_location("wake1_train", HERE.parent / "wake" / "train.py")
    assert spec is not None and spec.loader is not None
    v1 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(v1)
    model = v1.load_weights()
    test = Pools(HERE.parent / "data" / "wake2", "test")
    pos, neg = held_out(test, 202, 6100)  # the seed and size train.py evaluates lookback-wake/2 on
    scored = scores(model, pos, neg)
    r = evaluate(pos, neg, 0.98, scored, detail=True)  # lookback-wake/1's own threshold
    out = {
        "at_threshold_0.98": {k: r[k] for k in ("detection_rate", "false_alarms_per_hour", "negative_hours")},
        "curve": curve(pos, neg, scored),
        "detection_by_engine": r["detection_by"]["engine"],
        "false_alarms_by_kind": r["false_alarms_by_kind"],
    }
    path = HERE.parent / "runs" / "lookback-wake2" / "v1_on_wake2_test.json"
    path.write_text(json.dumps(out, indent=1))
    print(out["at_threshold_0.98"])
    for c in out["curve"]:
        if c["threshold"] in (0.5, 0.8, 0.9, 0.95, 0.98, 0.99):
            print(c)


if __name__ == "__main__":
    main()
