"""Removing what a store no longer needs: which folders may go is the caller's decision (``Keep``), how they go
safely is this module's.

Only the folders of derived artifacts are ever candidates: ``models/<key>``, ``evaluations/<key>`` (and
``evaluations/by-model/<key>``), ``plots/<key>``, ``reports/<run_id>`` and ``checkpoints/<key>``. The champion
pointer, the tables, the batches (accepted, quarantined or pending), the incoming location, MNIST's verified
objects, Prefect's result records and the locks are never touched, and neither is a name that is not one of
ours (hidden names, ``.damaged-…`` folders set aside by the door; a name that is not a key, such as an S3 object
``reports/r2/../x`` or a file ``a#b``, is skipped with a warning by ``storage/listing.py``, even inside a folder that
goes, which then stays holding it).

A prune killed at any point leaves the store consistent: every folder goes sidecar first (``model.json``,
``evaluation.json``, ``plots.json``, ``test_predictions.json``, a report's ``report.json`` and ``index.md``,
a checkpoint's ``latest.json``), then the files the sidecar named, and folders that reference others go before
the folders they reference (a model's predictions record before the evaluation folder holding the file). So no
reference is left naming a file that is gone: what remains of a half-removed folder is unreferenced bytes, which
every reader already treats as absent and the next prune lists again.
"""

from __future__ import annotations

import contextlib
import posixpath
from collections.abc import Callable
from dataclasses import dataclass, field

from pydantic import BaseModel

from storage.listing import listed_keys
from storage.store import Store

# kind → the folder its units are in; in the order they are removed (referencing before referenced)
FOLDERS: dict[str, str] = {
    "reports": "reports",
    "plots": "plots",
    "model-predictions": "evaluations/by-model",
    "evaluations": "evaluations",
    "models": "models",
    "checkpoints": "checkpoints",
}
SIDECARS = ("report.json", "index.md", "plots.json", "test_predictions.json", "evaluation.json", "model.json", "latest.json")
NOT_UNITS = {"evaluations": {"by-model"}}  # a folder inside another kind's folder


@dataclass
class Keep:
    """The names to keep of each kind (``FOLDERS``): every other folder of that kind may go."""

    names: dict[str, set[str]] = field(default_factory=lambda: {kind: set() for kind in FOLDERS})

    def add(self, kind: str, *names: str | None) -> None:
        self.names[kind].update(n for n in names if n)


class DoomedFile(BaseModel):
    key: str
    bytes: int


class DoomedFolder(BaseModel):
    """One folder that goes, with every file in it."""

    kind: str
    name: str
    key: str
    files: list[DoomedFile]

    @property
    def bytes(self) -> int:
        return sum(f.bytes for f in self.files)


class PrunePlan(BaseModel):
    """What a prune removes, folder by folder in the order it removes them, and what it keeps."""

    doomed: list[DoomedFolder]
    kept: dict[str, int]  # kind → folders kept

    @property
    def bytes(self) -> int:
        return sum(d.bytes for d in self.doomed)

    @property
    def files(self) -> list[str]:
        return [f.key for d in self.doomed for f in d.files]


def units(store: Store, kind: str) -> list[str]:
    """The folders of ``kind`` now in the store, by name; what is not a folder is left out, and a name that is not
    one of ours (hidden, or not a key: ``storage/listing.py``, which warns) is never a candidate."""
    parent = FOLDERS[kind]
    if not store.fs.exists(store.path(parent)):
        return []
    folders = [
        entry["name"]
        for entry in store.listing(store.path(parent))
        if entry.get("type") == "directory"
        and not _name(entry["name"]).startswith(".")
        and _name(entry["name"]) not in NOT_UNITS.get(kind, ())
    ]
    keys = listed_keys(store, parent, folders, f"{kind} folders", fits=lambda below: "/" not in below)
    return sorted(posixpath.basename(key) for key in keys)


def _name(path: str) -> str:
    return posixpath.basename(path.rstrip("/"))


def folder_files(store: Store, key: str) -> list[DoomedFile]:
    """Every file below folder ``key``, sidecars first (the order they are removed in). A name below it that is not
    a key of ours (an object ``reports/zzz/../x``, a file ``a#b``) is left out, with a warning: never removed, so
    the folder stays, holding it."""
    found = store.fs.find(store.path(key), detail=True, withdirs=False)
    keys = listed_keys(store, key, found, f"files of {key}")
    files = [DoomedFile(key=k, bytes=int(found[path].get("size") or 0)) for k, path in keys.items()]
    return sorted(files, key=_removal_order)


def _removal_order(file: DoomedFile) -> tuple[int, str]:
    name = posixpath.basename(file.key)
    return (SIDECARS.index(name) if name in SIDECARS else len(SIDECARS), file.key)


def plan(store: Store, keep: Keep) -> PrunePlan:
    """Every folder of a kind in ``FOLDERS`` whose name ``keep`` does not hold, with its files and their sizes."""
    doomed, kept = [], {}
    for kind, parent in FOLDERS.items():
        names = units(store, kind)
        kept[kind] = sum(1 for n in names if n in keep.names[kind])
        for name in names:
            if name not in keep.names[kind]:
                key = store.key(parent, name)
                doomed.append(DoomedFolder(kind=kind, name=name, key=key, files=folder_files(store, key)))
    return PrunePlan(doomed=doomed, kept=kept)


LOCKS = {"models": "train-{}", "evaluations": "evaluate-{}"}  # the lock a step holds while it writes that folder


def remove(store: Store, plan: PrunePlan, before_each: Callable[[DoomedFolder], None] = lambda _: None) -> list[str]:
    """Remove what ``plan`` lists, folder by folder, sidecars first; returns the keys removed.

    ``before_each`` runs before each folder (the caller checks again that no night started). A model or
    evaluation folder is removed holding the lock its step writes it under, so a night making that same
    artifact again waits, then finds it absent and makes it whole."""
    removed = []
    for folder in plan.doomed:
        before_each(folder)
        lock = LOCKS.get(folder.kind)
        with store.lock(lock.format(folder.name)) if lock else contextlib.nullcontext():
            for file in folder.files:
                store.remove(file.key)
                removed.append(file.key)
            if store.is_local:  # an object store has no folders: its files gone, so is the folder
                _remove_empty_folders(store, folder.key)
    return removed


def _remove_empty_folders(store: Store, key: str) -> None:
    """Remove folder ``key`` and those below it that are empty now; one holding a file (written since the
    plan was made) stays, with that file, and so does one whose name is not ours (``storage/listing.py``)."""
    try:
        found = store.fs.find(store.path(key), detail=True, withdirs=True)
    except FileNotFoundError:
        return
    below = listed_keys(store, key, [p for p, info in found.items() if info.get("type") == "directory"], f"folders in {key}")
    for folder in sorted(set(below) | {key}, key=lambda k: k.count("/"), reverse=True):
        with contextlib.suppress(FileNotFoundError, OSError):
            store.fs.rmdir(store.path(folder))  # only an empty folder: storage/door.py
