"""Which accepted batches a night trains on once they outgrow its budget: all of MNIST's base training set, then the
newest accepted batches, whole, while the total stays within ``max_training_images``.

Why: every accepted batch used to join every later night's training, so a night's time grew with every night
before it. With a budget, a night's training set, and so its cost, is bounded whatever arrived before. Newest first,
because new data is why the pipeline retrains: it is what the world sends now. A batch is never split (its digest
is its identity in the dataset version), and the rule stops at the first batch that does not fit, so what trains is
always the newest stretch of batches and a night's version follows the budget exactly.

The batches left out ("retired") stay in the store and in the ``batches`` table, accepted; they are only not part
of this night's dataset version (training, nor the new-data slice). Raising the budget brings them back. Batches
are ordered by the time of their decision, so a quarantined batch an operator releases counts as the newest.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from tasks.data.batch_format import AcceptedBatch
from tasks.data.splits import base_training_indices

DEFAULT_MAX_TRAINING_IMAGES = 240_000  # four times MNIST's 60 000 training images
MIN_MAX_TRAINING_IMAGES = 100  # train_limit's own lower bound: a budget below it could never hold a base set
MAX_MAX_TRAINING_IMAGES = 5_000_000


class TrainingBudgetError(ValueError):
    """The budget cannot hold what every night trains on: the message says which figures and what to change."""


class TrainingSet(NamedTuple):
    chosen: list[AcceptedBatch]  # oldest first, as given
    retired: list[AcceptedBatch]  # oldest first

    def images(self, base_images: int) -> int:
        return base_images + sum(b.train.rows for b in self.chosen)


def choose_batches(batches: Sequence[AcceptedBatch], base_images: int, max_training_images: int) -> TrainingSet:
    """Split ``batches`` (oldest first) into those this night trains on and those it retires, so that the
    ``base_images`` MNIST images plus the chosen batches' training shares are at most ``max_training_images``, and
    so are the chosen batches' holdout shares."""
    if base_images > max_training_images:
        raise TrainingBudgetError(
            f"max_training_images={max_training_images} is smaller than the {base_images} MNIST base training images "
            f"every night trains on: raise it to at least {base_images} (or lower train_limit, or hold back more images)"
        )
    room = max_training_images - base_images
    # The holdout shares are bounded by the same figure: the intake's protected index and the new-data slice read
    # every chosen batch's holdout, so a store holding batches of holdout images only (none of which train) would
    # otherwise cost a night without limit. An honest batch holds out a fifth of what it trains on: never binding.
    held_room = max_training_images
    newest: list[AcceptedBatch] = []
    for batch in reversed(batches):
        if batch.train.rows > room or batch.holdout.rows > held_room:
            break
        newest.append(batch)
        room -= batch.train.rows
        held_room -= batch.holdout.rows
    chosen = newest[::-1]
    return TrainingSet(chosen=chosen, retired=list(batches[: len(batches) - len(chosen)]))


def base_images(mnist_labels: np.ndarray, held_back: int, train_limit: int | None) -> int:
    """How many MNIST base training images a night trains on (``tasks.data.splits``, ``train_limit``'s subset)."""
    base = len(base_training_indices(mnist_labels, held_back))
    return base if train_limit is None else min(train_limit, base)
