"""What one run has decided so far, as one object: the steps that publish a run (tables, report, summary)
take it whole instead of eight loose arguments, so a new fact about a run is added in one place."""

from __future__ import annotations

from datetime import UTC, datetime

from pydantic import BaseModel, Field

from tasks.champion.promotion import GateRef
from tasks.data.fetch import DatasetRef
from tasks.evaluation.evaluate import EvaluationRef
from tasks.intake.ingest import BatchRecord
from tasks.training.model import ModelRef


class Execution(BaseModel):
    """When this execution of the run was due and began, and which attempt it is: facts the orchestrator
    reports (``flows/night/recovery.py``), recorded here as they are."""

    attempt: int = 1
    scheduled_start: datetime | None = None  # None outside a deployment
    started_at: datetime = Field(default_factory=lambda: datetime.now(UTC))


class RunRecord(BaseModel):
    """A run after its gate: its id and parameters, the artifacts it made or reused, and the champion decision."""

    run_id: str
    parameters: dict  # JSON-able, as recorded in the runs table
    dataset: DatasetRef
    model: ModelRef
    evaluation: EvaluationRef
    gate: GateRef
    execution: Execution = Field(default_factory=Execution)
    batches: list[BatchRecord] = []  # the batches this night ingested, accepted or quarantined
