"""The nightly retrain: fetch verified MNIST, train the CNN, evaluate it on a balanced sample,
publish confusion tables as Parquet, and render the report."""

from __future__ import annotations

import uuid

from prefect import flow
from prefect.logging import get_run_logger
from prefect.runtime import flow_run
from pydantic import BaseModel

from flows import steps
from flows.params import PipelineParameters
from storage import Store
from tasks.train import TrainConfig


class RunSummary(BaseModel):
    run_id: str
    test_accuracy: float
    balanced_accuracy: float
    n_evaluated: int
    model: str
    device: str
    precision: str
    model_path: str
    tables_dir: str
    report_dir: str
    report_index: str


@flow(name="mnist-retrain", description=__doc__)
def mnist_retrain(params: PipelineParameters = PipelineParameters()) -> RunSummary:
    logger = get_run_logger()
    store = Store.resolve(params.store)
    store.check_writable()  # before any download or training, not after fifteen epochs
    run_id = flow_run.get_id() or uuid.uuid4().hex
    logger.info("Run %s writing to store %s", run_id, store.url)

    config = TrainConfig(
        model=params.model,
        epochs=params.epochs,
        batch_size=params.batch_size,
        seed=params.seed,
        train_limit=params.train_limit,
        precision=params.precision.value,
    )
    dataset = steps.fetch(store.url, params.mnist_source)
    model = steps.train(store.url, dataset, config)
    evaluation = steps.evaluate(store.url, dataset, model, params.n_per_class, params.seed)
    tables = steps.write_tables(store.url, run_id, dataset, model, evaluation, params.model_dump(mode="json"))
    report = steps.plot(store.url, run_id, dataset, model, evaluation)

    return RunSummary(
        run_id=run_id,
        test_accuracy=evaluation.test_accuracy,
        balanced_accuracy=evaluation.balanced_accuracy,
        n_evaluated=evaluation.n_evaluated,
        model=model.model,
        device=model.device,
        precision=model.precision,
        model_path=model.path,
        tables_dir=store.path("tables"),
        report_dir=report.directory,
        report_index=report.files["index.md"],
    )
