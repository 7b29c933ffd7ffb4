"""Content digests: the identity of every artifact the pipeline stores or caches on."""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import os
import textwrap
from typing import IO, Any

CHUNK = 1 << 20
# Where a name a digested module imports from tasks/ lives is no code: keys name each import as tasks/ was laid out
# before its stage folders (``from tasks.training.loop import x`` counts as ``from tasks.training_loop import x``),
# so models trained before the folders came keep their keys, and a module moved to another stage keeps them too.
STAGES = ("data", "training", "evaluation", "champion", "intake", "publish")
FLAT_NAMES = {
    "loop": "training_loop",
    "config": "training_config",
    "promotion": "champion",
    "pointer": "champion_pointer",
    "checks": "data_checks",
}
FLOW_FOLDERS = ("night", "stack")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_stream(stream: IO[bytes]) -> tuple[str, int]:
    """Digest and size of a binary stream, read in chunks so a 47 MB file never sits in memory twice."""
    h = hashlib.sha256()
    size = 0
    while chunk := stream.read(CHUNK):
        h.update(chunk)
        size += len(chunk)
    return h.hexdigest(), size


def sha256_json(obj: Any) -> str:
    """Digest of a JSON-able value in canonical form, so equal parameters give equal keys."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode())


def code_digest(*dependencies: Any) -> str:
    """Digest of the code (and values) a step's output depends on: what a cache key names as "code".

    Functions, classes and modules are hashed by their syntax tree without docstrings, so a comment,
    a docstring or formatting changes nothing, while any change to what runs does. Where a function
    lives is not part of it: moving it to another module keeps the key, and so does moving a module of
    ``tasks/`` to another stage folder (``STAGES``). Plain values (a constant such as a batch size) are
    hashed by their ``repr``.
    """
    h = hashlib.sha256()
    for dependency in dependencies:
        h.update(_code_identity(dependency).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


# A code object's identity, remembered for as long as its source file is unchanged: a night asks for the same
# modules' digests dozens of times (every step's cache key, the evaluation's and the training's keys), and parsing
# them each time cost 2.6 s of CPU a night (measured 2026-12-07, tests/test_flow_e2e.py's nights under cProfile).
_IDENTITIES: dict[tuple[Any, str, int, int], str] = {}


def _code_identity(obj: Any) -> str:
    if not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.ismodule(obj) or inspect.ismethod(obj)):
        return f"value:{obj!r}"
    try:
        source = inspect.getsourcefile(obj) or ""
        stat = os.stat(source)
        seen = (obj, source, stat.st_mtime_ns, stat.st_size)
    except (OSError, TypeError):
        return _parsed_identity(obj)
    if seen not in _IDENTITIES:
        _IDENTITIES[seen] = _parsed_identity(obj)
    return _IDENTITIES[seen]


def _parsed_identity(obj: Any) -> str:
    tree = ast.parse(textwrap.dedent(inspect.getsource(obj)))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            node.body = body[1:] or [ast.Pass()]
        if isinstance(node, ast.ImportFrom) and node.module:
            node.module = _flat_module(node.module)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):  # a module run by name (``-m``)
            node.value = _flat_module(node.value)
    tree.body = _first_party_imports_sorted(tree.body)
    return ast.dump(tree, annotate_fields=False, include_attributes=False)


def _first_party_imports_sorted(body: list[ast.stmt]) -> list[ast.stmt]:
    """Each run of imports from this repository in the order its flat names sort (the order ruff keeps them in), so
    renaming a module, which makes ruff reorder its imports, changes nothing."""
    out: list[ast.stmt] = []
    run: list[ast.ImportFrom] = []
    for statement in [*body, None]:
        if isinstance(statement, ast.ImportFrom) and (statement.module or "").split(".")[0] in ("flows", "tasks", "storage"):
            run.append(statement)
            continue
        out += sorted(run, key=lambda node: node.module)
        run = []
        if statement is not None:
            out.append(statement)
    return out


def _flat_module(module: str) -> str:
    """``tasks.<stage>.<name>`` → ``tasks.<name as it was before the stages>``; ``tasks.<stage>`` → ``tasks``;
    ``flows.night.<name>`` and ``flows.stack.<name>`` → ``flows.<name>`` (flows/ was flat before them too)."""
    parts = module.split(".")
    if len(parts) > 2 and parts[0] == "flows" and parts[1] in FLOW_FOLDERS:
        return ".".join(["flows", *parts[2:]])
    if len(parts) < 2 or parts[0] != "tasks" or parts[1] not in STAGES:
        return module
    rest = parts[2:]
    if rest:
        rest[0] = FLAT_NAMES.get(rest[0], rest[0])
    return ".".join(["tasks", *rest])
