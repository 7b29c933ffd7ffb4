"""The Parquet tables a run publishes: confusion, per-digit metrics and predictions per slice, and the run itself.

On ``mnist-test``, ``confusion`` and ``per_class`` count the balanced test sample (as in schema 1) while
``predictions`` holds all 10 000 test images, ``sampled`` marking the sample: so both the reported accuracy and the
balanced accuracy of ``runs`` can be recomputed from the tables. ``mnist-selection`` and ``new-data`` hold every
image of the slice, as the gate compared them (every row ``sampled``). An evaluation's rows are written once,
by the first run that made it: a cached rerun adds its ``runs`` row (``reused_evaluation``), its gate's
``promotions`` row (``unchanged``) and any batch it ingested, but no evaluation rows, so counting or averaging
over the evaluation tables never counts one model twice.
"""

from __future__ import annotations

import json
from datetime import UTC, date, datetime

import numpy as np
import pandas as pd
from pydantic import BaseModel

from storage import Store
from storage.tables import read_partition, read_predictions, read_table, schema, write_table
from tasks.data.splits import SLICE_NEW, SLICE_SELECTION, SLICE_TEST
from tasks.evaluation.metrics import confusion_frame, confusion_matrix, per_class_frame
from tasks.publish.run_record import Execution, RunRecord


class TablesRef(BaseModel):
    run_id: str
    partition_keys: dict[str, str]  # table name → this run's partition (not "keys": that would shadow the mapping protocol)
    reused_evaluation: bool = False  # an earlier run wrote this evaluation's rows


UNFINISHED = "the night had not finished publishing (it stopped, or is still running)"


# The evaluation tables' columns as published, from the metrics' and the stored predictions' own names.
PUBLISHED_AS = {
    "count": "images",
    "label": "true_label",
    "accuracy_ci_low": "recall_ci_low",
    "accuracy_ci_high": "recall_ci_high",
    "test_index": "image_index",
}


def night_of(execution: Execution) -> date:
    """The night a run belongs to: the UTC date it was scheduled for (Prefect's expected start time, which the
    flow passes in), so a night that started late, after midnight, or was retried the next morning still groups
    with its own date; a run outside a deployment has no schedule and takes the date it started."""
    return (execution.scheduled_start or execution.started_at).astimezone(UTC).date()


def run_frame(run: RunRecord, reused_evaluation: bool, problem: str | None = UNFINISHED) -> pd.DataFrame:
    """The run's one ``runs`` row; ``problem`` None says the night finished publishing (``published``)."""
    model, evaluation, execution = run.model, run.evaluation, run.execution
    selection, new = evaluation.slice(SLICE_SELECTION), evaluation.slice(SLICE_NEW)
    now = datetime.now(UTC)
    return pd.DataFrame(
        [
            {
                "finished_at": now,
                "night": night_of(execution),
                "dataset_sha256": run.dataset.sha256,
                "model_key": model.key,
                "model_sha256": model.sha256,
                "evaluation_key": evaluation.key,
                "reused_evaluation": reused_evaluation,
                "parameters": json.dumps(run.parameters, sort_keys=True, default=str),
                "test_accuracy": evaluation.test_accuracy,
                "test_balanced_accuracy": evaluation.balanced_accuracy,
                "n_per_class": evaluation.n_per_class,
                "epochs": model.epochs,
                "model": model.network,
                "device": model.device,
                "backend": model.backend,
                "promoted": run.gate.promoted,
                "champion_after_model_key": run.gate.champion_model_key,
                "attempt": execution.attempt,
                "resumed_from_epoch": model.resumed_from_epoch,
                "scheduled_start": execution.scheduled_start,
                "started_at": execution.started_at,
                "dataset_version": run.dataset.version,
                "batches_accepted": len(run.dataset.batches),
                "selection_balanced_accuracy": selection.balanced_accuracy if selection else None,
                "new_data_balanced_accuracy": new.balanced_accuracy if new else None,
                "new_data_images": new.images if new else 0,
                "published": problem is None,
                "publish_problem": problem,
            }
        ]
    )


