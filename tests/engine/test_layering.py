"""The engine's modules import in one direction: no circle, not even under TYPE_CHECKING.

The frame's route is session -> batcher -> compute -> batcher -> session, and no module
knows the one that calls it: the batcher knows a function, the compute knows the table
and the graph, results reach the session through its waiter interface.
"""

from __future__ import annotations

import ast
from pathlib import Path

ENGINE = Path(__file__).resolve().parents[2] / "service" / "lookback" / "engine"


def engine_imports() -> dict[str, set[str]]:
    """Module -> engine modules it imports (every import statement, TYPE_CHECKING included)."""
    names = {p.stem for p in ENGINE.glob("*.py")} - {"__init__"}
    graph: dict[str, set[str]] = {}
    for name in names:
        deps: set[str] = set()
        for node in ast.walk(ast.parse((ENGINE / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module.startswith("lookback.engine."):
                    deps.add(node.module.removeprefix("lookback.engine."))
                elif node.module == "lookback.engine":
                    deps.update(a.name for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(
                    a.name.removeprefix("lookback.engine.")
                    for a in node.names
                    if a.name.startswith("lookback.engine.")
                )
        graph[name] = deps & names
    return graph


def test_engine_imports_have_no_circle() -> None:
    graph = engine_imports()
    assert "session" in graph and "batcher" in graph  # the scan found the package
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        assert module not in path, f"import circle: {' -> '.join([*path, module])}"
        if module in done:
            return
        for dep in sorted(graph[module]):
            visit(dep, [*path, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


def test_no_module_on_the_frame_route_knows_its_caller() -> None:
    graph = engine_imports()
    assert graph["batcher"] <= {"step"}, graph["batcher"]
    assert not graph["compute"] & {"batcher", "session", "served", "engine"}, graph["compute"]
    assert "session" not in graph["served"] | graph["batcher"] | graph["compute"]
