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
from storage.tables import read_predictions, read_table, write_table
from tasks.champion.gate import (
    Comparison,
    Decision,
    GateRules,
    PointerChange,
    SliceVerdict,
    compare,
    decide_slices,
    judge_slice,
    pointer_change,
)
from tasks.champion.pointer import (
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
    setting_aside_damaged,
    write_pointer,
)
from tasks.data.fetch import DatasetRef
from tasks.data.splits import SLICE_NEW, SLICE_SELECTION
from tasks.evaluation.evaluate import EvaluationRef, balanced_accuracy, predicted_labels
from tasks.evaluation.metrics import recall_per_digit
from tasks.training.model import ModelRef

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
    "setting_aside_damaged",
]

LOCK = "champion"
MANUAL = "manual"
MAX_REASON_CHARS = 4_000  # an operator's `--reason` kept (at most 16 KB of UTF-8: under the reader's TEXT_BYTES)
GATE, OPERATOR = "gate", "operator"  # promotions.decided_by
Log = Callable[[str], None]


class GateRef(BaseModel):
    """The decision of one run, with the evidence the report and the UI show."""

    run_id: str
    challenger_model_key: str
    decision: str
    reason: str
    forced: bool
    comparison: Comparison | None  # on mnist-selection
    slices: list[SliceVerdict] = []  # every deciding slice, with the rules it failed
    challenger_recall: list[float]  # per digit on mnist-selection
    champion_before: Champion | None
    champion_after: Champion | None
    pointer_problem: str | None
    damaged_champion: str | None = None  # one sentence when the champion's model was set aside as damaged
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
    run_id: str | None,
    challenger_key: str,
    challenger_balanced: float,
    challenger_test: float,
    champion: Champion | None,
    comparison: Comparison | None,
    decision: Decision,
    decided_at: datetime,
    slices: list[SliceVerdict] = (),
) -> dict:
    cmp = comparison
    row = {
        "run_id": run_id,
        "challenger_model_key": challenger_key,
        "champion_before_model_key": champion.model_key if champion else None,
        "challenger_selection_balanced_accuracy": challenger_balanced,
        "champion_selection_balanced_accuracy": cmp.champion_balanced_accuracy
        if cmp
        else (champion.selection_balanced_accuracy if champion else None),
        "challenger_test_accuracy": challenger_test,
        "champion_test_accuracy": champion.test_accuracy if champion else None,
        **_paired(cmp),
        "decision": decision.name,
        "reason": decision.reason,
        "forced": decision.forced,
        "decided_by": GATE if run_id is not None else OPERATOR,  # a night's gate, or an operator (no night)
        "decided_at": decided_at,
    }
    row["slices"] = [_slice_row(v) for v in slices]
    return row


PAIRED = ("mcnemar_b", "mcnemar_c", "mcnemar_p", "worst_digit", "worst_digit_drop")


def _paired(cmp: Comparison | None) -> dict:
    """The paired comparison's columns, null without one."""
    return {name: getattr(cmp, name) if cmp else None for name in PAIRED}


def _slice_row(verdict: SliceVerdict) -> dict:
    cmp = verdict.comparison
    return {
        "slice": verdict.slice,
        "images": verdict.images,
        "challenger_balanced_accuracy": verdict.challenger_balanced_accuracy,
        "champion_balanced_accuracy": cmp.champion_balanced_accuracy if cmp else None,
        **_paired(cmp),
        "passed": not verdict.failed,
        "failed_rules": list(verdict.failed),
        "note": verdict.note,
    }


def _record(store: Store, row: dict, part: str = "part-0") -> None:
    frame = pd.DataFrame([row]).astype({"mcnemar_b": "Int64", "mcnemar_c": "Int64", "worst_digit": "Int8"})
    if "slices" not in frame:
        frame["slices"] = [[]]
    write_table(store, "promotions", row["run_id"], frame, part=part)


def _json_row(row: dict) -> dict:
    return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in row.items()}


# ---- the gate -----------------------------------------------------------------------------
Slices = dict[str, tuple[np.ndarray, np.ndarray]]  # deciding slice → (true labels, predicted labels), in slice order


def _challenger_slices(store: Store, evaluation: EvaluationRef) -> Slices:
    """The challenger's predictions on every deciding slice, each file checked against its digest and its values
    (``read_predictions``: the evaluate step re-made an evaluation whose files fail them, so here they pass unless a
    writer changed them since)."""
    slices = {}
    for part in evaluation.slices:
        frame = read_predictions(store, part.predictions_key, part.predictions_sha256, part.images).sort_values("test_index")
        slices[part.name] = (frame["true_label"].to_numpy(), frame["predicted_label"].to_numpy())
    if SLICE_SELECTION not in slices:
        raise ChampionError(f"evaluation {evaluation.key} has no {SLICE_SELECTION} slice: the gate cannot decide without it")
    return slices


