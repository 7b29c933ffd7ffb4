"""New, plausible digits for soak runs: MNIST training images deformed as infiMNIST / MNIST8M made millions of them.

A soak (``bench/soak.py``) needs a year of arrivals that the intake accepts on their merits: images no check takes
for copies (of the test set, the selection split, or what was trained on), with labels that stay right. Each one
is a base training image (never a selection, held-back or test image) under a random elastic displacement field
(Simard et al. 2003: uniform noise smoothed by a Gaussian of ``sigma`` pixels, scaled by ``alpha``) and a small
random affine map (rotation, scale, shear), resampled bilinearly. The deformation is large enough that the
leakage check's pixel comparison does not call it a copy of its source (``tests/test_soak.py`` checks), and small
enough that the digit keeps its label.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

SIDE = 28
ALPHA = 20.0  # pixels of displacement before smoothing (Simard et al. used 34 with sigma 4; milder keeps labels plain)
SIGMA = 4.0
MAX_ROTATION = 8.0  # degrees
SCALE = (0.92, 1.08)
MAX_SHEAR = 0.1


def deformed(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each image under its own random elastic and affine deformation (uint8 in, uint8 out, same shape)."""
    source = np.asarray(images, dtype=np.uint8).reshape(-1, SIDE, SIDE)
    rows, cols = np.mgrid[0:SIDE, 0:SIDE].astype(np.float64)
    centre = (SIDE - 1) / 2
    out = np.empty_like(source)
    for k, image in enumerate(source):
        dy = ndimage.gaussian_filter(rng.uniform(-1, 1, (SIDE, SIDE)), SIGMA) * ALPHA
        dx = ndimage.gaussian_filter(rng.uniform(-1, 1, (SIDE, SIDE)), SIGMA) * ALPHA
        angle = np.deg2rad(rng.uniform(-MAX_ROTATION, MAX_ROTATION))
        scale, shear = rng.uniform(*SCALE), rng.uniform(-MAX_SHEAR, MAX_SHEAR)
        # where each output pixel samples the input: the inverse of rotate · shear · scale about the centre
        forward = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) @ np.array(
            [[1.0, 0.0], [shear, 1.0]]
        )
        inverse = np.linalg.inv(forward * scale)
        y, x = rows - centre, cols - centre
        sample_y = inverse[0, 0] * y + inverse[0, 1] * x + centre + dy
        sample_x = inverse[1, 0] * y + inverse[1, 1] * x + centre + dx
        warped = ndimage.map_coordinates(image.astype(np.float64), [sample_y, sample_x], order=1, mode="constant")
        out[k] = np.clip(np.round(warped), 0, 255).astype(np.uint8)
    return out.reshape(np.shape(images))


def deformed_batch(
    x_train: np.ndarray, y_train: np.ndarray, sources: np.ndarray, n: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` deformed images of training images drawn from ``sources`` (indices: the base training set), with
    their labels."""
    chosen = rng.choice(sources, size=n, replace=len(sources) < n)
    return deformed(x_train[chosen], rng), np.asarray(y_train[chosen], dtype=np.int64)
