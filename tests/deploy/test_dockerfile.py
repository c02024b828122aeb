"""Dockerfile: hadolint plus structural checks; COPY sources exist and survive
``.dockerignore``; the wheel the image installs holds the package's data files."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.conftest import (
    DOCKERFILE,
    DOCKERIGNORE,
    REPO,
    dockerfile_args,
    dockerfile_stages,
    require_tool,
    run_tool,
)


def test_hadolint() -> None:
    hadolint = require_tool("hadolint")
    res = run_tool(hadolint, "--no-color", "--failure-threshold", "style", str(DOCKERFILE))
    assert res.returncode == 0, res.stdout + res.stderr


def test_dockerfile_structure() -> None:
    stages = dockerfile_stages()
    assert list(stages) == ["wheel", "cpu-builder", "cpu", "gpu-builder", "gpu"]
    args = dockerfile_args()
    assert stages["gpu"][0] == ("FROM", "${CUDA_IMAGE}")
    assert stages["cpu"][0] == ("FROM", "${PYTHON_IMAGE}")
    assert re.fullmatch(r"python:3\.11-slim", args["PYTHON_IMAGE"])
    for runtime in ("cpu", "gpu"):  # gpu is last, hence the default target
        instrs = stages[runtime]
        by: dict[str, list[str]] = {}
        for instr, rest in instrs:
            by.setdefault(instr, []).append(rest)
        (user,) = by["USER"]
        assert user.split(":")[0] not in {"root", "0"}, f"{runtime} runs as root"
        (entry,) = by["ENTRYPOINT"]
        assert json.loads(entry) == ["lookback", "serve"]
        (health,) = by["HEALTHCHECK"]
        assert "/healthz" in health and "urllib" in health and "curl" not in health
        assert by["EXPOSE"] == ["8000"]
        env = {}
        for rest in by["ENV"]:
            env.update(dict(a.split("=", 1) for a in shlex.split(rest)))
        assert env["LOOKBACK_MODEL_STORE"] == "/app/model_store"
        assert env["LOOKBACK_HOST"] == "0.0.0.0"
        assert env["LOOKBACK_PORT"] == "8000"
        assert any(
            c.startswith("model_store/lookback-vad/ /app/model_store/lookback-vad") for c in by["COPY"]
        ), f"{runtime} does not bake in the default model"
        assert any("--from=" in c and "/opt/venv" in c for c in by["COPY"])
        # the healthcheck's python command is valid Python
        cmd = json.loads(health.split("CMD", 1)[1])
        assert cmd[:2] == ["python", "-c"]
        compile(cmd[2], "<healthcheck>", "exec")
    assert "onnxruntime==${ORT_VERSION}" in " ".join(r for _, r in stages["cpu-builder"])
    assert "onnxruntime-gpu==${ORT_VERSION}" in " ".join(r for _, r in stages["gpu-builder"])


def test_dockerfile_matches_installed_onnxruntime() -> None:
    """The image pins the ORT tested here, on a CUDA base of the major that wheel was built for."""
    from importlib.metadata import PackageNotFoundError, version

    args = dockerfile_args()
    m = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.(\d+)-cudnn-runtime-ubuntu24\.04", args["CUDA_IMAGE"])
    assert m, args["CUDA_IMAGE"]
    try:
        ort_gpu = version("onnxruntime-gpu")
    except PackageNotFoundError:
        pytest.skip(
            "onnxruntime-gpu not installed here (not linux x86_64): "
            "cannot compare its CUDA build with CUDA_IMAGE"
        )
    assert args["ORT_VERSION"] == ort_gpu
    from onnxruntime.capi import build_and_package_info as info

    assert info.cuda_version.split(".")[0] == m.group(1), (info.cuda_version, m.group(0))


def _dockerignore_patterns() -> list[str]:
    return [
        ln.strip()
        for ln in DOCKERIGNORE.read_text().splitlines()
        if ln.strip() and not ln.strip().startswith("#")
    ]


def _glob_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignored(rel: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or a parent of it decides."""
    parts = rel.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pat in patterns:
        negate = pat.startswith("!")
        rx = _glob_regex(pat.lstrip("!").strip().strip("/"))
        if any(rx.fullmatch(c) for c in candidates):
            excluded = not negate
    return excluded


