"""What a store keeps when it is pruned (``mnist-pipeline store prune``), decided from the champion pointer, the
``promotions`` and ``runs`` tables and the report manifests; ``storage/retention.py`` removes the rest safely.

Kept, always:

- every model that was ever champion: the pointer's, every ``promoted`` row's challenger and every row's
  ``champion_before`` (a model a kept decision was compared against);
- what those models' decisions rest on: every evaluation of them (by the ``runs`` table and by each
  ``evaluation.json``'s model digest), their stored predictions per slice (``evaluations/by-model``) and the
  evaluation folders those name, and the plots of those evaluations;
- the reports of the last ``KEEP_REPORTS`` runs, and the earlier reports whose figures they point at;
- a checkpoint whose model is not stored yet: a killed training's resume point.

Removed: every other model, evaluation, prediction record, plot folder, report, and the checkpoints of models
that are stored (training finished). Batches (pending, accepted, quarantined), the incoming location, the
tables, MNIST's objects, Prefect's result records and the locks are never touched.

A prune refuses, and removes nothing, when any of what it decides from cannot be read: the champion pointer, a
partition of ``promotions`` or ``runs`` or a row its readers drop (a ``runs`` row dated in the future would rank as
the newest run), or the markers of running nights; and while a night runs (it could be
using what would go). It holds the ``champion`` lock throughout, so no gate or operator moves the champion
between the decision and the removal.

Every night prunes too, after it has published (``RetentionRules``, a parameter of the pipeline, on by default):
then the night running it is no reason to refuse, and what that night made (its model, and so that model's
evaluations, predictions and plots, and its report) is kept as well, so a night without new data tomorrow reuses
tonight's model instead of training it again. Run every night, a prune removes about one night's folders; the
store then holds the champions, the last ``keep_reports`` reports and tonight's work, whatever the nights before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import pandas as pd
from pydantic import BaseModel, ValidationError

from storage import SIDECAR_LIMIT, Store, StoreError, UnsafeKey
from storage.listing import ForeignNames
from storage.nights import NightMarker, NightStateUnreadable, running_nights
from storage.retention import FOLDERS, DoomedFolder, Keep, PrunePlan, plan, remove, units
from storage.tables import read_table
from tasks.champion.pointer import Champion
from tasks.champion.promotion import LOCK
from tasks.evaluation.evaluate import EvaluationRef, ModelPredictionsRef
from tasks.evaluation.plots import plots_key
from tasks.publish.report import MANIFEST, read_manifest
from tasks.publish.retention_rules import KEEP_REPORTS, RetentionRules
from tasks.training.model import ModelRef

PROMOTED = "promoted"


class PruneRefused(StoreError):
    """A prune would have to guess what is in use: it removes nothing, and the message says what to fix."""


class PruneResult(BaseModel):
    """What a prune removed (``applied``) or would remove (a dry run)."""

    store: str
    applied: bool
    keep_reports: int
    plan: PrunePlan
    removed: list[str] = []
    left_behind: list[NightMarker] = []  # markers of nights killed long ago: reported, not obeyed

    def as_json(self) -> dict:
        return {
            "store": self.store,
            "applied": self.applied,
            "keep_reports": self.keep_reports,
            "bytes": self.plan.bytes,
            "files": len(self.plan.files),
            "kept": self.plan.kept,
            "folders": [
                {"kind": d.kind, "key": d.key, "files": [f.key for f in d.files], "bytes": d.bytes} for d in self.plan.doomed
            ],
            "removed": self.removed,
            "left_behind_nights": [m.model_dump(mode="json") for m in self.left_behind],
        }


@contextlib.contextmanager
def _strict(store: Store, what: str) -> Iterator[None]:
    """Read with every warning (a partition skipped as unreadable, a damaged record) turned into a refusal:
    what a prune cannot read, it cannot know is unused."""
    heard: list[str] = []
    warn = store.warn
    # names that are not ours (a partition folder run_id=%2E%2E) are passed on: no run of ours is hidden among them
    store.warn = lambda message: (warn if isinstance(message, ForeignNames) else heard.append)(message)
    try:
        yield
    finally:
        store.warn = warn
    if heard:
        raise PruneRefused(
            f"Cannot prune {store.url}: {what} could not be read whole: {heard[0]} Fix or remove it, then prune again."
        )


def _pointer(store: Store) -> Champion | None:
    where = store.location(store.champion_file())
    try:
        data, _ = store.read_versioned(store.champion_file(), limit=SIDECAR_LIMIT)
        return None if data is None else Champion.model_validate_json(data)
    except (ValidationError, StoreError, OSError) as exc:
        raise PruneRefused(
            f"Cannot prune {store.url}: the champion pointer {where} cannot be read ({str(exc).splitlines()[0]}). "
            "Repair it (`mnist-pipeline champion promote RUN_ID` or `champion rollback`), then prune again."
        ) from exc


def _sidecar(store: Store, key: str, kind: type[BaseModel]):
    """A reference read for deciding what to keep; one that is absent or damaged keeps nothing (None)."""
    try:
        if store.kind(key) != "file":
            return None
        return kind.model_validate_json(store.read_bytes(key, limit=SIDECAR_LIMIT))
    except (ValidationError, StoreError, OSError):
        return None


def _model(store: Store, key: str) -> ModelRef | None:
    """The record of model ``key``; a key from a table that is not one name in the store names nothing here."""
    try:
        return _sidecar(store, store.model_info_file(key), ModelRef)
    except UnsafeKey:
        return None


def champion_models(pointer: Champion | None, promotions: pd.DataFrame) -> set[str]:
    """Every model that was ever champion, and every model a kept decision was compared against."""
    models = set(promotions.loc[promotions["decision"] == PROMOTED, "challenger_model_key"].dropna())
    models |= set(promotions["champion_before_model_key"].dropna())
    if pointer is not None:
        models.add(pointer.model_key)
    return {str(m) for m in models}


def kept(store: Store, keep_reports: int = KEEP_REPORTS, night: str | None = None, night_models: Iterable[str] = ()) -> Keep:
    """The folders of each kind a prune keeps (the module's docstring says which, and why); ``night`` and
    ``night_models``: the run pruning from inside a night, and the models it made or used, kept as a champion's are."""
    pointer = _pointer(store)
    with _strict(store, "the promotions table"):
        promotions = read_table(store, "promotions")
    with _strict(store, "the runs table"):
        runs = read_table(store, "runs")
    keep = Keep()
    models = champion_models(pointer, promotions) | {str(m) for m in night_models}
    keep.add("models", *models)
    refs = [r for r in (_model(store, m) for m in models) if r is not None]
    digests = {r.sha256 for r in refs} | ({pointer.sha256} if pointer is not None else set())

    keep.add("evaluations", *runs.loc[runs["model_key"].isin(models), "evaluation_key"].dropna().astype(str))
    evaluations = []
    for name in units(store, "evaluations"):
        ref = _sidecar(store, store.evaluation_info_file(name), EvaluationRef)
        if ref is not None and ref.model_sha256 in digests:
            keep.add("evaluations", name)
        if ref is not None and name in keep.names["evaluations"]:
            evaluations.append(ref)
    for name in units(store, "model-predictions"):
        ref = _sidecar(store, store.model_predictions_info_file(name), ModelPredictionsRef)
        if ref is not None and ref.model_sha256 in digests:
            keep.add("model-predictions", name)
            parts = ref.file_key.split("/")
            if len(parts) == 3 and parts[0] == FOLDERS["evaluations"]:
                keep.add("evaluations", parts[1])
    keep.add("plots", *(plots_key(m, e) for e in evaluations for m in refs if m.sha256 == e.model_sha256))

    last = runs.sort_values("finished_at", kind="stable")["run_id"].astype(str).tolist()[-keep_reports:] if keep_reports else []
    last += [night] if night else []
    keep.add("reports", *last)
    for run_id in last:
        manifest = read_manifest(store, run_id)
        if manifest is not None:
            keep.add("reports", *manifest.folders())
        elif store.kind(store.report_file(run_id, MANIFEST)) is not None:  # absent: a report from before, whole
            raise PruneRefused(
                f"Cannot prune {store.url}: the report manifest {store.location(store.report_file(run_id, MANIFEST))} "
                "cannot be read, so which earlier reports hold its figures cannot be told. Remove it (the report then "
                "shows only the figures in its own folder), then prune again."
            )

    for name in units(store, "checkpoints"):
        if store.kind(store.model_info_file(name)) != "file":  # training not finished: its resume point
            keep.add("checkpoints", name)
    return keep


def _no_night_running(store: Store, night: str | None = None) -> list[NightMarker]:
    """The markers of nights killed long ago; refuses while a night runs, other than ``night`` (the one pruning)."""
    try:
        running, left_behind = running_nights(store)
    except NightStateUnreadable as exc:
        raise PruneRefused(f"Cannot prune {store.url}: {exc}") from exc
    running = [m for m in running if m.run_id != night]
    if running:
        nights = ", ".join(f"{m.run_id} (started {m.started_at:%Y-%m-%d %H:%M} UTC)" for m in running)
        raise PruneRefused(
            f"Cannot prune {store.url} while a night runs: {nights}. Prune after it ends; a night killed without "
            f"ending leaves its marker in {store.location(store.night_markers_dir())}: remove it if that night is not running."
        )
    return left_behind


def prune(
    store: Store,
    apply: bool = False,
    keep_reports: int = KEEP_REPORTS,
    before_each: Callable[[DoomedFolder], None] | None = None,
    night: str | None = None,
    night_models: Iterable[str] = (),
) -> PruneResult:
    """List (``apply=False``) or remove what the store no longer needs. Refuses (``PruneRefused``) rather than guess.

    ``night``: the run id of the night pruning after it published (its own marker does not hold it back, its
    report is kept); ``night_models``: the models that night made or compared with, kept with what they rest on."""
    if keep_reports < 0:
        raise PruneRefused(f"keep_reports must be 0 or more, not {keep_reports}")
    left_behind = _no_night_running(store, night)
    with store.lock(LOCK):
        doomed = plan(store, kept(store, keep_reports, night, night_models))
        removed = []
        if apply:

            def check(folder: DoomedFolder) -> None:
                _no_night_running(store, night)  # a night that started since: stop before its first file
                if before_each is not None:
                    before_each(folder)

            removed = remove(store, doomed, before_each=check)
    return PruneResult(
        store=store.url, applied=apply, keep_reports=keep_reports, plan=doomed, removed=removed, left_behind=left_behind
    )


def prune_store(store: Store, night: str, models: Iterable[str], rules: RetentionRules) -> PruneResult:
    """A night's own prune, after it published: ``rules`` applied, night ``night`` and its ``models`` kept."""
    return prune(store, apply=True, keep_reports=rules.keep_reports, night=night, night_models=models)