def gate(
    store: Store, dataset: DatasetRef, model: ModelRef, evaluation: EvaluationRef, rules: GateRules, run_id: str, log: Log = print
) -> GateRef:
    """Compare the run's model with the champion on the same images of every deciding slice, decide, and
    record the decision. The test set is not read here: its accuracy is only copied into the row.

    The champion's predictions come from its own stored evaluation (``predicted_labels``), so the gate
    loads no model unless they are missing (a new-data holdout that grew since the champion's night is
    predicted once, and stored). The locked part reads, decides (pure: ``judge``), then writes the
    pointer conditionally and the decision row; a lost race decides again.
    """
    challenger = _challenger_slices(store, evaluation)
    small = [n for n, (y, _) in challenger.items() if n == SLICE_NEW and len(y) < rules.min_new_data_images]
    for name in small:  # reported, not yet deciding
        del challenger[name]
    with store.lock(LOCK):
        for _ in range(POINTER_ATTEMPTS):
            lookup = find_champion(store)
            champion_labels = None
            if lookup.champion is not None and lookup.champion.model_key != model.key:
                lookup, champion_labels = setting_aside_damaged(
                    store,
                    lookup,
                    lambda ref: {
                        name: predicted_labels(store, dataset, ref, name, challenger[name][0])["predicted_label"].to_numpy()
                        for name in challenger
                    },
                )
            before = lookup.champion
            other = before is not None and before.model_key != model.key
            learned = {SLICE_SELECTION} if other and lookup.model is not None and not lookup.model.selection_held_out else set()
            verdicts, decision, change = judge(lookup, model.key, challenger, champion_labels, rules, learned)
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
            if change is PointerChange.already:  # a rerun changes nothing: not a promotion (one promoted row per change)
                decision = decision.model_copy(
                    update={
                        "promoted": False,
                        "unchanged": True,
                        "reason": f"already the champion (promoted with run {before.run_id}); {decision.reason}",
                    }
                )
            if lookup.problem:
                log(lookup.problem)
            selection = verdicts[0]
            row = _row(
                run_id,
                model.key,
                selection.challenger_balanced_accuracy,
                evaluation.test_accuracy,
                before,
                selection.comparison,
                decision,
                now,
                verdicts,
            )
            _record(store, row)
            break
        else:
            raise pointer_conflict(store, f"the gate decided on run {run_id}")
    y, predicted = challenger[SLICE_SELECTION]
    return GateRef(
        run_id=run_id,
        challenger_model_key=model.key,
        decision=decision.name,
        reason=decision.reason,
        forced=decision.forced,
        comparison=selection.comparison,
        slices=verdicts,
        challenger_recall=_recall(y, predicted),
        champion_before=before,
        champion_after=after,
        pointer_problem=lookup.problem,
        damaged_champion=lookup.damaged,
        row=_json_row(row),
    )


def judge(
    lookup: ChampionLookup,
    challenger_key: str,
    challenger: Slices,
    champion: dict[str, np.ndarray] | None,
    rules: GateRules,
    learned: set[str] = frozenset(),
) -> tuple[list[SliceVerdict], Decision, PointerChange]:
    """The whole decision, without I/O: each deciding slice's comparison on the same images (none without a
    champion; ``mnist-selection`` first), the rules' verdict, and what it does to the pointer. ``learned``: the
    slices the champion was trained on (a model made before the selection split existed): there the
    challenger meets the floor alone, since the champion's accuracy on images it learned says nothing."""
    before = lookup.champion
    # a broken pointer with no intact champion decides nothing (the operator does); a damaged champion with none
    # intact is judged as a first champion, since nothing of it can be compared
    unavailable = lookup.problem if before is None and lookup.problem and not lookup.damaged else None
    verdicts = []
    for name in sorted(challenger, key=lambda n: n != SLICE_SELECTION):
        y, predicted = challenger[name]
        comparison, note = None, None
        if before is not None and name in learned:
            note = f"not compared: the champion (run {before.run_id}) was trained on these images, before the selection split existed"
        elif before is not None:
            everything = np.arange(len(y))
            theirs = predicted if champion is None else champion[name]
            comparison = compare(y, everything, predicted, theirs, min_support=rules.min_digit_images)
        verdicts.append(judge_slice(name, len(y), balanced_accuracy(y, predicted), comparison, rules, note))
    decision = decide_slices(verdicts, rules, unavailable)
    change = pointer_change(before.model_key if before else None, lookup.fallback, challenger_key, decision.promoted)
    return verdicts, decision, change


def _recall(y: np.ndarray, predicted: np.ndarray) -> list[float]:
    return recall_per_digit(np.asarray(y, np.int64), np.asarray(predicted, np.int64)).tolist()


def _champion_of(model: ModelRef, evaluation: EvaluationRef, run_id: str, decision: Decision, now: datetime) -> Champion:
    return Champion(
        model_key=model.key,
        sha256=model.sha256,
        run_id=run_id,
        selection_balanced_accuracy=evaluation.slice(SLICE_SELECTION).balanced_accuracy,
        test_accuracy=evaluation.test_accuracy,
        promoted_at=now,
        reason=decision.reason,
        forced=decision.forced,
    )


