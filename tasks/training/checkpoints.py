"""A training's resume point on a remote store, so a run killed on one worker resumes on another.

Keras' ``BackupAndRestore`` needs a real filesystem: it writes into a private temporary folder on this
machine, never into the store (a link planted in the store cannot redirect Keras' or the epoch recorder's plain
file writes). After every epoch the working copy is published to the store, local or remote alike, through the
store's own writer under a folder of its own, then the one small pointer ``latest.json`` is replaced, then the
previous folder goes. The pointer is store content, so it is checked like any
other: a folder that is not one name of ours is reported and ignored, never deleted.
"""

from __future__ import annotations

import json
import math
import posixpath
import uuid
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError

from storage import SIDECAR_LIMIT, Store, StoreError, StoreName, damage
from storage.keys import confine_name
from tasks.training.config import MAX_TRAIN_EPOCHS
from tasks.training.model import PARAMETERS
from tasks.training.weight_file import plain_datasets

POINTER = "latest.json"
HISTORY = "history.json"  # what the epoch recorder of tasks/training/train.py writes beside Keras' backup
CHECKPOINT_LIMIT = 256 << 20  # all of a checkpoint's files together: the weights and the optimizer's state, a few MB for ours
# The values a Keras backup of our largest network declares: each weight, Adam's two moments and its moving average,
# float32 (measured 2026-12-08: 4.00 x 4 bytes x parameters for seed, 3.99 for strong), twice over for the optimizer's
# counters and another backend's layout. No weight file of a checkpoint declares more (strong: 6.4 MB), so a file that
# declares a 2 GiB dataset it never wrote is refused before a value is read.
VALUES_LIMIT = 2 * 4 * 4 * max(PARAMETERS.values())
# history.json: a row of ours is about 150 bytes (an epoch, four metrics and the seconds, each at most 24 characters);
# a row may take this much, and the file one row per epoch of the pointer's (at most MAX_TRAIN_EPOCHS): 512 KiB at most,
# checked before it is parsed (parsed whole, a 24 MiB file of empty objects raised the peak from 82 to 694 MiB)
HISTORY_ROW_LIMIT = 1 << 10
KERAS_STATE = "training_metadata.json"  # BackupAndRestore's epoch, parsed whole by Keras: it writes about 30 bytes
KERAS_STATE_LIMIT = 1 << 10


class CheckpointPointer(BaseModel):
    """A remote checkpoint's ``latest.json``: which folder beside it holds the files of which epoch."""

    epoch: int = Field(ge=0, le=MAX_TRAIN_EPOCHS)
    folder: StoreName


def push_checkpoint(store: Store, key: str, epoch: int, local: Path) -> None:
    """Publish the working copy ``local`` of ``key``'s checkpoint after ``epoch``, through the store's own writer."""
    folder = f"epoch-{epoch:04d}-{uuid.uuid4().hex[:8]}"
    for file in sorted(p for p in local.iterdir() if p.is_file()):
        store.put_file(str(file), store.checkpoint_key(key, folder, file.name))
    previous = _pointer(store, key)
    store.write_text(store.checkpoint_key(key, POINTER), CheckpointPointer(epoch=epoch, folder=folder).model_dump_json())
    if previous is not None:  # its folder was confined when the pointer was read
        store.remove(store.checkpoint_key(key, previous.folder), recursive=True)


