"""Train a network on verified MNIST, resumably, and store the model and its per-epoch history.

Resume after a crash uses Keras' own ``BackupAndRestore``: weights, optimizer state and the
epoch counter are backed up after every epoch under a directory named by the training key, so
the next run with the same parameters carries on from the last completed epoch.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from enum import Enum
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, model_validator

from storage import Store, code_digest, sha256_bytes, sha256_json
from tasks import model as networks
from tasks.backends import Backend, process_backend, run_in_backend
from tasks.checkpoints import drop_checkpoint, pull_checkpoint, push_checkpoint
from tasks.fetch import DatasetRef, load_mnist
from tasks.keras_runtime import import_keras
from tasks.model import DEFAULT_EPOCHS, ModelName, ModelRef, build_model, make_optimizer, scale, stamp_keras_file

VALIDATION_SPLIT = 0.1
HISTORY_COLUMNS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "seconds")
Log = Callable[[str], None]
OnEpoch = Callable[[int, int, dict], None]


TRAIN_IMAGES = 60_000
SEED_MAX = 2**31 - 1


class Precision(str, Enum):
    """Keras dtype policies a run may ask for; ``auto`` lets ``select_device`` choose."""

    auto = "auto"
    float32 = "float32"
    mixed_bfloat16 = "mixed_bfloat16"
    mixed_float16 = "mixed_float16"


class TrainConfig(BaseModel):
    """Everything that changes the trained weights; its digest is part of the training key.

    The flow's parameters reuse these fields (titles, bounds, descriptions), so the UI form and a
    direct call of ``train_model`` accept exactly the same values.
    """

    model_config = ConfigDict(extra="forbid")

    model: ModelName = Field(
        ModelName.seed,
        title="Model",
        description="Network to train; `seed` is the seed notebook's CNN, `strong` a deeper option (about 4x the compute).",
    )
    epochs: int | None = Field(
        None,
        ge=1,
        le=500,
        title="Epochs",
        description="Training epochs (1–500). Empty: the model's own default, "
        + ", ".join(f"{m.value} {n}" for m, n in DEFAULT_EPOCHS.items())
        + ".",
    )
    batch_size: int = Field(128, ge=1, le=8192, title="Batch size", description="Training batch size (1–8192).")
    seed: int = Field(
        0, ge=0, le=SEED_MAX, title="Seed", description=f"Seeds initialisation, shuffling and subsets (0–{SEED_MAX})."
    )
    train_limit: int | None = Field(
        None,
        ge=100,
        le=TRAIN_IMAGES,
        title="Training images",
        description=f"Train on a stratified subset of this many images (100–{TRAIN_IMAGES}); empty for all 60 000.",
    )
    precision: Precision = Field(
        Precision.auto,
        title="Precision",
        description="Keras dtype policy; `auto` uses mixed_float16 on a GPU, mixed_bfloat16 on a CPU with native bf16, else float32.",
    )
    learning_rate: float = Field(1e-3, gt=0, title="Learning rate")
    backend: Backend = Field(
        Backend.tensorflow,
        title="Keras backend",
        description="tensorflow (the CPU path), jax or torch: the same model code on each; "
        "another backend than the worker's own trains in a child process with that KERAS_BACKEND.",
    )

    @model_validator(mode="after")
    def _model_default_epochs(self) -> TrainConfig:
        """Empty epochs become the model's default here, so the key (and the model) are those of that number."""
        if self.epochs is None:
            self.epochs = DEFAULT_EPOCHS[self.model]
        return self


def training_code() -> str:
    """The code that determines the trained weights: the networks, the optimizer, the input pipeline and
    the training loop (resolved when called, so a key always names the code that would run)."""
    return code_digest(
        networks.build_seed_model,
        networks.build_strong_model,
        networks.build_model,
        networks.make_optimizer,
        networks.ema_momentum,
        networks.loss_and_targets,
        networks.LABEL_SMOOTHING,
        networks.scale,
        stratified_subset,
        input_pipeline,
        shuffled_batches,
        steps_per_execution,
        select_device,
        has_gpu,
        cpu_has_bf16,
        dtype_policy,
        _train,
        _epoch_recorder,
        VALIDATION_SPLIT,
        STEPS_PER_EXECUTION,
        VALIDATION_BATCH,
        HISTORY_COLUMNS,
    )


