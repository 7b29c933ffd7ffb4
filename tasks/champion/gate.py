"""The champion gate's rules: does the night's model (the challenger) replace the one in use?

Both models are compared on the *same images*, slice by slice: the fixed ``mnist-selection`` split of
MNIST's training images and, once batches were accepted, the ``new-data`` holdout (``tasks.data.splits``).
The test set is never one of them: it only reports. Every rule applies to each deciding slice: the
floor, the regression, the per-digit drop and the paired McNemar test. A difference in accuracy
between two classifiers on one set is only evidence if it survives a paired test (Dietterich 1998):
the exact McNemar test looks only at the images the two models disagree on.

Plain functions on predictions: no store, no Keras, no Prefect.
"""

from __future__ import annotations

import math
from enum import Enum

import numpy as np
from pydantic import BaseModel

from tasks.champion.rules import GateRules
from tasks.evaluation.metrics import recall_per_digit

ALPHA = 0.05  # two-sided significance level of the paired test


class Comparison(BaseModel):
    """Challenger and champion on the same images."""

    challenger_balanced_accuracy: float
    champion_balanced_accuracy: float
    challenger_test_accuracy: float
    champion_test_accuracy: float
    challenger_recall: list[float]  # per digit, on the balanced sample
    champion_recall: list[float]
    n_sample: int
    n_test: int
    mcnemar_b: int  # images only the champion gets right
    mcnemar_c: int  # images only the challenger gets right
    mcnemar_p: float
    worst_digit: int | None  # None: no digit had enough images for the per-digit rule
    worst_digit_drop: float | None  # champion's recall minus challenger's, on the digit where that is largest

    @property
    def significantly_worse(self) -> bool:
        return self.mcnemar_p < ALPHA and self.mcnemar_b > self.mcnemar_c

    @property
    def significantly_better(self) -> bool:
        return self.mcnemar_p < ALPHA and self.mcnemar_c > self.mcnemar_b


