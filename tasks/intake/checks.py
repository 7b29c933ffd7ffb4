"""The checks a new batch passes before it can reach a model: leakage, drift and label quality.

Plain functions on arrays, no store: ``tasks/intake/ingest.py`` feeds them and records what they return.
Leakage is judged by near copies, not only by equal bytes, with ``tasks/data/near_copies.py`` (the search the
new-data slice uses too).
Each check gives numbers (recorded in the ``batches`` table whatever the decision) and, when a
threshold of ``IngestRules`` is crossed, one sentence saying which and by how much. Drift and
label-distribution tests need both significance and size: with thousands of images a shift too small
to matter is still "significant", and a large shift in a tiny batch may not be.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel
from scipy import stats

from tasks.intake.rules import IngestRules

INK = 128  # a pixel at or above half intensity is ink
REFERENCE_IMAGES = 10_000  # MNIST training images the image statistics are compared with (a fixed sample)


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
    # Per label 0–9: the confident disagreements, and what the champion's own rate on selection images of that digit
    # explains (its upper bound, ``explained_rates``, times the confident images with that label). Summed over a
    # night's, or a source's, batches they say how many disagreements no rate and no chance explains
    # (``unexplained_disagreements``): the figure ``max_excess_disagreements`` caps.
    disagreements_by_label: list[int] | None = None
    explained_by_label: list[float] | None = None
    unexplained_disagreements: float | None = None  # for this batch alone


# ---- how many confident disagreements the champion's own rates explain, measured on 2026-12-07 --------------------
# bench/label_caps.py: a 1-epoch seed champion confidently disagrees with 0.61 % of the selection split's labels and
# with 1.12 % of clean deformed digits (tasks/data/deformed.py), 1.5–4 times its own rate per digit. A cap on the
# count beyond the own rate (as before) is crossed by honest data alone once enough of it is judged: 15 000 clean
# deformed digits a night carry some 60 such disagreements. So a group's disagreements are compared per label with
#   (1 + disagreement_tolerance) × explained + EXPLAINED_SD × √explained,
# where explained uses the champion's rate on the selection images of that digit at its upper RATE_CONFIDENCE bound
# (500 images a digit say a rate of 0.5 % only to within a factor of 2), and what is beyond, summed over the digits,
# is what max_excess_disagreements caps: a binomial bound that grows with the images judged, plus an absolute floor.
RATE_CONFIDENCE = 0.99
EXPLAINED_SD = 3.0
DIGITS = 10


def explained_rates(labels: np.ndarray, predicted: np.ndarray, confidence: np.ndarray, threshold: float) -> np.ndarray | None:
    """Per digit 0–9: the upper ``RATE_CONFIDENCE`` bound (Poisson) of the champion's confident disagreement rate on
    the selection images of that digit. None when it is confident about none of them (nothing to compare with)."""
    confident = np.asarray(confidence) >= threshold
    if not confident.any():
        return None
    truth = np.asarray(labels, np.int64)[confident]
    wrong = np.bincount(truth[np.asarray(predicted)[confident] != truth], minlength=DIGITS)[:DIGITS]
    judged = np.bincount(truth, minlength=DIGITS)[:DIGITS]
    upper = stats.chi2.ppf(RATE_CONFIDENCE, 2 * (wrong + 1)) / 2  # the Poisson upper bound of ``wrong``
    return np.minimum(1.0, upper / np.maximum(judged, 1))


def unexplained_disagreements(disagreements: np.ndarray, explained: np.ndarray, tolerance: float) -> float:
    """Confident disagreements beyond what the champion's own rates and chance explain, summed over the digits:
    per label, what exceeds ``(1 + tolerance) × explained + EXPLAINED_SD × √explained``. Inputs are per label sums
    over any group of batches (one batch, a night, a source), so the bound grows with the images judged."""
    disagreements = np.asarray(disagreements, np.float64)
    explained = np.asarray(explained, np.float64)
    allowed = (1.0 + tolerance) * explained + EXPLAINED_SD * np.sqrt(explained)
    return round(float(np.maximum(0.0, disagreements - allowed).sum()), 6)  # 50.000000001 is 50


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
    rate and as a count: a few per cent of a large batch is thousands of wrong labels, each one trained on. The
    count is what the champion's per-digit rates and chance do not explain (``unexplained_disagreements``), so it
    does not grow with the size of an honest batch."""
    labels = np.asarray(labels, np.int64)
    confident = np.asarray(confidence) >= rules.confident_probability
    confident_images = int(confident.sum())
    wrong = confident & (np.asarray(predicted) != labels)
    disagreeing = int(wrong.sum())
    figures = LabelFigures(
        disagreement=float((np.asarray(predicted) != labels).mean()),
        confident_disagreement=confident_disagreement(labels, predicted, confidence, rules.confident_probability),
        champion_confident_disagreement=confident_disagreement(
            selection_labels, selection_predicted, selection_confidence, rules.confident_probability
        ),
        confident_images=confident_images,
    )
    batch, own = figures.confident_disagreement, figures.champion_confident_disagreement
    rates = explained_rates(selection_labels, selection_predicted, selection_confidence, rules.confident_probability)
    if batch is None or own is None or rates is None:
        return figures, []
    figures.excess_disagreements = round(disagreeing - own * confident_images, 6)  # 50.000000001 is 50
    by_label = np.bincount(labels[wrong], minlength=DIGITS)[:DIGITS]
    explained = rates * np.bincount(labels[confident], minlength=DIGITS)[:DIGITS]
    figures.disagreements_by_label = [int(v) for v in by_label]
    figures.explained_by_label = [round(float(v), 6) for v in explained]
    figures.unexplained_disagreements = unexplained_disagreements(by_label, explained, rules.disagreement_tolerance)
    crossed = []
    if batch - own > rules.max_disagreement_excess:
        crossed.append(f"{batch - own:.1%} more often, more than the {rules.max_disagreement_excess:.1%} allowed")
    if figures.unexplained_disagreements > rules.max_excess_disagreements:
        crossed.append(
            f"{figures.unexplained_disagreements:.0f} times more than its per-digit rates and chance explain, more than "
            f"the {rules.max_excess_disagreements} a batch may carry whatever its size"
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
