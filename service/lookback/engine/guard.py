"""The state guard: a model step that yields NaN or Inf must not stay in the state slabs.

Called once per batch from ``ModelHandle.compute`` between the model call and the
scatter. The common case costs one ``isfinite(...).all()`` per state output and score
output. A row (session) with any non-finite value in its new states or scores gets its
new states replaced by the states' initial values, so its next step starts clean
instead of carrying NaN for ever, and its scores set to NaN: the transport reports a
step with NaN scores as ``non_finite_state`` instead of a result.
"""

from __future__ import annotations

import numpy as np

from lookback.engine.contract import ModelSpec


def reset_non_finite(spec: ModelSpec, outs: dict[str, np.ndarray], n: int) -> None:
    """Repair ``outs`` (the model call's outputs for ``n`` rows) in place; see the module."""
    bad = np.zeros(n, dtype=bool)
    found = False
    for st in spec.states:
        value = outs[st.output]
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            rows = np.moveaxis(value, st.batch_axis, 0).reshape(n, -1)
            bad |= ~np.isfinite(rows).all(axis=1)
            found = True
    for o in spec.outputs:
        value = outs[o.name]
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            bad |= ~np.isfinite(np.asarray(value).reshape(n, -1)).all(axis=1)
            found = True
    if not found:
        return
    for st in spec.states:
        value = np.array(outs[st.output])  # ORT's outputs may be read-only views
        np.moveaxis(value, st.batch_axis, 0)[bad] = st.initial
        outs[st.output] = value
    for o in spec.outputs:
        value = np.array(outs[o.name], dtype=np.float32)
        value.reshape(n, -1)[bad] = np.nan
        outs[o.name] = value
