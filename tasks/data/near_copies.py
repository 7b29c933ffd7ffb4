"""When an image is a copy of another, exact or near: the one search the intake (is a new batch copying a protected
image?) and the new-data slice (is a holdout image something the night trains on?) both use.

A data-stage module so that ``tasks/data/slices.py`` can use it; its thresholds live in the light
``tasks/data/copy_limits.py`` so the command line's help reads them without NumPy. Plain functions on arrays, no
store. Near copies, not only equal bytes: a sender who changes one pixel of an image by 1/255, adds faint noise or
moves the digit by a pixel still sends that image.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple

import numpy as np

from tasks.data.batch_format import PIXELS
from tasks.data.copy_limits import NEAR_COPY_PIXELS, PIXEL_TOLERANCE, RANKED_COPY_PIXELS  # measured below

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
SKETCH_CELL = 4  # candidates are found on 7×7 means of 4×4 cells: 16 times fewer numbers to multiply
# Nearest sketches whose pixels are compared. The original of a copy changed as above ranks 0–3, but a sender who
# steers each copy (every pixel moved up to ±32/255 toward another image of the same digit, 8 pixels set freely)
# pushes it further: measured 2026-12-06 on 200 test images, 24 such copies got past 8 candidates, 8 past 64 (the
# check then takes 0.23–0.26 s instead of 0.11–0.12 s for 600 images against 60 000). Only comparing every image
# within the sketch distance a near copy can have (median 2 229 of 60 000) would close it.
CANDIDATES = 64
# ---- near copies changed in intensity, measured on 2026-12-07 (bench/near_copies.py; docs/new-data.md has its table)
# A sender who changes every pixel's intensity by one increasing curve (gamma, contrast, ink made darker) or sets the
# border pixels keeps the digit's shape and the ORDER of its pixel values. The protected images (test, selection,
# holdout) are also compared as ``intensity_ranked``: the 2-pixel frame blanked, each ink pixel replaced by its rank
# among the image's ink pixels, the brightest ``1 - saturation`` of them all set to 255 (so that a curve that clips
# the bright end, as contrast × 1.3 does, changes nothing), at two saturations (0.4 for clipped bright ends, 0.6 for
# curves that blank the faintest pixels, as gamma 2). A copy in that form differs in at most RANKED_COPY_PIXELS.
# Stricter than NEAR_COPY_PIXELS because ranks make MNIST's own near twins nearer: clean training images against
# test and selection at 8 pixels: 5 of 20 000; at 4: 1 of 20 000.
# Before ranking, only ink in 2×2 blocks is kept (``ink_in_blocks``): review 7 (2026-12-07) set 5 blank pixels of
# a × 0.8 copy (0 of 300 caught: 5 pixels past RANKED_COPY_PIXELS, every rank shifted); with it 300 of 300, with 10
# pixels 298 of 300, a 3×3 square still 0; gamma 2 lost a little (253 → 248 of 300); 0 of 20 000 clean flagged.
# Cost: a 600-image batch against test and selection, fastest of 5 and of 9 in one run each: 1.24 s → 1.30 s and
# 3.61 s → 3.73 s (the shared 2-core Xeon's load between the runs), i.e. within the machine's noise.
# An image with more ink pixels than this (of the 24 × 24 inside the frame) is ranked whole, not opened: it is mostly
# ink (noise, a texture), and a few pixels crossing its median (a gamma curve merging two levels) would change many
# 2×2 blocks (3 of 120 gamma copies of noise images missed). MNIST's boldest digit has 351 (median 149).
MAX_OPENED_INK = 360
FRAME = 2  # pixels of the border blanked before ranking: MNIST's digits lie in the middle 20 × 20
RANKED_SATURATIONS = (0.4, 0.6)
# Pixels at most this much above an image's median (its background: MNIST's is 0) are blank when ranked. 0: a copy
# lifted by a constant (×0.85 + 1: 0 of 300 caught before, 300 of 300 after) is its original again; 2 already cost
# gamma 2 half its catch rate (faint pixels made background shift every rank), so noise everywhere is not undone.
BACKGROUND_MARGIN = 0
# A turned-back form (``decreasing_forms``) is compared only when it keeps this many ink pixels once ranked: an
# ordinary image inverted ranks blank (its background becomes the brightest), and a blank form would be a "copy" of
# any near-blank image a sender put in the holdout. MNIST's digits keep 34 or more (training set; 44 in the test set).
MIN_TURNED_INK = 20
QUERY_ROWS = 128  # batch images searched at once: a 128 × 60 000 distance matrix is 30 MB
BLOCK = 64  # index columns per block when the nearest sketches are picked (``_nearest``)


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


def _probe_pixels() -> np.ndarray:
    """Every other pixel of the middle 20 × 20 (a checkerboard of 200), where MNIST's digits lie."""
    row, column = np.mgrid[0:SIDE, 0:SIDE]
    middle = (row >= 4) & (row < SIDE - 4) & (column >= 4) & (column < SIDE - 4)
    return np.flatnonzero((middle & ((row + column) % 2 == 0)).ravel())