def training_key(dataset: DatasetRef, config: TrainConfig) -> str:
    return sha256_json({"dataset": dataset.sha256, "config": config.model_dump(mode="json"), "code": training_code()})[:32]


# ---- data ---------------------------------------------------------------------------------
def stratified_subset(labels: np.ndarray, limit: int | None, seed: int) -> np.ndarray:
    """Indices of ``limit`` examples with the class proportions of ``labels`` (largest remainder)."""
    if limit is None or limit >= len(labels):
        return np.arange(len(labels))
    classes, counts = np.unique(labels, return_counts=True)
    if limit < len(classes):
        raise ValueError(f"train_limit={limit} cannot hold every digit: it must be at least {len(classes)}")
    exact = counts * limit / counts.sum()
    take = np.maximum(np.floor(exact).astype(int), 1)
    for i in np.argsort(-(exact - np.floor(exact)))[: limit - take.sum()]:
        take[i] += 1
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(np.flatnonzero(labels == c), size=k, replace=False) for c, k in zip(classes, take)]
    return np.sort(np.concatenate(chosen))


STEPS_PER_EXECUTION = 16  # batches per compiled call: less Python between steps once bf16 made them fast
VALIDATION_BATCH = 1024


def steps_per_execution(backend: Backend) -> int:
    """Keras' PyTorch trainer runs one batch per call (it refuses more); TensorFlow and JAX compile several."""
    return 1 if backend is Backend.torch else STEPS_PER_EXECUTION


def input_pipeline(images: np.ndarray, labels: np.ndarray, batch_size: int, seed: int | None, training: bool):
    """tf.data: cached in memory, reshuffled every epoch (seeded), prefetched while the step runs.

    Measured here, this plus ``STEPS_PER_EXECUTION`` is what turns bf16's faster arithmetic into
    faster epochs; ``fit`` on NumPy arrays left the step waiting on input slicing.
    """
    import_keras()  # TensorFlow's start-up lines filtered on first use
    import tensorflow as tf

    data = tf.data.Dataset.from_tensor_slices((images, labels)).cache()
    if training:
        data = data.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
    return data.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def shuffled_batches(images: np.ndarray, labels: np.ndarray, batch_size: int, seed: int | None, training: bool):
    """Keras' own ``PyDataset`` for the JAX and PyTorch backends (no tf.data there): NumPy batches in a
    new seeded order every epoch while training, in order for validation."""
    keras = import_keras()

    class ShuffledBatches(keras.utils.PyDataset):
        def __init__(self) -> None:
            super().__init__()
            self.rng = np.random.default_rng(seed)
            self.order = self.rng.permutation(len(images)) if training else np.arange(len(images))

        def __len__(self) -> int:
            return int(np.ceil(len(images) / batch_size))

        def __getitem__(self, index: int):
            chosen = np.sort(self.order[index * batch_size : (index + 1) * batch_size])
            return images[chosen], labels[chosen]

        def on_epoch_end(self) -> None:
            if training:
                self.order = self.rng.permutation(len(images))

    return ShuffledBatches()


