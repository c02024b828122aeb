"""Import third-party models from their PyPI packages into the model store.

Nothing is downloaded at serving time: a model that ships inside a PyPI wheel (Silero
VAD) is fetched once by ``pip download``, its ONNX file is taken out of the wheel,
checked against the sha256 of a manifest that lives in this repository
(``known_models/``), validated against its graph, and only then published to
``<store>/<name>/<version>/``. The manifest in the repository is the single source:
the store gets a byte-for-byte copy of it as ``model.json``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from lookback.engine.contract import GraphPort, Manifest, check_step_graph, load_manifest
from lookback.engine.store import sha256_file
from lookback.errors import ContractError, LookbackError, ModelNotFound

KNOWN_MODELS_DIR = Path(__file__).with_name("known_models")

#: Seconds ``pip download`` may take before the import is given up.
PIP_TIMEOUT_S = 600.0
#: How much of pip's stderr an ImportFailed message carries.
_STDERR_TAIL = 2000


class ImportFailed(LookbackError):
    """Fetching or unpacking a model's package failed (network, pip, a malformed wheel)."""

    code = "import_failed"


@dataclass(frozen=True)
class KnownModel:
    """Where an importable model comes from: a pinned requirement and a member of its wheel."""

    requirement: str
    wheel_member: str
    manifest: Path


#: Importable models by name. The manifest pins name, version, file name and sha256.
REGISTRY: dict[str, KnownModel] = {
    "silero-vad": KnownModel(
        requirement="silero-vad==6.2.3",
        wheel_member="silero_vad/data/silero_vad.onnx",
        manifest=KNOWN_MODELS_DIR / "silero-vad-6.2.3.json",
    ),
}


def import_model(name: str, store: Path, *, pip: list[str] | None = None) -> Path:
    """Import ``name`` into ``store`` and return its version folder.

    ``pip`` is the command prefix that runs pip (default: this interpreter's
    ``-m pip``); tests replace it. Idempotent: when the folder already holds the
    same manifest and a graph with the expected hash, nothing is fetched or written.
    Raises ModelNotFound for an unknown name, ImportFailed when pip or the wheel
    fails, ContractError when the hash or the graph's signature is wrong.
    """
    known = REGISTRY.get(name)
    if known is None:
        raise ModelNotFound(f"no importable model named {name!r}; known: {', '.join(sorted(REGISTRY))}")
    spec = load_manifest(known.manifest)
    manifest_bytes = known.manifest.read_bytes()
    target = store / spec.name / spec.version
    if _is_current(target, spec, manifest_bytes):
        return target

    store.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".import-{spec.name}-", dir=store))
    try:
        staging.chmod(0o755)  # mkdtemp makes it private; the published folder is not
        data = _fetch_member(known, pip or [sys.executable, "-m", "pip"])
        digest = hashlib.sha256(data).hexdigest()
        if digest != spec.graph.sha256:
            raise ContractError(
                f"{spec.key}: {known.wheel_member} from {known.requirement} has sha256 "
                f"{digest}, the manifest {known.manifest.name} expects {spec.graph.sha256}; "
                "refusing to import it"
            )
        (staging / spec.graph.file).write_bytes(data)
        (staging / "model.json").write_bytes(manifest_bytes)
        validate_graph(spec, staging / spec.graph.file)
        _publish(staging, target, spec, manifest_bytes)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def validate_graph(spec: Manifest, path: Path) -> None:
    """Load the step graph with ORT on CPU and refuse it unless it matches the manifest."""
    import onnxruntime as ort  # deferred: importing the package is slow and rarely needed

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    try:
        sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own untyped exceptions
        raise ContractError(f"{spec.key}: ONNX Runtime cannot load {path.name}: {exc}") from exc
    check_step_graph(
        spec,
        [GraphPort.of(i) for i in sess.get_inputs()],
        [GraphPort.of(o) for o in sess.get_outputs()],
    )


def _is_current(target: Path, spec: Manifest, manifest_bytes: bytes) -> bool:
    """True when ``target`` already holds this manifest and a graph with its hash."""
    manifest = target / "model.json"
    graph = target / spec.graph.file
    if not (manifest.is_file() and graph.is_file()):
        return False
    return manifest.read_bytes() == manifest_bytes and sha256_file(graph) == spec.graph.sha256


def _fetch_member(known: KnownModel, pip: list[str]) -> bytes:
    """Download the pinned wheel (no dependencies, no sdist build) and read one member."""
    with tempfile.TemporaryDirectory(prefix="lookback-pip-") as tmp:
        cmd = [*pip, "download", "--no-deps", "--only-binary=:all:", known.requirement, "-d", tmp]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ImportFailed(f"could not run {' '.join(cmd)}: {exc}") from exc
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout or "").strip()[-_STDERR_TAIL:]
            raise ImportFailed(f"pip download {known.requirement} failed (exit {proc.returncode}):\n{tail}")
        wheels = sorted(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise ImportFailed(
                f"pip download {known.requirement} left {len(wheels)} wheels, expected one: "
                f"{[w.name for w in wheels]}"
            )
        try:
            with zipfile.ZipFile(wheels[0]) as zf:
                return zf.read(known.wheel_member)
        except KeyError as exc:
            raise ImportFailed(f"{wheels[0].name} has no {known.wheel_member}") from exc
        except (zipfile.BadZipFile, OSError) as exc:
            raise ImportFailed(f"cannot read {wheels[0].name}: {exc}") from exc


def _publish(staging: Path, target: Path, spec: Manifest, manifest_bytes: bytes) -> None:
    """Rename the checked staging folder into place, so readers never see a half import.

    A stale or damaged ``target`` is first moved aside (inside the store, so both
    renames stay on one filesystem). If a concurrent import won the race, its
    result is kept when it is current.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    old: Path | None = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".stale-{spec.name}-", dir=staging.parent))
        os.rename(target, old / "v")
    try:
        os.rename(staging, target)
    except OSError as exc:
        if not _is_current(target, spec, manifest_bytes):
            raise ImportFailed(f"cannot move the imported model into {target}: {exc}") from exc
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
