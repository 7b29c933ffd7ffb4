"""A watchdog that is not the scheduler: it notices the nights that should exist, or should have started, and did not.

The scheduler is the one service that makes the nights; when it silently made none (Prefect 3.9 under
SQLAlchemy 2.1 did), nothing else would say so. This process asks the API, every ``every`` seconds:

- does ``mnist-retrain/nightly`` have a Scheduled run in the next ``horizon`` (26 h: one night and a margin)?
  If not, it emits ``mnist.schedule.missing`` (a paused schedule, a scheduler that stopped);
- did a night (a run the scheduler made) stay unstarted ``grace`` seconds past its time? ``mnist.night.late``;
- is a run of the deployment stuck in Pending for ``pending_after`` seconds? Its worker died between claiming
  it and starting its process (or the process never started), so it never sent a heartbeat and the zombie
  automation (``flows/night/recovery.py``) cannot see it, while it holds the deployment's one concurrency slot and
  every later night queues behind it. The watchdog marks it Crashed (``STUCK_MESSAGE``), which releases the
  slot; the Crashed state raises the usual alert.

Both events are related to the deployment, so ``flows/night/alerts.py``'s automation sends them to the same webhook
as a failed night. Each problem is reported once while it lasts (again if it clears and comes back).
``make serve`` starts it in both topologies; under the HA topology its supervisor restarts it.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

DEPLOYMENT = "mnist-retrain/nightly"
SCHEDULE_MISSING = "mnist.schedule.missing"
NIGHT_LATE = "mnist.night.late"
HORIZON_SECONDS = 26 * 3600
GRACE_SECONDS = 3600  # a night may wait an hour (a long manual run before it) before anyone is told
PENDING_SECONDS = 600  # a healthy run leaves Pending within a minute (its process imports the pipeline, then runs)
EVERY_SECONDS = 60
SETTLE_SECONDS = 120  # the scheduler's first pass after a (re)start: no alert before it had its chance
STUCK_MESSAGE = (
    "Pending for {seconds:.0f} s without starting: its worker died between claiming it and starting its process "
    "(or the process never started). Marked Crashed by the watchdog, which releases the deployment's concurrency slot."
)


@dataclass(frozen=True)
class WatchdogSettings:
    """How the watchdog judges the nights; ``make serve`` uses the defaults, tests shorten them."""

    horizon: float = HORIZON_SECONDS
    grace: float = GRACE_SECONDS
    pending_after: float = PENDING_SECONDS
    every: float = EVERY_SECONDS
    settle: float = SETTLE_SECONDS

    def args(self) -> list[str]:
        return [f"--{name.replace('_', '-')}={getattr(self, name)}" for name in self.__dataclass_fields__]


class Watchdog:
    """One pass (``check``) reads the deployment's runs and acts; ``run`` repeats it."""

    def __init__(self, client: Any, settings: WatchdogSettings, deployment: str = DEPLOYMENT) -> None:
        self.client, self.settings, self.deployment_name = client, settings, deployment
        self.reported: set[str] = set()  # problems reported and still present

    def _runs(self, *state_types: Any) -> list:
        from prefect.client.schemas.filters import (
            DeploymentFilter,
            DeploymentFilterId,
            FlowRunFilter,
            FlowRunFilterState,
            FlowRunFilterStateType,
        )

        deployment = self.client.read_deployment_by_name(self.deployment_name)
        self.deployment_id = deployment.id
        query = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=list(state_types))))
        mine = DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
        return self.client.read_flow_runs(flow_run_filter=query, deployment_filter=mine, limit=200)

    def problems(self, now: datetime) -> dict[str, tuple[str, str]]:
        """What is wrong now: a key for each problem → (event, reason). Crashes stuck runs as it finds them."""
        from prefect.client.schemas.objects import StateType

        found: dict[str, tuple[str, str]] = {}
        scheduled = self._runs(StateType.SCHEDULED)
        horizon = now + timedelta(seconds=self.settings.horizon)
        if not any(now <= r.expected_start_time <= horizon for r in scheduled):
            hours = self.settings.horizon / 3600
            found["schedule"] = (
                SCHEDULE_MISSING,
                f"{self.deployment_name} has no Scheduled run in the next {hours:g} h: its schedule is paused or "
                "the scheduler (the services process) made none. Check the deployment's schedule and the services log.",
            )
        for run in scheduled:
            waited = (now - run.expected_start_time).total_seconds()
            if run.auto_scheduled and waited > self.settings.grace:
                found[f"late-{run.id}"] = (
                    NIGHT_LATE,
                    f"The night {run.name} was due at {run.expected_start_time:%Y-%m-%d %H:%M} UTC and has not started "
                    f"after {waited / 60:.0f} min (state {run.state.name}): are the gpu pool's workers up, or is its "
                    "concurrency slot held?",
                )
        for run in self._runs(StateType.PENDING):
            pending = (now - run.state.timestamp).total_seconds()
            if pending > self.settings.pending_after:
                self.crash(run, pending)
        return found

    def crash(self, run: Any, pending: float) -> None:
        from prefect.states import Crashed

        self.client.set_flow_run_state(run.id, Crashed(message=STUCK_MESSAGE.format(seconds=pending)), force=True)
        print(f"{datetime.now(UTC):%H:%M:%S} marked {run.name} ({run.id}) Crashed: Pending for {pending:.0f} s", flush=True)

    def report(self, event: str, reason: str) -> None:
        from prefect.events import emit_event
        from prefect.events.worker import EventsWorker

        emit_event(
            event=event,
            resource={
                "prefect.resource.id": f"mnist.watchdog.{self.deployment_id}",
                "prefect.resource.name": self.deployment_name,
            },
            related=[{"prefect.resource.id": f"prefect.deployment.{self.deployment_id}", "prefect.resource.role": "deployment"}],
            payload={"reason": reason},
        )
        EventsWorker.drain_all()  # sent now, not when the process exits
        print(f"{datetime.now(UTC):%H:%M:%S} {event}: {reason}", flush=True)

    def check(self) -> None:
        found = self.problems(datetime.now(UTC))
        for key, (event, reason) in found.items():
            if key not in self.reported:
                self.report(event, reason)
        self.reported = set(found)

    def run(self) -> None:
        time.sleep(self.settings.settle)
        while True:
            try:
                self.check()
            except Exception as exc:  # the API restarting (a replica, the balancer): try again next pass
                print(f"{datetime.now(UTC):%H:%M:%S} check failed, retrying in {self.settings.every:g} s: {exc!r}", flush=True)
            time.sleep(self.settings.every)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.stack.watchdog", description=__doc__.split("\n\n")[0])
    defaults = WatchdogSettings()
    for name in WatchdogSettings.__dataclass_fields__:
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(defaults, name), help="seconds")
    parser.add_argument("--deployment", default=DEPLOYMENT)
    args = parser.parse_args(argv)
    settings = WatchdogSettings(**{name: getattr(args, name) for name in WatchdogSettings.__dataclass_fields__})
    from prefect.client.orchestration import get_client

    print(f"watching {args.deployment}: {settings}", flush=True)
    with get_client(sync_client=True) as client:
        try:
            Watchdog(client, settings, args.deployment).run()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
