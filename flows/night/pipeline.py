"""The nightly retrain: fetch verified MNIST, check the new batches that arrived, train the CNN on both, evaluate
it on every slice, decide on the selection and new-data slices whether it replaces the champion, publish
confusion tables as Parquet, and render the report.

What a step's failure means (each step also fails when it runs past its budget, ``flows/night/budgets.py``):

* fetch-mnist, ingest, train, evaluate, plot, gate decide the night: a failure there fails the run (Prefect's
  ``Failed`` state, which the alert automation hears) and no decision is taken. Inside ingest, one batch's
  failure quarantines that batch only. A stored file that changed under the night after its step checked it is not
  such a failure: an accepted batch's share (``DamagedShare``, where train, evaluate or the gate read it), or a
  model or an evaluation's predictions (``DamagedArtifact``), or a stored MNIST file (``DamagedMnist``: fetched
  again). The night emits ``mnist.night.artifact-changed``,
  ingests again (which leaves a damaged batch out) and decides again, the damaged artifact made again; at most
  ``DATA_TRIES`` times. A damaged model (``DamagedModel``) is trained again on the next try (the train step
  refreshed, its cache record and stored model not reused), so a damaged model a lookup let through is not handed
  back at every try.
* tabulate, report and the artifacts are the record of a night, not its decision: a failure there is logged,
  emitted as ``mnist.night.unpublished`` (the alert automation hears it) and written in the run's ``runs`` row
  (``published`` false, ``publish_problem`` saying which step and why); the champion decision stands and the run
  ends ``Completed``. A step after a failed one that needs its output is skipped, and said so.
* prune (``params.retention``, on by default) removes what no night needs any more once the night has published,
  keeping tonight's model and report. A prune that refuses (another night runs; the pointer, a table or a night
  marker cannot be read whole) removes nothing and says why in a warning: the night's record is whole. A prune
  that fails (its budget spent, the store failing under it) is a publication failure as above, and nothing is
  removed that the prune had not listed.
* The ``runs`` row says whether the night finished: ``published`` is false from the moment the tables are written
  until the last publication step is done, so a night stopped in between (a cancel, SIGTERM, a crash) reads as
  unfinished.

The whole run has a limit too (``FLOW_SECONDS``): a night still running when the next is due is ended.
"""

from __future__ import annotations

import uuid

from prefect import flow
from prefect.events import emit_event
from prefect.logging import get_logger, get_run_logger
from prefect.runtime import deployment, flow_run

from flows.night import artifacts, budgets, recovery, steps
from flows.night.caching import call_cached
from flows.night.confinement import check_deployed_run
from flows.night.locks import open_store
from flows.night.params import PipelineParameters, data_seed, run_seed
from flows.night.results import result_storage
from flows.night.summary import RunSummary
from storage import DamagedArtifact
from storage.nights import mark_ended, mark_running
from tasks.data.batch_format import DamagedShare
from tasks.data.fetch import DamagedMnist
from tasks.publish.run_record import RunRecord
from tasks.publish.tabulate import record_finish
from tasks.training.rebuilt import DamagedModel

