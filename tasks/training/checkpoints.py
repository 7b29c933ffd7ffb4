"""A training's resume point on a remote store, so a run killed on one worker resumes on another.

Keras' ``BackupAndRestore`` needs a real filesystem: it writes into a working copy on this machine
(``Store.checkpoint_dir``; inside the store when the store is local). After every epoch the working
copy is published to the store under a folder of its own, then the one small pointer ``latest.json``
is replaced, then the previous folder goes. The pointer is store content, so it is checked like any
other: a folder that is not one name of ours is reported and ignored, never deleted.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError

from storage import SIDECAR_LIMIT, Store, StoreError, StoreName, damage

POINTER = "latest.json"
HISTORY = "history.json"  # what the epoch recorder of tasks/training/train.py writes beside Keras' backup


class CheckpointPointer(BaseModel):
    """A remote checkpoint's ``latest.json``: which folder beside it holds the files of which epoch."""

    epoch: int = Field(ge=0)
    folder: StoreName


def push_checkpoint(store: Store, key: str, epoch: int) -> None:
    """Publish the working copy of ``key``'s checkpoint after ``epoch`` (nothing to do on a local store)."""
    if store.is_local:
        return  # the checkpoint already lives in the store
    folder = f"epoch-{epoch:04d}-{uuid.uuid4().hex[:8]}"
    local = Path(store.checkpoint_dir(key))
    for file in sorted(p for p in local.iterdir() if p.is_file()):
        store.put_file(str(file), store.checkpoint_key(key, folder, file.name))
    previous = _pointer(store, key)
    store.write_text(store.checkpoint_key(key, POINTER), CheckpointPointer(epoch=epoch, folder=folder).model_dump_json())
    if previous is not None:  # its folder was confined when the pointer was read
        store.remove(store.checkpoint_key(key, previous.folder), recursive=True)


def pull_checkpoint(store: Store, key: str) -> int | None:
    """Bring the store's checkpoint of ``key`` into the working copy when it is further along than the one
    here (another machine trained it); returns the epoch it holds, if any."""
    pointer = None if store.is_local else _pointer(store, key)
    if pointer is None:
        return None
    local = Path(store.checkpoint_dir(key))
    history = local / HISTORY
    here = len(json.loads(history.read_text())) if history.exists() else 0
    if pointer.epoch > here:
        local.mkdir(parents=True, exist_ok=True)
        folder = store.checkpoint_key(key, pointer.folder)
        for name in store.list_files(folder):
            store.get_file(store.key(folder, name), str(local / name))
    return pointer.epoch


def drop_checkpoint(store: Store, key: str) -> None:
    """The model is stored: its resume point is no longer needed, here or in the store."""
    shutil.rmtree(store.checkpoint_dir(key), ignore_errors=True)
    if not store.is_local:
        store.remove(store.checkpoint_key(key), recursive=True)


def _pointer(store: Store, key: str) -> CheckpointPointer | None:
    """The pointer, if it is one we write; a damaged one (a folder outside the store, say) is reported and
    ignored: training starts afresh and nothing it names is deleted."""
    pointer = store.checkpoint_key(key, POINTER)
    if not store.exists(pointer):
        return None
    try:
        return CheckpointPointer.model_validate_json(store.read_bytes(pointer, limit=SIDECAR_LIMIT))
    except (ValidationError, StoreError) as exc:
        store.warn(damage(f"The checkpoint pointer {store.location(pointer)}", exc))
        return None
