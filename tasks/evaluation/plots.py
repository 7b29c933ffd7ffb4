"""The evaluation's figures: PNG plots with seaborn/matplotlib, rendered once per evaluation and cached.

Figures are built with ``matplotlib.figure.Figure`` rather than pyplot, so no global state is
shared between concurrent task runs and no display is ever needed.
"""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from pydantic import AliasChoices, BaseModel, Field

from storage import DamagedArtifact, Store, StoreError, StoreKey, StoreName, code_digest, sha256_bytes, sha256_json
from storage.tables import NUM_CLASSES, read_frame
from tasks.data.fetch import DatasetRef, load_mnist
from tasks.evaluation.evaluate import EvaluationRef
from tasks.evaluation.metrics import confusion_matrix, per_class_frame, wilson_interval
from tasks.training.loop import HISTORY_COLUMNS
from tasks.training.model import ModelRef

DIGITS = list(range(NUM_CLASSES))
MISTAKE = "#c0392b"
GALLERY_MAX = 24


def png_bytes(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def confusion_heatmap(cm: np.ndarray, drop_diagonal: bool = False) -> Figure:
    import seaborn as sns  # a second to import (scipy.stats): only when a figure is drawn, not on a cached rerun

    fig = Figure(figsize=(7.5, 6.2))
    ax = fig.subplots()
    mask = np.eye(NUM_CLASSES, dtype=bool) if drop_diagonal else None
    sns.heatmap(
        cm,
        mask=mask,
        annot=True,
        fmt="d",
        cmap="Reds" if drop_diagonal else "Blues",
        cbar=True,
        square=True,
        linewidths=0.5,
        linecolor="white",
        xticklabels=DIGITS,
        yticklabels=DIGITS,
        ax=ax,
        annot_kws={"size": 8},
    )
    ax.set_xlabel("predicted digit")
    ax.set_ylabel("true digit")
    errors = int(cm.sum() - np.trace(cm))
    title = (
        f"Mistakes only (diagonal removed): {errors} of {int(cm.sum())}"
        if drop_diagonal
        else f"Confusion matrix ({int(cm.sum())} images)"
    )
    ax.set_title(title)
    return fig


def per_class_accuracy(per_class: pd.DataFrame, balanced_accuracy: float) -> Figure:
    import seaborn as sns

    fig = Figure(figsize=(8, 4.2))
    ax = fig.subplots()
    acc = per_class["accuracy"].to_numpy()
    err = np.vstack([acc - per_class["accuracy_ci_low"], per_class["accuracy_ci_high"] - acc])
    colors = sns.color_palette("crest", NUM_CLASSES)
    ax.bar(per_class["label"], acc, color=colors, yerr=err, capsize=4, ecolor="#333")
    ax.axhline(balanced_accuracy, color="#555", ls="--", lw=1)
    low = float(np.nanmin(per_class["accuracy_ci_low"]))
    ax.set_ylim(max(0.0, low - 0.02), 1.002)
    ax.set_xticks(DIGITS)
    ax.set_xlabel("digit")
    ax.set_ylabel("accuracy (95 % Wilson interval)")
    ax.set_title(f"Per-digit accuracy on the balanced sample (dashed: balanced accuracy {balanced_accuracy:.4f})")
    return fig


def _image_grid(images: np.ndarray, captions: list[str], wrong: list[bool], title: str, columns: int) -> Figure:
    rows = max(1, int(np.ceil(len(images) / columns)))
    fig = Figure(figsize=(1.45 * columns, 1.7 * rows + 0.4))
    axes = np.atleast_1d(fig.subplots(rows, columns)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, image, caption, bad in zip(axes, images, captions, wrong):
        ax.imshow(image, cmap="gray_r", vmin=0, vmax=255)
        ax.set_title(caption, fontsize=9, color=MISTAKE if bad else "#1e5631", fontweight="bold" if bad else "normal")
        if bad:
            for spine in ax.spines.values():
                spine.set_visible(True)
                spine.set_color(MISTAKE)
                spine.set_linewidth(2)
            ax.axis("on")
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(title)
    return fig


def random_samples(predictions: pd.DataFrame, images: np.ndarray, seed: int, count: int = 10) -> Figure:
    rng = np.random.default_rng(seed)
    rows = predictions.iloc[np.sort(rng.choice(len(predictions), size=min(count, len(predictions)), replace=False))]
    wrong = (rows["true_label"] != rows["predicted_label"]).tolist()
    captions = [
        f"true {t} · pred {p}" + (" ✗" if w else "") for t, p, w in zip(rows["true_label"], rows["predicted_label"], wrong)
    ]
    return _image_grid(
        images[rows["test_index"].to_numpy()], captions, wrong, "Random evaluated images (red: mistake)", columns=5
    )


def most_confused(predictions: pd.DataFrame, cm: np.ndarray, images: np.ndarray) -> tuple[Figure, tuple[int, int] | None]:
    off = cm.copy()
    np.fill_diagonal(off, 0)
    if off.max() == 0:
        fig = Figure(figsize=(5, 1.5))
        ax = fig.subplots()
        ax.axis("off")
        ax.text(0.5, 0.5, "No misclassified images in the evaluation sample", ha="center", va="center")
        return fig, None
    true, pred = np.unravel_index(int(off.argmax()), off.shape)
    rows = predictions[(predictions["true_label"] == true) & (predictions["predicted_label"] == pred)].head(GALLERY_MAX)
    captions = [f"#{i} · {c:.0%}" for i, c in zip(rows["test_index"], rows["confidence"])]
    title = (
        f"Most confused pair: true {true} predicted as {pred} ({int(off[true, pred])} images; caption: test index · confidence)"
    )
    fig = _image_grid(images[rows["test_index"].to_numpy()], captions, [True] * len(rows), title, columns=min(8, len(rows)))
    return fig, (int(true), int(pred))


def training_curves(history: pd.DataFrame | None, problem: str = "") -> Figure:
    fig = Figure(figsize=(10, 3.8))
    if history is None:  # the model's stored history is damaged: the figure says so, the night goes on
        fig.text(0.5, 0.5, plot_text(f"Training curves unavailable: {problem}"[:200]), ha="center", va="center", wrap=True)
        return fig
    left, right = fig.subplots(1, 2)
    for ax, metric in ((left, "loss"), (right, "accuracy")):
        ax.plot(history["epoch"], history[metric], marker="o", label=f"training {metric}")
        ax.plot(history["epoch"], history[f"val_{metric}"], marker="s", label=f"validation {metric}")
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"Training curves ({len(history)} epochs, {history['seconds'].sum():.0f} s)")
    return fig


class PlotsRef(BaseModel):
    """The rendered PNGs of one evaluation: identical for every run that reuses that evaluation."""

    key: StoreName
    file_keys: dict[StoreName, StoreKey] = Field(validation_alias=AliasChoices("file_keys", "files"))  # figure name → key
    sha256: dict[StoreName, str]
    most_confused: tuple[int, int] | None


def plots_code() -> str:
    """The code that draws the figures, and the metrics they show; not the report's wording."""
    return code_digest(
        render_plots,
        png_bytes,
        confusion_heatmap,
        per_class_accuracy,
        _image_grid,
        random_samples,
        most_confused,
        training_curves,
        confusion_matrix,
        per_class_frame,
        wilson_interval,
        DIGITS,
        MISTAKE,
        GALLERY_MAX,
    )


def plots_key(model: ModelRef, evaluation: EvaluationRef) -> str:
    return sha256_json({"evaluation": evaluation.key, "history": model.key, "code": plots_code()})[:32]


def stored_plots(store: Store, key: str) -> PlotsRef | None:
    return store.load_ref(
        store.plots_file(key, "plots.json"), PlotsRef, lambda ref: {p: ref.sha256[n] for n, p in ref.file_keys.items()}
    )


MAX_EPOCHS = 10_000  # more rows than any training of ours has epochs: not our history


def _history(store: Store, model: ModelRef) -> pd.DataFrame:
    """The model's training history as our recorder writes it: numbers, one row an epoch; anything else (text where
    a figure belongs, a planted file) is ``DamagedArtifact``, so the curves are said unavailable, never a failed step."""
    history = read_frame(store, model.history_key, columns=HISTORY_COLUMNS)
    wrong = [c for c in HISTORY_COLUMNS if not pd.api.types.is_numeric_dtype(history[c])]
    if wrong or len(history) > MAX_EPOCHS:
        raise DamagedArtifact(
            f"{store.location(model.history_key)} is not a training history of ours: "
            + (f"the column(s) {', '.join(wrong)} hold no numbers" if wrong else f"{len(history)} epochs")
        )
    return history


def render_plots(store: Store, dataset: DatasetRef, model: ModelRef, evaluation: EvaluationRef) -> PlotsRef:
    """Render every figure of an evaluation into ``plots/<key>/``."""
    predictions = read_frame(store, evaluation.predictions_key, evaluation.predictions_sha256)
    try:
        history, problem = _history(store, model), ""
    except (DamagedArtifact, StoreError, OSError) as exc:
        history, problem = None, str(exc)
        store.warn(f"The training history of model {model.key} is damaged ({exc}): its curves are not drawn")
    images = load_mnist(store, dataset).x_test
    cm = confusion_matrix(predictions["true_label"].to_numpy(), predictions["predicted_label"].to_numpy())
    gallery, pair = most_confused(predictions, cm, images)
    figures = {
        "confusion.png": confusion_heatmap(cm),
        "confusion_mistakes.png": confusion_heatmap(cm, drop_diagonal=True),
        "per_class_accuracy.png": per_class_accuracy(per_class_frame(cm), evaluation.balanced_accuracy),
        "samples.png": random_samples(predictions, images, evaluation.seed),
        "most_confused.png": gallery,
        "training_curves.png": training_curves(history, problem),
    }
    key = plots_key(model, evaluation)
    files, digests = {}, {}
    for name, fig in figures.items():
        png = png_bytes(fig)
        files[name] = store.unique(store.plots_file(key, name))
        digests[name] = sha256_bytes(png)
        store.write_bytes(files[name], png)
    ref = PlotsRef(key=key, file_keys=files, sha256=digests, most_confused=pair)
    store.write_text(store.plots_file(key, "plots.json"), ref.model_dump_json(indent=2))
    return ref


def plot_text(value: object) -> str:
    """Text from outside (a run id read from a table, a sender's file name) as matplotlib shows it literally: a
    ``$`` would start mathtext, and mathtext it cannot parse makes drawing the whole figure fail."""
    return str(value).replace("$", r"\$")


def batch_drift(
    name: str,
    labels: np.ndarray,
    intensity: np.ndarray,
    reference_labels: np.ndarray,
    reference_intensity: np.ndarray,
    decision: str,
) -> Figure:
    """One incoming batch against MNIST's training set: its digits and its images' mean intensity."""
    fig = Figure(figsize=(9, 3.4))
    left, right = fig.subplots(1, 2)
    x = np.arange(NUM_CLASSES)
    for offset, values, label, colour in (
        (-0.2, reference_labels, "MNIST training set", "#999"),
        (0.2, labels, "this batch", "#2e86c1"),
    ):
        share = np.bincount(np.asarray(values, np.int64), minlength=NUM_CLASSES) / max(len(values), 1)
        left.bar(x + offset, share, width=0.4, color=colour, label=label)
    left.set_xticks(x)
    left.set_xlabel("digit")
    left.set_ylabel("share of images")
    left.legend(fontsize=7)
    bins = np.linspace(0, 1, 41)
    right.hist(reference_intensity, bins=bins, density=True, color="#999", alpha=0.6, label="MNIST training set")
    right.hist(intensity, bins=bins, density=True, color="#2e86c1", alpha=0.6, label="this batch")
    right.set_xlabel("mean intensity per image")
    right.legend(fontsize=7)
    title = plot_text(f"Batch {name}: {decision}")
    fig.suptitle(title, color=MISTAKE if decision != "accepted" else "#1e8449")
    return fig