UNPUBLISHED_EVENT = "mnist.night.unpublished"
CHANGED_EVENT = "mnist.night.artifact-changed"
# Times a night decides when a stored file changes under it (a batch's share: ingest drops the batch first; a model,
# an evaluation's predictions: made again): a writer who damages one three times in one night fails it.
DATA_TRIES = 3


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
    timeout_seconds=budgets.FLOW_SECONDS,
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
    ingest = steps.ingest.with_options(timeout_seconds=budgets.ingest_seconds(params.ingest))

    def ingested_now():
        args = (params.ingest, run_id, params.held_back, params.train_limit, params.max_training_images)
        return ingest(store.url, fetched.result(), *args)

    def decided_on(dataset, retrain: bool):
        """Train, evaluate, plot and gate tonight's dataset: the steps that read the accepted batches' shares."""
        seed = params.seed
        if seed is None:
            seed = run_seed(run_id) if params.new_seed else data_seed(dataset.version)
            how = "from the run id (new_seed): a new model is trained" if params.new_seed else "from the dataset version"
            logger.info("Seed %d for this run (seed left empty; drawn %s)", seed, how)
        config = params.train_config(seed)
        train = steps.train.with_options(timeout_seconds=budgets.train_seconds(dataset, config))
        if retrain:  # the model was damaged: not the cached one again
            trained = call_cached(
                train, store.url, dataset, config, False, result_storage=results, refresh=True, warn=logger.warning
            )
        else:
            trained = cached(train, store.url, dataset, config, reuse)
        model = trained.result()
        evaluate = steps.evaluate.with_options(timeout_seconds=budgets.predict_seconds(dataset, model.network))
        evaluated = cached(evaluate, store.url, dataset, model, params.n_per_class, seed, reuse)
        evaluation = evaluated.result()
        plotted = cached(steps.plot, store.url, dataset, model, evaluation)
        plots = plotted.result()
        gate = steps.gate.with_options(timeout_seconds=budgets.gate_seconds(dataset, model.network))
        decided = gate(store.url, run_id, dataset, model, evaluation, params.gate)
        return seed, model, evaluation, plots, decided, {"train": trained, "evaluate": evaluated, "plot": plotted}

    ingested, stale, retrain = None, True, False
    for tries in range(1, DATA_TRIES + 1):
        try:
            if stale:  # the first try, or a file changed under the last one: tonight's batches checked (again)
                fresh = ingested_now()
                ingested = fresh if ingested is None else ingested.model_copy(update={"dataset": fresh.dataset})
                stale = False  # tonight's decisions (the first ingest's) are kept
            seed, model, evaluation, plots, decided, states = decided_on(ingested.dataset, retrain)
            break
        except (DamagedShare, DamagedArtifact) as exc:  # changed after its step checked it: check again, decide again
            if tries == DATA_TRIES:
                raise
            retrain = retrain or isinstance(exc, DamagedModel)  # the night's model (a champion's is set aside in the gate)
            again = "the model is trained again, " if retrain else ""
            logger.error("%s; tonight's batches are checked again, %sand the night decides again", exc, again)
            emit_event(
                event=CHANGED_EVENT,
                resource={"prefect.resource.id": f"mnist.run.{run_id}", "prefect.resource.name": f"run {run_id}"},
                payload={"reason": str(exc)},
            )
            if isinstance(exc, DamagedMnist):  # a stored MNIST file: fetched again, its step's cache not trusted
                fetched = call_cached(
                    steps.fetch_mnist, store.url, params.mnist_source, result_storage=results, refresh=True, warn=logger.warning
                )
            stale = True
    dataset = ingested.dataset
    params = params.model_copy(update={"seed": seed})
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
    problems: list[str] = []

    def publishing(name: str, call):
        """One publication step inside the failure boundary: its error is the record's problem, not the night's."""
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 (the decision is taken: no failure here may undo it)
            problems.append(f"{name} failed ({type(exc).__name__}: {str(exc)[:300]})")
            logger.error("The %s step failed; the champion decision stands: %s", name, problems[-1])
            return None

    tables = publishing("tabulate", lambda: steps.tabulate(store.url, run))
    report = publishing("report", lambda: steps.report(store.url, run, plots, tables)) if tables else None
    if tables is None:
        problems.append("report and artifacts skipped (no tables)")
    cacheable = {"fetch-mnist": fetched, **states}
    published = {"tabulate": tables, "report": report}
    states = {  # every step in the order it ran: the four cacheable ones Completed or Cached, the rest ran tonight
        name: cacheable[name].name if name in cacheable else "Failed" if published.get(name, True) is None else "Completed"
        for name in ("fetch-mnist", "ingest", "train", "evaluate", "plot", "gate", "tabulate", "report")
    }
    summary = RunSummary.of(run, store, report, states, seed, attempt)
    if report is not None:
        publishing("artifacts", lambda: artifacts.publish(store, tables, artifacts.summary_markdown(store, summary, run, report)))
    elif tables is not None:
        problems.append("artifacts skipped (no report)")
    if params.retention.prune:  # after everything tonight wrote; what it made is kept (tasks/publish/retention.py)
        publishing("prune", lambda: steps.prune(store.url, run_id, [model.key], params.retention))
    publishing("runs row", lambda: record_finish(store, run, tables, problems))
    if problems:
        emit_event(
            event=UNPUBLISHED_EVENT,
            resource={"prefect.resource.id": f"mnist.run.{run_id}", "prefect.resource.name": f"run {run_id}"},
            payload={"reason": "; ".join(problems), "decision": decided.decision},
        )
    summary = summary.model_copy(update={"published": not problems, "publish_problem": "; ".join(problems) or None})
    logger.info("Steps: %s", ", ".join(f"{k} {v}" for k, v in states.items()))
    mark_ended(store, run_id)
    return summary