def _slice_frames(store: Store, run: RunRecord) -> dict[str, pd.DataFrame]:
    """Every slice's predictions, each row marked ``sampled`` when the slice's confusion and metrics count it."""
    evaluation = run.evaluation
    sample = read_predictions(store, evaluation.predictions_key, evaluation.predictions_sha256, evaluation.test_images)
    everything = read_predictions(
        store, evaluation.test_predictions_key, evaluation.test_predictions_sha256, evaluation.test_images
    )
    frames = {SLICE_TEST: everything.assign(sampled=everything["test_index"].isin(sample["test_index"]))}
    for part in evaluation.slices:
        frames[part.name] = read_predictions(store, part.predictions_key, part.predictions_sha256, part.images).assign(
            sampled=True
        )
    return frames


EVALUATION_TABLES = ("confusion", "per_class", "predictions")


def tabulated_by(store: Store, evaluation_key: str) -> str | None:
    """The earlier run that wrote this evaluation's rows, if one did (its ``runs`` row says so, written last) and its
    partitions still read with this evaluation's rows (a damaged one is skipped with a warning: this run then writes
    the rows again under its own run id)."""
    runs = read_table(store, "runs")
    wrote = runs[(runs["evaluation_key"] == evaluation_key) & ~runs["reused_evaluation"].fillna(False).astype(bool)]
    for run_id in wrote.sort_values("finished_at")["run_id"]:
        if all(_holds(store, table, str(run_id), evaluation_key) for table in EVALUATION_TABLES):
            return str(run_id)
    return None


def _holds(store: Store, table: str, run_id: str, evaluation_key: str) -> bool:
    key = store.table_file(table, run_id)
    return store.exists(key) and (read_partition(store, table, key)["evaluation_key"] == evaluation_key).any()


def per_class_rows(cm: np.ndarray) -> pd.DataFrame:
    """A slice's ``per_class`` rows: one per digit the slice holds, accuracy as ``recall``. A digit it does not hold
    has no row: its recall is undefined, and ``recall`` is never null. Review 9 (2026-12-07): an honest batch of 54
    images without a 9 (or with two 9s, of which the holdout took none) left the new-data slice without that digit,
    and every later night's tabulate failed on the null recall, so no night published until a 9 arrived."""
    frame = per_class_frame(cm).drop(columns=["accuracy"])
    return frame[frame["support"] > 0].reset_index(drop=True)


def tabulate(store: Store, run: RunRecord) -> TablesRef:
    """Write this run's partition of every table, the evaluation's rows only if no earlier run wrote them; ``runs``
    last, so a run listed there has its rows, with ``published`` false until ``record_finish`` says the night
    finished."""
    writer = tabulated_by(store, run.evaluation.key)
    keys = {table: store.table_file(table, writer) for table in EVALUATION_TABLES} if writer else {}
    if writer is None:
        tables: dict[str, list[pd.DataFrame]] = {table: [] for table in EVALUATION_TABLES}
        for name, predictions in _slice_frames(store, run).items():
            counted = predictions[predictions["sampled"]]
            cm = confusion_matrix(counted["true_label"].to_numpy(), counted["predicted_label"].to_numpy())
            for table, frame in (
                ("confusion", confusion_frame(cm)),
                ("per_class", per_class_rows(cm)),
                ("predictions", predictions),
            ):
                tables[table].append(frame.rename(columns=PUBLISHED_AS).assign(slice=name, evaluation_key=run.evaluation.key))
        for table, frames in tables.items():
            keys[table] = write_table(store, table, run.run_id, pd.concat(frames, ignore_index=True))
    if not run.batches:  # no batch tonight: an empty partition, so `batches` is a table DuckDB reads on any store
        keys["batches"] = write_table(store, "batches", run.run_id, schema("batches").empty_table().to_pandas())
    keys["runs"] = write_table(store, "runs", run.run_id, run_frame(run, reused_evaluation=writer is not None))
    return TablesRef(run_id=run.run_id, partition_keys=keys, reused_evaluation=writer is not None)


def record_finish(store: Store, run: RunRecord, tables: TablesRef | None, problems: list[str]) -> str:
    """Rewrite the run's ``runs`` row (its own partition, atomically) saying whether the night finished publishing:
    ``published`` true, or false with what failed. Written also when the tables step itself failed, so the table
    lists every night that decided, and says which did not finish."""
    problem = "; ".join(problems)[:4000] if problems else None
    reused = tables.reused_evaluation if tables is not None else False
    return write_table(store, "runs", run.run_id, run_frame(run, reused_evaluation=reused, problem=problem))
