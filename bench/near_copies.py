"""How often the leakage check catches a changed copy of a test or selection image, and how often it takes a clean
MNIST training image for one: the figures behind docs/new-data.md's near-copy table.

Copies: ``--copies`` test images and half as many selection images, each changed by every transform below, searched
with the night's own ``near_copies`` against the test set and the selection split (indices as ``ingest`` builds them).
False positives: every clean MNIST training image (outside the selection split) against the same indices. Writes one
JSON record (``--out``, default docs/measured/near-copies.json, which the docs page renders) and prints it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy import ndimage

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from measured_record import cpu_model  # noqa: E402 (bench/, beside this script)

from storage import Store  # noqa: E402
from tasks.data.fetch import fetch_mnist, load_mnist  # noqa: E402
from tasks.data.near_copies import ImageIndex, near_copies  # noqa: E402
from tasks.data.splits import selection_indices  # noqa: E402

CROSS = ndimage.generate_binary_structure(2, 1)


def _affine(matrix: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """Each image mapped by ``matrix`` about its centre (bilinear), as an image editor would."""
    centre = np.array([13.5, 13.5])

    def apply(images: np.ndarray) -> np.ndarray:
        offset = centre - matrix @ centre
        out = [ndimage.affine_transform(i.astype(np.float32), matrix, offset=offset, order=1) for i in images]
        return np.clip(np.round(out), 0, 255).astype(np.uint8)

    return apply


def _rotation(degrees: float) -> np.ndarray:
    t = np.deg2rad(degrees)
    return np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])


def _curve(f: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    return lambda images: np.clip(np.round(f(images.astype(np.float64))), 0, 255).astype(np.uint8)


def _border(n: int) -> Callable[[np.ndarray], np.ndarray]:
    ring = [(0, j) for j in range(28)] + [(27, j) for j in range(28)] + [(i, 0) for i in range(1, 27)]
    ring += [(i, 27) for i in range(1, 27)]

    def apply(images: np.ndarray) -> np.ndarray:
        rng, out = np.random.default_rng(0), images.copy()
        for image in out:
            for k in rng.choice(len(ring), n, replace=False):
                image[ring[k]] = 255
        return out

    return apply


def _planted(n: int, block: int = 1) -> Callable[[np.ndarray], np.ndarray]:
    """``n`` blank pixels inside the middle 20 × 20 set to random values 100–255 (review 7's probe), or, with
    ``block``, one ``block`` × ``block`` square of blank pixels set to 200."""

    def apply(images: np.ndarray) -> np.ndarray:
        rng, out = np.random.default_rng(2), images.copy()
        for image in out:
            if block > 1:
                free = [
                    (y, x)
                    for y in range(3, 25 - block)
                    for x in range(3, 25 - block)
                    if not image[y - 1 : y + block + 1, x - 1 : x + block + 1].any()
                ]
                y, x = free[rng.integers(len(free))]
                image[y : y + block, x : x + block] = 200
                continue
            ys, xs = np.nonzero(image[4:24, 4:24] == 0)
            pick = rng.choice(len(ys), n, replace=False)
            image[ys[pick] + 4, xs[pick] + 4] = rng.integers(100, 256, n)
        return out

    return apply


def _then(*steps: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    def apply(images: np.ndarray) -> np.ndarray:
        for step in steps:
            images = step(images)
        return images

    return apply


TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "gamma 0.5": _curve(lambda x: 255 * (x / 255) ** 0.5),
    "gamma 2.0": _curve(lambda x: 255 * (x / 255) ** 2.0),
    "contrast × 1.3": _curve(lambda x: x * 1.3),
    "+40 on ink pixels": _curve(lambda x: np.where(x > 0, x + 40, 0)),
    "12 border pixels set to 255": _border(12),
    "× 0.85 + 1 (a constant lift)": _curve(lambda x: 0.85 * x + 1),
    "× 0.8 + noise of sd 3 everywhere": lambda images: _curve(lambda x: 0.8 * x + np.random.default_rng(1).normal(0, 3, x.shape))(
        images
    ),
    "× 0.8, then 5 pixels set": _then(_curve(lambda x: 0.8 * x), _planted(5)),
    "× 0.8, then 10 pixels set": _then(_curve(lambda x: 0.8 * x), _planted(10)),
    "gamma 0.5, then 5 pixels set": _then(_curve(lambda x: 255 * (x / 255) ** 0.5), _planted(5)),
    "× 0.8, then a 3 × 3 square set": _then(_curve(lambda x: 0.8 * x), _planted(9, block=3)),
    "mirrored left-right": lambda images: np.ascontiguousarray(images[:, :, ::-1]),
    "mirrored top-bottom": lambda images: np.ascontiguousarray(images[:, ::-1, :]),
    "transposed": lambda images: np.ascontiguousarray(images.transpose(0, 2, 1)),
    "zoom 1.1": _affine(np.eye(2) / 1.1),
    "zoom 0.9": _affine(np.eye(2) / 0.9),
    "rotation 4°": _affine(_rotation(4)),
    "shear 0.15": _affine(np.array([[1.0, 0.0], [0.15, 1.0]])),
    "dilation by 1 pixel": lambda images: np.stack([ndimage.grey_dilation(i, footprint=CROSS) for i in images]),
    "erosion by 1 pixel": lambda images: np.stack([ndimage.grey_erosion(i, footprint=CROSS) for i in images]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--copies", type=int, default=1000, help="test images changed per transform (half as many selection images)"
    )
    parser.add_argument("--clean", type=int, default=0, help="clean training images checked (0: all outside the selection split)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "measured" / "near-copies.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp))
        mnist = load_mnist(store, fetch_mnist(store, log=lambda line: None))
    selection = selection_indices(mnist.y_train)
    started = time.perf_counter()
    test_index = ImageIndex(mnist.x_test, ranked=True, decreasing=True)  # as ingest builds them
    selection_index = ImageIndex(mnist.x_train[selection], ranked=True, decreasing=True)
    prepare_s = time.perf_counter() - started

    def leaked(images: np.ndarray) -> np.ndarray:
        return near_copies(images, test_index) | near_copies(images, selection_index)

    rng = np.random.default_rng(0)
    originals = np.concatenate(
        [
            mnist.x_test[rng.choice(len(mnist.x_test), args.copies, replace=False)],
            mnist.x_train[rng.choice(selection, args.copies // 2, replace=False)],
        ]
    )
    caught = {}
    for name, transform in TRANSFORMS.items():
        caught[name] = round(float(leaked(transform(originals)).mean()), 4)
        print(f"{name}: {caught[name]:.1%} caught", file=sys.stderr, flush=True)

    outside = np.setdiff1d(np.arange(len(mnist.x_train)), selection)
    if args.clean:
        outside = rng.choice(outside, args.clean, replace=False)
    flagged = int(leaked(mnist.x_train[outside]).sum())
    # Cost against the check as it was (as given and centred only), on the same 5 000 clean images, one after the other.
    plain = (ImageIndex(mnist.x_test), ImageIndex(mnist.x_train[selection]))
    timed = mnist.x_train[outside[:5000]]
    started = time.perf_counter()
    leaked(timed)
    ranked_s = time.perf_counter() - started
    started = time.perf_counter()
    near_copies(timed, plain[0]) | near_copies(timed, plain[1])
    plain_s = time.perf_counter() - started
    model = cpu_model()
    record = {
        "date": dt.date.today().isoformat(),
        "cpu": model,
        "copies": len(originals),
        "caught": caught,
        "clean_images": len(outside),
        "clean_flagged": flagged,
        "seconds_per_1000_images": round(1000 * ranked_s / len(timed), 3),
        "seconds_per_1000_images_as_given_only": round(1000 * plain_s / len(timed), 3),
        "index_seconds": round(prepare_s, 2),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps(record, ensure_ascii=False))


if __name__ == "__main__":
    main()
