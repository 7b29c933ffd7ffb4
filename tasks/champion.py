"""The champion: which model downstream consumers should use, and every decision that changed it.

The pointer is ``champion.json`` at the store's root; every decision is a row of the
``promotions`` table. The pointer is replaced atomically and under the store's ``champion`` lock,
with the comparison made inside the same lock, so two gates finishing together decide one after
the other against the champion each of them actually replaces.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import numpy as np
import pandas as pd
from pydantic import BaseModel

from storage import SIDECAR_LIMIT, Store, StoreError, StoreName, UnsafeKey, damage
from storage.tables import read_frame, read_table, write_table
from tasks.evaluate import EvaluationRef, predict
from tasks.fetch import DatasetRef, load_mnist
from tasks.gate import Comparison, Decision, GateRules, compare, decide
from tasks.metrics import recall_per_digit
from tasks.model import ModelRef, load_model

LOCK = "champion"
MANUAL = "manual"
Log = Callable[[str], None]


class ChampionError(RuntimeError):
    """A champion operation cannot be carried out: the message says why and what to do."""


class Champion(BaseModel):
    """What ``champion.json`` holds."""

    model_key: StoreName
    sha256: str
    run_id: str
    balanced_accuracy: float
    test_accuracy: float
    promoted_at: datetime
    reason: str
    forced: bool = False


class ChampionLookup(BaseModel):
    """The champion to compare against, and what was wrong with the pointer if it could not be used."""

    champion: Champion | None
    model: ModelRef | None = None  # the champion's model, its file checked against the recorded digest
    problem: str | None = None  # one sentence naming the broken pointer, when there was one
    fallback: bool = False  # the champion came from the promotions history, not the pointer


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


# ---- the pointer --------------------------------------------------------------------------
def _intact_model(store: Store, key: str, sha256: str | None = None) -> tuple[ModelRef | None, str | None]:
    """The model under ``key`` in this store, if the file its ``model.json`` names is there and matches
    the digest the pointer recorded (else the one in ``model.json``); else why not, in a few words."""
    try:
        info = store.model_info_file(key)
    except UnsafeKey as exc:  # a key from the pointer or the promotions table that leaves the store
        return None, f"its model key is refused: {exc}"
    if not store.exists(info):
        return None, f"its model record {store.location(info)} is missing"
    try:
        recorded = ModelRef.model_validate_json(store.read_bytes(info, limit=SIDECAR_LIMIT))
    except ValueError as exc:
        return None, damage(f"its model record {store.location(info)}", exc)
    expected = sha256 or recorded.sha256
    if not store.exists(recorded.path):
        return None, f"its model file {store.location(recorded.path)} is missing"
    if store.digest(recorded.path)[0] != expected:
        return None, f"its model file {store.location(recorded.path)} does not match the SHA-256 {expected[:12]}… recorded for it"
    return recorded, None


def read_pointer(store: Store) -> Champion | None:
    path = store.champion_file()
    if not store.exists(path):
        return None
    return Champion.model_validate_json(store.read_bytes(path, limit=SIDECAR_LIMIT))


def promotions(store: Store) -> pd.DataFrame:
    """Every decision so far, oldest first."""
    return read_table(store, "promotions").sort_values("decided_at", kind="stable").reset_index(drop=True)


def _champions_in_history(store: Store) -> list[Champion]:
    """Every model that was ever made champion, latest first, as pointers (their files not yet checked)."""
    rows = promotions(store)
    rows = rows[rows["decision"] == "promoted"].iloc[::-1]
    found = []
    for r in rows.itertuples():
        found.append(
            Champion(
                model_key=r.challenger_model_key,
                sha256="",  # filled in by _first_intact from the model's own record
                run_id=r.run_id,
                balanced_accuracy=r.challenger_balanced_accuracy,
                test_accuracy=r.challenger_test_accuracy,
                promoted_at=r.decided_at.to_pydatetime(),
                reason=r.reason,
                forced=bool(r.forced),
            )
        )
    return found


def _first_intact(store: Store, candidates: list[Champion], skip: str | None) -> tuple[Champion, ModelRef] | None:
    """The first candidate (other than model ``skip``) whose model file is intact, with its SHA-256, and its model."""
    for candidate in candidates:
        if candidate.model_key == skip:
            continue
        ref, _ = _intact_model(store, candidate.model_key)
        if ref is not None:
            return candidate.model_copy(update={"sha256": ref.sha256}), ref
    return None


def find_champion(store: Store) -> ChampionLookup:
    """The champion in ``champion.json``; if that pointer is broken, the last intact champion in history."""
    try:
        pointer = read_pointer(store)
    except (ValueError, StoreError) as exc:
        pointer, problem = None, damage(f"The champion pointer {store.location(store.champion_file())}", exc)
    else:
        problem = None
        if pointer is not None:
            ref, why = _intact_model(store, pointer.model_key, pointer.sha256)
            if ref is not None:
                return ChampionLookup(champion=pointer, model=ref)
            where = store.location(store.champion_file())
            problem = f"The champion pointer {where} names model {pointer.model_key} from run {pointer.run_id}, but {why}"
    history = _champions_in_history(store)
    if pointer is None and problem is None and not history:
        return ChampionLookup(champion=None)  # no champion yet
    if problem is None:
        problem = f"The champion pointer {store.location(store.champion_file())} is missing although models were promoted before"
    found = _first_intact(store, history, skip=pointer.model_key if pointer is not None else None)
    if found is not None:
        candidate, ref = found
        return ChampionLookup(
            champion=candidate,
            model=ref,
            problem=f"{problem}; using the last intact champion, run {candidate.run_id}.",
            fallback=True,
        )
    return ChampionLookup(champion=None, problem=f"{problem}, and no earlier champion is intact.")


def _write_pointer(store: Store, champion: Champion) -> None:
    store.write_text(store.champion_file(), champion.model_dump_json(indent=2))


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
    everything = read_frame(store, evaluation.test_path, evaluation.test_predictions_sha256).sort_values("test_index")
    sample = read_frame(store, evaluation.path, evaluation.predictions_sha256)["test_index"].to_numpy()
    return everything["true_label"].to_numpy(), everything["predicted_label"].to_numpy(), sample


def gate(
    store: Store, dataset: DatasetRef, model: ModelRef, evaluation: EvaluationRef, rules: GateRules, run_id: str, log: Log = print
) -> GateRef:
    """Compare the run's model with the champion on the same images, decide, and record the decision."""
    y_test, challenger, sample = _predicted_labels(store, evaluation)
    with store.lock(LOCK):
        lookup = find_champion(store)
        if lookup.problem:
            log(lookup.problem)
        before = lookup.champion
        comparison = None
        unavailable = None
        if before is not None and before.model_key == model.key:
            comparison = compare(y_test, sample, challenger, challenger)
        elif before is not None:  # find_champion checked its model under this same lock
            mnist = load_mnist(store, dataset)
            champion_labels = predict(load_model(store, lookup.model), mnist.x_test).argmax(axis=1)
            comparison = compare(y_test, sample, challenger, champion_labels)
        elif lookup.problem:
            unavailable = lookup.problem
        decision = decide(evaluation.balanced_accuracy, comparison, rules, unavailable)
        now = datetime.now(UTC)
        after = before
        if decision.promoted and not (before is not None and before.model_key == model.key and not lookup.fallback):
            after = Champion(
                model_key=model.key,
                sha256=model.sha256,
                run_id=run_id,
                balanced_accuracy=evaluation.balanced_accuracy,
                test_accuracy=evaluation.test_accuracy,
                promoted_at=now,
                reason=decision.reason,
                forced=decision.forced,
            )
            _write_pointer(store, after)
        elif decision.promoted:
            decision = decision.model_copy(
                update={"reason": f"already the champion (promoted with run {before.run_id}); {decision.reason}"}
            )
        elif lookup.fallback:  # repair the pointer, so consumers read a model that exists
            _write_pointer(store, before)
        row = _row(run_id, model.key, evaluation.balanced_accuracy, evaluation.test_accuracy, before, comparison, decision, now)
        _record(store, row)
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


