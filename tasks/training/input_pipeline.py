"""The training input: a stratified subset, and batches reshuffled every epoch (tf.data on TensorFlow, Keras'
``PyDataset`` on JAX and PyTorch), read from the staged images (``tasks/data/training_images.py``) and scaled
batch by batch. Part of the training key whole (``tasks.training.train.training_code``)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from tasks.data.training_images import TrainingImages
from tasks.training.backends import Backend
from tasks.training.keras_runtime import import_keras
from tasks.training.model import scale  # per batch, never the whole set at once

VALIDATION_SPLIT = 0.1


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


Targets = Callable[[np.ndarray], np.ndarray]  # a batch's labels → what the loss is given (one-hot for ``strong``)


READ_BATCHES = 16  # batches read per call into Python: its overhead (the GIL, a copy out) paid once for 16


def input_pipeline(source: TrainingImages, rows: np.ndarray, batch_size: int, seed: int | None, training: bool, targets: Targets):
    """tf.data over row numbers, in a new seeded order every epoch while training (in order for validation): read
    from the staged images ``READ_BATCHES`` batches at a time, as bytes, scaled by TensorFlow and cut into batches
    again, prefetched while the step runs. The order is drawn with NumPy (8 bytes an image), not tf.data's
    ``shuffle``, whose buffer holds every element as a tensor (measured: some 150 bytes an image), so memory stays
    flat as the training set grows. Reading one batch per call and scaling it in NumPy cost twice the CPU of the
    in-memory pipeline it replaced, and 11 % of the training speed on 2 cores (measured 2026-12-07,
    ``bench/against_commit.py``); read 16 at a time, as bytes, the input costs what it did in memory.
    """
    import_keras()  # TensorFlow's start-up lines filtered on first use
    import tensorflow as tf

    rows = np.asarray(rows, dtype=np.int64)
    rng = np.random.default_rng(seed)
    chunk = batch_size * READ_BATCHES

    def chunks_of_rows():  # called once an epoch: the next permutation of the seeded sequence
        order = rng.permutation(rows) if training else rows
        for start in range(0, len(order), chunk):
            yield order[start : start + chunk]

    def read(chosen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return source.images(chosen), targets(source.labels[chosen])

    _, y0 = read(rows[:1])
    label_type = tf.as_dtype(y0.dtype)

    def scaled(chosen):
        x, y = tf.numpy_function(read, [chosen], (tf.uint8, label_type), stateful=False)
        x = tf.ensure_shape(x, (None, 28, 28))
        y = tf.ensure_shape(y, (None, *y0.shape[1:]))
        return tf.cast(x, tf.float32)[..., tf.newaxis] / 255.0, y  # ``scale``, in TensorFlow's threads

    data = tf.data.Dataset.from_generator(chunks_of_rows, output_signature=tf.TensorSpec((None,), tf.int64))
    data = data.map(scaled, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    data = data.unbatch().batch(batch_size)  # the same batches, in the same order, as reading one at a time
    data = data.apply(tf.data.experimental.assert_cardinality(int(np.ceil(len(rows) / batch_size))))  # Keras' epoch length
    return data.prefetch(tf.data.AUTOTUNE)


def shuffled_batches(
    source: TrainingImages, rows: np.ndarray, batch_size: int, seed: int | None, training: bool, targets: Targets
):
    """Keras' own ``PyDataset`` for the JAX and PyTorch backends (no tf.data there): batches of rows in a new
    seeded order every epoch while training, in order for validation, each read from the staged images and
    scaled as it is asked for."""
    keras = import_keras()

    class ShuffledBatches(keras.utils.PyDataset):
        def __init__(self) -> None:
            super().__init__()
            self.rng = np.random.default_rng(seed)
            self.order = self.rng.permutation(rows) if training else np.asarray(rows)

        def __len__(self) -> int:
            return int(np.ceil(len(rows) / batch_size))

        def __getitem__(self, index: int):
            chosen = np.sort(self.order[index * batch_size : (index + 1) * batch_size])
            return scale(source.images(chosen)), targets(source.labels[chosen])

        def on_epoch_end(self) -> None:
            if training:
                self.order = self.rng.permutation(rows)

    return ShuffledBatches()
