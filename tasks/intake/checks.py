"""The checks a new batch passes before it can reach a model: leakage, drift and label quality.

Plain functions on arrays, no store: ``tasks/intake/ingest.py`` feeds them and records what they return.
Leakage is judged by near copies, not only by equal bytes (``differing_pixels``): a sender who changes one
pixel of a test image by 1/255, adds faint noise or moves the digit by a pixel still sends that test image.
Each check gives numbers (recorded in the ``batches`` table whatever the decision) and, when a
threshold of ``IngestRules`` is crossed, one sentence saying which and by how much. Drift and
label-distribution tests need both significance and size: with thousands of images a shift too small
to matter is still "significant", and a large shift in a tiny batch may not be.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy import stats

from tasks.data.batch_format import MAX_BATCH_ROWS, PIXELS

INK = 128  # a pixel at or above half intensity is ink
REFERENCE_IMAGES = 10_000  # MNIST training images the image statistics are compared with (a fixed sample)
SIDE = 28  # an image is SIDE × SIDE = PIXELS pixels

# ---- near copies, as measured on 2026-12-06 (real MNIST, this project's 2-core CPU) -----------------------------
# A pixel "differs" between two images when their values are more than PIXEL_TOLERANCE apart; an image is a near
# copy of another when at most NEAR_COPY_PIXELS of its 784 pixels differ, as given or once both are centred
# (``centred``). Changed copies of 2 000 test and 1 000 selection images, searched among both sets:
#   all caught: one pixel changed by 1/255; every pixel by up to ±2/255 or ±8/255; Gaussian noise of sd 10/255
#     (at most 4 pixels differ); 5 pixels set to random values, or inverted;
#   99.8–100 % caught: the digit moved by 1 pixel (right, down, diagonally) or by 2 (a copy whose centre of mass
#     lands on a half pixel is centred a pixel away from its original); 99.3 % moved by 1 with ±2/255 noise;
#     85 % moved by 1 with 5 random pixels; 91–100 % with every pixel raised or lowered by 16 or 31;
#   none caught: 20 random pixels, noise of sd 25/255, intensity × 0.8. Those are as far from their original as
#     MNIST's own near twins are from each other (next lines), so no pixel threshold separates them.
# False positives, clean MNIST training images against the test set and the selection split: 1 of 55 000
# (0.002 %; 0 of the 45 000 base training images of held_back=10 000, fewest differing pixels 11, and 1 of the
# 10 000 held-back ones, a thin "1" 7 pixels from test image 3070). Held-back against base training images (the
# de-duplication): the same 1 of 10 000. With NEAR_COPY_PIXELS = 12: 5 of 55 000; 16: 41.
# Cost: 0.16–0.4 s for a 600-image batch against the test set, the selection split and 45 000 training images,
# plus 0.2–0.7 s once a night to prepare those 60 000 images; a whole night with one 600-image batch went from
# 1.1–1.3 s of ingest to 1.5–2.4 s (the 2-core machine shared with other work, so the spread is its load).
PIXEL_TOLERANCE = 32  # of 255: a pixel off by no more than this is the same pixel (noise, rounding, a re-encoding)
NEAR_COPY_PIXELS = 8  # at most this many pixels differing by more than PIXEL_TOLERANCE: a near copy
SKETCH_CELL = 4  # candidates are found on 7×7 means of 4×4 cells: 16 times fewer numbers to multiply
# Nearest sketches whose pixels are compared. The original of a copy changed as above ranks 0–3, but a sender who
# steers each copy (every pixel moved up to ±32/255 toward another image of the same digit, 8 pixels set freely)
# pushes it further: measured 2026-12-06 on 200 test images, 24 such copies got past 8 candidates, 8 past 64 (the
# check then takes 0.23–0.26 s instead of 0.11–0.12 s for 600 images against 60 000). Only comparing every image
# within the sketch distance a near copy can have (median 2 229 of 60 000) would close it.
CANDIDATES = 64
QUERY_ROWS = 128  # batch images searched at once: a 128 × 60 000 distance matrix is 30 MB
BLOCK = 64  # index columns per block when the nearest sketches are picked (``_nearest``)


class IngestRules(BaseModel):
    """When a new batch is quarantined instead of trained on; the flow's "ingest" parameter group.

    Defaults were chosen from measurements on the scripted week (README, "Nights with new data"): clean
    batches of held-back MNIST images score far inside every threshold, each bad night far outside one.
    """

    model_config = ConfigDict(extra="forbid", title="New-data checks")

    max_leaked_share: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        title="Largest share of leaked images",
        description="Exact copies of MNIST test images or of the selection split, and near copies of them (at most "
        f"{NEAR_COPY_PIXELS} pixels differ by more than {PIXEL_TOLERANCE}/255, also once both are centred), are always "
        "dropped; a batch with more than this share of them is quarantined (0–1).",
    )
    drift_p: float = Field(
        1e-6,
        gt=0.0,
        le=1.0,
        title="Drift significance",
        description="A label or image-statistics difference from MNIST's training set counts only below this p-value.",
    )
    max_label_shift: float = Field(
        0.15,
        ge=0.0,
        le=1.0,
        title="Largest label shift",
        description="Total variation distance between the batch's label distribution and MNIST's (0–1).",
    )
    max_image_drift: float = Field(
        0.25,
        ge=0.0,
        le=1.0,
        title="Largest image drift",
        description="Kolmogorov–Smirnov statistic of mean intensity or ink fraction per image, against MNIST (0–1).",
    )
    confident_probability: float = Field(
        0.9,
        ge=0.5,
        le=1.0,
        title="Confident prediction",
        description="The champion is confident about an image when its top probability is at least this.",
    )
    max_disagreement_excess: float = Field(
        0.05,
        ge=0.0,
        le=1.0,
        title="Largest excess of confident disagreement",
        description="A batch whose labels the champion confidently contradicts this much more often than it "
        "contradicts the selection split's labels is quarantined as likely mislabelled (0–1).",
    )
    max_excess_disagreements: int = Field(
        50,
        ge=0,
        le=100_000,
        title="Most confident disagreements beyond the champion's own rate",
        description="A batch whose labels the champion confidently contradicts more than this many times beyond what "
        "its own rate on the selection split predicts is quarantined as likely mislabelled, however large the batch: "
        "a share alone would let 100 000 images carry some 5 000 targeted wrong labels. Counted across every batch "
        "accepted in one night, and across a week of batches declaring the same source: twenty files each under "
        "it are not twenty times it.",
    )
    accept_unjudged_labels: bool = Field(
        False,
        title="Accept batches whose labels no champion judged",
        description="Off: a batch whose labels cannot be judged waits in the incoming location while there is no "
        "champion, and is quarantined when the champion is confident about none of its images. On: such a batch is "
        "accepted without a label check (a deployed run may turn this on only where the worker allows looser rules).",
    )
    min_batch_images: int = Field(
        20,
        ge=1,
        le=100_000,
        title="Smallest batch",
        description="A batch with fewer images, once repeats, leaked copies and copies of trained images are dropped, "
        "is quarantined: its label and image statistics would say nothing.",
    )
    holdout_share: float = Field(
        0.2,
        gt=0.0,
        lt=1.0,
        title="New-data holdout share",
        description="Of each accepted batch, this stratified share joins the new-data holdout and is never trained on.",
    )
    max_files_per_night: int = Field(
        20,
        ge=1,
        le=10_000,
        title="Most batch files a night",
        description="A night takes at most this many new batch files from the incoming location, oldest first; "
        "the rest wait there, untouched, for a later night.",
    )
    max_images_per_night: int = Field(
        MAX_BATCH_ROWS,
        ge=1,
        le=10_000_000,
        title="Most batch images a night",
        description="A night takes batch files, oldest first, while their images fit in this many; a file that "
        "does not fit waits, untouched, for a later night (the default lets any one file fit).",
    )


def image_hashes(images: np.ndarray) -> np.ndarray:
    """One digest per image, of its 784 bytes: equal images, equal digests."""
    flat = np.ascontiguousarray(np.asarray(images, dtype=np.uint8).reshape(len(images), 28 * 28))
    return np.array([hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in flat], dtype=object)


# ---- near copies ---------------------------------------------------------------------------------------------------
def _flat(images: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(images, dtype=np.uint8).reshape(len(images), PIXELS))


def centred(flat: np.ndarray) -> np.ndarray:
    """Each image moved by whole pixels so that its centre of mass is nearest (14, 14), where MNIST's own centring
    put it: a copy moved by a pixel or two becomes its original again, and an MNIST image stays as it is."""
    images = flat.reshape(len(flat), SIDE, SIDE)
    mass = images.sum(axis=(1, 2), dtype=np.int64)
    grid = np.arange(SIDE, dtype=np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):  # exact integer moments: a copy is centred as its original
        centre = (
            np.stack([images.sum(axis=2, dtype=np.int64) @ grid, images.sum(axis=1, dtype=np.int64) @ grid], 1) / mass[:, None]
        )
    moves = np.nan_to_num(np.floor(SIDE / 2 - centre + 0.5)).astype(np.int64)  # a blank image stays where it is
    out = images.copy()
    for dy, dx in np.unique(moves[moves.any(axis=1)], axis=0):
        rows = np.flatnonzero((moves[:, 0] == dy) & (moves[:, 1] == dx))
        moved = np.zeros((len(rows), SIDE, SIDE), np.uint8)
        moved[:, max(dy, 0) : SIDE + min(dy, 0), max(dx, 0) : SIDE + min(dx, 0)] = images[
            rows, max(-dy, 0) : SIDE + min(-dy, 0), max(-dx, 0) : SIDE + min(-dx, 0)
        ]
        out[rows] = moved
    return out.reshape(len(flat), PIXELS)


def _pooling() -> np.ndarray:
    """(784, 49): the matrix that averages each 4×4 cell, scaled to 0–1."""
    cells = SIDE // SKETCH_CELL
    cell_of = (np.arange(SIDE)[:, None] // SKETCH_CELL) * cells + np.arange(SIDE)[None, :] // SKETCH_CELL
    return (np.eye(cells * cells, dtype=np.float32)[cell_of.ravel()] / (SKETCH_CELL * SKETCH_CELL * 255.0)).astype(np.float32)


POOLING = _pooling()


def _sketch(flat: np.ndarray) -> np.ndarray:
    """7×7 means of 4×4 cells (0–1): close images have close sketches, and they are 16 times cheaper to compare.
    In slices of ``QUERY_ROWS`` × 32 images: a float copy of 60 000 images at once cost a second in page faults."""
    out = np.empty((len(flat), POOLING.shape[1]), np.float32)
    for start in range(0, len(flat), 32 * QUERY_ROWS):
        rows = slice(start, start + 32 * QUERY_ROWS)
        out[rows] = flat[rows].astype(np.float32) @ POOLING
    return out


class _View(NamedTuple):
    pixels: np.ndarray  # (n, 784) uint8
    sketch: np.ndarray  # (n, 50) float32: the 49 sketch values, and 1 (queries) or minus half the squared norm (index)


def _view(pixels: np.ndarray, index: bool, like: _View | None = None) -> _View:
    """Pixels and sketches, the sketches extended so that one matrix product ranks by distance: for a query q and an
    index image s, ``[q, 1] · [s, -|s|²/2] = q·s - |s|²/2``, which is largest where ``|q - s|²`` is smallest.
    ``like``: the view of the same images before centring, whose sketches are reused where centring moved nothing
    (nearly every MNIST image), halving the work."""
    if like is None:
        sketch = _sketch(pixels)
    else:
        sketch = like.sketch[:, :-1].copy()
        changed = np.flatnonzero((pixels != like.pixels).any(axis=1))
        sketch[changed] = _sketch(pixels[changed])
    extra = -0.5 * np.einsum("ij,ij->i", sketch, sketch) if index else np.ones(len(sketch), np.float32)
    return _View(pixels, np.concatenate([sketch, extra[:, None].astype(np.float32)], axis=1))


def _views(flat: np.ndarray, index: bool) -> list[_View]:
    """The images as given and centred."""
    given = _view(flat, index)
    return [given, _view(centred(flat), index, like=given)]


class ImageIndex:
    """Images a batch may not copy, prepared once a night for ``differing_pixels``: their pixels and sketches as
    given and centred, in parts. ``add`` appends a part (a batch accepted earlier the same night) without copying
    the others: 45 000 training images are 70 MB."""

    def __init__(self, *images: np.ndarray) -> None:
        self.parts: list[list[_View]] = []
        for part in images:
            self.add(part)

    def __len__(self) -> int:
        return sum(len(views[0].pixels) for views in self.parts)

    def add(self, images: np.ndarray) -> None:
        if len(images):
            self.parts.append(_views(_flat(images), index=True))


def _nearest(closeness: np.ndarray, k: int) -> np.ndarray:
    """Per row, the columns of the ``k`` largest values. They all lie in the ``k`` blocks of ``BLOCK`` columns with the
    largest maxima (a block left out has ``k`` larger values in the blocks kept), so the rows are scanned once for
    their block maxima and only ``k × BLOCK`` values a row are partitioned: about 12 times faster than partitioning
    the whole rows, and the same columns."""
    rows, n = closeness.shape
    if n <= k:
        return np.broadcast_to(np.arange(n), (rows, n))
    maxima = np.maximum.reduceat(closeness, np.arange(0, n, BLOCK), axis=1)
    if maxima.shape[1] <= k:
        return np.argpartition(closeness, -k, axis=1)[:, -k:]
    blocks = np.argpartition(maxima, -k, axis=1)[:, -k:]
    columns = (blocks[:, :, None] * BLOCK + np.arange(BLOCK)).reshape(rows, -1)
    values = np.take_along_axis(closeness, np.minimum(columns, n - 1), axis=1)
    values[columns >= n] = -np.inf  # past the last, partial block
    best = np.argpartition(values, -k, axis=1)[:, -k:]
    return np.take_along_axis(columns, best, axis=1)


def _fewest_differing(query: _View, index: _View) -> np.ndarray:
    """Per query image: the fewest differing pixels among the ``CANDIDATES`` index images with the nearest sketches."""
    nearest = _nearest(query.sketch @ index.sketch.T, CANDIDATES)
    gaps = np.abs(query.pixels[:, None, :].astype(np.int16) - index.pixels[nearest].astype(np.int16))
    return (gaps > PIXEL_TOLERANCE).sum(axis=2).min(axis=1)


def differing_pixels(images: np.ndarray, index: ImageIndex) -> np.ndarray:
    """Per image, how many of its pixels differ by more than ``PIXEL_TOLERANCE`` from its nearest image in
    ``index``, as given or with both centred: 0 for an exact copy, a few for a lightly changed one, tens for a
    different image of the same digit (``NEAR_COPY_PIXELS`` is the line, measured above). 785 for an empty index.

    The nearest image is searched among the ``CANDIDATES`` with the closest 7×7 sketches (one matrix product per
    ``QUERY_ROWS`` images), so the cost grows with the batch times the index, at 49 numbers an image."""
    flat = _flat(images)
    fewest = np.full(len(flat), PIXELS + 1, dtype=np.int64)
    if not len(flat) or not len(index):
        return fewest
    queries = _views(flat, index=False)
    for views in index.parts:
        for query, view in zip(queries, views):
            for start in range(0, len(flat), QUERY_ROWS):
                rows = slice(start, start + QUERY_ROWS)
                some = _View(query.pixels[rows], query.sketch[rows])
                fewest[rows] = np.minimum(fewest[rows], _fewest_differing(some, view))
    return fewest


def near_copies(images: np.ndarray, index: ImageIndex) -> np.ndarray:
    """True for each image that is an exact or near copy of an image in ``index``."""
    return differing_pixels(images, index) <= NEAR_COPY_PIXELS


def image_statistics(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per image: mean intensity (0–1) and ink fraction (share of pixels at or above half intensity)."""
    flat = np.asarray(images, dtype=np.uint8).reshape(len(images), -1)
    return flat.mean(axis=1) / 255.0, (flat >= INK).mean(axis=1)


