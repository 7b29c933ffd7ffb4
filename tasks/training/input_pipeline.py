"""The training input: a stratified subset, and batches reshuffled every epoch (tf.data on TensorFlow, Keras'
``PyDataset`` on JAX and PyTorch). Part of the training key whole (``tasks.training.train.training_code``)."""

from __future__ import annotations

import numpy as np

from tasks.training.backends import Backend
from tasks.training.keras_runtime import import_keras

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
