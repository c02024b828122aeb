"""Engine test fixtures: the real Silero VAD model, imported once per session.

The import goes into the repository's own ``model_store/`` (gitignored for
silero-vad/), so later runs and ``lookback serve`` reuse it and nothing is
fetched again. A failed import fails the tests that need it, loudly: skipping
would hide that the Silero checks never ran.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lookback.engine.importer import import_model
from lookback.errors import LookbackError

MODEL_STORE = Path(__file__).parents[2] / "model_store"


@pytest.fixture(scope="session")
def silero_store() -> Path:
    """The model store holding silero-vad/6.2.3, imported from PyPI if missing."""
    try:
        import_model("silero-vad", MODEL_STORE)
    except LookbackError as exc:
        pytest.fail(
            f"importing silero-vad into {MODEL_STORE} failed [{exc.code}]: {exc.message}",
            pytrace=False,
        )
    return MODEL_STORE


@pytest.fixture
def default_model() -> str:
    """The shipped default model ``lookback-vad/1``; fails (never skips) when it is missing."""
    from tests.engine.engine_support import require_default_model

    require_default_model()
    return "lookback-vad"


@pytest.fixture(params=["silero-vad", "lookback-vad"])
def any_model(request: pytest.FixtureRequest) -> str:
    """Each served model in turn: Silero (hop 512, batch axis 1) and the default model."""
    if request.param == "silero-vad":
        request.getfixturevalue("silero_model")
    else:
        request.getfixturevalue("default_model")
    return str(request.param)
