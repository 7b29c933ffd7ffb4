"""The images of each use, from one dataset reference: what a night trains on, and each slice it is judged on.

* training: the base MNIST training images (``tasks.data.splits``) plus every accepted batch's training share;
* ``mnist-selection``: the fixed selection split of MNIST's training images (where the gate decides);
* ``mnist-test``: MNIST's test set (reported, never decided on);
* ``new-data``: the accepted batches' holdout shares, newest first, at most ``NEW_DATA_PER_DIGIT`` images of each
  digit (where the gate decides too), without any image that is an exact or near copy of one the night trains on.

Batch shares are read from the store through their recorded digests, parsed by the one batch parser.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from storage import Store, sha256_json
from tasks.data.batch_format import BatchPart, read_share
from tasks.data.fetch import DatasetRef, Mnist, load_mnist
from tasks.data.near_copies import ImageIndex, near_copies
from tasks.data.splits import SLICE_NEW, SLICE_SELECTION, SLICE_TEST, base_training_indices, selection_indices

NEW_DATA_PER_DIGIT = 1_000  # the new-data slice's cap: 10 000 images at most, the size of MNIST's test set
# Holdout images read (and searched for copies of trained images) to fill the slice: at most this many times its
# size, plus the share that crosses it. Without it a digit that never arrives (review 5, 2026-12-07: a sender who
# sends no 5s passes the drift check) made a night read and search every chosen batch's holdout.
SLICE_READ_FACTOR = 2
_SLICES: dict[tuple[str, str, int], Images] = {}  # the last slice made, by its digest: its images are what it names


class Images(NamedTuple):
    x: np.ndarray  # (n, 28, 28) uint8
    y: np.ndarray  # (n,) labels


def _parts(store: Store, parts: list[BatchPart]) -> Images:
    loaded = [read_share(store, p) for p in parts]
    if not loaded:
        return Images(np.zeros((0, 28, 28), np.uint8), np.zeros(0, np.int64))
    return Images(np.concatenate([b.images for b in loaded]), np.concatenate([b.labels for b in loaded]))


def new_training_images(store: Store, dataset: DatasetRef) -> Images:
    return _parts(store, [b.train for b in dataset.batches])


def new_holdout_images(store: Store, dataset: DatasetRef) -> Images:
    return _parts(store, [b.holdout for b in dataset.batches])


def trained_on(store: Store, dataset: DatasetRef, mnist: Mnist | None = None) -> ImageIndex:
    """Every image the night trains on (MNIST's base training images and the chosen batches' training shares), ready
    for ``near_copies``. The shares are one part of the index, not one part each: the search compares pixels with
    the nearest candidates of every part, so forty small parts cost forty times the pixel work of one. Ranked by
    intensity too (``near_copies.intensity_ranked``): a gamma-changed copy of a trained image is that image, held out
    or not."""
    mnist = mnist or load_mnist(store, dataset)
    return ImageIndex(mnist.x_train[base_training(mnist, dataset)], new_training_images(store, dataset).x, ranked=True)


def new_data_slice(store: Store, dataset: DatasetRef, per_digit: int | None = None, mnist: Mnist | None = None) -> Images:
    """The ``new-data`` slice: the accepted batches' holdout images, newest batch first, at most ``per_digit`` of each
    digit (within a batch, in its share's order). Bounded, so that predicting it costs the same every night however
    many batches came before, and balanced enough that the gate's per-digit rules see every digit that arrived;
    shares past the cap are not read.

    A holdout image that is an exact or near copy of an image the night trains on is left out, whatever history let
    it get there (a batch checked while the other was retired by ``max_training_images``, held back under another
    ``held_back``, or released from quarantine by an operator): the intake protects each holdout when a batch
    arrives, and this holds tonight's slice to it against tonight's training set, so no path through history makes
    the slice a test of memory. The cost is one near-copy search of the shares read, newest first, until every digit
    has ``per_digit`` images or ``SLICE_READ_FACTOR`` times the slice's size was read (a digit that seldom or never
    arrives then has fewer: it did not arrive), against the training set, which the training-set budget bounds."""
    per_digit = NEW_DATA_PER_DIGIT if per_digit is None else per_digit
    key = (store.url, slice_digest(dataset, SLICE_NEW), per_digit)
    if (cached := _SLICES.get(key)) is not None:
        return cached
    taken = np.zeros(10, dtype=np.int64)
    chosen: list[Images] = []
    trained: ImageIndex | None = None
    read = 0
    for batch in reversed(dataset.batches):  # oldest first in the dataset: newest first here
        if taken.min() >= per_digit or read >= SLICE_READ_FACTOR * 10 * per_digit:
            break
        part = batch.holdout
        share = read_share(store, part)
        read += len(share.labels)
        if trained is None:  # built once, and only when a share is read (an ImageIndex is falsy when empty)
            trained = trained_on(store, dataset, mnist)
        clean = ~near_copies(share.images, trained) if len(share.labels) else np.zeros(0, bool)
        images, labels = share.images[clean], share.labels[clean]
        rank = np.zeros(len(labels), dtype=np.int64)  # each image's place among its digit's in this share
        for digit in np.unique(labels):
            where = np.flatnonzero(labels == digit)
            rank[where] = np.arange(len(where)) + taken[digit]
        keep = rank < per_digit
        taken += np.bincount(labels[keep], minlength=10)
        chosen.append(Images(images[keep], labels[keep]))
    if not chosen:
        return Images(np.zeros((0, 28, 28), np.uint8), np.zeros(0, np.int64))
    result = Images(np.concatenate([c.x for c in chosen]), np.concatenate([c.y for c in chosen]))
    _SLICES.clear()  # one slice kept: a night asks for it once per model it predicts with
    _SLICES[key] = result
    return result


def slice_images(store: Store, dataset: DatasetRef, name: str, mnist: Mnist | None = None) -> Images:
    if name == SLICE_NEW:
        return new_data_slice(store, dataset, mnist=mnist)
    mnist = mnist or load_mnist(store, dataset)
    if name == SLICE_TEST:
        return Images(mnist.x_test, mnist.y_test.astype(np.int64))
    if name == SLICE_SELECTION:
        chosen = selection_indices(mnist.y_train)
        return Images(mnist.x_train[chosen], mnist.y_train[chosen].astype(np.int64))
    raise ValueError(f"unknown slice {name!r}")


def slice_digest(dataset: DatasetRef, name: str) -> str:
    """What a slice's images are: the same digest, the same images (a champion's predictions on it are reusable)."""
    if name == SLICE_NEW:
        parts = [b.holdout.sha256 for b in dataset.batches]
        trained = {"mnist": dataset.sha256, "held_back": dataset.held_back, "parts": [b.train.sha256 for b in dataset.batches]}
        return sha256_json(
            {
                "slice": name,
                "parts": parts,
                "per_digit": NEW_DATA_PER_DIGIT,
                "order": "newest first",
                "read at most": SLICE_READ_FACTOR,
                "without copies of": trained,
            }
        )
    return sha256_json({"slice": name, "mnist": dataset.sha256})


def base_training(mnist: Mnist, dataset: DatasetRef) -> np.ndarray:
    return base_training_indices(mnist.y_train, dataset.held_back)
