"""The champion gate and the operator's overrides: every decision that changes which model is champion.

The pointer is ``champion.json`` at the store's root; every decision is a row of the
``promotions`` table. Every read–decide–write of the pointer (the gate, ``promote``, ``rollback``)
holds the store's ``champion`` lock, and its write is conditional on the pointer it read (S3's
If-Match; each write carries a new ``revision``, so even an unchanged champion rewritten is a new
version). A writer that loses (a laptop's rollback while a worker's gate writes, with no common
lock between them) reads again and decides again; nothing is overwritten silently, and each
decision's ``decided_at`` is taken between its read and its write, so the last row of
``promotions`` is the decision the pointer holds.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import numpy as np
import pandas as pd
from pydantic import BaseModel

from storage import Store, WriteConflict
from storage.tables import read_frame, read_table, write_table
from tasks.champion_pointer import (
    POINTER_ATTEMPTS,
    Champion,
    ChampionError,
    ChampionLookup,
    champions_in_history,
    find_champion,
    first_intact,
    intact_model,
    pointer_conflict,
    promotions,
    read_pointer,
    write_pointer,
)
from tasks.evaluate import EvaluationRef, predicted_test_labels
from tasks.fetch import DatasetRef
from tasks.gate import Comparison, Decision, GateRules, PointerChange, compare, decide, pointer_change
from tasks.metrics import recall_per_digit
from tasks.model import ModelRef

__all__ = [
    "Champion",
    "ChampionError",
    "ChampionLookup",
    "GateRef",
    "find_champion",
    "gate",
    "judge",
    "promote_run",
    "promotions",
    "read_pointer",
    "rollback",
]

LOCK = "champion"
MANUAL = "manual"
Log = Callable[[str], None]


class GateRef(BaseModel):
    """The decision of one run, with the evidence the report and the UI show."""

    run_id: str
    challenger_model_key: str
    decision: str
    reason: str
    forced: bool
    comparison: Comparison | None
    challenger_recall: list[float]
    champion_before: Champion | None
    champion_after: Champion | None
    pointer_problem: str | None
    row: dict  # the promotions row, JSON-able: the Prefect event's payload

    @property
    def promoted(self) -> bool:
        return self.decision == "promoted"

    @property
    def champion_model_key(self) -> str | None:
        """The champion after this run (what the ``runs`` table records)."""
        return self.champion_after.model_key if self.champion_after else None


# ---- the decision row ---------------------------------------------------------------------
def _row(
    run_id: str,
    challenger_key: str,
    challenger_balanced: float,
    challenger_test: float,
    champion: Champion | None,
    comparison: Comparison | None,
    decision: Decision,
    decided_at: datetime,
) -> dict:
    cmp = comparison
    return {
        "run_id": run_id,
        "challenger_model_key": challenger_key,
        "champion_model_key": champion.model_key if champion else None,
        "challenger_balanced_accuracy": challenger_balanced,
        "champion_balanced_accuracy": cmp.champion_balanced_accuracy
        if cmp
        else (champion.balanced_accuracy if champion else None),
        "challenger_test_accuracy": challenger_test,
        "champion_test_accuracy": cmp.champion_test_accuracy if cmp else (champion.test_accuracy if champion else None),
        "mcnemar_b": cmp.mcnemar_b if cmp else None,
        "mcnemar_c": cmp.mcnemar_c if cmp else None,
        "mcnemar_p": cmp.mcnemar_p if cmp else None,
        "worst_digit": cmp.worst_digit if cmp else None,
        "worst_digit_drop": cmp.worst_digit_drop if cmp else None,
        "decision": decision.name,
        "reason": decision.reason,
        "forced": decision.forced,
        "decided_at": decided_at,
    }


def _record(store: Store, row: dict, part: str = "part-0") -> None:
    frame = pd.DataFrame([row]).astype({"mcnemar_b": "Int64", "mcnemar_c": "Int64", "worst_digit": "Int8"})
    write_table(store, "promotions", row["run_id"], frame, part=part)


def _json_row(row: dict) -> dict:
    return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in row.items()}


# ---- the gate -----------------------------------------------------------------------------
def _predicted_labels(store: Store, evaluation: EvaluationRef) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(test labels, challenger's predicted labels on every test image, this run's balanced sample)."""
    everything = read_frame(store, evaluation.test_predictions_key, evaluation.test_predictions_sha256).sort_values("test_index")
    sample = read_frame(store, evaluation.predictions_key, evaluation.predictions_sha256)["test_index"].to_numpy()
    return everything["true_label"].to_numpy(), everything["predicted_label"].to_numpy(), sample


