"""The champion: which model downstream consumers should use, and every decision that changed it.

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

import uuid
from collections.abc import Callable
from datetime import UTC, datetime

import numpy as np
import pandas as pd
from pydantic import BaseModel

from storage import SIDECAR_LIMIT, Store, StoreError, StoreName, UnsafeKey, WriteConflict, damage
from storage.tables import read_frame, read_table, write_table
from tasks.evaluate import EvaluationRef, predicted_test_labels
from tasks.fetch import DatasetRef
from tasks.gate import Comparison, Decision, GateRules, PointerChange, compare, decide, pointer_change
from tasks.metrics import recall_per_digit
from tasks.model import ModelRef

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
    revision: str | None = None  # new with every write of the pointer: what a conditional write compares


class ChampionLookup(BaseModel):
    """The champion to compare against, and what was wrong with the pointer if it could not be used."""

    champion: Champion | None
    model: ModelRef | None = None  # the champion's model, its file checked against the recorded digest
    problem: str | None = None  # one sentence naming the broken pointer, when there was one
    fallback: bool = False  # the champion came from the promotions history, not the pointer
    version: str | None = None  # the pointer's version as read (S3 ETag): the next write is conditional on it


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
    if not store.exists(recorded.file_key):
        return None, f"its model file {store.location(recorded.file_key)} is missing"
    if store.digest(recorded.file_key)[0] != expected:
        return (
            None,
            f"its model file {store.location(recorded.file_key)} does not match the SHA-256 {expected[:12]}… recorded for it",
        )
    return recorded, None


def read_pointer(store: Store) -> Champion | None:
    data, _ = store.read_versioned(store.champion_file(), limit=SIDECAR_LIMIT)
    return None if data is None else Champion.model_validate_json(data)


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
    where = store.location(store.champion_file())
    pointer, problem = None, None
    try:
        data, version = store.read_versioned(store.champion_file(), limit=SIDECAR_LIMIT)
    except StoreError as exc:  # far too large to be ours
        problem, version = damage(f"The champion pointer {where}", exc), store.version(store.champion_file())
    else:
        try:
            pointer = None if data is None else Champion.model_validate_json(data)
        except ValueError as exc:
            problem = damage(f"The champion pointer {where}", exc)
        if pointer is not None:
            ref, why = _intact_model(store, pointer.model_key, pointer.sha256)
            if ref is not None:
                return ChampionLookup(champion=pointer, model=ref, version=version)
            problem = f"The champion pointer {where} names model {pointer.model_key} from run {pointer.run_id}, but {why}"
    history = _champions_in_history(store)
    if pointer is None and problem is None and not history:
        return ChampionLookup(champion=None, version=version)  # no champion yet
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
            version=version,
        )
    return ChampionLookup(champion=None, problem=f"{problem}, and no earlier champion is intact.", version=version)


def _write_pointer(store: Store, champion: Champion, version: str | None) -> Champion:
    """Write ``champion`` with a new revision, if the pointer is still the ``version`` read (``WriteConflict`` if not)."""
    written = champion.model_copy(update={"revision": uuid.uuid4().hex})
    store.write_if_unchanged(store.champion_file(), written.model_dump_json(indent=2).encode(), version)
    return written


POINTER_ATTEMPTS = 20  # a writer that keeps losing the race this often fails with a message instead


def _conflict(store: Store, what: str) -> ChampionError:
    return ChampionError(
        f"The champion pointer {store.location(store.champion_file())} was replaced by another writer {POINTER_ATTEMPTS} times "
        f"while {what}; nothing was written. Run it again."
    )


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
                    after = _write_pointer(store, _champion_of(model, evaluation, run_id, decision, now), lookup.version)
                elif before is not None and (change is PointerChange.repair or store.conditional_writes):
                    after = _write_pointer(store, before, lookup.version)  # repaired, or confirmed still the one compared against
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
            raise _conflict(store, f"the gate decided on run {run_id}")
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
                _write_pointer(store, champion, lookup.version)
            except WriteConflict:
                continue
            decision = Decision(promoted=True, forced=True, reason=MANUAL)
            row = _row(owner, target.model_key, target.balanced_accuracy, target.test_accuracy, before, None, decision, now)
            if before is not None:
                row["champion_balanced_accuracy"], row["champion_test_accuracy"] = before.balanced_accuracy, before.test_accuracy
            _record(store, row, part=f"manual-{now.strftime('%Y%m%dT%H%M%S%f')}")
            return _json_row(row)
    raise _conflict(store, "a manual promotion chose its target")


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
    return _set_by_hand(store, lambda _lookup: target, run_id)


def _model_of_run(store: Store, run_id: str) -> str | None:
    rows = read_table(store, "promotions", run_id=run_id)
    return None if rows.empty else str(rows.sort_values("decided_at")["challenger_model_key"].iloc[0])


def rollback(store: Store) -> dict:
    """Make the champion before the current one the champion again, chosen inside the champion lock."""

    def previous(lookup: ChampionLookup) -> Champion:
        if lookup.champion is None:
            raise ChampionError(f"There is no champion in {store.url} to roll back from.")
        found = _first_intact(store, _champions_in_history(store), skip=lookup.champion.model_key)
        if found is None:
            raise ChampionError(f"No earlier champion in {store.url} with an intact model file: nothing to roll back to.")
        return found[0]

    return _set_by_hand(store, previous)