# The pixels compared first when the question is only "is it within the limit?" (``near_copies``): a pair that
# differs in more than the limit among them differs in more among all 784, so it is settled without the rest, and
# the few pairs left are compared whole. The same answers as comparing every pixel of every pair (tests/test_poison.py
# checks it on real MNIST at every line). Measured 2026-12-07 (Intel Xeon, 2 cores, shared), with ``_nearest``'s
# block gather: ``near_copies`` of 600 held-back MNIST images against the test set and the selection split (ranked,
# decreasing forms) 0.71 s of CPU instead of 1.21–1.48 s; against 45 000 training images 0.20 s instead of 0.24–0.29.
PROBE = _probe_pixels()


class _View(NamedTuple):
    pixels: np.ndarray  # (n, 784) uint8
    sketch: np.ndarray  # (n, 50) float32: the 49 sketch values, and 1 (queries) or minus half the squared norm (index)
    probe: np.ndarray  # (n, len(PROBE)) uint8: the PROBE pixels, contiguous


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
    sketch = np.concatenate([sketch, extra[:, None].astype(np.float32)], axis=1)
    return _View(pixels, sketch, np.ascontiguousarray(pixels[:, PROBE]))


def _views(flat: np.ndarray, index: bool) -> list[_View]:
    """The images as given and centred."""
    given = _view(flat, index)
    return [given, _view(centred(flat), index, like=given)]


def intensity_ranked(images: np.ndarray, saturation: float) -> np.ndarray:
    """Each image with its frame blanked, its specks blanked (``ink_in_blocks``) and every ink pixel replaced by its
    rank among the image's ink pixels (ties share their mean rank), scaled so that the top ``1 - saturation`` of them
    are 255: the same image for every increasing curve applied to the intensities, and for any border pixels or
    specks set. Ranks come from each image's 256-bin histogram, in slices of ``32 × QUERY_ROWS`` images (60 000
    images in about a second)."""
    flat = _flat(images).reshape(-1, SIDE, SIDE).copy()
    flat[:, :FRAME] = 0
    flat[:, SIDE - FRAME :] = 0
    flat[:, :, :FRAME] = 0
    flat[:, :, SIDE - FRAME :] = 0
    flat = flat.reshape(len(flat), PIXELS)
    # The background is what most of an image is (MNIST's: 0): a copy lifted by a constant has its background made
    # blank again, so its ranks are its original's, not shifted by hundreds of background pixels ranked as ink.
    background = np.median(flat, axis=1, keepdims=True) + BACKGROUND_MARGIN
    flat = np.where(flat > background, flat, 0).astype(np.uint8)
    flat = ink_in_blocks(flat)  # a few planted pixels neither differ nor shift every rank (review 7)
    out = np.zeros_like(flat)
    for start in range(0, len(flat), 32 * QUERY_ROWS):
        part = flat[start : start + 32 * QUERY_ROWS]
        keys = np.arange(len(part), dtype=np.int64)[:, None] * 256 + part
        counts = np.bincount(keys.ravel(), minlength=len(part) * 256).reshape(len(part), 256)
        up_to = np.cumsum(counts, axis=1)
        blank = up_to[:, :1]  # blank pixels are the darkest: the count up to value 0
        ink = PIXELS - blank
        values = part.astype(np.int64)
        as_dark = np.take_along_axis(up_to, values, axis=1)  # pixels as dark as this one or darker
        darker = as_dark - np.take_along_axis(counts, values, axis=1)
        rank = (darker + as_dark - 1) / 2 - blank  # 0 for the faintest ink pixel; ties share their mean rank
        level = np.minimum(1.0, (rank + 1) / (saturation * np.maximum(ink, 1)))
        out[start : start + len(part)] = np.where(part > 0, np.clip(np.round(level * 255), 1, 255), 0)
    return out


