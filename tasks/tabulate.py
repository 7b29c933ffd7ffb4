"""The Parquet tables a run publishes: confusion, per-digit metrics, predictions and the run itself."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pandas as pd
from pydantic import BaseModel

from storage import Store
from storage.tables import read_frame, write_table
from tasks.metrics import confusion_frame, confusion_matrix, per_class_frame
from tasks.run_record import RunRecord


class TablesRef(BaseModel):
    run_id: str
    partition_keys: dict[str, str]  # table name → this run's partition (not "keys": that would shadow the mapping protocol)


def run_frame(run: RunRecord) -> pd.DataFrame:
    model, evaluation, execution = run.model, run.evaluation, run.execution
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
            }
        ]
    )


def tabulate(store: Store, run: RunRecord) -> TablesRef:
    """Write this run's partition of every table; ``runs`` last, so a run listed there is complete."""
    evaluation = run.evaluation
    predictions = read_frame(store, evaluation.predictions_key, evaluation.predictions_sha256)
    cm = confusion_matrix(predictions["true_label"].to_numpy(), predictions["predicted_label"].to_numpy())
    keys = {
        "confusion": write_table(store, "confusion", run.run_id, confusion_frame(cm)),
        "per_class": write_table(store, "per_class", run.run_id, per_class_frame(cm)),
        "predictions": write_table(store, "predictions", run.run_id, predictions),
    }
    keys["runs"] = write_table(store, "runs", run.run_id, run_frame(run))
    return TablesRef(run_id=run.run_id, partition_keys=keys)
