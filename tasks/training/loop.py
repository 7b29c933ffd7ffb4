"""The training loop: fit with Keras' ``BackupAndRestore`` (resume after a crash from the last completed epoch),
record every epoch, store the model and its history. Part of the training key whole (``tasks.training.train.training_code``).

Resume after a crash uses Keras' own ``BackupAndRestore``: weights, optimizer state and the epoch
counter are backed up after every epoch under a directory named by the training key, so the next run
with the same parameters carries on from the last completed epoch.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from storage import Store, sha256_bytes
from tasks.data.fetch import DatasetRef, load_mnist
from tasks.data.slices import base_training
from tasks.data.training_images import TrainingImages, staged_training_images
from tasks.training import model as networks
from tasks.training.backends import Backend, process_backend
from tasks.training.checkpoints import HISTORY, drop_checkpoint, pull_checkpoint, push_checkpoint
from tasks.training.config import TrainConfig
from tasks.training.input_pipeline import (
    VALIDATION_BATCH,
    VALIDATION_SPLIT,
    input_pipeline,
    shuffled_batches,
    steps_per_execution,
    stratified_subset,
)
from tasks.training.keras_runtime import import_keras
from tasks.training.model import ModelRef, build_model, make_optimizer, stamp_keras_file
from tasks.training.precision import dtype_policy, select_device
from tasks.training.rebuilt import DamagedModel, check_finite

HISTORY_COLUMNS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "seconds")
Log = Callable[[str], None]
OnEpoch = Callable[[int, int, dict], None]


def _epoch_recorder(state_file: Path, log: Log, on_epoch: OnEpoch | None, total: int, on_backup: Callable[[int], None]):
    keras = import_keras()

    class EpochRecorder(keras.callbacks.Callback):
        """Logs each epoch and keeps the history across a resume (Keras' History restarts at the resume)."""

        def __init__(self) -> None:
            super().__init__()
            self.rows: list[dict] = json.loads(state_file.read_text()) if state_file.exists() else []
            self.resumed_from: int | None = None
            self._t0 = 0.0

        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            if self.resumed_from is None:
                self.resumed_from = epoch
                self.rows = [r for r in self.rows if r["epoch"] <= epoch]
                if epoch:
                    log(f"Resuming from the checkpoint after epoch {epoch}/{total}")
            self._t0 = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            row = {"epoch": epoch + 1, **{k: float(v) for k, v in (logs or {}).items()}}
            row["seconds"] = time.perf_counter() - self._t0
            self.rows = [r for r in self.rows if r["epoch"] < epoch + 1] + [row]
            tmp = state_file.with_name(f".{state_file.name}.tmp")
            tmp.write_text(json.dumps(self.rows))
            os.replace(tmp, state_file)
            on_backup(epoch + 1)  # Keras' backup of this epoch is written (its callback runs first)
            log(
                f"Epoch {epoch + 1}/{total}: loss {row.get('loss', float('nan')):.4f} "
                f"accuracy {row.get('accuracy', float('nan')):.4f} val_accuracy {row.get('val_accuracy', float('nan')):.4f} "
                f"({row['seconds']:.1f} s)"
            )
            if on_epoch is not None:
                on_epoch(epoch + 1, total, row)

    return EpochRecorder()


def _fit(
    store: Store,
    source: TrainingImages,
    train_rows: np.ndarray,
    val_rows: np.ndarray,
    config: TrainConfig,
    backend: Backend,
    key: str,
    log: Log,
    on_epoch: OnEpoch | None,
):
    """Build and fit the network on the staged images, resuming from this key's checkpoint; (model, recorder,
    device, dtype policy, seconds)."""
    keras = import_keras()
    device, policy = select_device(config.precision, backend)
    log(
        f"Training {config.model.value} on {device} ({backend.value}) with dtype policy {policy}: "
        f"{len(train_rows)} images, {len(val_rows)} for validation"
    )
    keras.utils.set_random_seed(config.seed)
    steps_per_epoch = int(np.ceil(len(train_rows) / config.batch_size))
    with tempfile.TemporaryDirectory(prefix="mnist-checkpoint-") as work:  # private to this process, never the store
        backup = Path(work)
        if (pulled := pull_checkpoint(store, key, backup)) is not None:
            log(f"Found a checkpoint after epoch {pulled} in the store")

        def recorder_for_backup():
            on_backup = lambda epoch: push_checkpoint(store, key, epoch, backup)  # noqa: E731
            return _epoch_recorder(backup / HISTORY, log, on_epoch, config.epochs, on_backup=on_backup)

        def fit(recorder):
            with dtype_policy(policy):
                model = build_model(config.model)
                loss, _ = networks.loss_and_targets(config.model, source.labels[:1])

                def targets(labels: np.ndarray) -> np.ndarray:
                    return networks.loss_and_targets(config.model, labels)[1]

                model.compile(
                    optimizer=make_optimizer(config.model, config.learning_rate, config.epochs * steps_per_epoch),
                    loss=loss,
                    metrics=["accuracy"],
                    steps_per_execution=steps_per_execution(backend),
                )
                batches = input_pipeline if backend is Backend.tensorflow else shuffled_batches
                model.fit(
                    batches(source, train_rows, config.batch_size, config.seed, training=True, targets=targets),
                    epochs=config.epochs,
                    validation_data=batches(source, val_rows, VALIDATION_BATCH, None, training=False, targets=targets),
                    callbacks=[keras.callbacks.BackupAndRestore(str(backup), delete_checkpoint=False), recorder],
                    shuffle=False,  # the input reshuffles every epoch itself
                    verbose=0,
                )
            return model

        recorder = recorder_for_backup()
        started = time.perf_counter()
        try:
            model = fit(recorder)
            done = [r["epoch"] for r in recorder.rows]
            if pulled is not None and (not done or max(done) != config.epochs):
                # Keras restored an epoch past the end (metadata a writer planted): no epoch ran, nothing learned
                raise ValueError(f"the restored training ended after epochs {done or 'none'}, not {config.epochs}")
        except Exception as exc:
            if pulled is None or recorder.resumed_from is not None and recorder.rows:  # the training itself failed
                raise
            # Keras' BackupAndRestore failed to read the checkpoint's own files, or restored a state past the end
            # (weights or metadata a writer of the store planted): that checkpoint is damaged, not the training. It
            # goes, and training starts afresh.
            store.warn(
                f"The checkpoint of training {key} could not be restored ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); it is removed and training starts from epoch 0"
            )
            shutil.rmtree(backup, ignore_errors=True)
            backup.mkdir()
            drop_checkpoint(store, key)
            keras.utils.set_random_seed(config.seed)
            recorder = recorder_for_backup()
            started = time.perf_counter()
            model = fit(recorder)
    return model, recorder, device, policy, time.perf_counter() - started


def train_and_store(
    store: Store, dataset: DatasetRef, config: TrainConfig, key: str, log: Log, on_epoch: OnEpoch | None
) -> ModelRef:
    mnist = load_mnist(store, dataset)
    base = base_training(mnist, dataset)  # never the selection split (nor held-back images)
    subset = base[stratified_subset(mnist.y_train[base], config.train_limit, config.seed)]
    shares = [b.train for b in dataset.batches]  # accepted batches' training shares, whole
    backend = process_backend()
    if backend is not config.backend:
        raise RuntimeError(f"this process's Keras backend is {backend.value}, the configuration asks for {config.backend.value}")
    with staged_training_images(store, mnist.x_train, mnist.y_train, subset, shares) as source:
        new_images = len(source) - len(subset)
        if new_images:
            log(f"Training data: {len(subset)} MNIST images and {new_images} from {len(dataset.batches)} accepted batches")
        order = np.random.default_rng(config.seed).permutation(len(source))
        n_val = max(int(round(len(order) * VALIDATION_SPLIT)), 1)
        train_rows, val_rows = order[:-n_val], order[-n_val:]
        model, recorder, device, policy, seconds = _fit(store, source, train_rows, val_rows, config, backend, key, log, on_epoch)
    try:  # a NaN model is never stored as ours: it would be every later night's cache hit
        check_finite(model, f"the model trained under {key}")
    except DamagedModel as exc:  # its checkpoint goes too, so the next try trains afresh
        drop_checkpoint(store, key)
        raise DamagedModel(f"{exc}; not stored (training diverged, or resumed from a damaged checkpoint, now removed)") from exc

    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "model.keras")
        networks.for_serving(config.model, model).save(local)  # with its test-time views, if the network has any
        stamp_keras_file(local, backend=backend.value, device=device, dtype_policy=policy)
        digest = sha256_bytes(Path(local).read_bytes())
        model_file = store.unique(store.model_file(key))
        store.put_file(local, model_file)
    history = pd.DataFrame(recorder.rows).reindex(columns=list(HISTORY_COLUMNS))
    history["epoch"] = history["epoch"].astype("int32")
    history_file = store.unique(store.history_file(key))
    store.write_bytes(history_file, history.to_parquet(index=False))
    ref = ModelRef(
        key=key,
        file_key=model_file,
        sha256=digest,
        history_key=history_file,
        network=config.model.value,
        backend=backend.value,
        device=device,
        precision=policy,
        epochs=config.epochs,
        resumed_from_epoch=recorder.resumed_from or 0,
        train_images=len(train_rows),
        train_seconds=seconds,
        val_accuracy=float(history["val_accuracy"].iloc[-1]),
        selection_held_out=True,
    )
    store.write_text(store.model_info_file(key), ref.model_dump_json(indent=2))  # the publish: replaced last
    drop_checkpoint(store, key)
    return ref