class Decision(BaseModel):
    promoted: bool
    forced: bool
    reason: str
    unchanged: bool = False  # the challenger already is the champion: the pointer stays, and it is no promotion

    @property
    def name(self) -> str:
        return "unchanged" if self.unchanged else "promoted" if self.promoted else "rejected"


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: under H0 the b + c discordant images split like fair coin flips.

    Summed in log space, so 10 000 discordant pairs neither overflow nor underflow.
    """
    if b < 0 or c < 0:
        raise ValueError(f"McNemar counts must be non-negative, got b={b}, c={c}")
    n, k = b + c, min(b, c)
    if n == 0 or 2 * k == n:
        return 1.0
    log_terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2) for i in range(k + 1)]
    top = max(log_terms)
    tail = math.exp(top) * sum(math.exp(t - top) for t in log_terms)
    return min(1.0, 2.0 * tail)


def compare(
    y_test: np.ndarray, sample: np.ndarray, challenger: np.ndarray, champion: np.ndarray, min_support: int = 1
) -> Comparison:
    """Pair two models' predicted labels for every image of a slice; ``sample`` indexes the images balanced
    accuracy and recall are read on (the whole slice for a deciding slice). Digits with fewer than
    ``min_support`` images there are left out of the per-digit drop."""
    y_test, challenger, champion = (np.asarray(a, dtype=np.int64) for a in (y_test, challenger, champion))
    if not (len(y_test) == len(challenger) == len(champion)):
        raise ValueError(
            f"cannot pair predictions of different test sets: {len(y_test)} labels, "
            f"{len(challenger)} challenger and {len(champion)} champion predictions"
        )
    new_right, old_right = challenger == y_test, champion == y_test
    b = int((old_right & ~new_right).sum())
    c = int((new_right & ~old_right).sum())
    new_recall = recall_per_digit(y_test[sample], challenger[sample])
    old_recall = recall_per_digit(y_test[sample], champion[sample])
    support = np.bincount(y_test[sample], minlength=len(new_recall))[: len(new_recall)]
    drops = np.where(support >= min_support, old_recall - new_recall, np.nan)
    judged = not np.isnan(drops).all()  # else no digit has enough images: the per-digit rule does not apply
    worst = int(np.nanargmax(drops)) if judged else None
    return Comparison(
        challenger_balanced_accuracy=float(np.nanmean(new_recall)),
        champion_balanced_accuracy=float(np.nanmean(old_recall)),
        challenger_test_accuracy=float(new_right.mean()),
        champion_test_accuracy=float(old_right.mean()),
        challenger_recall=new_recall.tolist(),
        champion_recall=old_recall.tolist(),
        n_sample=len(sample),
        n_test=len(y_test),
        mcnemar_b=b,
        mcnemar_c=c,
        mcnemar_p=mcnemar_exact(b, c),
        worst_digit=worst,
        worst_digit_drop=float(drops[worst]) if judged else None,
    )


def _failures(balanced_accuracy: float, comparison: Comparison | None, rules: GateRules) -> list[str]:
    failed = []
    if balanced_accuracy < rules.min_balanced_accuracy:
        failed.append(f"balanced accuracy {balanced_accuracy:.4f} is below the floor {rules.min_balanced_accuracy:.4f}")
    if comparison is None:
        return failed
    cmp = comparison
    regression = cmp.champion_balanced_accuracy - cmp.challenger_balanced_accuracy
    if regression > rules.max_regression + 1e-12:
        failed.append(
            f"balanced accuracy {cmp.challenger_balanced_accuracy:.4f} is {regression:.4f} below the champion's "
            f"{cmp.champion_balanced_accuracy:.4f} (allowed: {rules.max_regression:.4f})"
        )
    if cmp.worst_digit_drop is not None and cmp.worst_digit_drop > rules.max_digit_drop + 1e-12:
        d = cmp.worst_digit
        failed.append(
            f"digit {d}'s recall fell by {cmp.worst_digit_drop:.4f} ({cmp.challenger_recall[d]:.4f} against the champion's "
            f"{cmp.champion_recall[d]:.4f}; allowed: {rules.max_digit_drop:.4f})"
        )
    if cmp.significantly_worse:
        failed.append(f"significantly worse than the champion on the {cmp.n_test} paired images ({mcnemar_text(cmp)})")
    return failed


def digit_text(cmp: Comparison, rules: GateRules) -> str:
    if cmp.worst_digit is None:
        return f"per-digit rule not applied (no digit has {rules.min_digit_images} images)"
    return f"largest digit drop {cmp.worst_digit_drop:.4f} (digit {cmp.worst_digit})"


def mcnemar_text(cmp: Comparison) -> str:
    verdict = (
        "significantly better"
        if cmp.significantly_better
        else "significantly worse"
        if cmp.significantly_worse
        else "no significant difference"
    )
    return f"McNemar b={cmp.mcnemar_b}, c={cmp.mcnemar_c}, p={_p_text(cmp.mcnemar_p)}: {verdict}"


class SliceVerdict(BaseModel):
    """The rules on one deciding slice: what the promotions table records per slice."""

    slice: str
    images: int
    challenger_balanced_accuracy: float
    comparison: Comparison | None  # None without a champion to compare with, or one that trained on these images
    failed: list[str]
    note: str | None = None  # why there is no comparison although there is a champion


def judge_slice(
    name: str, images: int, balanced_accuracy: float, comparison: Comparison | None, rules: GateRules, note: str | None = None
) -> SliceVerdict:
    return SliceVerdict(
        slice=name,
        images=images,
        challenger_balanced_accuracy=balanced_accuracy,
        comparison=comparison,
        failed=_failures(balanced_accuracy, comparison, rules),
        note=note,
    )


def decide(balanced_accuracy: float, comparison: Comparison | None, rules: GateRules, unavailable: str | None = None) -> Decision:
    """The rules on one set of images (see ``decide_slices``)."""
    return decide_slices([judge_slice("", 0, balanced_accuracy, comparison, rules)], rules, unavailable)


def decide_slices(verdicts: list[SliceVerdict], rules: GateRules, unavailable: str | None = None) -> Decision:
    """Apply the rules to every deciding slice: promoted only if every slice passes. A verdict without a
    comparison means there is no champion; ``unavailable`` says why a champion exists but could not be
    compared, and then nothing is promoted unless forced."""
    named = [v for v in verdicts if v.slice]

    def where(v: SliceVerdict) -> str:
        return f"{v.slice} ({v.images} images): " if v.slice else ""

    if unavailable is not None:
        failed = [f"no comparison could be made ({unavailable})"]
    else:
        failed = [where(v) + text for v in verdicts for text in v.failed]
    if rules.force_promote:
        without = "; ".join(failed) if failed else "it would have been promoted anyway"
        return Decision(promoted=True, forced=True, reason=f"forced by the operator (the rules alone: {without})")
    if failed:
        return Decision(promoted=False, forced=False, reason="; ".join(failed))
    notes = "; ".join(f"{v.slice}: {v.note}" for v in verdicts if v.note)
    if all(v.comparison is None for v in verdicts) and not notes:
        accuracies = ", ".join(f"{v.slice} {v.challenger_balanced_accuracy:.4f}" for v in named)
        shown = accuracies or f"{verdicts[0].challenger_balanced_accuracy:.4f}"
        return Decision(
            promoted=True,
            forced=False,
            reason=f"first champion: balanced accuracy {shown} meets the floor {rules.min_balanced_accuracy:.4f}",
        )
    passes = []
    for v in verdicts:
        c = v.comparison
        if c is None:
            passes.append(
                where(v)
                + f"balanced accuracy {v.challenger_balanced_accuracy:.4f} meets the floor {rules.min_balanced_accuracy:.4f}"
            )
            continue
        passes.append(
            where(v)
            + f"balanced accuracy {c.challenger_balanced_accuracy:.4f} against the champion's {c.champion_balanced_accuracy:.4f}, "
            f"{digit_text(c, rules)}, {mcnemar_text(c)}"
        )
    reason = "passes every rule: " + "; ".join(passes) + (f" ({notes})" if notes else "")
    return Decision(promoted=True, forced=False, reason=reason)


def _p_text(p: float) -> str:
    """Three significant digits; below what a float can hold, say so rather than print 0."""
    return f"{p:.3g}" if p > 0 else "<1e-300"


class PointerChange(str, Enum):
    """What a decision does to ``champion.json``."""

    promote = "promote"  # the challenger becomes champion
    already = "already"  # promoted, but it already is the champion the pointer names: nothing changes
    repair = "repair"  # rejected, and the pointer was broken: it is rewritten to the intact champion compared against
    keep = "keep"  # rejected: the champion stays


def pointer_change(champion_key: str | None, from_history: bool, challenger_key: str, promoted: bool) -> PointerChange:
    """The pointer's change, from the champion compared against (``from_history``: the pointer was broken and
    this champion came from the promotions history) and the rules' verdict."""
    if promoted:
        return PointerChange.already if champion_key == challenger_key and not from_history else PointerChange.promote
    return PointerChange.repair if from_history else PointerChange.keep
