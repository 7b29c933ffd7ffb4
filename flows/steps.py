"""The thin Prefect layer over ``tasks/``: each step as a ``@task`` with its logger and retries.

Steps take and return small references (store URL, paths, digests), never arrays or models, so
they can be cached, retried and run on another machine against the same store.
"""

from __future__ import annotations

from prefect import task
from prefect.logging import get_run_logger

from storage import Store
from tasks.evaluate import EvaluationRef, evaluate_model
from tasks.fetch import DatasetRef, default_sources, fetch_mnist
from tasks.plots import ReportRef, render_report
from tasks.tabulate import TablesRef, tabulate
from tasks.train import ModelRef, TrainConfig, train_model


@task(name="fetch-mnist", retries=1, retry_delay_seconds=5)
def fetch(store_url: str, mnist_source: str | None = None) -> DatasetRef:
    logger = get_run_logger()
    ref = fetch_mnist(Store(store_url), sources=default_sources(mnist_source), log=logger.info)
    logger.info("MNIST %s verified (from %s)", ref.digest[:12], ", ".join(ref.sources))
    return ref


@task(name="train")
def train(store_url: str, dataset: DatasetRef, config: TrainConfig) -> ModelRef:
    logger = get_run_logger()
    ref = train_model(Store(store_url), dataset, config, log=logger.info)
    logger.info("Model %s saved: %s (sha256 %s)", ref.model, ref.path, ref.sha256[:12])
    return ref


@task(name="evaluate")
def evaluate(store_url: str, dataset: DatasetRef, model: ModelRef, n_per_class: int, seed: int) -> EvaluationRef:
    ref = evaluate_model(Store(store_url), dataset, model, n_per_class, seed)
    get_run_logger().info(
        "Test accuracy %.4f on %d images; balanced accuracy %.4f on %d (%d per digit)",
        ref.test_accuracy, ref.test_images, ref.balanced_accuracy, ref.n_evaluated, ref.n_per_class,
    )
    return ref


@task(name="tabulate")
def write_tables(
    store_url: str, run_id: str, dataset: DatasetRef, model: ModelRef, evaluation: EvaluationRef, parameters: dict
) -> TablesRef:
    return tabulate(Store(store_url), run_id, dataset, model, evaluation, parameters)


@task(name="plot")
def plot(store_url: str, run_id: str, dataset: DatasetRef, model: ModelRef, evaluation: EvaluationRef) -> ReportRef:
    store = Store(store_url)
    return render_report(store, run_id, dataset, model, evaluation, store.path("tables"))
