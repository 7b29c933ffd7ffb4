"""Confusion and per-digit metrics against a case small enough to compute by hand."""

import numpy as np
import pytest

from tasks.evaluation.metrics import confusion_frame, confusion_matrix, per_class_frame, wilson_interval

# 3 classes, 10 samples. true 0: 0,0,0,1   true 1: 1,1,2   true 2: 2,2,0
Y_TRUE = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
Y_PRED = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 0])


def test_confusion_matrix_by_hand():
    cm = confusion_matrix(Y_TRUE, Y_PRED, num_classes=3)
    np.testing.assert_array_equal(cm, [[3, 1, 0], [0, 2, 1], [1, 0, 2]])


def test_confusion_frame_has_every_pair_with_zeros_and_row_shares():
    frame = confusion_frame(confusion_matrix(Y_TRUE, Y_PRED, num_classes=3))
    assert len(frame) == 9
    row = frame[(frame.true_label == 0) & (frame.predicted_label == 1)].iloc[0]
    assert row["count"] == 1 and row["share_of_true"] == pytest.approx(0.25)
    assert frame[(frame.true_label == 1) & (frame.predicted_label == 0)]["count"].item() == 0
    np.testing.assert_allclose(frame.groupby("true_label")["share_of_true"].sum(), 1.0)


def test_per_class_metrics_by_hand():
    frame = per_class_frame(confusion_matrix(Y_TRUE, Y_PRED, num_classes=3)).set_index("label")
    # class 0: support 4, correct 3, predicted 4 (3 + one from class 2)
    assert frame.loc[0, "support"] == 4 and frame.loc[0, "correct"] == 3
    assert frame.loc[0, "accuracy"] == pytest.approx(0.75)
    assert frame.loc[0, "recall"] == pytest.approx(0.75)
    assert frame.loc[0, "precision"] == pytest.approx(0.75)
    # class 1: correct 2 of 3, predicted 3 times (two right, one from class 0)
    assert frame.loc[1, "precision"] == pytest.approx(2 / 3)
    assert frame.loc[1, "f1"] == pytest.approx(2 / 3)
    # class 2: correct 2 of 3, predicted 3 times (2 right, 1 from class 1)
    assert frame.loc[2, "f1"] == pytest.approx(2 * (2 / 3) * (2 / 3) / (4 / 3))


def test_precision_is_null_for_a_digit_never_predicted():
    frame = per_class_frame(confusion_matrix(np.array([0, 1]), np.array([0, 0]), num_classes=2))
    assert np.isnan(frame.loc[1, "precision"]) and np.isnan(frame.loc[1, "f1"])
    assert frame.loc[1, "accuracy"] == 0.0


def test_wilson_interval_matches_the_textbook_values():
    # 8 of 10: Wilson 95 % interval is (0.4902, 0.9433) to four places
    low, high = wilson_interval(np.array([8]), np.array([10]))
    assert low[0] == pytest.approx(0.4902, abs=1e-4) and high[0] == pytest.approx(0.9433, abs=1e-4)
    # all correct still leaves room below 1
    low, high = wilson_interval(np.array([800]), np.array([800]))
    assert high[0] == pytest.approx(1.0) and 0.99 < low[0] < 1.0


def test_wilson_interval_always_contains_the_observed_rate():
    k = np.arange(0, 31)
    low, high = wilson_interval(k, np.full_like(k, 30))
    p = k / 30
    assert np.all(low <= p) and np.all(p <= high) and low[0] == 0.0 and high[-1] == 1.0


def test_a_label_outside_the_classes_is_named_not_counted_in_another_cell():
    """Review 7 (f5): a predicted label of 120 made ``bincount`` longer than 10 × 10 and the reshape failed with a
    message naming neither the label nor the cause (and a label of 12 with 3 classes would land in another cell)."""
    with pytest.raises(ValueError, match="a predicted label of 120 is not a class 0–9"):
        confusion_matrix(np.array([0, 1]), np.array([0, 120]))
    with pytest.raises(ValueError, match="a true label of -1 is not a class 0–2"):
        confusion_matrix(np.array([-1, 1]), np.array([0, 1]), num_classes=3)
