"""The gate's rules and its paired test, on hand-made predictions (no training needed)."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.champion.gate import GateRules, compare, decide, mcnemar_exact
from tests.conftest import reference_mcnemar


@pytest.mark.parametrize(
    "b, c", [(0, 0), (1, 0), (0, 5), (3, 3), (10, 2), (2, 10), (25, 40), (58, 1141), (2046, 380), (400, 401)]
)
def test_mcnemar_exact_matches_the_binomial_reference(b, c):
    assert mcnemar_exact(b, c) == pytest.approx(reference_mcnemar(b, c), rel=1e-9, abs=1e-300)


def test_mcnemar_is_symmetric_and_textbook():
    assert mcnemar_exact(10, 2) == mcnemar_exact(2, 10)
    # b=10, c=2: 2 * P(X <= 2 | n=12) = 2 * 79 / 4096
    assert mcnemar_exact(10, 2) == pytest.approx(2 * 79 / 4096)
    with pytest.raises(ValueError, match="non-negative"):
        mcnemar_exact(-1, 3)


def labels_with(accuracy_by_digit: list[float], per_digit: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Test labels and predictions that are right on the first ``accuracy * per_digit`` images of each digit."""
    y = np.repeat(np.arange(10), per_digit)
    pred = y.copy()
    for d, acc in enumerate(accuracy_by_digit):
        wrong = np.flatnonzero(y == d)[int(round(acc * per_digit)) :]
        pred[wrong] = (d + 1) % 10
    return y, pred


def test_compare_counts_discordant_pairs_and_the_worst_digit():
    y, champion = labels_with([0.99] * 10)
    _, challenger = labels_with([0.99] * 5 + [0.90] + [0.99] * 4)
    sample = np.arange(len(y))
    cmp = compare(y, sample, challenger, champion)
    assert (cmp.mcnemar_b, cmp.mcnemar_c) == (9, 0)  # nine fives only the champion gets right
    assert cmp.worst_digit == 5 and cmp.worst_digit_drop == pytest.approx(0.09)
    assert cmp.champion_balanced_accuracy == pytest.approx(0.99) and cmp.challenger_balanced_accuracy == pytest.approx(0.981)
    assert cmp.significantly_worse and not cmp.significantly_better
    with pytest.raises(ValueError, match="different test sets"):
        compare(y, sample, challenger[:-1], champion)


def test_the_balanced_sample_is_what_balanced_accuracy_and_recall_use():
    y, champion = labels_with([1.0] * 10)
    _, challenger = labels_with([0.5] + [1.0] * 9)
    not_zeros = np.flatnonzero(y != 0)
    cmp = compare(y, not_zeros, challenger, champion)
    assert cmp.challenger_balanced_accuracy == 1.0 and cmp.mcnemar_b == 50  # the paired test still sees every image
    assert np.isnan(cmp.challenger_recall[0])


RULES = GateRules()


def comparison(champion_acc: list[float], challenger_acc: list[float]):
    y, champion = labels_with(champion_acc)
    _, challenger = labels_with(challenger_acc)
    return compare(y, np.arange(len(y)), challenger, champion)


def test_first_model_needs_only_the_floor():
    assert decide(0.99, None, RULES).promoted
    refused = decide(0.97, None, RULES)
    assert not refused.promoted and "below the floor 0.9800" in refused.reason


def test_each_rule_rejects_on_its_own():
    same = [0.99] * 10
    # a regression of 0.001 with max_regression 0
    cmp = comparison(same, [0.99] * 9 + [0.98])
    decision = decide(cmp.challenger_balanced_accuracy, cmp, RULES)
    assert not decision.promoted and "below the champion's" in decision.reason and "McNemar" not in decision.reason
    assert decide(cmp.challenger_balanced_accuracy, cmp, GateRules(max_regression=0.01)).promoted
    # one digit falls by 0.02 while the mean improves
    cmp = comparison(same, [1.0] * 9 + [0.97])
    decision = decide(cmp.challenger_balanced_accuracy, cmp, RULES)
    assert not decision.promoted and "digit 9's recall fell by 0.0200" in decision.reason
    assert decide(cmp.challenger_balanced_accuracy, cmp, GateRules(max_digit_drop=0.05)).promoted


def test_significantly_worse_is_never_promoted_even_within_the_thresholds():
    cmp = comparison([0.99] * 10, [0.99] * 5 + [0.90] + [0.99] * 4)
    lenient = GateRules(min_balanced_accuracy=0.0, max_regression=1.0, max_digit_drop=1.0)
    decision = decide(cmp.challenger_balanced_accuracy, cmp, lenient)
    assert not decision.promoted and "significantly worse" in decision.reason


def test_an_equal_model_passes_and_says_no_significant_difference():
    cmp = comparison([0.99] * 10, [0.99] * 10)
    decision = decide(cmp.challenger_balanced_accuracy, cmp, RULES)
    assert decision.promoted and "no significant difference" in decision.reason


def test_force_promotes_and_records_what_the_rules_said():
    cmp = comparison([0.99] * 10, [0.5] * 10)
    decision = decide(cmp.challenger_balanced_accuracy, cmp, GateRules(force_promote=True))
    assert decision.promoted and decision.forced and decision.reason.startswith("forced by the operator")
    assert "significantly worse" in decision.reason


def test_nothing_is_promoted_on_a_comparison_that_could_not_be_made():
    decision = decide(0.999, None, RULES, unavailable="the champion's model file is missing")
    assert not decision.promoted and "no comparison could be made" in decision.reason


def test_the_per_digit_rule_is_not_applied_on_too_few_images_and_says_so():
    y = np.repeat(np.arange(10), 30)
    champion = y.copy()
    challenger = y.copy()
    challenger[np.flatnonzero(y == 3)[:3]] = 4  # three of digit 3's 30 images lost: a drop of 0.1, not significant
    few = compare(y, np.arange(len(y)), challenger, champion, min_support=200)
    assert few.worst_digit is None and few.worst_digit_drop is None
    lenient = GateRules(min_balanced_accuracy=0.0, max_regression=1.0, min_digit_images=200)
    reason = decide(few.challenger_balanced_accuracy, few, lenient).reason
    assert "per-digit rule not applied (no digit has 200 images)" in reason and "digit 0" not in reason
    enough = compare(y, np.arange(len(y)), challenger, champion, min_support=30)
    assert enough.worst_digit == 3 and enough.worst_digit_drop == pytest.approx(0.1)
