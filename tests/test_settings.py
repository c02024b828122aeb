"""``lookback.settings.Settings``: defaults, ``LOOKBACK_*`` env parsing, validation."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from lookback.settings import Settings

REPO_STORE = Path(__file__).resolve().parents[1] / "model_store"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("LOOKBACK_"):
            monkeypatch.delenv(name)


def _settings(**kw: Any) -> Settings:
    return Settings(_env_file=None, **kw)


def test_defaults_are_sane() -> None:
    s = _settings()
    assert (s.host, s.port) == ("127.0.0.1", 8000)
    assert s.model_store == REPO_STORE
    assert s.default_model == "lookback-vad"
    assert s.models == [] and s.api_keys == [] and s.allowed_origins == []
    assert s.auth_enabled is False and s.metrics_require_auth is False
    assert s.providers == "auto"
    assert s.max_wait_ms > 0 and s.adaptive_wait and s.max_batch_size >= 1
    assert s.ws_impl == "websockets-sansio" and s.ws_per_message_deflate is False
    assert s.max_frames_per_message <= s.max_pending_steps
    assert s.max_message_bytes >= s.max_frames_per_message * 128 * 4
    assert s.max_upload_bytes >= 100 << 20 and s.max_upload_seconds >= 3600
    assert 0 < s.idle_timeout_s < s.max_session_s
    assert s.drain_grace_s > 0
    assert s.warmup_batch_sizes and all(b >= 1 for b in s.warmup_batch_sizes)


def test_env_scalars(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOKBACK_PORT", "9123")
    monkeypatch.setenv("LOOKBACK_HOST", "0.0.0.0")
    monkeypatch.setenv("LOOKBACK_MAX_WAIT_MS", "2.5")
    monkeypatch.setenv("LOOKBACK_METRICS_REQUIRE_AUTH", "true")
    monkeypatch.setenv("LOOKBACK_PROVIDERS", "cpu")
    monkeypatch.setenv("LOOKBACK_MODEL_STORE", "/srv/models")
    monkeypatch.setenv("lookback_log_level", "debug")  # case-insensitive
    s = _settings()
    assert (s.port, s.host, s.max_wait_ms) == (9123, "0.0.0.0", 2.5)
    assert s.metrics_require_auth is True and s.providers == "cpu"
    assert s.model_store == Path("/srv/models") and s.log_level == "debug"


def test_env_comma_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOKBACK_API_KEYS", " k1, k2 ,,")
    monkeypatch.setenv("LOOKBACK_MODELS", "silero-vad,lookback-vad/1")
    monkeypatch.setenv("LOOKBACK_ALLOWED_ORIGINS", "https://a.example,https://b.example")
    monkeypatch.setenv("LOOKBACK_WARMUP_BATCH_SIZES", "1, 4,16")
    s = _settings()
    assert [k.get_secret_value() for k in s.api_keys] == ["k1", "k2"]
    assert s.auth_enabled
    assert s.models == ["silero-vad", "lookback-vad/1"]
    assert s.allowed_origins == ["https://a.example", "https://b.example"]
    assert s.warmup_batch_sizes == [1, 4, 16]


def test_single_and_empty_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOKBACK_API_KEYS", "only")
    monkeypatch.setenv("LOOKBACK_MODELS", "")
    s = _settings()
    assert [k.get_secret_value() for k in s.api_keys] == ["only"]
    assert s.models == []


def test_keys_are_secret() -> None:
    s = _settings(api_keys="hunter2,other")
    assert "hunter2" not in repr(s) and "hunter2" not in str(s.model_dump())
    assert [k.get_secret_value() for k in s.api_keys] == ["hunter2", "other"]


def test_init_values_take_lists_too() -> None:
    s = _settings(api_keys=["a"], models=["silero-vad"], allowed_origins=[])
    assert s.auth_enabled and s.models == ["silero-vad"]


def test_dotenv_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = tmp_path / ".env"
    env.write_text("LOOKBACK_PORT=7001\nLOOKBACK_API_KEYS=x,y\nOTHER_THING=1\n")
    s = Settings(_env_file=env)
    assert s.port == 7001 and len(s.api_keys) == 2
    monkeypatch.setenv("LOOKBACK_PORT", "7002")  # the environment wins over the file
    assert Settings(_env_file=env).port == 7002


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("LOOKBACK_PORT", "70000"),
        ("LOOKBACK_PORT", "eighty"),
        ("LOOKBACK_LOG_LEVEL", "loud"),
        ("LOOKBACK_PROVIDERS", "tpu"),
        ("LOOKBACK_MAX_BATCH_SIZE", "0"),
        ("LOOKBACK_MAX_MESSAGE_BYTES", "100"),
        ("LOOKBACK_IDLE_TIMEOUT_S", "0"),
        ("LOOKBACK_WARMUP_BATCH_SIZES", "1,x"),
    ],
)
def test_invalid_values_are_refused(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        _settings()


def test_inconsistent_limits_are_refused() -> None:
    with pytest.raises(ValidationError):
        _settings(max_frames_per_message=128, max_pending_steps=64)


def test_unknown_env_vars_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOKBACK_NOT_A_SETTING", "1")
    assert _settings().port == 8000
