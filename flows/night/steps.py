"""The thin Prefect layer over ``tasks/``: each step as a ``@task`` with its cache policy, logger and retries.

Each step is named as the ``tasks/`` function it wraps. Steps take and return small references
(store URL, paths, digests), never arrays or models, so they can be cached across runs, retried,
and run on another machine against the same store.
Heavy steps are cached on content (``flows/night/caching.py``); per-run publication (tables, report
folder) always runs, as it is the record of that run.

Every step has a time budget (Prefect's ``timeout_seconds``): fixed here for the steps whose work does not grow
with the parameters, derived from the night's work for ingest, train, evaluate and gate (``flows/night/budgets.py``,
set by the flow with ``with_options``). What a step's failure means for the night is the flow's rule
(``flows/night/pipeline.py``).
"""

from __future__ import annotations

import os

from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event
from prefect.logging import get_run_logger

import tasks.champion.promotion
import tasks.data.fetch
import tasks.intake.ingest
import tasks.publish.tabulate
from flows.night import caching
from flows.night.budgets import FLOOR, PRUNE_SECONDS
from flows.night.locks import open_store
from flows.night.results import ReferenceSerializer
from tasks.champion.gate import GateRules
from tasks.champion.promotion import GateRef
from tasks.data import training_set
from tasks.data.fetch import DatasetRef, default_sources, load_mnist
from tasks.data.training_set import DEFAULT_MAX_TRAINING_IMAGES
from tasks.evaluation.evaluate import EvaluationRef, evaluate_model
from tasks.evaluation.plots import PlotsRef, render_plots
from tasks.intake.checks import IngestRules
from tasks.intake.ingest import INCOMING_ENV, IngestRef
from tasks.publish.report import ReportRef, publish_report
from tasks.publish.retention import PruneRefused, prune_store
from tasks.publish.retention_rules import RetentionRules
from tasks.publish.run_record import RunRecord
from tasks.publish.tabulate import TablesRef
from tasks.training.model import ModelRef
from tasks.training.train import TrainConfig, train_model

PROGRESS_KEY = "mnist-training-progress"
REFERENCES = ReferenceSerializer()  # cache records hold data only: see flows/night/results.py


@task(
    name="fetch-mnist",
    cache_policy=caching.FETCH,
    persist_result=True,
    result_serializer=REFERENCES,
    retries=1,
    retry_delay_seconds=5,
    timeout_seconds=FLOOR,
)
def fetch_mnist(store_url: str, mnist_source: str | None = None) -> DatasetRef:
    logger = get_run_logger()
    ref = tasks.data.fetch.fetch_mnist(open_store(store_url), sources=default_sources(mnist_source), log=logger.info)
    logger.info("MNIST %s verified (from %s)", ref.sha256[:12], ", ".join(ref.sources))
    return ref


BATCH_EVENT = "mnist.batch.{decision}"


@task(name="ingest", cache_policy=NO_CACHE)
def ingest(
    store_url: str,
    dataset: DatasetRef,
    rules: IngestRules,
    run_id: str,
    held_back: int = 0,
    train_limit: int | None = None,
    max_training_images: int = DEFAULT_MAX_TRAINING_IMAGES,
) -> IngestRef:
    """Check the batches waiting in the incoming location (``$MNIST_INCOMING``, else ``<store>/incoming``: the
    worker's setting, never a run parameter, so an API caller cannot point a worker at files to read and
    delete); never cached, since it reads what arrived. A quarantined batch emits an event and the night goes on.
    The dataset it returns holds the accepted batches the training-set policy chose (``tasks/data/training_set.py``);
    a budget that cannot hold the base set is refused before any batch is read."""
    logger = get_run_logger()
    store = open_store(store_url, warn=logger.warning)
    incoming = tasks.intake.ingest.incoming_store(store, os.environ.get(INCOMING_ENV) or None)
    base = dataset.model_copy(update={"held_back": held_back})
    base_images = training_set.base_images(load_mnist(store, base).y_train, held_back, train_limit)
    training_set.choose_batches([], base_images, max_training_images)  # a misconfigured budget: refused first
    ref = tasks.intake.ingest.ingest_batches(store, incoming, base, rules, run_id, logger.info, max_training_images, base_images)
    chosen = training_set.choose_batches(ref.dataset.batches, base_images, max_training_images)
    if chosen.retired:
        logger.info(
            "Training set: %d MNIST images and the %d newest accepted batches (%d images in all, max_training_images=%d); "
            "%d older accepted batches (%d images) retired from tonight's dataset, kept in the store",
            base_images,
            len(chosen.chosen),
            chosen.images(base_images),
            max_training_images,
            len(chosen.retired),
            sum(b.train.rows for b in chosen.retired),
        )
    ref = ref.model_copy(update={"dataset": ref.dataset.model_copy(update={"batches": chosen.chosen})})
    for record in ref.night:
        emit_event(
            event=BATCH_EVENT.format(decision=record.status),
            resource={"prefect.resource.id": f"mnist.batch.{record.digest}", "prefect.resource.name": f"batch {record.file}"},
            payload={"decision": record.status, "reason": record.reason, "digest": record.digest, "file": record.file},
        )
        if record.status == "quarantined":
            logger.warning("Batch %s (%s) quarantined: %s", record.digest[:12], record.file, record.reason)
    logger.info(
        "Dataset version %s: MNIST and %d accepted batches (%d new tonight, %d quarantined)",
        ref.dataset.version[:12],
        len(ref.dataset.batches),
        len(ref.night) - len(ref.quarantined),
        len(ref.quarantined),
    )
    return ref