def gate(
    store: Store, dataset: DatasetRef, model: ModelRef, evaluation: EvaluationRef, rules: GateRules, run_id: str, log: Log = print
) -> GateRef:
    """Compare the run's model with the champion on the same images, decide, and record the decision.

    The champion's predictions come from its own stored evaluation (``predicted_test_labels``), so
    the gate loads no model unless they are missing. The locked part reads, decides (pure:
    ``judge``), then writes the pointer conditionally and the decision row; a lost race decides again.
    """
    y_test, challenger, sample = _predicted_labels(store, evaluation)
    with store.lock(LOCK):
        for _ in range(POINTER_ATTEMPTS):
            lookup = find_champion(store)
            before = lookup.champion
            other = before is not None and before.model_key != model.key
            champion_labels = predicted_test_labels(store, dataset, lookup.model) if other else None
            comparison, decision, change = judge(
                lookup, model.key, evaluation.balanced_accuracy, y_test, sample, challenger, champion_labels, rules
            )
            now = datetime.now(UTC)  # after the read, before the write: rows sort as the pointer changed
            after = before
            try:
                if change is PointerChange.promote:
                    after = write_pointer(store, _champion_of(model, evaluation, run_id, decision, now), lookup.version)
                elif before is not None and (change is PointerChange.repair or store.conditional_writes):
                    after = write_pointer(store, before, lookup.version)  # repaired, or confirmed still the one compared against
            except WriteConflict as exc:
                log(f"{exc}: deciding again against the pointer now in the store")
                continue
            if change is PointerChange.already:
                decision = decision.model_copy(
                    update={"reason": f"already the champion (promoted with run {before.run_id}); {decision.reason}"}
                )
            if lookup.problem:
                log(lookup.problem)
            row = _row(
                run_id, model.key, evaluation.balanced_accuracy, evaluation.test_accuracy, before, comparison, decision, now
            )
            _record(store, row)
            break
        else:
            raise pointer_conflict(store, f"the gate decided on run {run_id}")
    challenger_recall = comparison.challenger_recall if comparison else _sample_recall(y_test, sample, challenger)
    return GateRef(
        run_id=run_id,
        challenger_model_key=model.key,
        decision=decision.name,
        reason=decision.reason,
        forced=decision.forced,
        comparison=comparison,
        challenger_recall=challenger_recall,
        champion_before=before,
        champion_after=after,
        pointer_problem=lookup.problem,
        row=_json_row(row),
    )


def judge(
    lookup: ChampionLookup,
    challenger_key: str,
    balanced_accuracy: float,
    y_test: np.ndarray,
    sample: np.ndarray,
    challenger: np.ndarray,
    champion: np.ndarray | None,
    rules: GateRules,
) -> tuple[Comparison | None, Decision, PointerChange]:
    """The whole decision, without I/O: the comparison on the same images (none without a champion), the
    rules' verdict, and what it does to the pointer."""
    before = lookup.champion
    comparison, unavailable = None, None
    if before is not None:
        comparison = compare(y_test, sample, challenger, challenger if champion is None else champion)
    elif lookup.problem:
        unavailable = lookup.problem
    decision = decide(balanced_accuracy, comparison, rules, unavailable)
    change = pointer_change(before.model_key if before else None, lookup.fallback, challenger_key, decision.promoted)
    return comparison, decision, change


