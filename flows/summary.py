"""What one run returns and shows: its headline numbers, where its outputs are, and the champion decision."""

from __future__ import annotations

from pydantic import BaseModel

from tasks.tabulate import Attempt


class RunSummary(BaseModel):
    run_id: str
    seed: int
    test_accuracy: float
    balanced_accuracy: float
    n_evaluated: int
    network: str  # seed or strong
    backend: str  # the Keras backend it was trained on
    device: str
    precision: str
    model_path: str
    tables_dir: str
    report_dir: str
    report_index: str
    step_states: dict[str, str]  # fetch-mnist, train, evaluate, plot: Completed, or Cached when reused
    decision: str  # promoted or rejected
    decision_reason: str
    forced: bool
    champion_model_key: str | None  # the champion after this run
    champion_run_id: str | None
    attempt: Attempt  # attempt 2 and up: this run restarted after crashing
    resumed_from_epoch: int  # training this run did resumed from the checkpoint after this epoch (0: from scratch)
