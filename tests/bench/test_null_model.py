"""The bench's null twin loads under the default model's contract and does no arithmetic."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lookback.engine.engine import Engine
from lookback.engine.slabs import CONTEXT
from lookback.engine.step import Step
from tests.bench.null_model import make_null_model
from tests.conftest import test_settings as make_settings


async def test_null_twin_passes_states_through_and_scores_zero(tmp_path: Path) -> None:
    name = make_null_model("lookback-vad", tmp_path)
    assert name == "null-lookback-vad"
    engine = Engine(make_settings(model_store=tmp_path, models=[name], default_model=name))
    await engine.start()
    try:
        handle = engine.resolve(name)
        real = handle.spec
        assert (real.context_samples, real.hop_samples) == (384, 128)
        assert [s.input for s in real.states] == ["conv", "h"]
        table = handle.table
        slots = [table.acquire() for _ in range(3)]
        rng = np.random.default_rng(0)
        before = {}
        for st in real.states:
            table.slabs[st.input][slots] = rng.standard_normal((3, *st.shape)).astype(np.float32)
            before[st.input] = table.slabs[st.input][slots].copy()
        pcm = [rng.integers(-3000, 3000, 128, dtype=np.int16) for _ in slots]
        out = handle.compute(
            [
                Step(s, 0, p.tobytes(), None, 0.0)  # type: ignore[arg-type]
                for s, p in zip(slots, pcm, strict=True)
            ]
        )
        assert out.shape == (3, 1) and not out.any()
        for st in real.states:
            np.testing.assert_array_equal(table.slabs[st.input][slots], before[st.input])
        # The context still advances: the new hop is the last 128 samples of the lookback.
        ctx = table.slabs[CONTEXT][slots, 256:384]
        np.testing.assert_allclose(ctx, np.stack(pcm) / 32768.0, rtol=0, atol=1e-7)
    finally:
        await engine.stop()
