"""What store content cannot do to a night: stop it in the report step, or take its decision with a failed publication.

Whole nights on real MNIST (1 epoch, a small subset) under the session's Prefect API, on a real store in which
damage is planted between nights, as a writer of the store could plant it (findings 2 and 3 of issue 39).
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.night.params import PipelineParameters
from storage import Store
from storage.tables import read_table, schema
from tests.conftest import sample_frames, with_mnist

pytestmark = pytest.mark.slow


def null_finish_row(store: Store, run_id: str) -> None:
    """A ``runs`` row valid for its schema's types, with ``finished_at`` null (pyarrow does not enforce nullability)."""
    target = schema("runs")
    loose = pa.schema([f.with_nullable(True) for f in target], metadata=target.metadata)
    frame = sample_frames(7)["runs"].assign(finished_at=None)
    folder = Path(store.path(store.table_file("runs", run_id))).parent
    folder.mkdir(parents=True)
    pq.write_table(pa.Table.from_pandas(frame[loose.names], schema=loose, preserve_index=False), folder / "part-0.parquet")


def test_damaged_tables_and_a_failed_report_end_nights_completed_with_the_decision(
    mnist_store, prefect_harness, tmp_path, monkeypatch
):
    from flows.night import steps
    from flows.night.pipeline import mnist_retrain

    store = with_mnist(Store(tmp_path / "store"), mnist_store)
    params = PipelineParameters(epochs=1, train_limit=500, n_per_class=10, seed=3, store=store.url)
    first = mnist_retrain(params)
    assert first.published and first.publish_problem is None
    (row,) = read_table(store, "runs", run_id=first.run_id).itertuples()
    assert row.published and pd.isna(row.publish_problem)

    # Finding 3: the first night's per_class partition emptied, and a runs row with a null finish time planted.
    Path(store.path(store.table_file("per_class", first.run_id))).write_bytes(b"")
    null_finish_row(store, "planted")
    second = mnist_retrain(params)  # a cached night: the same evaluation as the first
    assert second.step_states["evaluate"] == "Cached" and second.published, second.publish_problem
    rows = read_table(store, "per_class", run_id=second.run_id)
    assert len(rows) == 20  # it wrote the evaluation's rows again (10 digits × 2 slices), not pointed at the empty ones
    assert Path(store.path(store.report_file(second.run_id, "trend.png"))).is_file()

    # Finding 2's failure boundary: the report step fails as a full disk makes it fail (the store's door repairs a
    # file or link planted where the reports folder belongs, so the fault is injected where the step writes).
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(steps, "publish_report", full_disk)
    third = mnist_retrain(params)
    assert not third.published and "report failed" in third.publish_problem
    assert third.report_dir is None  # and the gate's decision stands, recorded as every decision is
    (row,) = read_table(store, "runs", run_id=third.run_id).itertuples()
    assert not row.published and "report failed (OSError" in row.publish_problem
    decided = read_table(store, "promotions", run_id=third.run_id)
    assert list(decided["decision"]) == [third.decision]


def test_a_night_whose_models_training_history_is_damaged_ends_completed_with_the_curves_said_unavailable(
    mnist_store, prefect_harness, tmp_path
):
    """The model's training history (its curves, a Parquet file in the store) truncated by a writer of the store:
    the next night that draws the model's plots ends Completed with its decision, its curves figure says they are
    unavailable, and the damage is reported in the night's log."""
    import logging
    import re

    from flows.night.pipeline import mnist_retrain
    from tasks.evaluation.plots import png_bytes, training_curves
    from tasks.training.model import ModelRef

    store = with_mnist(Store(tmp_path / "store"), mnist_store)
    params = PipelineParameters(epochs=1, train_limit=500, n_per_class=10, seed=3, store=store.url)
    first = mnist_retrain(params)
    (model,) = [
        ModelRef.model_validate_json(store.read_bytes(store.model_info_file(k))) for k in os.listdir(store.path("models"))
    ]
    history = Path(store.path(model.history_key))
    history.write_bytes(history.read_bytes()[:40])  # truncated: a Parquet file without its footer

    said: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: said.append(record.getMessage())
    logger = logging.getLogger("prefect")
    logger.addHandler(handler)
    try:  # another evaluation sample: the model is reused (its training cached), its plots are drawn again
        second = mnist_retrain(params.model_copy(update={"n_per_class": 12}))
    finally:
        logger.removeHandler(handler)
    assert second.step_states["train"] == "Cached" and second.step_states["plot"] == "Completed", second.step_states
    assert second.published and second.decision in ("promoted", "rejected", "unchanged"), second.publish_problem
    (row,) = read_table(store, "runs", run_id=second.run_id).itertuples()
    assert row.published
    (warning,) = [line for line in said if "training history" in line]
    assert f"The training history of model {model.key} is damaged" in warning and "curves are not drawn" in warning
    problem = re.search(r"is damaged \((.*)\): its curves are not drawn", warning, re.S).group(1)
    unavailable = png_bytes(training_curves(None, problem))  # the figure that says "Training curves unavailable: ..."
    assert Path(store.path(store.report_file(second.run_id, "training_curves.png"))).read_bytes() == unavailable
    assert Path(store.path(store.report_file(first.run_id, "training_curves.png"))).read_bytes() != unavailable
