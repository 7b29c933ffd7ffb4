"""Every step of a night has a time budget, derived from its work where its work grows with the parameters."""

from __future__ import annotations

import ast
from pathlib import Path

from flows.night import budgets, steps
from flows.night.pipeline import mnist_retrain
from tasks.data.batch_format import AcceptedBatch, BatchPart
from tasks.data.fetch import DatasetRef
from tasks.intake.checks import IngestRules
from tasks.training.config import TrainConfig

REPO = Path(__file__).resolve().parent.parent
BUDGETED_BY_THE_FLOW = {"ingest", "train", "evaluate", "gate"}  # their budget depends on the night's parameters


def dataset(train_rows: int = 0, holdout_rows: int = 0) -> DatasetRef:
    part = BatchPart(key="b", sha256="0" * 64, size=0, rows=0)
    batch = AcceptedBatch(
        digest="1" * 64,
        train=part.model_copy(update={"rows": train_rows}),
        holdout=part.model_copy(update={"rows": holdout_rows}),
    )
    return DatasetRef(sha256="d" * 64, files={}, sources=["store"], batches=[batch] if train_rows or holdout_rows else [])


def test_every_step_has_a_timeout_fixed_or_set_by_the_flow():
    tasks = {name: obj for name, obj in vars(steps).items() if hasattr(obj, "timeout_seconds") and hasattr(obj, "fn")}
    assert set(tasks) >= BUDGETED_BY_THE_FLOW | {"fetch_mnist", "plot", "tabulate", "report", "prune"}
    fixed = {name for name, task in tasks.items() if task.timeout_seconds}
    assert set(tasks) - fixed == BUDGETED_BY_THE_FLOW
    source = ast.parse((REPO / "flows/night/pipeline.py").read_text())
    set_by_flow = {
        node.func.value.attr
        for node in ast.walk(source)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "with_options"
        and isinstance(node.func.value, ast.Attribute)
        and any(k.arg == "timeout_seconds" for k in node.keywords)
    }
    assert set_by_flow == BUDGETED_BY_THE_FLOW
    assert mnist_retrain.timeout_seconds == budgets.FLOW_SECONDS


def test_budgets_grow_with_the_work():
    base = TrainConfig(epochs=2, train_limit=3000)
    assert budgets.train_seconds(dataset(), base.model_copy(update={"epochs": 4})) > budgets.train_seconds(dataset(), base)
    assert budgets.train_seconds(dataset(train_rows=5000), base) > budgets.train_seconds(dataset(), base)
    assert budgets.train_seconds(dataset(), TrainConfig(epochs=2, train_limit=3000, model="strong")) > budgets.train_seconds(
        dataset(), base
    )
    assert budgets.predict_seconds(dataset(holdout_rows=9000), "seed") > budgets.predict_seconds(dataset(), "seed")
    # batch size 1 trained at 292 images a second (review of 2026-12-07): 10 epochs of 55 000 images took ~1 880 s
    tiny = TrainConfig(epochs=10, batch_size=1)
    assert budgets.train_seconds(dataset(), tiny) >= 25 * 10 * 60_000 / 292
    assert budgets.ingest_seconds(IngestRules(max_files_per_night=40)) > budgets.ingest_seconds(IngestRules())


def test_the_budgets_leave_a_slow_two_core_machine_room():
    """The measured rates (bench/bench.py on 2026-11-26, 2 cores without a GPU): the seed network trained about 14 700 images a
    second, 40 epochs of the strong one took 12.7–14.0 min. Each budget allows at least 25 times that."""
    full = TrainConfig(epochs=15)
    assert budgets.train_seconds(dataset(), full) >= 25 * 15 * 60_000 / 14_700
    strong = TrainConfig(model="strong")
    assert budgets.train_seconds(dataset(), strong) >= 25 * 14 * 60
    # every step's budget fits in the flow's, for the default night of either network
    for config in (TrainConfig(), strong):
        night = (
            budgets.train_seconds(dataset(), config)
            + budgets.predict_seconds(dataset(), config.model)
            + budgets.gate_seconds(dataset(), config.model)
            + budgets.ingest_seconds(IngestRules())
            + 4 * budgets.FLOOR
        )
        assert night < budgets.FLOW_SECONDS, config.model
