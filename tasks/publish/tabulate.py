"""The Parquet tables a run publishes: confusion, per-digit metrics and predictions per slice, and the run itself.

The ``mnist-test`` slice's rows are the balanced test sample (as in schema 1); ``mnist-selection`` and
``new-data`` hold every image of the slice, as the gate compared them.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pandas as pd
from pydantic import BaseModel

from storage import Store
from storage.tables import read_frame, write_table
from tasks.data.splits import SLICE_NEW, SLICE_SELECTION, SLICE_TEST
from tasks.evaluation.metrics import confusion_frame, confusion_matrix, per_class_frame
from tasks.publish.run_record import RunRecord


class TablesRef(BaseModel):
    run_id: str
    partition_keys: dict[str, str]  # table name → this run's partition (not "keys": that would shadow the mapping protocol)


def run_frame(run: RunRecord) -> pd.DataFrame:
    model, evaluation, execution = run.model, run.evaluation, run.execution
    selection, new = evaluation.slice(SLICE_SELECTION), evaluation.slice(SLICE_NEW)
    return pd.DataFrame(
        [
            {
                "finished_at": datetime.now(UTC),
                "dataset_sha256": run.dataset.sha256,
                "model_sha256": model.sha256,
                "parameters": json.dumps(run.parameters, sort_keys=True, default=str),
                "test_accuracy": evaluation.test_accuracy,
                "balanced_accuracy": evaluation.balanced_accuracy,
                "n_per_class": evaluation.n_per_class,
                "epochs": model.epochs,
                "model": model.network,
                "device": model.device,
                "backend": model.backend,
                "promoted": run.gate.promoted,
                "champion_model_key": run.gate.champion_model_key,  # the champion after this run
                "attempt": execution.attempt,
                "resumed_from_epoch": model.resumed_from_epoch,
                "scheduled_start": execution.scheduled_start,
                "started_at": execution.started_at,
                "dataset_version": run.dataset.version,
                "batches_accepted": len(run.dataset.batches),
                "selection_balanced_accuracy": selection.balanced_accuracy if selection else None,
                "new_data_balanced_accuracy": new.balanced_accuracy if new else None,
                "new_data_images": new.images if new else 0,
            }
        ]
    )


def _slice_frames(store: Store, run: RunRecord) -> dict[str, pd.DataFrame]:
    evaluation = run.evaluation
    frames = {SLICE_TEST: read_frame(store, evaluation.predictions_key, evaluation.predictions_sha256)}
    for part in evaluation.slices:
        frames[part.name] = read_frame(store, part.predictions_key, part.predictions_sha256)
    return frames


def tabulate(store: Store, run: RunRecord) -> TablesRef:
    """Write this run's partition of every table; ``runs`` last, so a run listed there is complete."""
    tables: dict[str, list[pd.DataFrame]] = {"confusion": [], "per_class": [], "predictions": []}
    for name, predictions in _slice_frames(store, run).items():
        cm = confusion_matrix(predictions["true_label"].to_numpy(), predictions["predicted_label"].to_numpy())
        for table, frame in (
            ("confusion", confusion_frame(cm)),
            ("per_class", per_class_frame(cm)),
            ("predictions", predictions),
        ):
            tables[table].append(frame.assign(slice=name))
    keys = {
        table: write_table(store, table, run.run_id, pd.concat(frames, ignore_index=True)) for table, frames in tables.items()
    }
    keys["runs"] = write_table(store, "runs", run.run_id, run_frame(run))
    return TablesRef(run_id=run.run_id, partition_keys=keys)