# ---- device -------------------------------------------------------------------------------
def cpu_has_bf16() -> bool:
    """AVX512-BF16 or AMX: where bfloat16 matmuls and convolutions run natively on the CPU."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def has_gpu(backend: Backend) -> bool:
    """Whether ``backend`` sees a GPU in this process (each backend asks its own runtime)."""
    if backend is Backend.jax:
        import jax

        return any(d.platform == "gpu" for d in jax.devices())
    if backend is Backend.torch:
        import torch

        return torch.cuda.is_available()
    import_keras()  # TensorFlow's start-up lines filtered on first use
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def select_device(precision: Precision | str = Precision.auto, backend: Backend = Backend.tensorflow) -> tuple[str, str]:
    """(device, Keras dtype policy): the GPU with mixed precision when the backend sees one, else the CPU.

    ``auto`` on a GPU: mixed float16 on TensorFlow (its loss scaling is built in), mixed bfloat16 on JAX
    and PyTorch (Ampere and later compute it at float16's rate, without loss scaling). On a CPU,
    TensorFlow uses mixed bfloat16 where the CPU computes it natively; JAX and PyTorch use float32.
    """
    precision = Precision(precision).value
    gpu = has_gpu(backend)
    device = "GPU:0" if gpu else "CPU:0"
    if precision != "auto":
        return device, precision
    if gpu:
        return device, "mixed_float16" if backend is Backend.tensorflow else "mixed_bfloat16"
    return device, "mixed_bfloat16" if backend is Backend.tensorflow and cpu_has_bf16() else "float32"


@contextlib.contextmanager
def dtype_policy(policy: str) -> Iterator[None]:
    keras = import_keras()

    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


# ---- training -----------------------------------------------------------------------------
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


def stored_model(store: Store, key: str) -> ModelRef | None:
    """The model already trained under ``key``, if its file is there and still matches its digest."""
    return store.load_ref(store.model_info_file(key), ModelRef, lambda ref: {ref.path: ref.sha256})


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
        if reuse and (existing := stored_model(store, key)) is not None:
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
        return _train(store, dataset, config, key, log, on_epoch)


def _train(store: Store, dataset: DatasetRef, config: TrainConfig, key: str, log: Log, on_epoch: OnEpoch | None) -> ModelRef:
    keras = import_keras()

    mnist = load_mnist(store, dataset)
    subset = stratified_subset(mnist.y_train, config.train_limit, config.seed)
    rng = np.random.default_rng(config.seed)
    order = rng.permutation(subset)
    n_val = max(int(round(len(order) * VALIDATION_SPLIT)), 1)
    train_idx, val_idx = order[:-n_val], order[-n_val:]
    x_train, y_train = scale(mnist.x_train[train_idx]), mnist.y_train[train_idx]
    x_val, y_val = scale(mnist.x_train[val_idx]), mnist.y_train[val_idx]

    backend = process_backend()
    if backend is not config.backend:
        raise RuntimeError(f"this process's Keras backend is {backend.value}, the configuration asks for {config.backend.value}")
    device, policy = select_device(config.precision, backend)
    log(
        f"Training {config.model.value} on {device} ({backend.value}) with dtype policy {policy}: "
        f"{len(x_train)} images, {len(x_val)} for validation"
    )
    keras.utils.set_random_seed(config.seed)
    backup = Path(store.checkpoint_dir(key))
    backup.mkdir(parents=True, exist_ok=True)
    if (pulled := pull_checkpoint(store, key)) is not None:
        log(f"Found a checkpoint after epoch {pulled} in the store")
    recorder = _epoch_recorder(
        backup / "history.json", log, on_epoch, config.epochs, on_backup=lambda epoch: push_checkpoint(store, key, epoch)
    )

    steps_per_epoch = int(np.ceil(len(x_train) / config.batch_size))
    started = time.perf_counter()
    with dtype_policy(policy):
        model = build_model(config.model)
        loss, y_train = networks.loss_and_targets(config.model, y_train)
        _, y_val = networks.loss_and_targets(config.model, y_val)
        model.compile(
            optimizer=make_optimizer(config.model, config.learning_rate, config.epochs * steps_per_epoch),
            loss=loss,
            metrics=["accuracy"],
            steps_per_execution=steps_per_execution(backend),
        )
        batches = input_pipeline if backend is Backend.tensorflow else shuffled_batches
        model.fit(
            batches(x_train, y_train, config.batch_size, config.seed, training=True),
            epochs=config.epochs,
            validation_data=batches(x_val, y_val, VALIDATION_BATCH, None, training=False),
            callbacks=[keras.callbacks.BackupAndRestore(str(backup), delete_checkpoint=False), recorder],
            shuffle=False,  # the input reshuffles every epoch itself
            verbose=0,
        )
    seconds = time.perf_counter() - started

    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "model.keras")
        model.save(local)
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
        path=model_file,
        sha256=digest,
        history_path=history_file,
        network=config.model.value,
        backend=backend.value,
        device=device,
        precision=policy,
        epochs=config.epochs,
        resumed_from_epoch=recorder.resumed_from or 0,
        train_images=len(x_train),
        train_seconds=seconds,
        val_accuracy=float(history["val_accuracy"].iloc[-1]),
    )
    store.write_text(store.model_info_file(key), ref.model_dump_json(indent=2))  # the publish: replaced last
    drop_checkpoint(store, key)
    return ref
