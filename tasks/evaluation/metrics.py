"""Confusion and per-digit metrics: plain functions of labels and counts, shared by tables, plots and the gate."""

from __future__ import annotations

import numpy as np
import pandas as pd

from storage.tables import NUM_CLASSES

Z_95 = 1.959963984540054


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Counts with true labels as rows and predictions as columns. A label outside 0…``num_classes - 1`` is a
    ``ValueError`` naming it (readers of stored predictions refuse such frames before they get here:
    ``storage.tables.read_predictions``); counted as is, it would land in another cell or fail a reshape."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    for name, labels in (("true", y_true), ("predicted", y_pred)):
        outside = labels[(labels < 0) | (labels >= num_classes)]
        if outside.size:
            raise ValueError(
                f"a {name} label of {outside[0]} is not a class 0–{num_classes - 1}: these labels are not predictions "
                "of ours; read stored predictions with storage.tables.read_predictions, which refuses them"
            )
    flat = y_true * num_classes + y_pred
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def wilson_interval(successes: np.ndarray, trials: np.ndarray, z: float = Z_95) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval: honest near 0 and 1, where the normal approximation claims 100 % ± 0."""
    k = np.asarray(successes, dtype=float)
    n = np.asarray(trials, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = k / n
        denom = 1 + z**2 / n
        centre = (p + z**2 / (2 * n)) / denom
        half = z * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / denom
    # exact arithmetic puts p inside the interval; keep it there when rounding says 0.9999999 < 1.0
    return np.minimum(centre - half, p), np.maximum(centre + half, p)


def confusion_frame(cm: np.ndarray) -> pd.DataFrame:
    n = cm.shape[0]
    support = cm.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(support > 0, cm / support, 0.0)
    true, pred = np.divmod(np.arange(n * n), n)
    return pd.DataFrame(
        {
            "true_label": true.astype(np.int8),
            "predicted_label": pred.astype(np.int8),
            "count": cm.ravel().astype(np.int64),
            "share_of_true": share.ravel(),
        }
    )


def per_class_frame(cm: np.ndarray) -> pd.DataFrame:
    """Per digit: support, correct, accuracy (= recall) with its 95 % Wilson interval, precision, F1.

    Precision and F1 are null for a digit the model never predicted, rather than a made-up zero.
    """
    correct = np.diag(cm).astype(np.int64)
    support = cm.sum(axis=1).astype(np.int64)
    predicted = cm.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = correct / support
        precision = np.where(predicted > 0, correct / predicted, np.nan)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), np.nan)
    low, high = wilson_interval(correct, support)
    return pd.DataFrame(
        {
            "label": np.arange(cm.shape[0], dtype=np.int8),
            "support": support,
            "correct": correct,
            "accuracy": recall,
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "accuracy_ci_low": low,
            "accuracy_ci_high": high,
        }
    )


def recall_per_digit(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Recall of every digit (NaN for a digit absent from ``y_true``)."""
    cm = confusion_matrix(y_true, y_pred)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.diag(cm) / cm.sum(axis=1)