# ---- by hand ------------------------------------------------------------------------------
def manual_reason(reason: str | None) -> str:
    """The ``reason`` of an operator's decision: ``manual``, or ``manual: <why>`` when the operator said why (the
    prefix keeps an operator's rows apart from a night's in the one column that says who decided), its first
    ``MAX_REASON_CHARS`` characters: a longer string is one the table reader refuses (``storage/tables.py``)."""
    why = " ".join((reason or "").split())[:MAX_REASON_CHARS]  # the reader refuses a partition with a longer one
    return f"{MANUAL}: {why}" if why else MANUAL


def _set_by_hand(
    store: Store, choose: Callable[[ChampionLookup], Champion], run_id: str | None = None, reason: str | None = None
) -> dict | None:
    """Make ``choose(current lookup)`` the champion, recorded as a manual, forced decision of an operator: a
    ``promotions`` row with no night (``run_id`` null, ``decided_by = operator``), so the nights' partitions hold
    only their gates' decisions. The pointer keeps the run that trained the model (``run_id``'s, or the target's).
    The target is chosen inside the lock, from the pointer just read. None, and nothing written, when the target
    already is the champion: ``promotions`` holds one ``promoted`` row per change."""
    why = manual_reason(reason)
    with store.lock(LOCK):
        for _ in range(POINTER_ATTEMPTS):
            lookup = find_champion(store)
            before = lookup.champion
            target = choose(lookup)
            if before is not None and before.model_key == target.model_key and not lookup.fallback:
                return None
            now = datetime.now(UTC)
            owner = run_id or target.run_id
            champion = target.model_copy(update={"promoted_at": now, "reason": why, "forced": True, "run_id": owner})
            try:
                write_pointer(store, champion, lookup.version)
            except WriteConflict:
                continue
            decision = Decision(promoted=True, forced=True, reason=why)
            row = _row(
                None, target.model_key, target.selection_balanced_accuracy, target.test_accuracy, before, None, decision, now
            )
            if before is not None:
                row["champion_selection_balanced_accuracy"] = before.selection_balanced_accuracy
                row["champion_test_accuracy"] = before.test_accuracy
            _record(store, row, part=f"manual-{now.strftime('%Y%m%dT%H%M%S%f')}")
            return _json_row(row)
    raise pointer_conflict(store, "a manual promotion chose its target")


def promote_run(store: Store, run_id: str, reason: str | None = None) -> dict | None:
    """Make the model of run ``run_id`` the champion (an operator's decision); None when it already is."""
    runs = read_table(store, "runs", run_id=run_id)
    if runs.empty:
        raise ChampionError(
            f"Run {run_id} is not in the runs table of {store.url}; `mnist-pipeline runs list` lists the run ids."
        )
    if len(runs) > 1:  # a night writes one row: a file copied or planted beside its partition, not a second night
        raise ChampionError(_not_one_night(store, run_id, "runs", f"{len(runs)} rows"))
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
        selection_balanced_accuracy=None if pd.isna(run.selection_balanced_accuracy) else run.selection_balanced_accuracy,
        test_accuracy=run.test_accuracy,
        promoted_at=datetime.now(UTC),
        reason=MANUAL,
        forced=True,
    )
    return _set_by_hand(store, lambda _lookup: target, run_id, reason)


def _model_of_run(store: Store, run_id: str) -> str | None:
    """The model the night ``run_id`` trained, from its gate's row; the rows of that run naming two models are not
    that night's alone (a partition copied or planted beside its own), so which model it trained cannot be told."""
    rows = read_table(store, "promotions", run_id=run_id)
    models = rows["challenger_model_key"].dropna().unique()
    if len(models) > 1:
        raise ChampionError(_not_one_night(store, run_id, "promotions", f"rows naming {len(models)} models"))
    return None if rows.empty else str(rows.sort_values("decided_at")["challenger_model_key"].iloc[0])


def _not_one_night(store: Store, run_id: str, table: str, found: str) -> str:
    """One sentence for a run whose partitions in ``table`` hold more than its night wrote."""
    return (
        f"Run {run_id} has {found} in the {table} table of {store.url}, where its night wrote one, so it is not promoted: "
        f"remove what was copied or planted beside {store.location(store.table_file(table, run_id))} (another file "
        f"in its folder, or a folder whose name decodes to run_id={run_id}), then promote it again."
    )


def rollback(store: Store, reason: str | None = None) -> dict:
    """Make the champion before the current one the champion again, chosen inside the champion lock."""

    def previous(lookup: ChampionLookup) -> Champion:
        if lookup.champion is None:
            raise ChampionError(f"There is no champion in {store.url} to roll back from.")
        found = first_intact(store, champions_in_history(store), skip=(lookup.champion.model_key,))
        if found is None:
            raise ChampionError(f"No earlier champion in {store.url} with an intact model file: nothing to roll back to.")
        return found[0]

    return _set_by_hand(store, previous, reason=reason)
