"""A scripted week of arrivals, for tests and for people trying the pipeline: ``simulate-arrivals --night K``.

The base training set holds back MNIST training images (``--held-back``, 10 000 by default here; the
nights must be run with the same number) and this releases them night by night:

* nights 1, 4, 6, 7: a clean batch of held-back images;
* night 2: a batch of held-back images with 40 % of its labels permuted;
* night 3: a batch that copies MNIST test images;
* night 5: a batch of held-back images, inverted (black digit on white).
"""

from __future__ import annotations

import numpy as np

from storage import Store
from tasks.data.batch_format import batch_bytes
from tasks.data.fetch import Mnist
from tasks.data.splits import held_back_indices

HELD_BACK = 10_000
BATCH_IMAGES = 1_500
NIGHTS = {
    1: "clean",
    2: "mislabelled",
    3: "test copies",
    4: "clean",
    5: "inverted",
    6: "clean",
    7: "clean",
}
_RELEASE_ORDER = [n for n in NIGHTS if NIGHTS[n] != "test copies"]  # which share of the held-back images each night uses
MISLABELLED_SHARE = 0.4


def night_batch(
    mnist: Mnist, night: int, held_back: int = HELD_BACK, images: int = BATCH_IMAGES
) -> tuple[np.ndarray, np.ndarray, str]:
    """Night ``night``'s images, labels and what kind of batch it is."""
    if night not in NIGHTS:
        raise ValueError(f"night {night} is not in the scripted week (1–7)")
    kind = NIGHTS[night]
    rng = np.random.default_rng(night)
    if kind == "test copies":
        chosen = np.sort(rng.choice(len(mnist.y_test), size=images, replace=False))
        return mnist.x_test[chosen], mnist.y_test[chosen].astype(np.int64), kind
    reserve = held_back_indices(mnist.y_train, held_back)
    share = _RELEASE_ORDER.index(night)
    chosen = reserve[share * images : (share + 1) * images]
    if len(chosen) < images:
        raise ValueError(f"held_back={held_back} holds too few images for {len(_RELEASE_ORDER)} nights of {images}: raise it")
    x, y = mnist.x_train[chosen].copy(), mnist.y_train[chosen].astype(np.int64)
    if kind == "mislabelled":
        rows = rng.choice(len(y), size=int(MISLABELLED_SHARE * len(y)), replace=False)
        y[rows] = rng.permutation(y[rows])
    elif kind == "inverted":
        x = 255 - x
    return x, y, kind


def write_night(incoming: Store, mnist: Mnist, night: int, held_back: int = HELD_BACK, images: int = BATCH_IMAGES) -> str:
    """Write night ``night``'s batch into the incoming location (atomically); returns its location."""
    x, y, kind = night_batch(mnist, night, held_back, images)
    key = f"night-{night}.parquet"
    incoming.write_bytes(
        key, batch_bytes(x, y, source=f"simulate-arrivals night {night} ({kind})", collected_at=f"night {night}")
    )
    return incoming.location(key)
