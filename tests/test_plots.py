"""Each plot renders to a valid PNG of sensible size, from hand-made predictions (no training needed)."""

import io

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest

from tasks.evaluate import predictions_frame
from tasks.plots import png_bytes, confusion_heatmap, most_confused, per_class_accuracy, random_samples, training_curves
from tasks.tabulate import confusion_matrix, per_class_frame

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
    history = pd.DataFrame({"epoch": [1, 2], "loss": [0.5, 0.2], "accuracy": [0.8, 0.9], "val_loss": [0.3, 0.25],
                            "val_accuracy": [0.88, 0.91], "seconds": [9.0, 8.5]})
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
