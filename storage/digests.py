"""Content digests: the identity of every artifact the pipeline stores or caches on."""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import textwrap
from typing import IO, Any

CHUNK = 1 << 20


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
    lives is not part of it: moving it to another module keeps the key. Plain values (a constant
    such as a batch size) are hashed by their ``repr``.
    """
    h = hashlib.sha256()
    for dependency in dependencies:
        h.update(_code_identity(dependency).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _code_identity(obj: Any) -> str:
    if not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.ismodule(obj) or inspect.ismethod(obj)):
        return f"value:{obj!r}"
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
    return ast.dump(tree, annotate_fields=False, include_attributes=False)
