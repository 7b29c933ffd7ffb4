"""The worker decides what a run may do, not whoever created the run.

In open-source Prefect, whoever holds the API's auth string can create a run with ``job_variables`` (the UI's
custom-run form, ``prefect deployment run --job-variable``), edit the work pool's base job template, and edit a
deployment's entrypoint and pull steps. Prefect's process worker honours all of them: a run's ``command`` is
a shell command on the worker, its ``env`` overrides the worker's own settings (the allow-lists of
``flows/night/confinement.py``), its ``working_dir`` picks the code. So this worker takes none of them:

* every run starts as ``python -m flows.stack.engine`` in the worker's own checkout and environment (start-up
  environment plus Prefect's run settings), whatever the template or the run's job variables say; that engine
  runs this checkout's flow and never a deployment's pull steps or entrypoint, which the API can change even
  after the check below;
* only runs of a deployment as ``prefect deploy`` made it from this checkout are started (this project's
  entrypoint, one pull step setting the working directory to this checkout, literally, nothing else in it); an
  ad-hoc bundle submitted to the pool, a deployment edited to pull or run other code, is refused (the run is
  marked Crashed with the reason);
* the pool's base job template (``locked_template``) exposes no variable but ``name``, ``labels`` and
  ``stream_output`` and allows no other (``additionalProperties: false``), so the server itself refuses a
  run created with ``command``, ``env`` or ``working_dir`` (HTTP 422), before anything reaches a worker.

``make serve`` starts this worker (``python -m flows.stack.worker --pool gpu``); a worker on another machine is started
the same way, from a checkout of this repository.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import shlex
import sys
import warnings
from pathlib import Path
from typing import Any

import prefect.workers.process
from prefect.workers.process import ProcessJobConfiguration, ProcessWorker

from flows.night.recovery import CRASH_AUTOMATION, HEARTBEAT_ENV, HEARTBEAT_SECONDS

CODE = Path(__file__).resolve().parents[2]  # the code this worker runs: its own checkout
ENTRYPOINT = "flows/night/pipeline.py:mnist_retrain"
ENTRYPOINT_BEFORE_V5 = "flows/pipeline.py:mnist_retrain"  # before flows/ was split into night/ and stack/
WORKING_DIRECTORY_STEP = "prefect.deployments.steps.set_working_directory"
TEMPLATE_VARIABLES = ("name", "labels", "stream_output")  # what a run may set: none changes what runs or where


class RefusedRun(PermissionError):
    """A run asks this worker to run code it does not serve: the message says what and where to change it."""


def locked_template() -> dict[str, Any]:
    """Prefect's process template without ``command``, ``env`` and ``working_dir``, and no variable beyond it."""
    template = copy.deepcopy(ProcessWorker.get_default_base_job_template())
    variables = template["variables"]
    variables["properties"] = {k: v for k, v in variables["properties"].items() if k in TEMPLATE_VARIABLES}
    variables["additionalProperties"] = False
    variables.pop("required", None)
    template["job_configuration"] = {k: v for k, v in template["job_configuration"].items() if k in TEMPLATE_VARIABLES}
    return template


def check_deployment(deployment: Any) -> None:
    """Refuse a run that is not of this project's deployment as ``prefect deploy`` made it from this checkout."""
    if deployment is None:
        raise RefusedRun(
            "This worker runs only deployments of the MNIST pipeline; a run without a deployment (an ad-hoc flow "
            "submitted to the pool) would run code it was handed. Submit it as `prefect deploy` made it."
        )
    if deployment.entrypoint == ENTRYPOINT_BEFORE_V5:
        raise RefusedRun(
            f"Deployment {deployment.name!r} was made before the flow moved to {ENTRYPOINT!r} (it names "
            f"{ENTRYPOINT_BEFORE_V5!r}). Redeploy from this checkout: `make serve` does, or `prefect deploy --all`."
        )
    if deployment.entrypoint != ENTRYPOINT:
        raise RefusedRun(
            f"Deployment {deployment.name!r} has entrypoint {deployment.entrypoint!r}; this worker runs only "
            f"{ENTRYPOINT!r}. Redeploy from the repository (`prefect deploy --all`)."
        )
    steps = deployment.pull_steps or []
    if steps != [{WORKING_DIRECTORY_STEP: {"directory": str(CODE)}}]:  # literally: no template, no "requires"
        raise RefusedRun(
            f"Deployment {deployment.name!r} has pull steps {str(steps)[:300]}; this worker runs only its own checkout "
            f"({CODE}), set by one {WORKING_DIRECTORY_STEP} step. Redeploy from that checkout (`prefect deploy --all`), "
            "or start the worker from the checkout the deployment names."
        )


