"""The training step: what a training is configured by (``TrainConfig``), its cache key, and the model already
trained under that key. The work itself is in ``tasks/training/loop.py``, fed by ``tasks/training/input_pipeline.py``
on the device ``tasks/training/precision.py`` picks, with the networks of ``tasks/training/model.py``.
"""

from __future__ import annotations

from storage import Store, code_digest, sha256_json
from tasks.data import batch_format, slices, splits, training_images
from tasks.data.fetch import DatasetRef
from tasks.training import input_pipeline, precision
from tasks.training import loop as training_loop
from tasks.training.backends import process_backend, run_in_backend
from tasks.training.config import SEED_MAX, TRAIN_IMAGES, TrainConfig
from tasks.training.loop import Log, OnEpoch, train_and_store
from tasks.training.model import NETWORK_CODE, ModelRef
from tasks.training.precision import Precision
from tasks.training.rebuilt import MODEL_LIMIT, DamagedModel, check_archive

__all__ = [
    "SEED_MAX",
    "TRAIN_IMAGES",
    "Precision",
    "TrainConfig",
    "stored_model",
    "train_model",
    "trained_model",
    "training_code",
    "training_key",
]


def training_code() -> str:
    """The code that determines the trained weights: the networks' group in ``tasks/training/model.py`` and the three
    training modules whole, so a helper added to any of them is part of the key without anyone listing it; and the
    modules that say which images train and how they are read (the splits, the batch parser, the slices, the staged
    training images)."""
    return code_digest(*NETWORK_CODE, input_pipeline, precision, training_loop, splits, slices, batch_format, training_images)


def training_key(dataset: DatasetRef, config: TrainConfig) -> str:
    return sha256_json({"dataset": dataset.version, "config": config.model_dump(mode="json"), "code": training_code()})[:32]


def stored_model(store: Store, key: str) -> ModelRef | None:
    """The record of the model trained under ``key``, if its file is there and still matches its digest (and is no
    larger than a model of ours may be: a larger file is a miss before it is hashed). Only the record and the digest
    are checked: the training step reuses a model through ``trained_model``."""
    return store.load_ref(store.model_info_file(key), ModelRef, lambda ref: {ref.file_key: ref.sha256}, MODEL_LIMIT)


def trained_model(store: Store, key: str, config: TrainConfig) -> ModelRef | None:
    """The model already trained under ``key`` for ``config``: ``stored_model``, whose record also names the network
    ``config`` trains and whose archive is that network as this code builds it (``check_archive``: its config.json and
    weight shapes, no weights read). A record or archive a writer altered, digests set to match, is a miss, reported,
    and the model is trained again: as a hit it would fail the evaluation of every night with that key."""
    ref = stored_model(store, key)
    if ref is None:
        return None
    try:
        if ref.network != config.model.value:
            raise DamagedModel(f"its record names the {ref.network[:40]!r} network, not {config.model.value!r}")
        check_archive(store, ref)
    except DamagedModel as exc:
        store.warn(f"The stored model {key} is damaged ({exc}): it is trained again")
        return None
    return ref


def train_model(
    store: Store,
    dataset: DatasetRef,
    config: TrainConfig,
    log: Log = print,
    on_epoch: OnEpoch | None = None,
    reuse: bool = True,
) -> ModelRef:
    """Train ``config.model`` on ``dataset``, or return the model already trained with the same key.

    Runs with the same key are serialised by a lock, so two runs started together train once
    and share one model. An interrupted run resumes from this key's checkpoint.
    """
    key = training_key(dataset, config)
    with store.lock(f"train-{key}"):
        if reuse and (existing := trained_model(store, key, config)) is not None:
            log(f"Reusing model {key} trained earlier (sha256 {existing.sha256[:12]}…)")
            return existing
        if config.backend is not process_backend():
            log(f"Training on the {config.backend.value} backend in a child process (this one uses {process_backend().value})")
            arguments = {
                "store": store.url,
                "dataset": dataset.model_dump(mode="json"),
                "config": config.model_dump(mode="json"),
                "key": key,
            }
            return ModelRef.model_validate(run_in_backend(config.backend, arguments, log, on_epoch))
        return train_and_store(store, dataset, config, key, log, on_epoch)
