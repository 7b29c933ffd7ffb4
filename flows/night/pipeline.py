"""The nightly retrain: fetch verified MNIST, check the new batches that arrived, train the CNN on both, evaluate
it on every slice, decide on the selection and new-data slices whether it replaces the champion, publish
confusion tables as Parquet, and render the report."""

from __future__ import annotations

import uuid

from prefect import flow
from prefect.logging import get_logger, get_run_logger
from prefect.runtime import deployment, flow_run

from flows.night import artifacts, recovery, steps
from flows.night.caching import call_cached
from flows.night.confinement import check_deployed_run
from flows.night.locks import open_store
from flows.night.params import PipelineParameters, data_seed, run_seed
from flows.night.results import result_storage
from flows.night.summary import RunSummary
from storage.nights import mark_ended, mark_running
from tasks.publish.run_record import RunRecord


def night_ended(flow, flow_run, state) -> None:
    """A night that failed, crashed or was cancelled no longer runs: its marker goes (``storage/nights.py``), so
    ``store prune`` is not held back by it. A hook must not fail the run's end: a marker it cannot remove is logged."""
    params = flow_run.parameters.get("params") or {}
    store_url = params.get("store") if isinstance(params, dict) else getattr(params, "store", None)
    try:
        mark_ended(open_store(store_url, warn=get_logger("mnist.night").warning), str(flow_run.id))
    except Exception as exc:  # noqa: BLE001 (reported; the marker ages out after NIGHT_HOURS)
        get_logger("mnist.night").warning("The night marker of run %s was not removed: %s", flow_run.id, exc)


@flow(
    name="mnist-retrain",
    on_failure=[night_ended],
    on_crashed=[night_ended],
    on_cancellation=[night_ended],
    description="Fetch verified MNIST, train the CNN, evaluate it on a balanced sample, gate it against the champion, "
    "publish Parquet tables and plots.",
)
def mnist_retrain(params: PipelineParameters = PipelineParameters()) -> RunSummary:
    logger = get_run_logger()
    if deployment.get_id() is not None:  # started through the API: only what this worker serves
        params = check_deployed_run(params)
    store = open_store(params.store)
    if params.store:  # as the store spells itself: no credentials, whatever the caller passed
        params = params.model_copy(update={"store": store.url})
    store.check_writable()  # before any download or training, not after fifteen epochs
    attempt = recovery.current_attempt()
    recovery.check_attempt(attempt)
    if attempt.restarted:
        logger.warning("Attempt %d of this run: the previous one crashed (%s)", attempt.number, attempt.crashed[-1])
    run_id = flow_run.get_id() or uuid.uuid4().hex
    logger.info("Run %s writing to store %s", run_id, store.url)
    mark_running(store, run_id)  # `store prune` refuses while it is there; removed at the end, or by night_ended

    results = result_storage(store)
    reuse = not params.refresh

    def cached(step, *args):  # the store holds the cache; `refresh` recomputes everything after the download
        refresh = params.refresh and step is not steps.fetch_mnist
        return call_cached(step, *args, result_storage=results, refresh=refresh, warn=logger.warning)

    fetched = cached(steps.fetch_mnist, store.url, params.mnist_source)
    ingested = steps.ingest(store.url, fetched.result(), params.ingest, run_id, params.held_back)
    dataset = ingested.dataset
    seed = params.seed
    if seed is None:
        seed = run_seed(run_id) if params.new_seed else data_seed(dataset.version)
        how = "from the run id (new_seed): a new model is trained" if params.new_seed else "from the dataset version"
        logger.info("Seed %d for this run (seed left empty; drawn %s)", seed, how)
    params = params.model_copy(update={"seed": seed})
    trained = cached(steps.train, store.url, dataset, params.train_config(seed), reuse)
    model = trained.result()
    evaluated = cached(steps.evaluate, store.url, dataset, model, params.n_per_class, seed, reuse)
    evaluation = evaluated.result()
    plotted = cached(steps.plot, store.url, dataset, model, evaluation)
    plots = plotted.result()
    decided = steps.gate(store.url, run_id, dataset, model, evaluation, params.gate)
    run = RunRecord(
        run_id=run_id,
        parameters=params.model_dump(mode="json"),
        dataset=dataset,
        model=model,
        evaluation=evaluation,
        gate=decided,
        execution=attempt.execution(),
        batches=ingested.night,
    )
    tables = steps.tabulate(store.url, run)
    report = steps.report(store.url, run, plots, tables)

    cacheable = {"fetch-mnist": fetched, "train": trained, "evaluate": evaluated, "plot": plotted}
    states = {  # every step in the order it ran: the four cacheable ones Completed or Cached, the rest ran tonight
        name: cacheable[name].name if name in cacheable else "Completed"
        for name in ("fetch-mnist", "ingest", "train", "evaluate", "plot", "gate", "tabulate", "report")
    }
    summary = RunSummary.of(run, store, report, states, seed, attempt)
    artifacts.publish(store, tables, artifacts.summary_markdown(store, summary, run, report))
    logger.info("Steps: %s", ", ".join(f"{k} {v}" for k, v in states.items()))
    mark_ended(store, run_id)
    return summary