@task(name="train", cache_policy=caching.TRAIN, persist_result=True, result_serializer=REFERENCES)
def train(store_url: str, dataset: DatasetRef, config: TrainConfig, reuse: bool = True) -> ModelRef:
    logger = get_run_logger()
    progress = create_progress_artifact(
        0.0, key=PROGRESS_KEY, description=f"Training {config.model.value}: epochs done / {config.epochs}"
    )

    def on_epoch(done: int, total: int, row: dict) -> None:
        update_progress_artifact(progress, 100.0 * done / total)

    ref = train_model(open_store(store_url), dataset, config, log=logger.info, on_epoch=on_epoch, reuse=reuse)
    update_progress_artifact(progress, 100.0)
    logger.info("Model %s: %s (sha256 %s)", ref.network, ref.file_key, ref.sha256[:12])
    return ref


@task(name="evaluate", cache_policy=caching.EVALUATE, persist_result=True, result_serializer=REFERENCES)
def evaluate(
    store_url: str, dataset: DatasetRef, model: ModelRef, n_per_class: int, seed: int, reuse: bool = True
) -> EvaluationRef:
    ref = evaluate_model(open_store(store_url), dataset, model, n_per_class, seed, reuse=reuse)
    get_run_logger().info(
        "Test accuracy %.4f on %d images; balanced accuracy %.4f on %d (%d per digit)",
        ref.test_accuracy,
        ref.test_images,
        ref.balanced_accuracy,
        ref.n_evaluated,
        ref.n_per_class,
    )
    return ref


@task(name="plot", cache_policy=caching.PLOT, persist_result=True, result_serializer=REFERENCES, timeout_seconds=FLOOR)
def plot(store_url: str, dataset: DatasetRef, model: ModelRef, evaluation: EvaluationRef) -> PlotsRef:
    return render_plots(open_store(store_url), dataset, model, evaluation)


MODEL_EVENT = "mnist.model.{decision}"
DAMAGED_EVENT = "mnist.champion.damaged"  # flows/night/alerts.py: the champion's model was set aside


@task(name="gate", cache_policy=NO_CACHE)
def gate(
    store_url: str, run_id: str, dataset: DatasetRef, model: ModelRef, evaluation: EvaluationRef, rules: GateRules
) -> GateRef:
    """Decide whether this run's model replaces the champion; never cached, since the champion moves."""
    logger = get_run_logger()
    decided = tasks.champion.promotion.gate(open_store(store_url), dataset, model, evaluation, rules, run_id, log=logger.warning)
    emit_event(
        event=MODEL_EVENT.format(decision=decided.decision),
        resource={
            "prefect.resource.id": f"mnist.model.{model.key}",
            "prefect.resource.name": f"{model.network} {model.key[:12]}",
        },
        payload=decided.row,
    )
    if decided.damaged_champion:  # logged once by the gate itself (its lookup's problem); heard by the alerts here
        before = decided.row.get("champion_before_model_key") or "none"
        emit_event(
            event=DAMAGED_EVENT,
            resource={"prefect.resource.id": f"mnist.champion.{run_id}", "prefect.resource.name": f"champion for run {run_id}"},
            payload={"reason": decided.damaged_champion, "decision": decided.decision, "compared_against": before},
        )
    logger.info("Model %s %s: %s", model.key[:12], decided.decision, decided.reason)
    return decided


@task(name="tabulate", cache_policy=NO_CACHE, timeout_seconds=FLOOR)
def tabulate(store_url: str, run: RunRecord) -> TablesRef:
    return tasks.publish.tabulate.tabulate(open_store(store_url), run)


@task(name="report", cache_policy=NO_CACHE, timeout_seconds=FLOOR)
def report(store_url: str, run: RunRecord, plots: PlotsRef, tables: TablesRef) -> ReportRef:
    return publish_report(open_store(store_url), run, plots, tables)


@task(name="prune", cache_policy=NO_CACHE, timeout_seconds=PRUNE_SECONDS)
def prune(store_url: str, run_id: str, models: list[str], rules: RetentionRules) -> int:
    """Remove what no night needs any more (``tasks/publish/retention.py``), keeping tonight's work; returns the
    bytes removed. Never cached: the store changes every night.

    A refusal (another night runs, a table has rows or partitions the readers skip, the pointer cannot be read) is
    a warning, not a failure: tonight's record is written whole, and a prune that cannot know what is unused
    removes nothing. ``mnist-pipeline store prune`` says the same reason until it is mended."""
    logger = get_run_logger()
    try:
        result = prune_store(open_store(store_url, warn=logger.warning), run_id, models, rules)
    except PruneRefused as exc:
        logger.warning("The store was not pruned tonight, and nothing was removed: %s", exc)
        return 0
    logger.info(
        "Store pruned: %d folders (%d files, %.1f MB) removed; kept %s",
        len(result.plan.doomed),
        len(result.removed),
        result.plan.bytes / 1e6,
        ", ".join(f"{n} {kind}" for kind, n in result.plan.kept.items()),
    )
    return result.plan.bytes
