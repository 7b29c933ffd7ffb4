"""The images a night trains on, staged once into a private local file and read back by index, batch by batch.

Why: holding the training set in memory (and as float32, 3 136 bytes an image) made a night's memory grow with
every accepted batch. Here the base MNIST images a night trains on and every accepted batch's training share
are copied, verified, into one unnamed temporary file of raw 784-byte images (a process killed mid-training
leaves nothing behind); only the labels (one byte an image) stay in memory. A batch of images is read with ``os.preadv`` at the rows it names, so a
night's resident memory does not depend on how many images it trains on. Not ``numpy.memmap``: a memory map's
pages count in the process's resident memory once touched, and every epoch touches all of them.

A share is read through ``Store.verified_copy`` (hashed while it is copied) and checked like ``parse_share``:
its size must be exactly ``rows`` × 785 bytes and its labels 0–9, so a share changed in the store is refused,
not trained on.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Sequence

import numpy as np

from storage import DamagedArtifact, Store, StoreError
from tasks.data.batch_format import PIXELS, BatchPart, BatchRejected, share_problem

CHUNK_IMAGES = 8192  # images copied per write while staging: 6.4 MB, whatever the training set's size


class TrainingImages:
    """Images by row, read from the staged file; the labels in memory. Rows are numbered as staged: the base
    images first (in the order given), then each share's rows in turn."""

    def __init__(self, fd: int, labels: np.ndarray) -> None:
        self._fd = fd
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def images(self, rows: np.ndarray) -> np.ndarray:
        """The (n, 28, 28) uint8 images at ``rows``, in the order given."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self.labels)):
            raise IndexError(f"rows {rows.min()}–{rows.max()} outside the {len(self.labels)} training images")
        out = np.empty((len(rows), PIXELS), dtype=np.uint8)
        for j, row in enumerate(rows.tolist()):
            if os.preadv(self._fd, [out[j]], row * PIXELS) != PIXELS:
                raise OSError(f"the staged training images end before row {row}: the temporary file was changed")
        return out.reshape(-1, 28, 28)


def _copy_share(store: Store, part: BatchPart, target) -> np.ndarray:
    """Append one verified share's images to ``target``; its labels. ``DamagedShare`` if it is not that share."""
    start = target.tell()
    try:
        return _copied_share(store, part, target)
    except (DamagedArtifact, StoreError, BatchRejected, OSError) as exc:
        target.seek(start)
        target.truncate()
        raise share_problem(part, exc) from exc


def _copied_share(store: Store, part: BatchPart, target) -> np.ndarray:
    with store.verified_copy(part.key, part.sha256, limit=part.size) as local, open(local, "rb") as share:
        size = os.fstat(share.fileno()).st_size
        if part.rows < 0 or size != part.rows * (PIXELS + 1):
            raise BatchRejected(f"a share of {part.rows} images must be {part.rows * (PIXELS + 1)} bytes, not {size}")
        left = part.rows * PIXELS
        while left:
            chunk = share.read(min(left, CHUNK_IMAGES * PIXELS))
            target.write(chunk)
            left -= len(chunk)
        labels = np.frombuffer(share.read(part.rows), dtype=np.uint8)
    if part.rows and labels.max() > 9:
        raise BatchRejected(f"a share holds label {labels.max()}: labels are 0–9")
    return labels


@contextlib.contextmanager
def staged_training_images(
    store: Store, mnist_images: np.ndarray, mnist_labels: np.ndarray, base_rows: np.ndarray, shares: Sequence[BatchPart]
) -> Iterator[TrainingImages]:
    """MNIST's images at ``base_rows`` and the shares' images, staged for as long as the block runs."""
    with tempfile.TemporaryFile(prefix="mnist-training-images-") as target:  # unnamed: nothing is left, even if killed
        labels = [np.asarray(mnist_labels[base_rows], dtype=np.uint8)]
        for start in range(0, len(base_rows), CHUNK_IMAGES):
            chunk = mnist_images[base_rows[start : start + CHUNK_IMAGES]]
            target.write(np.ascontiguousarray(chunk, dtype=np.uint8).tobytes())
        for part in shares:
            labels.append(_copy_share(store, part, target))
        target.flush()
        yield TrainingImages(target.fileno(), np.concatenate(labels))
