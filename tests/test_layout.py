"""The shape of the code: flows/ → tasks/ → storage/, no import running back up, no circle, tasks/ free of Prefect."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("flows", "tasks", "storage")
LAYER = {"flows": 2, "tasks": 1, "storage": 0}


def imports() -> dict[str, set[str]]:
    """Every first-party module and the first-party modules it imports (anywhere in the file, lazy ones too)."""
    graph: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).glob("*.py")):
            name = f"{package}.{path.stem}" if path.stem != "__init__" else package
            found: set[str] = set()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    found |= {alias.name for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module:
                    found.add(node.module)
                    found |= {f"{node.module}.{alias.name}" for alias in node.names}
            graph[name] = found
    return graph


def first_party(graph: dict[str, set[str]], module: str) -> set[str]:
    return {m for m in graph[module] if m in graph and m != module and m not in PACKAGES}


def test_no_import_runs_back_up_a_layer_and_tasks_are_free_of_prefect():
    graph = imports()
    for module, targets in graph.items():
        for target in first_party(graph, module):
            assert LAYER[target.split(".")[0]] <= LAYER[module.split(".")[0]], f"{module} imports {target}"
        if module.startswith(("tasks", "storage")):  # Prefect is the outer layer: flows/ alone imports it
            assert not {t for t in targets if t.split(".")[0] == "prefect"}, f"{module} imports Prefect"


def test_the_import_graph_has_no_circle():
    graph = imports()
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        assert module not in path, "import circle: " + " → ".join([*path[path.index(module) :], module])
        if module in done:
            return
        for target in sorted(first_party(graph, module)):
            visit(target, [*path, module])
        done.add(module)

    for module in graph:
        visit(module, [])
