"""The evaluation's figures: PNG plots with seaborn/matplotlib, rendered once per evaluation and cached.

Figures are built with ``matplotlib.figure.Figure`` rather than pyplot, so no global state is
shared between concurrent task runs and no display is ever needed.
"""

from __future__ import annotations

import io
from typing import Annotated

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from pydantic import AliasChoices, BaseModel, Field, model_validator

from storage import DamagedArtifact, Digest, Store, StoreError, StoreKey, StoreName, code_digest, sha256_bytes, sha256_json
from storage.tables import NUM_CLASSES, read_frame, read_predictions
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


# Every figure ``render_plots`` writes, by file name: a plots reference names exactly these
FIGURES = (
    "confusion.png",
    "confusion_mistakes.png",
    "per_class_accuracy.png",
    "samples.png",
    "most_confused.png",
    "training_curves.png",
)
Digit = Annotated[int, Field(ge=0, le=NUM_CLASSES - 1)]


class PlotsRef(BaseModel):
    """The rendered PNGs of one evaluation: identical for every run that reuses that evaluation.

    Loading one hashes each file it names, in the flow's process, and the report reads each into memory: so it names
    exactly the ``FIGURES`` this code renders, each with its digest. A reference naming more (7 000 hard links to a
    128 MiB file, review 8) or other files is damaged: a miss, and the figures are rendered again."""

    key: StoreName
    file_keys: dict[StoreName, StoreKey] = Field(
        validation_alias=AliasChoices("file_keys", "files"), max_length=len(FIGURES)
    )  # figure name → key
    sha256: dict[StoreName, Digest] = Field(max_length=len(FIGURES))
    most_confused: tuple[Digit, Digit] | None

    @model_validator(mode="after")
    def _our_figures(self) -> PlotsRef:
        if set(self.file_keys) != set(FIGURES) or set(self.sha256) != set(FIGURES):
            raise ValueError(f"it does not name exactly the figures {', '.join(FIGURES)}, each with its digest")
        return self


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
        curves_png,
        _history,
        history_problem,
        HISTORY_RANGES,
        MAX_EPOCHS,
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
# What an epoch of ours records: a cross-entropy Keras clips at -log(1e-7), about 16 (a million leaves room for any
# loss we might train with, and is far below what breaks drawing: 1e308 overflows matplotlib's tick arithmetic);
# accuracies are shares; an epoch lasts less than a night's 23 hours.
HISTORY_RANGES = {
    "loss": (0.0, 1e6),
    "val_loss": (0.0, 1e6),
    "accuracy": (0.0, 1.0),
    "val_accuracy": (0.0, 1.0),
    "seconds": (0.0, 1e6),
}


def _history(store: Store, model: ModelRef) -> pd.DataFrame:
    """The model's training history as our recorder writes it: numbers, one row an epoch (1, 2, 3, …), each value
    finite and in its range (``HISTORY_RANGES``); anything else (text where a figure belongs, a planted file, a loss
    of 1e308) is ``DamagedArtifact``, so the curves are said unavailable, never a failed step."""
    history = read_frame(store, model.history_key, columns=HISTORY_COLUMNS)
    problem = history_problem(history)
    if problem:
        raise DamagedArtifact(f"{store.location(model.history_key)} is not a training history of ours: {problem}")
    return history


def history_problem(history: pd.DataFrame) -> str:
    """What in a training history no training of ours records, in words ("" when nothing)."""
    wrong = [c for c in HISTORY_COLUMNS if not pd.api.types.is_numeric_dtype(history[c].dtype)]
    if history.columns.duplicated().any():
        return "a column is named twice"
    if wrong:
        return f"the column(s) {', '.join(wrong)} hold no numbers"
    if len(history) > MAX_EPOCHS:
        return f"{len(history)} epochs"
    if not np.array_equal(history["epoch"].to_numpy(), np.arange(1, len(history) + 1)):
        return "its epochs are not 1, 2, 3, … one row each"
    for name, (low, high) in HISTORY_RANGES.items():
        values = history[name].to_numpy(np.float64)
        if not np.isfinite(values).all():
            return f"{name} holds a NaN or an infinity"
        if len(values) and (values.min() < low or values.max() > high):
            return f"{name} runs from {values.min():.4g} to {values.max():.4g}, outside [{low:g}, {high:g}]"
    return ""


def curves_png(store: Store, model: ModelRef) -> bytes:
    """The training-curves figure, drawn inside its own failure boundary: a history that fails ``_history``'s checks,
    or that matplotlib cannot draw for any other reason, gives the figure that says the curves are unavailable (and
    one warning), never a failed plot step. Drawing happens at ``savefig``, so the PNG is made inside the ``try``."""
    try:
        return png_bytes(training_curves(_history(store, model)))
    except Exception as exc:  # noqa: BLE001 (store content drawn: whatever reading or drawing raises, this figure only)
        damaged = isinstance(exc, (DamagedArtifact, StoreError, OSError))  # the file: unreadable, or not a history of ours
        problem = str(exc) if damaged else f"it cannot be drawn ({type(exc).__name__}: {exc})"
        store.warn(f"The training history of model {model.key} is damaged ({problem}): its curves are not drawn")
        return png_bytes(training_curves(None, problem))


def render_plots(store: Store, dataset: DatasetRef, model: ModelRef, evaluation: EvaluationRef) -> PlotsRef:
    """Render every figure of an evaluation into ``plots/<key>/``. The predictions are checked value by value
    (``read_predictions``: the evaluate step re-made an evaluation whose files fail that check, so they pass here
    unless a writer changed them since); the training history is the model's, read without a digest, so its figure
    is drawn inside its own failure boundary (``curves_png``)."""
    images = load_mnist(store, dataset).x_test
    predictions = read_predictions(store, evaluation.predictions_key, evaluation.predictions_sha256, len(images))
    cm = confusion_matrix(predictions["true_label"].to_numpy(), predictions["predicted_label"].to_numpy())
    gallery, pair = most_confused(predictions, cm, images)
    figures = {
        "confusion.png": confusion_heatmap(cm),
        "confusion_mistakes.png": confusion_heatmap(cm, drop_diagonal=True),
        "per_class_accuracy.png": per_class_accuracy(per_class_frame(cm), evaluation.balanced_accuracy),
        "samples.png": random_samples(predictions, images, evaluation.seed),
        "most_confused.png": gallery,
    }
    pngs = {name: png_bytes(fig) for name, fig in figures.items()} | {"training_curves.png": curves_png(store, model)}
    key = plots_key(model, evaluation)
    files, digests = {}, {}
    for name, png in pngs.items():
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