class ConfinedJobConfiguration(ProcessJobConfiguration):
    """A process job whose command, environment and directory are the worker's, never the run's."""

    def prepare_for_flow_run(
        self,
        flow_run: Any,
        deployment: Any = None,
        flow: Any = None,
        work_pool: Any = None,
        worker_name: str | None = None,
        worker_id: Any = None,
    ) -> None:
        check_deployment(deployment)
        self.command = shlex.join([sys.executable, "-m", "flows.stack.engine"])  # this checkout's flow, no pull step
        self.env = {}  # the worker's environment, plus Prefect's settings for this run
        self.working_dir = CODE
        super().prepare_for_flow_run(flow_run, deployment, flow, work_pool, worker_name, worker_id=worker_id)


async def this_checkouts_flow(flow_run: Any) -> Any:
    """The flow whose hooks the worker runs for a run that crashed or was cancelled: this checkout's. Prefect's
    process worker would load the flow the run's deployment names, running the deployment's pull steps in the
    worker's own process, after any edit made through the API since the check above."""
    from flows.night.pipeline import mnist_retrain

    return mnist_retrain


prefect.workers.process.load_flow_from_flow_run = this_checkouts_flow  # the hook runner's flow, in this process


with warnings.catch_warnings():  # Prefect registers every worker class by its type; ours is a "process" worker too
    warnings.filterwarnings("ignore", message=".*matches existing registered type.*")

    class ConfinedProcessWorker(ProcessWorker):
        """Prefect's process worker with ``ConfinedJobConfiguration``: a pool of type ``process`` serves it as is."""

        job_configuration = ConfinedJobConfiguration


class HeartbeatTooSlow(RuntimeError):
    """The flow runs this worker starts would beat too rarely for the zombie automation: it would crash healthy runs."""


def check_heartbeat(frequency: float | None, silent_after: list[float]) -> None:
    """Refuse to serve when a run's heartbeat (``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``, inherited by every flow run
    this worker starts) would not beat twice within the zombie automation's window (``flows/night/recovery.py``, read
    from the API: ``silent_after``): such a run, healthy and slow, would be marked Crashed between two beats.
    Prefect 3.9's default is 180 s; ``make serve`` sets 30 s for a 90 s window."""
    if frequency is None:
        raise HeartbeatTooSlow(
            f"Flow-run heartbeats are off ({HEARTBEAT_ENV} unset): a worker or machine that dies mid-run would leave "
            f"its run Running forever. Start the worker with {HEARTBEAT_ENV}={HEARTBEAT_SECONDS}."
        )
    for window in silent_after:
        if 2 * frequency > window:
            raise HeartbeatTooSlow(
                f"{HEARTBEAT_ENV}={frequency:g} s, but the automation {CRASH_AUTOMATION} crashes a run silent for "
                f"{window:g} s: a healthy run would be crashed between two heartbeats. Start the worker with "
                f"{HEARTBEAT_ENV}={HEARTBEAT_SECONDS} (as make serve does), or at most {window / 2:g}."
            )


def heartbeat_windows() -> list[float]:
    """The windows of the zombie automation on the API this worker serves (none if it is not set up there)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        automations = client.read_automations_by_name(CRASH_AUTOMATION)
    return [a.trigger.within.total_seconds() for a in automations if getattr(a.trigger, "within", None)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.stack.worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pool", required=True, help="work pool to serve (created by make serve with locked_template)")
    parser.add_argument("--name", default=None, help="worker name (default: Prefect's)")
    parser.add_argument("--limit", type=int, default=None, help="most flow runs at once (default: no limit)")
    args = parser.parse_args(argv)
    from prefect.settings import get_current_settings

    try:
        check_heartbeat(get_current_settings().flows.heartbeat_frequency, heartbeat_windows())
    except HeartbeatTooSlow as refused:
        print(f"flows.stack.worker refuses to start: {refused}", file=sys.stderr)
        return 2

    async def serve() -> None:
        async with ConfinedProcessWorker(work_pool_name=args.pool, name=args.name, limit=args.limit) as worker:
            await worker.start()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