def ink_in_blocks(flat: np.ndarray) -> np.ndarray:
    """Each image with only the ink pixels that belong to some 2×2 block of ink (an opening by a 2×2 square): a speck,
    a pair or a line one pixel wide that a sender plants is blanked, so it neither differs nor shifts a rank, while an
    MNIST stroke (2 pixels wide or more) stays. Review 7 (2026-12-07): a copy under × 0.8 with 5 background pixels set
    got past the ranked comparison (0 of 300; 300 of 300 after, ``bench/near_copies.py`` has the rates)."""
    ink = (flat > 0).reshape(-1, SIDE, SIDE)
    ink[ink.sum(axis=(1, 2)) > MAX_OPENED_INK] = False  # mostly ink: no background for a speck; kept whole below
    block = np.zeros((len(ink), SIDE + 1, SIDE + 1), bool)  # block[y + 1, x + 1]: pixels (y..y+1, x..x+1) all ink
    block[:, 1:-1, 1:-1] = ink[:, :-1, :-1] & ink[:, 1:, :-1] & ink[:, :-1, 1:] & ink[:, 1:, 1:]
    kept = block[:, 1:, 1:] | block[:, :-1, 1:] | block[:, 1:, :-1] | block[:, :-1, :-1]
    kept |= ((flat > 0).sum(axis=1) > MAX_OPENED_INK)[:, None, None]
    return np.where(kept.reshape(len(flat), PIXELS), flat, 0).astype(np.uint8)


class ImageIndex:
    """Images a batch may not copy, prepared once a night for ``differing_pixels``: their pixels and sketches as
    given and centred, in parts. ``add`` appends a part (a batch accepted earlier the same night) without copying
    the others: 45 000 training images are 70 MB. ``ranked``: also as ``intensity_ranked`` at each of
    ``RANKED_SATURATIONS``, for the images that decide or report (test, selection, holdout), where a copy changed
    in intensity must be caught too; the images trained on are compared as given only (a repeat there costs a
    double count, not a test of memory). ``decreasing`` (with ``ranked``): a searched image is also turned back
    (``decreasing_forms``: inverted, ink reversed) and ranked, for the images that decide (test, selection, holdout)."""

    def __init__(self, *images: np.ndarray, ranked: bool = False, decreasing: bool = False) -> None:
        self.parts: list[list[_View]] = []
        self.ranked = {saturation: ImageIndex() for saturation in RANKED_SATURATIONS} if ranked else {}
        self.decreasing = decreasing and ranked
        for part in images:
            self.add(part)

    def __len__(self) -> int:
        return sum(len(views[0].pixels) for views in self.parts)

    def add(self, images: np.ndarray) -> None:
        if len(images):
            self.parts.append(_views(_flat(images), index=True))
            for saturation, index in self.ranked.items():
                index.add(intensity_ranked(images, saturation))


