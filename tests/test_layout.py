"""The shape of the code: flows/ (cli → stack → night) → tasks/ → storage/, and inside tasks/ six stages in the order a night runs them.

A module may import its own folder and the folders below it, never one above: no import runs back up, so no
circle, and tasks/ and storage/ stay free of Prefect.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("flows", "tasks", "storage")
STAGES = ("data", "training", "evaluation", "champion", "intake", "publish")  # tasks/, in the order a night runs
# Rank of each folder: a module may import folders of a rank at most its own, and only its own folder at equal rank.
RANK = {"storage": 0, **{f"tasks.{stage}": 1 + i for i, stage in enumerate(STAGES)}, "tasks": 1 + len(STAGES)}
FLOW_FOLDERS = ("night", "stack")  # flows/, from the bottom: what a night does, then what serves it; cli.py on top
for i, sub in enumerate(FLOW_FOLDERS):
    RANK[f"flows.{sub}"] = RANK["tasks"] + 1 + i
RANK["flows"] = RANK["tasks"] + 1 + len(FLOW_FOLDERS)


def imports(root: Path = REPO) -> dict[str, set[str]]:
    """Every first-party module and the first-party names it imports (anywhere in the file, lazy ones too)."""
    graph: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found: set[str] = set()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    found |= {alias.name for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module:
                    found.add(node.module)
                    found |= {f"{node.module}.{alias.name}" for alias in node.names}
            graph[name] = found
    return graph


def folder(module: str) -> str:
    """The folder a module belongs to: ``tasks.training.model`` → ``tasks.training``; ``tasks`` itself → ``tasks``."""
    parts = module.split(".")
    if parts[0] == "tasks" and len(parts) > 1 and parts[1] in STAGES:
        return f"tasks.{parts[1]}"
    if parts[0] == "flows" and len(parts) > 1 and parts[1] in FLOW_FOLDERS:
        return f"flows.{parts[1]}"
    return parts[0]


def first_party(graph: dict[str, set[str]], module: str) -> set[str]:
    """The modules ``module`` imports (a package's ``__init__`` imported for a submodule's sake is not counted)."""
    targets = {m for m in graph[module] if m in graph and m != module}
    return {t for t in targets if not any(other.startswith(t + ".") for other in targets)}


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import that runs back up, into a sibling stage, or into Prefect from below flows/."""
    found = []
    for module, targets in sorted(graph.items()):
        here = folder(module)
        for target in sorted(first_party(graph, module)):
            there = folder(target)
            if RANK[there] > RANK[here] or (RANK[there] == RANK[here] and there != here):
                found.append(f"{module} ({here}) imports {target} ({there}), a later stage")
        if not here.startswith("flows") and any(t.split(".")[0] == "prefect" for t in targets):
            found.append(f"{module} imports Prefect: only flows/ may")
    return found


def test_no_import_runs_back_up_a_stage_or_a_layer_and_tasks_are_free_of_prefect():
    assert violations(imports()) == []


def test_every_task_module_lives_in_a_stage_folder():
    loose = [p.name for p in (REPO / "tasks").glob("*.py") if p.name != "__init__.py"]
    assert loose == [], f"tasks/ holds modules outside the stage folders: {loose}"
    assert sorted(p.name for p in (REPO / "tasks").iterdir() if p.is_dir() and p.name != "__pycache__") == sorted(STAGES)
    for stage in STAGES:
        doc = ast.get_docstring(ast.parse((REPO / "tasks" / stage / "__init__.py").read_text()))
        assert doc, f"tasks/{stage}/__init__.py must say, in its docstring, what the stage decides"


def test_flows_is_the_night_the_stack_and_the_command_line_on_top():
    loose = sorted(p.name for p in (REPO / "flows").glob("*.py"))
    assert loose == ["__init__.py", "cli.py"], f"flows/ holds modules outside night/ and stack/: {loose}"
    folders = sorted(p.name for p in (REPO / "flows").iterdir() if p.is_dir() and p.name != "__pycache__")
    assert folders == sorted(FLOW_FOLDERS)
    for sub in FLOW_FOLDERS:
        assert ast.get_docstring(ast.parse((REPO / "flows" / sub / "__init__.py").read_text()))


def test_the_rule_catches_an_import_of_a_later_stage(tmp_path):
    """A scratch import planted in a copy: data importing publish, training importing intake, and a sibling."""
    for package in PACKAGES:
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "tasks/data/scratch.py").write_text("from tasks.publish.report import write_report\n")
    (tmp_path / "tasks/training/scratch.py").write_text("def f():\n    from tasks.intake import ingest\n")
    (tmp_path / "storage/scratch.py").write_text("import tasks.data.fetch\n")
    (tmp_path / "tasks/evaluation/scratch.py").write_text("import prefect\n")
    (tmp_path / "flows/night/scratch.py").write_text("from flows.stack.serve import LocalStack\n")
    (tmp_path / "flows/stack/scratch.py").write_text("import flows.cli\n")
    found = violations(imports(tmp_path))
    assert len(found) == 6, found
    assert any(v.startswith("flows.night.scratch (flows.night) imports flows.stack.serve") for v in found)
    assert any(v.startswith("flows.stack.scratch (flows.stack) imports flows.cli") for v in found)
    assert any(v.startswith("tasks.data.scratch (tasks.data) imports tasks.publish.report") for v in found)
    assert any(v.startswith("tasks.training.scratch (tasks.training) imports tasks.intake.ingest") for v in found)
    assert any(v.startswith("storage.scratch (storage) imports tasks.data.fetch") for v in found)
    assert "tasks.evaluation.scratch imports Prefect: only flows/ may" in found


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


def test_the_store_is_listed_only_through_store_listing():
    """An object store lists a name twice when an object and a folder share it (review 10 #4): ``Store.listing``
    lists each name once, so every listing goes through it; ``fs.ls`` is called there and in the local door only."""
    allowed = {Path("storage/files.py"), Path("storage/door.py")}
    found = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "ls":
                    if path.relative_to(REPO) not in allowed:
                        found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert found == [], f"listings that bypass Store.listing: {found}"
