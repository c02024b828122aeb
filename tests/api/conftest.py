"""Fixtures of the API protocol tests (the shared servers live in tests/conftest.py)."""

from __future__ import annotations

import pytest

from tests.api.ws_util import require_model
from tests.conftest import AUDIO, DEFAULT_MODEL, SILERO

SPEECH = "silero_ref_speech.wav"


@pytest.fixture(scope="session")
def default_model() -> str:
    """The shipped default model; fails (never skips) while it is missing from the store."""
    return require_model(DEFAULT_MODEL)


@pytest.fixture(params=[SILERO, DEFAULT_MODEL])
def model(request: pytest.FixtureRequest) -> str:
    """Each model the protocol is checked against: Silero (hop 512) and the default (hop 128)."""
    if request.param == SILERO:
        return str(request.getfixturevalue("silero_model"))
    return str(request.getfixturevalue("default_model"))


@pytest.fixture(scope="session")
def speech_wav() -> bytes:
    return (AUDIO / SPEECH).read_bytes()
