"""Every ``LOOKBACK_*`` variable set anywhere in the deployment files is a ``Settings`` field
with a valid value."""

from __future__ import annotations

import shlex

import pytest

from tests.deploy.conftest import (
    compose,
    compose_env,
    container_env,
    deployment,
    dockerfile_stages,
)


def _env_sources() -> dict[str, dict[str, str]]:
    sources: dict[str, dict[str, str]] = {}
    for stage, instrs in dockerfile_stages().items():
        env = {}
        for instr, rest in instrs:
            if instr == "ENV":
                env.update(dict(a.split("=", 1) for a in shlex.split(rest)))
        sources[f"Dockerfile stage {stage}"] = env
    for name, svc in compose()["services"].items():
        sources[f"compose service {name}"] = compose_env(svc)
    dep = deployment()
    sources["k8s deployment"] = container_env(dep)
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    for e in c["env"]:  # secret-backed ones: check the name only
        sources["k8s deployment"].setdefault(e["name"], "")
    return sources


def test_lookback_env_vars_are_settings_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    from lookback.settings import Settings

    fields = set(Settings.model_fields)
    checked = 0
    for where, env in _env_sources().items():
        for key, value in env.items():
            if not key.startswith("LOOKBACK_"):
                continue
            field = key.removeprefix("LOOKBACK_").lower()
            assert field in fields, f"{where}: {key} is not a Settings field"
            checked += 1
            if value:
                monkeypatch.setenv(key, value)
                Settings(_env_file=None)  # raises if the value does not validate
                monkeypatch.delenv(key)
    assert checked >= 20, checked
