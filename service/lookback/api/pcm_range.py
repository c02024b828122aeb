"""The one rule for float audio, on the WebSocket and REST alike.

Float PCM is full scale at 1.0. Samples up to ``max_float_amplitude`` (default 4.0, i.e.
12 dB of headroom for a hot recording) are accepted as they are; anything larger, and
NaN or Inf, is refused whole before it reaches a model: huge finite values drive a
recurrent state to Inf and then NaN, which would poison every later step.
"""

from __future__ import annotations

import numpy as np


def float_problem(audio: np.ndarray, max_amplitude: float) -> tuple[str, str] | None:
    """(code, message) when ``audio`` (float32) must be refused, else None. One pass."""
    if audio.size == 0:
        return None
    peak = float(np.max(np.abs(audio)))  # NaN anywhere makes the peak NaN
    if peak <= max_amplitude:
        return None
    if not np.isfinite(peak):
        return "non_finite_audio", "float audio holds NaN or Inf samples"
    return (
        "audio_out_of_range",
        f"float sample of magnitude {peak:.3g} outside [-{max_amplitude:g}, {max_amplitude:g}] "
        "(full scale is 1.0)",
    )