def _nearest(closeness: np.ndarray, k: int) -> np.ndarray:
    """Per row, the columns of the ``k`` largest values. They all lie in the ``k`` blocks of ``BLOCK`` columns with the
    largest maxima (a block left out has ``k`` larger values in the blocks kept), so the rows are scanned once for
    their block maxima and only ``k × BLOCK`` values a row are partitioned: about 12 times faster than partitioning
    the whole rows, and the same columns. The blocks are gathered whole (a view of the rows as blocks), not value by
    value: twice as fast again (2026-12-07: 2.9 ms instead of 6.0 for 128 rows of 10 000)."""
    rows, n = closeness.shape
    if n <= k:
        return np.broadcast_to(np.arange(n), (rows, n))
    maxima = np.maximum.reduceat(closeness, np.arange(0, n, BLOCK), axis=1)
    if maxima.shape[1] <= k:
        return np.argpartition(closeness, -k, axis=1)[:, -k:]
    blocks = np.argpartition(maxima, -k, axis=1)[:, -k:]
    whole = n // BLOCK
    values = closeness[:, : whole * BLOCK].reshape(rows, whole, BLOCK)[np.arange(rows)[:, None], np.minimum(blocks, whole - 1)]
    last = blocks == whole  # the partial last block, where one was picked: its values, the rest never picked
    if last.any():
        tail = np.full((rows, BLOCK), -np.inf, closeness.dtype)
        tail[:, : n - whole * BLOCK] = closeness[:, whole * BLOCK :]
        values[last] = tail[np.nonzero(last)[0]]
    best = np.argpartition(values.reshape(rows, -1), -k, axis=1)[:, -k:]
    return np.take_along_axis(blocks, best // BLOCK, axis=1) * BLOCK + best % BLOCK


def _fewest_differing(query: _View, index: _View) -> np.ndarray:
    """Per query image: the fewest differing pixels among the ``CANDIDATES`` index images with the nearest sketches."""
    nearest = _nearest(query.sketch @ index.sketch.T, CANDIDATES)
    near, given = index.pixels[nearest], query.pixels[:, None, :]
    gaps = np.maximum(given, near)
    gaps -= np.minimum(given, near)  # |a - b| in uint8, without widening copies: 3-4 times faster than in int16
    return (gaps > PIXEL_TOLERANCE).sum(axis=2, dtype=np.int32).min(axis=1)


def differing_pixels(images: np.ndarray, index: ImageIndex) -> np.ndarray:
    """Per image, how many of its pixels differ by more than ``PIXEL_TOLERANCE`` from its nearest image in
    ``index``, as given or with both centred: 0 for an exact copy, a few for a lightly changed one, tens for a
    different image of the same digit (``NEAR_COPY_PIXELS`` is the line, measured above). 785 for an empty index.

    The nearest image is searched among the ``CANDIDATES`` with the closest 7×7 sketches (one matrix product per
    ``QUERY_ROWS`` images), so the cost grows with the batch times the index, at 49 numbers an image."""
    flat = _flat(images)
    fewest = np.full(len(flat), PIXELS + 1, dtype=np.int64)
    for rows, query, view in _searches(flat, index):
        fewest[rows] = np.minimum(fewest[rows], _fewest_differing(query, view))
    return fewest


def _searches(flat: np.ndarray, index: ImageIndex, done: np.ndarray | None = None):
    """(rows, the queries' view at those rows, an index view) for every search of ``flat`` in ``index``: each part,
    as given and centred, ``QUERY_ROWS`` images at a time, leaving out the rows ``done`` already says True."""
    if not len(flat) or not len(index):
        return
    queries = _views(flat, index=False)
    for views in index.parts:
        for query, view in zip(queries, views):
            for start in range(0, len(flat), QUERY_ROWS):
                rows = np.arange(start, min(start + QUERY_ROWS, len(flat)))
                if done is not None:
                    rows = rows[~done[rows]]
                if len(rows):
                    yield rows, _View(query.pixels[rows], query.sketch[rows], query.probe[rows]), view


def _any_within(query: _View, index: _View, limit: int) -> np.ndarray:
    """Per query image: whether one of the ``CANDIDATES`` index images with the nearest sketches differs in at most
    ``limit`` pixels. ``_fewest_differing``'s answer to ``<= limit``, the pairs first compared on ``PROBE``."""
    nearest = _nearest(query.sketch @ index.sketch.T, CANDIDATES)
    near, given = index.probe[nearest], query.probe[:, None, :]
    gaps = np.maximum(given, near)
    gaps -= np.minimum(given, near)
    rows, columns = np.nonzero((gaps > PIXEL_TOLERANCE).sum(axis=2, dtype=np.int32) <= limit)
    found = np.zeros(len(nearest), dtype=bool)
    if len(rows):
        given, near = query.pixels[rows], index.pixels[nearest[rows, columns]]
        gaps = np.maximum(given, near)
        gaps -= np.minimum(given, near)
        found[rows[(gaps > PIXEL_TOLERANCE).sum(axis=1, dtype=np.int32) <= limit]] = True
    return found


def _within(flat: np.ndarray, index: ImageIndex, limit: int) -> np.ndarray:
    """Per image: ``differing_pixels(flat, index) <= limit``, without counting the pixels of pairs the probe settles."""
    found = np.zeros(len(flat), dtype=bool)
    for rows, query, view in _searches(flat, index, done=found):
        found[rows] = _any_within(query, view, limit)
    return found


def decreasing_forms(flat: np.ndarray) -> list[np.ndarray]:
    """The image as its original would be had a decreasing curve been applied to it: inverted (``255 - v``, the
    background made ink and the ink background) and ink reversed (``256 - v`` on the pixels brighter than the
    image's background, its median, and the background made blank). Ranked, either is its original again for any
    decreasing curve of the whole image or of its ink, an increasing one on top included: review 4 (2026-12-07)
    caught 0 of 300 such copies of test images before; review 6 caught 0 of 300 ink-reversed copies lifted by +1
    while the ink was reversed about 0 rather than about the background."""
    inverted = 255 - flat
    background = np.median(flat, axis=1, keepdims=True)
    ink_reversed = np.where(flat > background, 256 - flat.astype(np.int16), 0).astype(np.uint8)
    return [inverted, ink_reversed]


def near_copies(images: np.ndarray, index: ImageIndex) -> np.ndarray:
    """True for each image that is an exact or near copy of an image in ``index``: at most ``NEAR_COPY_PIXELS``
    differ as given (or centred), or, for a ``ranked`` index, at most ``RANKED_COPY_PIXELS`` once both are
    ``intensity_ranked`` (and, for a ``decreasing`` one, once the image is turned back by ``decreasing_forms``)."""
    flat = _flat(images)
    found = _within(flat, index, NEAR_COPY_PIXELS)
    forms = [flat, *decreasing_forms(flat)] if index.decreasing else [flat]
    for turned, form in enumerate(forms):
        for saturation, ranked in index.ranked.items():
            rest = np.flatnonzero(~found)
            if not len(rest):
                return found
            query = intensity_ranked(form[rest], saturation)
            if turned:  # an image's own inverted form is blank: never compared, or it would match a blank image
                inked = (query > 0).sum(axis=1) >= MIN_TURNED_INK
                rest, query = rest[inked], query[inked]
            found[rest] = _within(query, ranked, RANKED_COPY_PIXELS)
    return found
