"""What one run returns and shows: its headline numbers, where its outputs are, and the champion decision."""

from __future__ import annotations

from pydantic import BaseModel

from flows.night.recovery import Attempt
from storage import Store
from tasks.data.splits import SLICE_NEW, SLICE_SELECTION
from tasks.publish.report import ReportRef
from tasks.publish.run_record import RunRecord


class RunSummary(BaseModel):
    run_id: str
    seed: int
    test_accuracy: float
    test_balanced_accuracy: float  # on the balanced test sample: reported, never decided on
    n_evaluated: int
    network: str  # seed or strong
    backend: str  # the Keras backend it was trained on
    device: str
    precision: str
    model_path: str
    tables_dir: str
    report_dir: str | None  # None: the report step failed (``publish_problem``)
    report_index: str | None
    step_states: dict[str, str]  # every step in order; fetch-mnist, train, evaluate, plot Cached when reused
    decision: str  # promoted, rejected, or unchanged (already the champion)
    decision_reason: str
    forced: bool
    champion_model_key: str | None  # the champion after this run
    champion_run_id: str | None
    attempt: Attempt  # attempt 2 and up: this run restarted after crashing
    resumed_from_epoch: int  # training this run did resumed from the checkpoint after this epoch (0: from scratch)
    selection_balanced_accuracy: float  # where the gate decides, with new-data
    new_data_balanced_accuracy: float | None  # None until a batch was accepted
    new_data_images: int
    dataset_version: str
    batches_accepted: int  # in the dataset version
    batches_tonight: dict[str, str] = {}  # digest → accepted / quarantined
    published: bool = True  # False: a publication step failed; the decision above stands
    publish_problem: str | None = None

    @classmethod
    def of(cls, run: RunRecord, store: Store, report: ReportRef | None, step_states: dict[str, str], seed: int, attempt: Attempt):
        model, evaluation, decided = run.model, run.evaluation, run.gate
        new = evaluation.slice(SLICE_NEW)
        return cls(
            run_id=run.run_id,
            seed=seed,
            test_accuracy=evaluation.test_accuracy,
            test_balanced_accuracy=evaluation.balanced_accuracy,
            n_evaluated=evaluation.n_evaluated,
            network=model.network,
            backend=model.backend,
            device=model.device,
            precision=model.precision,
            model_path=store.location(model.file_key),
            tables_dir=store.location("tables"),
            report_dir=store.location(report.directory_key) if report else None,
            report_index=store.location(report.file_keys["index.md"]) if report else None,
            step_states=step_states,
            decision=decided.decision,
            decision_reason=decided.reason,
            forced=decided.forced,
            champion_model_key=decided.champion_model_key,
            champion_run_id=decided.champion_after.run_id if decided.champion_after else None,
            attempt=attempt,
            resumed_from_epoch=model.resumed_from_epoch if step_states["train"] == "Completed" else 0,
            selection_balanced_accuracy=evaluation.slice(SLICE_SELECTION).balanced_accuracy,
            new_data_balanced_accuracy=new.balanced_accuracy if new else None,
            new_data_images=new.images if new else 0,
            dataset_version=run.dataset.version,
            batches_accepted=len(run.dataset.batches),
            batches_tonight={b.digest: b.status for b in run.batches},
        )
