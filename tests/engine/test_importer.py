"""The importer: pinned wheel -> hash-checked, graph-validated, atomically published model."""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import replace
from pathlib import Path

import onnxruntime as ort
import pytest

from lookback.engine import importer
from lookback.engine.contract import GraphPort, check_step_graph, load_manifest
from lookback.engine.importer import ImportFailed, import_model
from lookback.errors import ContractError, ModelNotFound

KNOWN = importer.REGISTRY["silero-vad"]
# A "pip" that fails at once: a test passing it proves pip was never run.
NO_PIP = [sys.executable, "-c", "import sys; sys.exit('pip must not run')"]


def _fake_pip(tmp_path: Path, member: bytes) -> list[str]:
    """A pip stand-in that 'downloads' a wheel holding ``member`` as the ONNX file."""
    script = tmp_path / "fake_pip.py"
    script.write_text(
        "import sys, zipfile\n"
        "dest = sys.argv[sys.argv.index('-d') + 1]\n"
        "with zipfile.ZipFile(dest + '/silero_vad-6.2.3-py3-none-any.whl', 'w') as zf:\n"
        f"    zf.writestr({KNOWN.wheel_member!r}, {member!r})\n"
    )
    return [sys.executable, str(script)]


@pytest.mark.silero
def test_import_publishes_a_valid_model_and_is_idempotent(tmp_path: Path) -> None:
    store = tmp_path / "store"
    target = import_model("silero-vad", store)

    assert target == store / "silero-vad" / "6.2.3"
    assert sorted(p.name for p in target.iterdir()) == ["model.json", "silero_vad.onnx"]
    assert [p.name for p in store.iterdir()] == ["silero-vad"]  # no staging left behind
    assert (target / "model.json").read_bytes() == KNOWN.manifest.read_bytes()
    spec = load_manifest(target / "model.json")
    onnx = target / spec.graph.file
    assert hashlib.sha256(onnx.read_bytes()).hexdigest() == spec.graph.sha256
    sess = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    check_step_graph(
        spec, [GraphPort.of(i) for i in sess.get_inputs()], [GraphPort.of(o) for o in sess.get_outputs()]
    )

    stamps = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in target.iterdir()}
    assert import_model("silero-vad", store, pip=NO_PIP) == target
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in target.iterdir()} == stamps


@pytest.mark.silero
def test_expected_hash_mismatch_is_a_contract_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = json.loads(KNOWN.manifest.read_text())
    raw["graph"]["sha256"] = "0" * 64
    bad = tmp_path / "silero-vad-6.2.3.json"
    bad.write_text(json.dumps(raw))
    monkeypatch.setitem(importer.REGISTRY, "silero-vad", replace(KNOWN, manifest=bad))

    store = tmp_path / "store"
    with pytest.raises(ContractError, match="sha256"):
        import_model("silero-vad", store)
    assert not (store / "silero-vad" / "6.2.3").exists()
    assert list(store.iterdir()) == []


def test_corrupted_wheel_is_a_contract_error(tmp_path: Path) -> None:
    store = tmp_path / "store"
    with pytest.raises(ContractError, match="sha256"):
        import_model("silero-vad", store, pip=_fake_pip(tmp_path, b"not an onnx graph"))
    assert list(store.iterdir()) == []


def test_damaged_store_copy_is_replaced_not_trusted(tmp_path: Path) -> None:
    store = tmp_path / "store"
    target = store / "silero-vad" / "6.2.3"
    target.mkdir(parents=True)
    (target / "model.json").write_bytes(KNOWN.manifest.read_bytes())
    (target / "silero_vad.onnx").write_bytes(b"truncated")
    # Not current, so pip runs; the (failing) import must leave the old folder alone.
    with pytest.raises(ImportFailed, match="pip must not run"):
        import_model("silero-vad", store, pip=NO_PIP)
    assert (target / "silero_vad.onnx").read_bytes() == b"truncated"


def test_pip_failure_is_import_failed_with_stderr_tail(tmp_path: Path) -> None:
    with pytest.raises(ImportFailed, match="pip must not run") as info:
        import_model("silero-vad", tmp_path / "store", pip=NO_PIP)
    assert info.value.code == "import_failed"
    assert "silero-vad==6.2.3" in info.value.message


def test_wheel_without_the_member_is_import_failed(tmp_path: Path) -> None:
    script = tmp_path / "empty_pip.py"
    script.write_text(
        "import sys, zipfile\n"
        "dest = sys.argv[sys.argv.index('-d') + 1]\n"
        "zipfile.ZipFile(dest + '/x-1-py3-none-any.whl', 'w').close()\n"
    )
    with pytest.raises(ImportFailed, match=r"has no silero_vad/data/silero_vad\.onnx"):
        import_model("silero-vad", tmp_path / "store", pip=[sys.executable, str(script)])


def test_unknown_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="silero-vad"):
        import_model("no-such-model", tmp_path / "store")


@pytest.mark.silero
def test_session_store_fixture_holds_silero(silero_store: Path) -> None:
    spec = load_manifest(silero_store / "silero-vad" / "6.2.3" / "model.json")
    assert spec.key == "silero-vad/6.2.3"
    onnx = silero_store / "silero-vad" / "6.2.3" / spec.graph.file
    assert hashlib.sha256(onnx.read_bytes()).hexdigest() == spec.graph.sha256
