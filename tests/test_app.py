"""create_app's lifespan: the start-up GC freeze (``gc_freeze``)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from tests.conftest import running_server
from tests.conftest import test_settings as make_settings


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()  # leave the test process's collector as it found it


@pytest.mark.parametrize("freeze", [True, False])
def test_gc_freeze_after_startup(unfrozen: None, silero_model: str, freeze: bool) -> None:
    with running_server(make_settings(models=[silero_model], gc_freeze=freeze)) as srv:
        assert srv.get("/readyz").status_code == 200
        frozen = gc.get_freeze_count()
    # the loaded app (engine, models, routes) is frozen, not just a handful of objects
    assert (frozen > 10_000) if freeze else frozen == 0
