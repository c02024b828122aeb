"""The model store: discovery, sha256 verification, opening and checking graphs."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TypedDict

import numpy as np
import pytest

from lookback.engine.engine import Engine
from lookback.engine.store import (
    StoreEntry,
    discover,
    latest,
    open_graphs,
    sha256_file,
    verify_file,
)
from lookback.errors import ContractError, ModelNotFound
from tests.engine import engine_graphs as g
from tests.engine.engine_support import Collect, settings


class OrtOptions(TypedDict):
    """The keyword arguments of ``open_graphs``, typed so the splat checks against them."""

    providers: str
    intra_op_threads: int
    inter_op_threads: int


CPU: OrtOptions = {"providers": "cpu", "intra_op_threads": 1, "inter_op_threads": 1}


def only(store: Path) -> StoreEntry:
    found = discover(store)
    assert len(found) == 1
    return found[0]


def test_discover_finds_models_and_skips_broken_manifests(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    g.write_model(tmp_path, g.toy_manifest(version="1"))
    g.write_model(tmp_path, g.toy_manifest(version="2", sequence=True))
    broken = tmp_path / "broken" / "1"
    broken.mkdir(parents=True)
    (broken / "model.json").write_text("{not json")
    (tmp_path / "stray.json").write_text("{}")  # not in <name>/<version>/
    with caplog.at_level(logging.ERROR, logger="lookback.store"):
        found = discover(tmp_path)
    assert sorted(m.spec.key for m in found) == ["toy/1", "toy/2"]
    assert all(m.path == tmp_path / "toy" / m.spec.version for m in found)
    assert "broken" in caplog.text and "not valid JSON" in caplog.text
    assert discover(tmp_path / "does-not-exist") == []


def test_latest_orders_versions_numerically(tmp_path: Path) -> None:
    for v in ["2", "10", "9", "1.10", "1.9"]:
        g.write_model(tmp_path, g.toy_manifest(version=v))
    models = discover(tmp_path)
    assert latest(models, "toy").spec.version == "10"
    assert latest([m for m in models if m.spec.version.startswith("1.")], "toy").spec.version == "1.10"
    with pytest.raises(ModelNotFound):
        latest(models, "other")


def test_open_graphs_verifies_and_checks_both_graphs(tmp_path: Path) -> None:
    g.write_model(tmp_path, g.toy_manifest(sequence=True))
    step, seq = open_graphs(only(tmp_path), **CPU)
    assert seq is not None
    assert [i.name for i in step.inputs] == ["audio", "conv", "h", "sr"]
    assert step.provider == "CPUExecutionProvider"
    out = step.run(
        {
            "audio": np.ones((2, 192), np.float32),
            "conv": np.zeros((2, 3, 2), np.float32),
            "h": np.zeros((1, 2, 4), np.float32),
            "sr": np.array(16000, np.int64),
        }
    )
    assert out[0].shape == (2, 1)


def test_verify_file_accepts_the_right_hash(tmp_path: Path) -> None:
    folder = g.write_model(tmp_path)
    spec = json.loads((folder / "model.json").read_text())
    assert sha256_file(folder / "model.onnx") == spec["graph"]["sha256"]
    assert verify_file(folder, "model.onnx", spec["graph"]["sha256"], "graph") == folder / "model.onnx"


def test_missing_onnx_file_is_refused(tmp_path: Path) -> None:
    folder = g.write_model(tmp_path)
    (folder / "model.onnx").unlink()
    with pytest.raises(ContractError, match=r"graph\.file 'model.onnx' is missing"):
        open_graphs(only(tmp_path), **CPU)


def test_missing_sequence_file_is_refused(tmp_path: Path) -> None:
    folder = g.write_model(tmp_path, g.toy_manifest(sequence=True))
    (folder / "sequence.onnx").unlink()
    with pytest.raises(ContractError, match=r"sequence\.file 'sequence.onnx' is missing"):
        open_graphs(only(tmp_path), **CPU)


def test_wrong_sha256_is_refused(tmp_path: Path) -> None:
    folder = g.write_model(tmp_path)
    data = bytearray((folder / "model.onnx").read_bytes())
    data[-1] ^= 1  # one flipped bit
    (folder / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ContractError, match=r"graph\.sha256 mismatch for model\.onnx") as info:
        open_graphs(only(tmp_path), **CPU)
    assert sha256_file(folder / "model.onnx") in str(info.value)


def test_wrong_sequence_sha256_is_refused(tmp_path: Path) -> None:
    folder = g.write_model(tmp_path, g.toy_manifest(sequence=True))
    manifest = json.loads((folder / "model.json").read_text())
    manifest["sequence"]["sha256"] = manifest["graph"]["sha256"]
    (folder / "model.json").write_text(json.dumps(manifest))
    with pytest.raises(ContractError, match=r"sequence\.sha256 mismatch"):
        open_graphs(only(tmp_path), **CPU)


def test_graph_that_is_not_onnx_is_refused(tmp_path: Path) -> None:
    folder = g.write_model(tmp_path)
    (folder / "model.onnx").write_bytes(b"not a graph")
    manifest = json.loads((folder / "model.json").read_text())
    manifest["graph"]["sha256"] = sha256_file(folder / "model.onnx")
    (folder / "model.json").write_text(json.dumps(manifest))
    with pytest.raises(ContractError, match="ONNX Runtime cannot load the graph"):
        open_graphs(only(tmp_path), **CPU)


def test_signature_mismatch_is_refused_at_open(tmp_path: Path) -> None:
    g.write_model(tmp_path, step=g.step_signature().with_(audio=g.Port("audio", "float32", ["B", 128])))
    with pytest.raises(ContractError, match=r"audio_input\.name dimension 1 mismatch"):
        open_graphs(only(tmp_path), **CPU)


async def test_engine_refuses_to_start_with_a_corrupt_model(tmp_path: Path) -> None:
    folder = g.write_model(tmp_path)
    (folder / "model.onnx").write_bytes((folder / "model.onnx").read_bytes() + b"\0")
    engine = Engine(settings(model_store=tmp_path, models=["toy"]))
    with pytest.raises(ContractError, match="sha256 mismatch"):
        await engine.start()
    await engine.stop()


async def test_engine_selection_errors(tmp_path: Path) -> None:
    with pytest.raises(ContractError, match="no models to serve"):
        await Engine(settings(model_store=tmp_path / "empty")).start()
    g.write_model(tmp_path)
    with pytest.raises(ModelNotFound, match="'nope'"):
        await Engine(settings(model_store=tmp_path, models=["nope"])).start()


async def test_engine_serves_a_toy_model_with_both_batch_axes(tmp_path: Path) -> None:
    """End to end over the toy store: the step score is the window mean (context + hop)."""
    g.write_model(tmp_path, g.toy_manifest(version="1"))
    g.write_model(tmp_path, g.toy_manifest(version="2"))
    engine = Engine(settings(model_store=tmp_path, models=["toy"]))
    await engine.start()
    try:
        handle = engine.resolve("toy")
        assert handle.spec.version == "2"
        assert engine.resolve("toy", "1").spec.version == "1"
        with pytest.raises(ModelNotFound) as info:
            engine.resolve("toy", "3")
        assert info.value.code == "unknown_version"
        sink = Collect()
        session = engine.open_session(handle, sink)
        x = np.arange(3 * 128, dtype=np.int16) * 10
        session.push(x.astype("<i2").tobytes())
        await session.wait_idle()
        session.close()
        audio = np.concatenate([np.zeros(64), x]).astype(np.float32) / 32768
        expect = [audio[k * 128 : k * 128 + 192].mean() for k in range(3)]
        np.testing.assert_allclose(sink.scores[:, 0], expect, rtol=1e-6)
        # slot released and reset: the table holds only initial values again
        assert handle.table.used == 0
        assert (handle.table.slabs["h"] == 0.25).all() and (handle.table.slabs["conv"] == 0).all()
    finally:
        await engine.stop()


async def test_one_bad_model_directory_does_not_stop_the_others(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A corrupt copy of one model is logged and listed as failed; the rest serve."""
    g.write_model(tmp_path, g.toy_manifest(name="toy"))
    folder = g.write_model(tmp_path, g.toy_manifest(name="broken"))
    (folder / "model.onnx").write_bytes((folder / "model.onnx").read_bytes() + b"\0")
    engine = Engine(settings(model_store=tmp_path, default_model="toy"))
    with caplog.at_level(logging.ERROR, logger="lookback.engine"):
        await engine.start()
    try:
        assert engine.ready and sorted(engine.models) == ["toy/1"]
        assert list(engine.failed) == ["broken/1"] and "sha256 mismatch" in engine.failed["broken/1"]
        assert "broken/1" in caplog.text and "sha256 mismatch" in caplog.text
        assert engine.resolve("toy").spec.key == "toy/1"
        with pytest.raises(ModelNotFound):
            engine.resolve("broken")
    finally:
        await engine.stop()


async def test_engine_warns_when_the_default_model_is_missing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    g.write_model(tmp_path, g.toy_manifest(name="toy"))
    engine = Engine(settings(model_store=tmp_path, default_model="lookback-vad"))
    with caplog.at_level(logging.WARNING, logger="lookback.engine"):
        await engine.start()
    try:
        assert "default model 'lookback-vad' is not loaded" in caplog.text
    finally:
        await engine.stop()