class DriftFigures(BaseModel):
    label_chi2_p: float
    label_shift: float
    mean_intensity: float
    mean_intensity_ks: float
    mean_intensity_p: float
    ink_fraction: float
    ink_fraction_ks: float
    ink_fraction_p: float


def drift(labels: np.ndarray, images: np.ndarray, reference_labels: np.ndarray, reference_images: np.ndarray) -> DriftFigures:
    """The batch against MNIST's training set: labels by a chi-square goodness-of-fit test, images by
    two-sample Kolmogorov–Smirnov tests on their mean intensity and ink fraction."""
    expected_share = np.bincount(np.asarray(reference_labels, np.int64), minlength=10) / len(reference_labels)
    observed = np.bincount(np.asarray(labels, np.int64), minlength=10)
    chi2 = stats.chisquare(observed, expected_share * observed.sum())
    intensity, ink = image_statistics(images)
    ref_intensity, ref_ink = image_statistics(reference_images)
    ks_intensity = stats.ks_2samp(intensity, ref_intensity)
    ks_ink = stats.ks_2samp(ink, ref_ink)
    return DriftFigures(
        label_chi2_p=float(chi2.pvalue),
        label_shift=float(0.5 * np.abs(observed / observed.sum() - expected_share).sum()),
        mean_intensity=float(intensity.mean()),
        mean_intensity_ks=float(ks_intensity.statistic),
        mean_intensity_p=float(ks_intensity.pvalue),
        ink_fraction=float(ink.mean()),
        ink_fraction_ks=float(ks_ink.statistic),
        ink_fraction_p=float(ks_ink.pvalue),
    )


