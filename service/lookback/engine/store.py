"""The model store: ``<store>/<name>/<version>/model.json`` plus the ONNX files.

Loading checks each file's sha256 and the graph signatures against the manifest before
a model may serve, so a corrupt copy or an edited graph is refused at start-up with a
message naming the field, not discovered by a client as wrong numbers.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from lookback.engine.contract import (
    GraphPort,
    Manifest,
    check_sequence_graph,
    check_step_graph,
    load_manifest,
)
from lookback.engine.graph import OrtGraph
from lookback.engine.multistep import build_multistep
from lookback.errors import ContractError, ModelNotFound

log = logging.getLogger("lookback.store")


@dataclass(frozen=True)
class StoreEntry:
    spec: Manifest
    path: Path  # the version folder


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def version_key(version: str) -> tuple:
    """Sort versions numerically where they are numbers: 10 > 9, 1.10 > 1.9."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"[.+-]", version))


def discover(store: Path, failed: dict[str, str] | None = None) -> list[StoreEntry]:
    """Every manifest in the store that parses; a broken one is logged, not fatal, and
    recorded in ``failed`` (``<folder>/<version folder>`` -> why) when given."""
    found: list[StoreEntry] = []
    if not store.is_dir():
        return found
    for manifest in sorted(store.glob("*/*/model.json")):
        try:
            found.append(StoreEntry(load_manifest(manifest), manifest.parent))
        except ContractError as exc:
            log.error("skipping %s: %s", manifest, exc)
            if failed is not None:
                failed[f"{manifest.parent.parent.name}/{manifest.parent.name}"] = str(exc)
    return found


def latest(models: list[StoreEntry], name: str) -> StoreEntry:
    candidates = [m for m in models if m.spec.name == name]
    if not candidates:
        raise ModelNotFound(f"model {name!r} is not in the store")
    return max(candidates, key=lambda m: version_key(m.spec.version))


def verify_file(folder: Path, file: str, expected: str, field: str) -> Path:
    path = folder / file
    if not path.is_file():
        raise ContractError(f"{folder}: {field}.file {file!r} is missing")
    actual = sha256_file(path)
    if actual != expected:
        raise ContractError(
            f"{folder}: {field}.sha256 mismatch for {file}: manifest {expected}, file {actual}"
        )
    return path


def open_graphs(
    stored: StoreEntry, *, providers: str, intra_op_threads: int, inter_op_threads: int
) -> tuple[OrtGraph, OrtGraph | None]:
    """Verify hashes, open ORT sessions and check both signatures against the manifest."""
    spec, folder = stored.spec, stored.path
    kw = dict(providers=providers, intra_op_threads=intra_op_threads, inter_op_threads=inter_op_threads)
    step = OrtGraph(str(verify_file(folder, spec.graph.file, spec.graph.sha256, "graph")), **kw)  # type: ignore[arg-type]
    check_step_graph(spec, [GraphPort.of(i) for i in step.inputs], [GraphPort.of(o) for o in step.outputs])
    seq = None
    if spec.sequence is not None:
        path = verify_file(folder, spec.sequence.file, spec.sequence.sha256, "sequence")
        seq = OrtGraph(str(path), **kw)  # type: ignore[arg-type]
        check_sequence_graph(
            spec, [GraphPort.of(i) for i in seq.inputs], [GraphPort.of(o) for o in seq.outputs]
        )
    return step, seq


def open_multistep(
    stored: StoreEntry, *, providers: str, intra_op_threads: int, inter_op_threads: int
) -> OrtGraph:
    """The step graph wrapped in a Loop over k hops (see ``multistep.py``), opened in ORT."""
    spec, folder = stored.spec, stored.path
    path = verify_file(folder, spec.graph.file, spec.graph.sha256, "graph")
    try:
        model = build_multistep(path.read_bytes(), spec)
    except ContractError:
        raise
    except Exception as exc:  # onnx raises its own types on a graph it cannot take apart
        raise ContractError(f"{spec.key}: cannot build the multi-step graph: {exc}") from exc
    return OrtGraph(
        f"{path} (multi-step)",
        model=model,
        providers=providers,
        intra_op_threads=intra_op_threads,
        inter_op_threads=inter_op_threads,
    )