def test_dockerignore_matcher() -> None:
    pats = ["*", "!service/", "!model_store/lookback-vad/", "**/__pycache__"]
    assert dockerignored(".venv/bin/python", pats)
    assert not dockerignored("service/lookback/api/ws.py", pats)
    assert dockerignored("service/lookback/api/__pycache__/ws.cpython-311.pyc", pats)
    assert not dockerignored("model_store/lookback-vad/1/model.onnx", pats)
    assert dockerignored("model_store/silero-vad/6.2.3/silero_vad.onnx", pats)


def test_copy_sources_exist_and_survive_dockerignore() -> None:
    patterns = _dockerignore_patterns()
    copied = 0
    for stage, instrs in dockerfile_stages().items():
        for instr, rest in instrs:
            if instr not in ("COPY", "ADD"):
                continue
            args = [a for a in shlex.split(rest) if not a.startswith("--")]
            if "--from=" in rest:
                continue
            for src in args[:-1]:
                path = REPO / src
                assert path.exists(), f"stage {stage}: COPY source {src} is not in the repository"
                files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
                kept = [f for f in files if not dockerignored(str(f.relative_to(REPO)), patterns)]
                assert kept, f"stage {stage}: .dockerignore excludes all of COPY source {src}"
                copied += 1
    assert copied >= 4
    for secret in (
        ".env",
        ".venv/bin/python",
        "model_store/silero-vad/6.2.3/silero_vad.onnx",
        "model_store/recipes/data/x.wav",
        "tests/deploy/test_prometheus.py",
        ".git/config",
        "service/lookback/__pycache__/app.cpython-311.pyc",
    ):
        assert dockerignored(secret, patterns), f"{secret} would enter the build context"


def test_wheel_contains_package_data(tmp_path: Path) -> None:
    """The image installs the project as a wheel: every non-Python file under service/lookback/
    (web demo, known model manifests, py.typed) must be in it, or the image lacks it."""
    import importlib.util
    import zipfile

    if importlib.util.find_spec("setuptools") is None:
        pytest.fail(
            "setuptools is not installed in this environment: pip install "
            "'setuptools>=68' (the wheel is built offline, without build isolation)",
            pytrace=False,
        )
    # The same inputs as the Dockerfile's wheel stage, in a scratch copy (an in-tree build
    # would leave build/ in the repository and could reuse stale files from it).
    src = tmp_path / "src"
    src.mkdir()
    for needed in ("pyproject.toml", "README.md"):
        assert (REPO / needed).is_file(), f"{needed} missing: the Dockerfile copies it"
        shutil.copy2(REPO / needed, src / needed)
    shutil.copytree(REPO / "service", src / "service", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--quiet",
            "--wheel-dir",
            str(tmp_path / "wheels"),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    assert res.returncode == 0, res.stdout + res.stderr
    (wheel,) = (tmp_path / "wheels").glob("lookback_serve-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    data = sorted(
        str(p.relative_to(REPO / "service"))
        for p in (REPO / "service" / "lookback").rglob("*")
        if p.is_file() and p.suffix not in {".py", ".pyc"} and "__pycache__" not in p.parts
    )
    assert "lookback/py.typed" in data
    missing = [d for d in data if d not in names]
    assert not missing, (
        f"not packaged into the wheel (add them to "
        f"[tool.setuptools.package-data] in pyproject.toml): {missing}"
    )
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert re.search(r"^lookback\s*=\s*lookback\.cli:main$", entry, re.M), entry
