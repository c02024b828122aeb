"""The state guard: a model step that yields NaN or Inf must not stay in the state slabs.

Called once per model call by ``StepCompute`` between the run and the scatter. The common
case costs one ``isfinite(...).all()`` per state output and one on the scores. A session
(row) with any non-finite value in its new states or scores gets its new states replaced
by the states' initial values, so its next step starts clean instead of carrying NaN for
ever, and its scores set to NaN: the session reports a step with NaN scores to its sink
as ``non_finite_state`` (``NonFiniteState``) instead of a result. A multi-hop step is
judged whole: one bad hop resets the session and marks every hop of that call.
"""

from __future__ import annotations

import numpy as np

from lookback.engine.contract import Manifest


def reset_non_finite(
    spec: Manifest, states: list[np.ndarray], scores: np.ndarray, n: int
) -> tuple[list[np.ndarray], np.ndarray]:
    """``states`` (one per ``spec.states``, graph layout) and ``scores`` (rows grouped by
    session: ``n`` sessions, any hops each) of one call, repaired; see the module."""
    bad = np.zeros(n, dtype=bool)
    found = False
    for st, value in zip(spec.states, states, strict=True):
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            rows = np.moveaxis(value, st.batch_axis, 0).reshape(n, -1)
            bad |= ~np.isfinite(rows).all(axis=1)
            found = True
    if not np.isfinite(scores).all():
        bad |= ~np.isfinite(scores.reshape(n, -1)).all(axis=1)
        found = True
    if not found:
        return states, scores
    repaired = []
    for st, value in zip(spec.states, states, strict=True):
        value = np.array(value)  # ORT's outputs may be read-only views
        np.moveaxis(value, st.batch_axis, 0)[bad] = st.initial
        repaired.append(value)
    scores = np.array(scores, dtype=np.float32)
    scores.reshape(n, -1)[bad] = np.nan
    return repaired, scores
