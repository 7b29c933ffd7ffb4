"""The Parquet tables a run publishes: confusion, per-digit metrics, predictions and the run itself."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pandas as pd
from pydantic import BaseModel

from storage import Store
from storage.tables import read_frame, write_table
from tasks.evaluate import EvaluationRef
from tasks.fetch import DatasetRef
from tasks.metrics import confusion_frame, confusion_matrix, per_class_frame
from tasks.model import ModelRef


class Attempt(BaseModel):
    """One execution of a run: which attempt, why there were earlier ones, when it was due and when it began.

    The orchestrator fills it in (``flows/recovery.py``); here it is only recorded.
    """

    number: int = 1
    crashed: list[str] = []  # the messages of earlier attempts' Crashed states
    scheduled_start: datetime | None = None  # when the scheduler meant it to run; None outside a deployment
    started_at: datetime

    @property
    def restarted(self) -> bool:
        return self.number > 1


class TablesRef(BaseModel):
    run_id: str
    paths: dict[str, str]


def run_frame(
    dataset: DatasetRef,
    model: ModelRef,
    evaluation: EvaluationRef,
    parameters: dict,
    promoted: bool,
    champion_model_key: str | None,
    attempt: Attempt,
) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "finished_at": datetime.now(UTC),
                "dataset_sha256": dataset.sha256,
                "model_sha256": model.sha256,
                "parameters": json.dumps(parameters, sort_keys=True, default=str),
                "test_accuracy": evaluation.test_accuracy,
                "balanced_accuracy": evaluation.balanced_accuracy,
                "n_per_class": evaluation.n_per_class,
                "epochs": model.epochs,
                "model": model.network,
                "device": model.device,
                "backend": model.backend,
                "promoted": promoted,
                "champion_model_key": champion_model_key,
                "attempt": attempt.number,
                "resumed_from_epoch": model.resumed_from_epoch,
                "scheduled_start": attempt.scheduled_start,
                "started_at": attempt.started_at,
            }
        ]
    )


def tabulate(
    store: Store,
    run_id: str,
    dataset: DatasetRef,
    model: ModelRef,
    evaluation: EvaluationRef,
    parameters: dict,
    promoted: bool,
    champion_model_key: str | None,
    attempt: Attempt | None = None,
) -> TablesRef:
    """Write this run's partition of every table; ``runs`` last, so a run listed there is complete.

    ``promoted`` and ``champion_model_key`` are the champion gate's outcome (the champion after this run);
    ``attempt`` says whether this execution restarted a crashed one, and when the run was due.
    """
    attempt = attempt or Attempt(started_at=datetime.now(UTC))  # called outside an orchestrator: the first attempt
    predictions = read_frame(store, evaluation.path, evaluation.predictions_sha256)
    cm = confusion_matrix(predictions["true_label"].to_numpy(), predictions["predicted_label"].to_numpy())
    paths = {
        "confusion": write_table(store, "confusion", run_id, confusion_frame(cm)),
        "per_class": write_table(store, "per_class", run_id, per_class_frame(cm)),
        "predictions": write_table(store, "predictions", run_id, predictions),
    }
    paths["runs"] = write_table(
        store, "runs", run_id, run_frame(dataset, model, evaluation, parameters, promoted, champion_model_key, attempt)
    )
    return TablesRef(run_id=run_id, paths=paths)