def _sample_recall(y_test: np.ndarray, sample: np.ndarray, predicted: np.ndarray) -> list[float]:
    return recall_per_digit(np.asarray(y_test)[sample].astype(np.int64), np.asarray(predicted)[sample].astype(np.int64)).tolist()


# ---- by hand ------------------------------------------------------------------------------
def _set_by_hand(store: Store, target: Champion, run_id: str) -> dict:
    """Make ``target`` the champion, recorded as a manual, forced decision in ``run_id``'s partition."""
    with store.lock(LOCK):
        before = find_champion(store).champion
        now = datetime.now(UTC)
        champion = target.model_copy(update={"promoted_at": now, "reason": MANUAL, "forced": True, "run_id": run_id})
        _write_pointer(store, champion)
        decision = Decision(promoted=True, forced=True, reason=MANUAL)
        row = _row(run_id, target.model_key, target.balanced_accuracy, target.test_accuracy, before, None, decision, now)
        if before is not None:
            row["champion_balanced_accuracy"], row["champion_test_accuracy"] = before.balanced_accuracy, before.test_accuracy
        _record(store, row, part=f"manual-{now.strftime('%Y%m%dT%H%M%S%f')}")
    return _json_row(row)


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
    ref, why = _intact_model(store, info)
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
    return _set_by_hand(store, target, run_id)


def _model_of_run(store: Store, run_id: str) -> str | None:
    rows = read_table(store, "promotions", run_id=run_id)
    return None if rows.empty else str(rows.sort_values("decided_at")["challenger_model_key"].iloc[0])


def rollback(store: Store) -> dict:
    """Make the champion before the current one the champion again."""
    current = find_champion(store).champion
    if current is None:
        raise ChampionError(f"There is no champion in {store.url} to roll back from.")
    found = _first_intact(store, _champions_in_history(store), skip=current.model_key)
    if found is not None:
        candidate, _ = found
        return _set_by_hand(store, candidate, candidate.run_id)
    raise ChampionError(f"No earlier champion in {store.url} with an intact model file: nothing to roll back to.")