def pull_checkpoint(store: Store, key: str, local: Path) -> int | None:
    """Copy the store's checkpoint of ``key`` (another run's, on this machine or another) into the empty working
    folder ``local``; returns the epoch it holds, if any. Whatever is wrong with it (a folder, link or pipe among its
    files, a file that cannot be read, more than ``CHECKPOINT_LIMIT`` bytes in all, a history longer than its epochs
    allow, a weight file with a link, values kept outside it or more values than ``VALUES_LIMIT`` bytes, a weight or
    optimizer value that is NaN or infinite: training would resume into a NaN model) makes it damaged: reported, and
    training starts afresh."""
    pointer = _pointer(store, key)
    if pointer is None:
        return None
    folder = store.checkpoint_key(key, pointer.folder)
    left = CHECKPOINT_LIMIT
    try:
        for entry in store.listing(store.path(folder)):
            name = confine_name(posixpath.basename(entry["name"].rstrip("/")))
            if entry.get("type") != "file":
                raise StoreError(f"{name!r} is not a file")
            left -= store.get_file(store.key(folder, name), str(local / name), limit=left)
        if (local / HISTORY).exists():
            _check_history(_bounded_json(local / HISTORY, HISTORY_ROW_LIMIT * max(pointer.epoch, 1)), pointer.epoch)
        if (local / KERAS_STATE).exists():
            _bounded_json(local / KERAS_STATE, KERAS_STATE_LIMIT)
        for file in sorted(local.glob("*.h5")):
            _check_finite_weights(file)
    except Exception as exc:  # noqa: BLE001 (store content: any error means this checkpoint is not used)
        store.warn(damage(f"The checkpoint {store.location(folder)}", exc) + "; training starts from epoch 0")
        for file in local.iterdir():
            file.unlink()
        return None
    return pointer.epoch


def _check_history(rows: object, epoch: int) -> None:
    """The epoch recorder's rows as it writes them: a list of objects, each an ``epoch`` from 1 to the checkpoint's
    and finite numbers; anything else (a planted file) makes the checkpoint damaged, not the training."""
    if not isinstance(rows, list) or len(rows) > epoch:
        raise ValueError(f"{HISTORY} is not a list of at most {epoch} epochs")
    for row in rows:
        if not isinstance(row, dict) or not isinstance(row.get("epoch"), int) or not 1 <= row["epoch"] <= epoch:
            raise ValueError(f"{HISTORY} has a row without an epoch from 1 to {epoch}")
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in row.values()):
            raise ValueError(f"{HISTORY} has a value that is not a finite number")


def _bounded_json(file: Path, limit: int) -> object:
    """``file`` parsed as JSON if it holds at most ``limit`` bytes (parsing amplifies: ``{}`` is two bytes, a dict
    about a hundred); a larger one is not parsed."""
    if file.stat().st_size > limit:
        raise ValueError(f"{file.name} holds more than {limit} bytes, more than its epochs could write")
    return json.loads(file.read_bytes())


def _check_finite_weights(file: Path) -> None:
    """Every value Keras' backup ``file`` holds (weights, optimizer state) is a finite number. Its structure is walked
    first, without following a link or reading a value (``plain_datasets``): a link, a dataset kept outside the file or
    more values than ``VALUES_LIMIT`` bytes make it damaged before anything outside the store is opened or memory
    is filled; then one dataset is read at a time."""
    import h5py
    import numpy as np

    if not h5py.is_hdf5(file):  # not HDF5 at all: Keras' restore refuses it (the fallback in tasks/training/loop.py)
        return
    with h5py.File(file, "r") as f:
        try:
            datasets = plain_datasets(f, VALUES_LIMIT)
        except ValueError as exc:
            raise ValueError(f"{file.name}: {exc}") from exc
        bad = [name for name, d in datasets.items() if d.dtype.kind == "f" and not np.isfinite(d[()]).all()]
    if bad:
        raise ValueError(f"{file.name} holds values that are not finite numbers ({len(bad)} arrays, first {bad[0]})")


def drop_checkpoint(store: Store, key: str) -> None:
    """The model is stored: its resume point is no longer needed."""
    store.remove(store.checkpoint_key(key), recursive=True)


def _pointer(store: Store, key: str) -> CheckpointPointer | None:
    """The pointer, if it is one we write; a damaged one (a folder outside the store, say) is reported and
    ignored: training starts afresh and nothing it names is deleted."""
    pointer = store.checkpoint_key(key, POINTER)
    if not store.exists(pointer):
        return None
    try:
        return CheckpointPointer.model_validate_json(store.read_bytes(pointer, limit=SIDECAR_LIMIT))
    except (ValidationError, StoreError, OSError) as exc:  # OSError: a folder, link or pipe at it (storage/door.py)
        store.warn(damage(f"The checkpoint pointer {store.location(pointer)}", exc))
        return None
