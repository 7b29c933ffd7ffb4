"""Which MNIST images a night may train on, select on and report on: fixed splits, the same for every seed.

* **selection**: a balanced share of MNIST's *training* images that no night ever trains on. The gate
  decides on it (with the new-data holdout), so the test set stays a test: a champion picked as the winner
  of many nights' comparisons on one set is biased upward on that set.
* **held back**: more training images kept out of the base training set, in a fixed order, so that
  ``simulate-arrivals`` can release them night by night as new batches (0 in production).
* **base**: every other training image.

Seed-independent on purpose (``SPLIT_SEED``): two nights with different seeds must be judged on the same
selection images, and no seed may train on them. Part of the training and evaluation keys.
"""

from __future__ import annotations

import numpy as np

SPLIT_SEED = 20_261_201
SELECTION_PER_DIGIT = 500  # 5 000 images, balanced: accuracy on them is balanced accuracy
SLICE_SELECTION = "mnist-selection"
SLICE_TEST = "mnist-test"
SLICE_NEW = "new-data"
SLICES = (SLICE_SELECTION, SLICE_TEST, SLICE_NEW)
DECIDING_SLICES = (SLICE_SELECTION, SLICE_NEW)  # the test set reports; no rule reads it


def selection_per_digit(y_train: np.ndarray) -> int:
    """500 per digit on MNIST; on a small data set (tests), a fifth of the rarest digit."""
    counts = np.bincount(np.asarray(y_train, dtype=np.int64), minlength=10)
    return int(min(SELECTION_PER_DIGIT, max(counts.min() // 5, 1)))


def _fixed_order(y_train: np.ndarray) -> list[np.ndarray]:
    """Each digit's training indices in one fixed shuffled order."""
    rng = np.random.default_rng(SPLIT_SEED)
    labels = np.asarray(y_train, dtype=np.int64)
    return [rng.permutation(np.flatnonzero(labels == digit)) for digit in range(10)]


def selection_indices(y_train: np.ndarray) -> np.ndarray:
    """The selection split: the same images for every night and seed, never trained on."""
    n = selection_per_digit(y_train)
    return np.sort(np.concatenate([order[:n] for order in _fixed_order(y_train)]))


def held_back_indices(y_train: np.ndarray, held_back: int) -> np.ndarray:
    """``held_back`` training images outside the selection split, in the fixed order ``simulate-arrivals``
    releases them (a prefix of one fixed permutation: night 1's batch is the first of them)."""
    if held_back <= 0:
        return np.zeros(0, dtype=np.int64)
    n = selection_per_digit(y_train)
    rest = np.concatenate([order[n:] for order in _fixed_order(y_train)])
    order = np.random.default_rng(SPLIT_SEED + 1).permutation(rest)
    if held_back > len(order) // 2:
        raise ValueError(
            f"held_back={held_back} would leave fewer base training images than it holds back (at most {len(order) // 2})"
        )
    return order[:held_back]


def base_training_indices(y_train: np.ndarray, held_back: int = 0) -> np.ndarray:
    """Every training image outside the selection split and the held-back images, sorted."""
    keep = np.ones(len(y_train), dtype=bool)
    keep[selection_indices(y_train)] = False
    keep[held_back_indices(y_train, held_back)] = False
    return np.flatnonzero(keep)
