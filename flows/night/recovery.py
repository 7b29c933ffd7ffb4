"""What happens to a night whose worker died: Prefect marks the silent run Crashed and starts it again.

Two automations, created by ``make serve`` (``python -m flows.night.recovery``):

- ``mnist-crash-silent-runs``: the trigger from Prefect's guide "How to detect and respond to zombie
  flows". A flow run that sent a heartbeat and then neither another heartbeat nor a final state within
  ``silent_after`` seconds is marked Crashed, with ``CRASH_MESSAGE``.
- ``mnist-restart-crashed-runs``: a run of the nightly deployment crashed *by that automation* (matched on
  the state message, so a run that crashed for another reason is left for a person) is put back to
  ``Scheduled`` as ``AwaitingRetry``, the state Prefect's own "Retry" button uses. It keeps its id and its
  parameters, and the seed an empty ``seed`` derives from the dataset version (``flows.night.params.data_seed``; the
  batches it ingested are recorded, so the version is the same unless another batch arrived meanwhile) or,
  with ``new_seed``, from the run id (``flows.night.params.run_seed``), so any worker of the pool picks it up and
  training carries on from the checkpoint in the store.

Heartbeats need ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` (30 s or more) where flow runs execute; ``make serve``
sets it for its workers. A run that crashed ``MAX_ATTEMPTS`` times fails on its next attempt instead of looping.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime, timedelta

from pydantic import BaseModel

from flows.night.alerts import prepare_automations
from tasks.publish.run_record import Execution


class Attempt(BaseModel):
    """One execution of a run: which attempt, why there were earlier ones, when it was due and when it began.

    Read from the run's state history by ``current_attempt``; what the tables record of it is ``execution``.
    """

    number: int = 1
    crashed: list[str] = []  # the messages of earlier attempts' Crashed states
    scheduled_start: datetime | None = None  # when the scheduler meant it to run; None outside a deployment
    started_at: datetime

    @property
    def restarted(self) -> bool:
        return self.number > 1

    def execution(self) -> Execution:
        return Execution(attempt=self.number, scheduled_start=self.scheduled_start, started_at=self.started_at)


HEARTBEAT_ENV = "PREFECT_FLOWS_HEARTBEAT_FREQUENCY"
HEARTBEAT_SECONDS = 30  # Prefect's minimum
SILENT_AFTER_SECONDS = 90  # three heartbeats missed
DEPLOYMENT = "mnist-retrain/nightly"
CRASH_AUTOMATION = "mnist-crash-silent-runs"
RESTART_AUTOMATION = "mnist-restart-crashed-runs"
CRASH_MESSAGE = "No heartbeat from this flow run's process: its worker or machine died. Marked Crashed by {automation}."
RESTART_MESSAGE = "Restarted by {automation} after its worker stopped sending heartbeats; training resumes from the checkpoint."
MAX_ATTEMPTS = 3
# The server's proactive evaluation runs on its events clock, which lags real time by as much as the events it last
# processed (on a loaded server, a minute or more) and stays there while a dead run sends nothing. The server sweeps
# an expired bucket after PREFECT_SERVER_EVENTS_EXPIRED_BUCKET_BUFFER (60 s by default); when the clock then jumps,
# the sweep can take a silent run's bucket before the evaluation sees it, and that run is never marked Crashed.
# ``make serve`` sets the buffer to 15 minutes: a swept bucket can only be one no evaluation needs.
BUCKET_BUFFER_ENV = "PREFECT_SERVER_EVENTS_EXPIRED_BUCKET_BUFFER"
BUCKET_BUFFER = "PT900S"  # an ISO 8601 duration: the setting does not read a bare number of seconds
FINAL_EVENTS = ("prefect.flow-run.Completed", "prefect.flow-run.Failed", "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed")


def configure_recovery(silent_after: float = SILENT_AFTER_SECONDS, deployment: str = DEPLOYMENT) -> str:
    """Create (or replace) both automations; returns a line for the operator."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture

    deployment_id = prepare_automations(deployment, CRASH_AUTOMATION, RESTART_AUTOMATION)
    Automation(
        name=CRASH_AUTOMATION,
        description=f"Mark a flow run Crashed when it sends no heartbeat for {silent_after:.0f} s (its process died).",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *FINAL_EVENTS},
            match={"prefect.resource.id": "prefect.flow-run.*"},
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=silent_after),
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED, message=CRASH_MESSAGE.format(automation=CRASH_AUTOMATION))],
    ).create()
    Automation(
        name=RESTART_AUTOMATION,
        description=f"Schedule a {deployment} run again when {CRASH_AUTOMATION} marked it Crashed.",
        trigger=EventTrigger(
            expect={"prefect.flow-run.Crashed"},
            match={
                "prefect.resource.id": "prefect.flow-run.*",
                "prefect.state-message": CRASH_MESSAGE.format(automation=CRASH_AUTOMATION),
            },
            match_related={"prefect.resource.id": f"prefect.deployment.{deployment_id}"},
            posture=Posture.Reactive,
            threshold=1,
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.SCHEDULED,
                name="AwaitingRetry",
                message=RESTART_MESSAGE.format(automation=RESTART_AUTOMATION),
            )
        ],
    ).create()
    return (
        f"Recovery:       a run silent for {silent_after:.0f} s is Crashed ({CRASH_AUTOMATION}); "
        f"a {deployment} run crashed so is restarted ({RESTART_AUTOMATION})"
    )


def current_attempt() -> Attempt:
    """Read this flow run's state history: how many times it crashed before, when it was scheduled.

    Outside a deployment (``make run``) there is no history worth a request: attempt 1, no schedule.
    """
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext

    started_at = datetime.now(UTC)
    context = FlowRunContext.get()
    run = context.flow_run if context is not None else None
    if run is None or run.deployment_id is None:
        return Attempt(started_at=started_at)
    with get_client(sync_client=True) as client:
        states = client.read_flow_run_states(run.id)
    crashed = [s.message or "" for s in states if s.is_crashed()]
    return Attempt(number=len(crashed) + 1, crashed=crashed, scheduled_start=run.expected_start_time, started_at=started_at)


def check_attempt(attempt: Attempt) -> None:
    """Refuse a run that keeps crashing: a Failed run is not restarted, a person looks at it."""
    if attempt.number > MAX_ATTEMPTS:
        raise RuntimeError(
            f"This run crashed {len(attempt.crashed)} times (last: {attempt.crashed[-1]!r}); not trying again. "
            "Look at the workers' logs and the machine (out of memory? preempted?), then start a new run."
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.night.recovery", description=__doc__.split("\n")[0])
    parser.add_argument("--silent-after", type=float, default=SILENT_AFTER_SECONDS, help="seconds without a heartbeat")
    args = parser.parse_args(argv)
    print(configure_recovery(args.silent_after))
    return 0


if __name__ == "__main__":
    sys.exit(main())
