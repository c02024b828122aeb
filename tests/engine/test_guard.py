"""``lookback.engine.guard``: a step's NaN/Inf never stays in the state slabs.

Checked on Silero's real manifest, whose state ``[2, B, 128]`` has its batch on axis 1,
so a row is found and reset along the declared batch axis, not axis 0.
"""

from __future__ import annotations

import numpy as np

from lookback.engine.contract import load_manifest
from lookback.engine.guard import reset_non_finite
from tests.conftest import STORE


def _outs(n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "stateN": rng.standard_normal((2, n, 128)).astype(np.float32),
        "output": rng.random((n, 1)).astype(np.float32),
    }


def test_finite_outputs_are_left_alone(silero_model: str) -> None:
    spec = load_manifest(STORE / "silero-vad" / "6.2.3" / "model.json")
    outs = _outs(4)
    states, scores = reset_non_finite(spec, [outs["stateN"]], outs["output"], 4)
    assert states[0] is outs["stateN"] and scores is outs["output"]  # nothing copied


def test_a_non_finite_row_is_reset_and_its_scores_marked(silero_model: str) -> None:
    spec = load_manifest(STORE / "silero-vad" / "6.2.3" / "model.json")
    (state,) = spec.states
    outs = _outs(4)
    outs[state.output][1, 2, 5] = np.inf  # row 2 of the batch, along batch_axis 1
    outs["output"][3, 0] = np.nan  # row 3: a NaN score alone also resets
    before = {k: v.copy() for k, v in outs.items()}
    (new,), scores = reset_non_finite(spec, [outs[state.output]], outs["output"], 4)
    assert np.all(new[:, 2] == state.initial) and np.all(new[:, 3] == state.initial)
    assert np.array_equal(new[:, :2], before[state.output][:, :2])  # other rows untouched
    assert np.isnan(scores[2:]).all() and np.array_equal(scores[:2], before["output"][:2])


def test_a_multi_hop_step_is_judged_whole(silero_model: str) -> None:
    """Scores of a multi-hop call are grouped by session (row i * k + j): one bad hop
    resets that session and marks all its hops, the other session is untouched."""
    spec = load_manifest(STORE / "silero-vad" / "6.2.3" / "model.json")
    (state,) = spec.states
    outs = _outs(2)
    hops = np.random.default_rng(1).random((2 * 3, 1)).astype(np.float32)
    hops[4, 0] = np.nan  # session 1, hop 1
    (new,), scores = reset_non_finite(spec, [outs[state.output]], hops, 2)
    assert np.all(new[:, 1] == state.initial) and np.array_equal(new[:, 0], outs[state.output][:, 0])
    assert np.isnan(scores[3:]).all() and np.array_equal(scores[:3], hops[:3])
