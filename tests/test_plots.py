"""Each plot renders to a valid PNG of sensible size, from hand-made predictions (no training needed)."""

import io
from datetime import UTC

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest

from tasks.evaluation.evaluate import predictions_frame
from tasks.evaluation.metrics import confusion_matrix, per_class_frame
from tasks.evaluation.plots import (
    confusion_heatmap,
    most_confused,
    per_class_accuracy,
    png_bytes,
    random_samples,
    training_curves,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def evaluated():
    rng = np.random.default_rng(0)
    true = np.repeat(np.arange(10), 20)
    logits = np.eye(10)[true] * 3 + rng.normal(size=(len(true), 10))
    probs = (np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)).astype(np.float32)
    predictions = predictions_frame(np.arange(len(true)), true, probs)
    images = rng.integers(0, 256, (len(true), 28, 28), dtype=np.uint8)
    cm = confusion_matrix(true, predictions["predicted_label"].to_numpy())
    return predictions, images, cm


def decode(png: bytes) -> np.ndarray:
    assert png.startswith(PNG_SIGNATURE)
    return mpimg.imread(io.BytesIO(png), format="png")


def test_every_plot_is_a_decodablepng_bytes(evaluated):
    predictions, images, cm = evaluated
    history = pd.DataFrame(
        {
            "epoch": [1, 2],
            "loss": [0.5, 0.2],
            "accuracy": [0.8, 0.9],
            "val_loss": [0.3, 0.25],
            "val_accuracy": [0.88, 0.91],
            "seconds": [9.0, 8.5],
        }
    )
    figures = [
        confusion_heatmap(cm),
        confusion_heatmap(cm, drop_diagonal=True),
        per_class_accuracy(per_class_frame(cm), 0.9),
        random_samples(predictions, images, seed=0),
        most_confused(predictions, cm, images)[0],
        training_curves(history),
    ]
    for fig in figures:
        pixels = decode(png_bytes(fig))
        assert pixels.shape[0] > 100 and pixels.shape[1] > 300
        assert pixels[..., :3].std() > 0.05  # not a blank canvas


def test_most_confused_pair_is_the_largest_off_diagonal_cell(evaluated):
    predictions, images, _ = evaluated
    true = predictions["true_label"].to_numpy().copy()
    pred = true.copy()
    pred[:7] = 4  # seven zeros predicted as four
    pred[25:27] = 9  # two ones predicted as nine
    frame = predictions.assign(predicted_label=pred.astype(np.int8))
    cm = confusion_matrix(true, pred)
    _, pair = most_confused(frame, cm, images)
    assert pair == (0, 4)


def test_a_perfect_model_still_gets_a_gallery_image(evaluated):
    predictions, images, _ = evaluated
    perfect = predictions.assign(predicted_label=predictions["true_label"])
    fig, pair = most_confused(perfect, confusion_matrix(perfect["true_label"], perfect["predicted_label"]), images)
    assert pair is None
    decode(png_bytes(fig))


def test_report_figures_render_with_and_without_a_champion():
    from datetime import datetime, timedelta

    from tasks.champion.gate import compare
    from tasks.champion.promotion import Champion, GateRef
    from tasks.publish.report import champion_vs_challenger, nightly_trend

    y = np.repeat(np.arange(10), 50)
    champion_pred, challenger_pred = y.copy(), y.copy()
    champion_pred[:5] = 1
    challenger_pred[50:60] = 2
    cmp = compare(y, np.arange(len(y)), challenger_pred, champion_pred)
    start = datetime(2026, 11, 20, 2, tzinfo=UTC)
    champion = Champion(
        model_key="a" * 32,
        sha256="0" * 64,
        run_id="run-1",
        balanced_accuracy=0.99,
        test_accuracy=0.99,
        promoted_at=start,
        reason="first champion",
    )
    for comparison, before in ((cmp, champion), (None, None)):
        gate = GateRef(
            run_id="run-2",
            challenger_model_key="b" * 32,
            decision="rejected",
            reason="r",
            forced=False,
            comparison=comparison,
            challenger_recall=[0.9] * 10,
            champion_before=before,
            champion_after=before,
            pointer_problem=None,
            row={},
        )
        assert decode(png_bytes(champion_vs_challenger(gate)))[..., :3].std() > 0.05
    runs = pd.DataFrame(
        {
            "run_id": [f"run-{i}" for i in range(5)],
            "finished_at": [start + timedelta(days=i) for i in range(5)],
            "test_balanced_accuracy": [0.990, 0.985, 0.992, 0.991, 0.993],
            "selection_balanced_accuracy": [None, 0.984, 0.989, 0.990, 0.992],  # run-3: rejected above the champion
            "n_per_class": [800] * 5,
            "promoted": pd.array([None, True, True, False, True], dtype="boolean"),  # the first night predates the gate
            "model_key": [None, "m1", "m2", "m3", "m4"],
            "champion_after_model_key": [None, "m1", "m2", "m2", "m4"],
        }
    )
    pixels = decode(png_bytes(nightly_trend(runs, current_run="run-3")))
    assert pixels.shape[1] > 600 and pixels[..., :3].std() > 0.05