def _champion_of(model: ModelRef, evaluation: EvaluationRef, run_id: str, decision: Decision, now: datetime) -> Champion:
    return Champion(
        model_key=model.key,
        sha256=model.sha256,
        run_id=run_id,
        balanced_accuracy=evaluation.balanced_accuracy,
        test_accuracy=evaluation.test_accuracy,
        promoted_at=now,
        reason=decision.reason,
        forced=decision.forced,
    )


def _sample_recall(y_test: np.ndarray, sample: np.ndarray, predicted: np.ndarray) -> list[float]:
    return recall_per_digit(np.asarray(y_test)[sample].astype(np.int64), np.asarray(predicted)[sample].astype(np.int64)).tolist()


# ---- by hand ------------------------------------------------------------------------------
def _set_by_hand(store: Store, choose: Callable[[ChampionLookup], Champion], run_id: str | None = None) -> dict:
    """Make ``choose(current lookup)`` the champion, recorded as a manual, forced decision in its run's
    partition (or ``run_id``'s). The target is chosen inside the lock, from the pointer just read."""
    with store.lock(LOCK):
        for _ in range(POINTER_ATTEMPTS):
            lookup = find_champion(store)
            before = lookup.champion
            target = choose(lookup)
            now = datetime.now(UTC)
            owner = run_id or target.run_id
            champion = target.model_copy(update={"promoted_at": now, "reason": MANUAL, "forced": True, "run_id": owner})
            try:
                write_pointer(store, champion, lookup.version)
            except WriteConflict:
                continue
            decision = Decision(promoted=True, forced=True, reason=MANUAL)
            row = _row(owner, target.model_key, target.balanced_accuracy, target.test_accuracy, before, None, decision, now)
            if before is not None:
                row["champion_balanced_accuracy"], row["champion_test_accuracy"] = before.balanced_accuracy, before.test_accuracy
            _record(store, row, part=f"manual-{now.strftime('%Y%m%dT%H%M%S%f')}")
            return _json_row(row)
    raise pointer_conflict(store, "a manual promotion chose its target")


def promote_run(store: Store, run_id: str) -> dict:
    """Make the model of run ``run_id`` the champion (an operator's decision)."""
    runs = read_table(store, "runs", run_id=run_id)
    if runs.empty:
        raise ChampionError(
            f"Run {run_id} is not in the runs table of {store.url}; `mnist-pipeline champion` and the runs table list run ids."
        )
    (run,) = runs.itertuples()
    info = _model_of_run(store, run_id)
    if info is None:
        raise ChampionError(f"Run {run_id}'s model is not in the promotions table of {store.url}, so its model cannot be found.")
    ref, why = intact_model(store, info)
    if ref is None:
        raise ChampionError(
            f"Run {run_id}'s model {info} cannot be promoted: {why}. Retrain it (rerun with the run's parameters)."
        )
    target = Champion(
        model_key=ref.key,
        sha256=ref.sha256,
        run_id=run_id,
        balanced_accuracy=run.balanced_accuracy,
        test_accuracy=run.test_accuracy,
        promoted_at=datetime.now(UTC),
        reason=MANUAL,
        forced=True,
    )
    return _set_by_hand(store, lambda _lookup: target, run_id)


def _model_of_run(store: Store, run_id: str) -> str | None:
    rows = read_table(store, "promotions", run_id=run_id)
    return None if rows.empty else str(rows.sort_values("decided_at")["challenger_model_key"].iloc[0])


def rollback(store: Store) -> dict:
    """Make the champion before the current one the champion again, chosen inside the champion lock."""

    def previous(lookup: ChampionLookup) -> Champion:
        if lookup.champion is None:
            raise ChampionError(f"There is no champion in {store.url} to roll back from.")
        found = first_intact(store, champions_in_history(store), skip=lookup.champion.model_key)
        if found is None:
            raise ChampionError(f"No earlier champion in {store.url} with an intact model file: nothing to roll back to.")
        return found[0]

    return _set_by_hand(store, previous)