def drift_problems(figures: DriftFigures, rules: IngestRules) -> list[str]:
    problems = []
    if figures.label_chi2_p < rules.drift_p and figures.label_shift > rules.max_label_shift:
        problems.append(
            f"label drift: its digits are distributed {figures.label_shift:.3f} (total variation) away from MNIST's, "
            f"chi-square p={figures.label_chi2_p:.2g} (thresholds {rules.max_label_shift}, p<{rules.drift_p:g})"
        )
    for name, ks, p, mean in (
        ("mean intensity", figures.mean_intensity_ks, figures.mean_intensity_p, figures.mean_intensity),
        ("ink fraction", figures.ink_fraction_ks, figures.ink_fraction_p, figures.ink_fraction),
    ):
        if p < rules.drift_p and ks > rules.max_image_drift:
            problems.append(
                f"image drift: {name} per image differs from MNIST's (Kolmogorov–Smirnov {ks:.3f}, p={p:.2g}; "
                f"batch mean {mean:.3f}; thresholds {rules.max_image_drift}, p<{rules.drift_p:g})"
            )
    return problems


class LabelFigures(BaseModel):
    disagreement: float
    confident_disagreement: float | None  # None: the champion is confident about none of the images
    champion_confident_disagreement: float | None  # the champion's own rate on mnist-selection
    confident_images: int = 0  # images the champion is confident about
    excess_disagreements: float | None = None  # confident disagreements beyond what the champion's own rate predicts


