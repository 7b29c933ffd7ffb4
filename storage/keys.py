"""Store keys read from store content are untrusted input: this is the one place that confines them.

A key is a path relative to the store's root. Sidecars (``model.json``, ``evaluation.json``,
``plots.json``), the champion pointer, a remote checkpoint's ``latest.json`` and Prefect's result
records all name files by key, and anyone who can write the store can write those. A key that
is absolute, climbs out with ``..``, names another scheme or bucket (``s3://other/x``), or hides a
NUL or a backslash would let that writer make a worker read, embed or delete a file outside the
store. Every reader passes the keys it reads through :func:`confine_key` (or the :data:`StoreKey`
type, which calls it when pydantic validates a reference), and :meth:`storage.Store.path` checks
every key again before it touches the filesystem.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, Field, ValidationError

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")  # s3:, file:, C: ...
MAX_KEY_LENGTH = 1024
UNSAFE_CHARACTERS = "*?[]{}#%"  # no key of ours holds one


class UnsafeKey(ValueError):
    """A key read from the store points outside it: the file that held it is treated as damaged."""


def confine_key(key: str) -> str:
    """``key`` itself if it names a file inside the store, else :class:`UnsafeKey` saying why."""
    if not isinstance(key, str) or not key:
        raise UnsafeKey(f"{key!r} is not a key inside the store (empty or not text)")
    why = None
    if len(key) > MAX_KEY_LENGTH:
        why = f"it is longer than {MAX_KEY_LENGTH} characters"
    elif "\0" in key or "\\" in key:
        why = "it holds a NUL or a backslash"
    elif any(c in key for c in UNSAFE_CHARACTERS):
        why = "it holds a glob or URL character (one of * ? [ ] { } # %), which fsspec would expand or a URL would cut"
    elif key.startswith("/") or key.startswith("~"):
        why = "it is an absolute path"
    elif _SCHEME.match(key) or "://" in key:
        why = "it names another scheme or bucket"
    elif any(part in ("", ".", "..") for part in key.split("/")):
        why = "it has an empty, '.' or '..' part"
    elif any(len(part.encode("utf-8", "surrogateescape")) > 255 for part in key.split("/")):
        why = "a part of it is longer than 255 bytes, more than a file name may be"
    if why:
        raise UnsafeKey(f"{key[:120]!r} is not a key inside the store ({why})")
    return key


def confine_name(name: str) -> str:
    """One path segment (a model key, a checkpoint folder): a confined key without ``/``."""
    confine_key(name)
    if "/" in name:
        raise UnsafeKey(f"{name[:120]!r} is not a single name inside the store (it holds '/')")
    return name


StoreKey = Annotated[str, AfterValidator(confine_key)]
"""A reference field holding a store key: validating a sidecar confines it."""
StoreName = Annotated[str, AfterValidator(confine_name)]
"""A reference field holding one segment of a key (``models/<name>/...``)."""
Digest = Annotated[str, Field(pattern=r"^[0-9A-Za-z]{64}$")]
"""A SHA-256 as a reference records it: 64 hex characters (a longer string is not a digest of ours)."""
RUN_ID_PATTERN = r"^[0-9A-Za-z][0-9A-Za-z._-]{0,63}$"  # starts with a letter or digit: never '.', '..' or hidden
RunId = Annotated[str, Field(pattern=RUN_ID_PATTERN)]
"""A run's id as a reference records it: what Prefect makes (a UUID, 36 characters), at most 64 name characters, so
a reason or a table row that quotes it stays short."""


def is_run_id(name: object) -> bool:
    """Whether ``name`` is a run id of ours (``RUN_ID_PATTERN``): one name, never ``.``, ``..`` or hidden."""
    return isinstance(name, str) and re.fullmatch(RUN_ID_PATTERN, name) is not None


def confine_run_id(run_id: str) -> str:
    """``run_id`` itself if it is a run id of ours (``RUN_ID_PATTERN``: one name, never ``.`` or ``..``), else
    :class:`UnsafeKey`. Every id decoded from a name in the store (a partition folder ``run_id=%2E%2E`` decodes
    to ``..``) passes here before it is used to build a key: checking the whole key is not enough."""
    if not is_run_id(run_id):
        shown = run_id[:80] if isinstance(run_id, str) else run_id
        raise UnsafeKey(
            f"{shown!r} is not a run id (one name of at most 64 letters, digits, '.', '_' or '-', starting with a letter or digit)"
        )
    return run_id


def damage(where: str, exc: Exception) -> str:
    """One sentence for the log: which file is damaged, which field, and why it is not used."""
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "(the whole file)"
        detail = first["msg"].removeprefix("Value error, ")
        return f"{where} is damaged and not used: field {field!r}: {detail}"
    return f"{where} is damaged and not used: {exc}"
