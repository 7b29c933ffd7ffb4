"""The checks a new batch passes before it can reach a model: leakage, drift and label quality.

Plain functions on arrays, no store: ``tasks/intake/ingest.py`` feeds them and records what they return.
Each check gives numbers (recorded in the ``batches`` table whatever the decision) and, when a
threshold of ``IngestRules`` is crossed, one sentence saying which and by how much. Drift and
label-distribution tests need both significance and size: with thousands of images a shift too small
to matter is still "significant", and a large shift in a tiny batch may not be.
"""

from __future__ import annotations

import hashlib

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy import stats

INK = 128  # a pixel at or above half intensity is ink
REFERENCE_IMAGES = 10_000  # MNIST training images the image statistics are compared with (a fixed sample)


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
        description="Exact copies of MNIST test images or of the selection split are always dropped; "
        "a batch with more than this share of them is quarantined (0–1).",
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
    min_batch_images: int = Field(
        20,
        ge=1,
        le=100_000,
        title="Smallest batch",
        description="A batch with fewer images, once repeats and leaked copies are dropped, is quarantined: "
        "its label and image statistics would say nothing.",
    )
    holdout_share: float = Field(
        0.2,
        gt=0.0,
        lt=1.0,
        title="New-data holdout share",
        description="Of each accepted batch, this stratified share joins the new-data holdout and is never trained on.",
    )


def image_hashes(images: np.ndarray) -> np.ndarray:
    """One digest per image, of its 784 bytes: equal images, equal digests."""
    flat = np.ascontiguousarray(np.asarray(images, dtype=np.uint8).reshape(len(images), 28 * 28))
    return np.array([hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in flat], dtype=object)


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
    selection split's (correct) labels: far more often means the labels, not the model, are wrong."""
    figures = LabelFigures(
        disagreement=float((np.asarray(predicted) != np.asarray(labels)).mean()),
        confident_disagreement=confident_disagreement(labels, predicted, confidence, rules.confident_probability),
        champion_confident_disagreement=confident_disagreement(
            selection_labels, selection_predicted, selection_confidence, rules.confident_probability
        ),
    )
    problems = []
    batch, own = figures.confident_disagreement, figures.champion_confident_disagreement
    if batch is not None and own is not None and batch - own > rules.max_disagreement_excess:
        problems.append(
            f"likely mislabelled: the champion confidently disagrees with {batch:.1%} of its labels, against {own:.1%} "
            f"on the selection split (allowed excess {rules.max_disagreement_excess:.1%})"
        )
    return figures, problems


def holdout_rows(labels: np.ndarray, share: float, digest: str) -> np.ndarray:
    """A stratified ``share`` of the rows, drawn from the batch's digest: the same batch, the same holdout."""
    rng = np.random.default_rng(int(digest[:16], 16))
    labels = np.asarray(labels, np.int64)
    chosen = []
    for digit in np.unique(labels):
        rows = np.flatnonzero(labels == digit)
        chosen.append(rng.choice(rows, size=int(round(share * len(rows))), replace=False))
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)