def confident_disagreement(labels: np.ndarray, predicted: np.ndarray, confidence: np.ndarray, threshold: float) -> float | None:
    confident = np.asarray(confidence) >= threshold
    if not confident.any():
        return None
    return float((np.asarray(predicted)[confident] != np.asarray(labels)[confident]).mean())


def label_quality(
    labels: np.ndarray,
    predicted: np.ndarray,
    confidence: np.ndarray,
    selection_labels: np.ndarray,
    selection_predicted: np.ndarray,
    selection_confidence: np.ndarray,
    rules: IngestRules,
) -> tuple[LabelFigures, list[str]]:
    """How often the champion contradicts the batch's labels, against how often it contradicts the
    selection split's (correct) labels: far more often means the labels, not the model, are wrong. Judged as a
    rate and as a count: a few per cent of a large batch is thousands of wrong labels, each one trained on."""
    confident = np.asarray(confidence) >= rules.confident_probability
    confident_images = int(confident.sum())
    disagreeing = int((np.asarray(predicted)[confident] != np.asarray(labels)[confident]).sum())
    figures = LabelFigures(
        disagreement=float((np.asarray(predicted) != np.asarray(labels)).mean()),
        confident_disagreement=confident_disagreement(labels, predicted, confidence, rules.confident_probability),
        champion_confident_disagreement=confident_disagreement(
            selection_labels, selection_predicted, selection_confidence, rules.confident_probability
        ),
        confident_images=confident_images,
    )
    batch, own = figures.confident_disagreement, figures.champion_confident_disagreement
    if batch is None or own is None:
        return figures, []
    figures.excess_disagreements = round(disagreeing - own * confident_images, 6)  # 50.000000001 is 50
    crossed = []
    if batch - own > rules.max_disagreement_excess:
        crossed.append(f"{batch - own:.1%} more often, more than the {rules.max_disagreement_excess:.1%} allowed")
    if figures.excess_disagreements > rules.max_excess_disagreements:
        crossed.append(
            f"{figures.excess_disagreements:.0f} times more than that rate predicts, more than the "
            f"{rules.max_excess_disagreements} a batch may carry whatever its size"
        )
    if not crossed:
        return figures, []
    return figures, [
        f"likely mislabelled: the champion confidently disagrees with {batch:.1%} of its labels ({disagreeing} of the "
        f"{confident_images} images it is confident about), against {own:.1%} on the selection split: " + " and ".join(crossed)
    ]


def holdout_rows(labels: np.ndarray, share: float, digest: str) -> np.ndarray:
    """A stratified ``share`` of the rows, drawn from the batch's digest: the same batch, the same holdout."""
    rng = np.random.default_rng(int(digest[:16], 16))
    labels = np.asarray(labels, np.int64)
    chosen = []
    for digit in np.unique(labels):
        rows = np.flatnonzero(labels == digit)
        chosen.append(rng.choice(rows, size=int(round(share * len(rows))), replace=False))
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)
