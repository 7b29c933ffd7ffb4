"""The nightly deployment operated: a real Prefect server, the stack `make serve` starts (heartbeats, the
recovery automations, the deployment's concurrency limit from prefect.yaml) and two real process workers.

- one worker with ``--limit 1`` runs two runs one after the other;
- a run triggered while the deployment's run trains is queued behind it (ENQUEUE, as the README says);
- a worker killed with SIGKILL during epoch 2 of 4: the run is Crashed for its missing heartbeats, scheduled
  again, picked up by the other worker, resumes from the checkpoint, completes, and is one row in ``runs``;
- a run due while the workers were away runs when they come back; ``runs`` records when it was due and began.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from flows.recovery import CRASH_MESSAGE, MAX_ATTEMPTS, RESTART_MESSAGE
from flows.serve import LocalStack, free_port
from storage import Store
from storage.tables import read_table
from tests.conftest import submissions, with_mnist

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("operations")]  # one worker shares the module's fixtures

DEPLOYMENT = "mnist-retrain/nightly"
QUICK = {"epochs": 1, "train_limit": 3000, "n_per_class": 20}
SILENT_AFTER = 60  # two heartbeats (30 s apart, Prefect's minimum) missed; make serve uses 90


class Ops:
    """The running stack, the store its runs write to, and a client of its API."""

    def __init__(self, stack: LocalStack, store: Store, client) -> None:
        self.stack, self.store, self.client = stack, store, client
        self.deployment = client.read_deployment_by_name(DEPLOYMENT)

    def trigger(self, **params):
        from prefect.deployments import run_deployment

        return run_deployment(DEPLOYMENT, parameters={"params": params}, timeout=0)

    def wait(self, ids, until, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            runs = [self.client.read_flow_run(i) for i in ids]
            if until(runs):
                return runs
            time.sleep(0.5)
        raise AssertionError(f"{what} within {timeout:.0f} s: {[(r.name, r.state.name, r.state.message) for r in runs]}")

    def finished(self, ids, timeout: float = 300):
        runs = self.wait(ids, lambda rs: all(r.state.is_final() for r in rs), timeout, "runs did not finish")
        assert all(r.state.is_completed() for r in runs), [(r.state.name, r.state.message) for r in runs]
        return runs

    def states(self, run_id) -> list[str]:
        return [s.name for s in sorted(self.client.read_flow_run_states(run_id), key=lambda s: s.timestamp)]

    def summary(self, run_id) -> str:
        """The run's summary artifact, as the UI shows it (markdown)."""
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId

        (artifact,) = self.client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["mnist-run-summary"])),
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])),
        )
        return artifact.data

    def pause_pool(self, paused: bool) -> None:
        from prefect.client.schemas.actions import WorkPoolUpdate

        self.client.update_work_pool("gpu", WorkPoolUpdate(is_paused=paused))

    def set_deployment_limit(self, limit: int) -> None:
        from prefect.client.schemas.actions import DeploymentUpdate

        self.client.update_deployment(self.deployment.id, DeploymentUpdate(concurrency_limit=limit))


@pytest.fixture(scope="module")
def ops(tmp_path_factory: pytest.TempPathFactory, mnist_store: Store):
    from prefect.client.orchestration import get_client
    from prefect.settings import temporary_settings

    tmp = tmp_path_factory.mktemp("operations")
    store = Store(tmp / "store")
    with_mnist(store, mnist_store)
    stack = LocalStack(
        tmp / "server", port=free_port(), store=store.url, poll_seconds=2, silent_after=SILENT_AFTER, slot_wait_seconds=5
    )
    with pytest.MonkeyPatch.context() as env:
        env.delenv("MNIST_ALERT_WEBHOOK", raising=False)
        env.delenv("PREFECT_API_DATABASE_CONNECTION_URL", raising=False)
        try:
            stack.start()  # one worker, "gpu-worker-local", --limit 1 on this GPU-less machine
            with temporary_settings(stack.client_settings()), get_client(sync_client=True) as client:
                yield Ops(stack, store, client)
        finally:
            stack.stop()


@pytest.fixture
def one_worker(ops):
    """Exactly one live worker for the test, whichever tests ran before (a test may have killed one)."""
    assert ops.stack.workers(), "no live worker left in the stack"
    for name in ops.stack.workers()[1:]:
        ops.stack.remove_worker(name)
    return ops.stack.workers()[0]


@pytest.fixture
def two_workers(ops, one_worker, tmp_path: Path):
    """A second machine's worker (its own home and directory) beside the first, for this test only."""
    home = tmp_path / "machine-b"
    home.mkdir()
    ops.stack.add_worker("gpu", f"gpu-worker-{tmp_path.name}", prefect_home=home / "prefect", cwd=home)
    yield
    for name in ops.stack.workers()[1:]:  # back to one, whichever of the two survived the test
        ops.stack.remove_worker(name)


def test_deployment_and_worker_limits_are_configured(ops, one_worker):
    assert ops.deployment.global_concurrency_limit.limit == 1
    assert ops.deployment.concurrency_options.collision_strategy.value == "ENQUEUE"
    worker = Path(f"/proc/{ops.stack._pids()[one_worker]}/cmdline").read_bytes().split(b"\0")
    assert worker[worker.index(b"--limit") + 1] == b"1"  # this machine has no GPU: one run at a time
    names = {a.name for a in ops.client.read_automations()}
    assert {"mnist-crash-silent-runs", "mnist-restart-crashed-runs"} <= names


def test_one_worker_runs_one_flow_run_at_a_time(ops, one_worker):
    ops.set_deployment_limit(10)  # only the worker's --limit 1 is left to keep the two apart
    try:
        runs = [ops.trigger(**QUICK, seed=seed) for seed in (21, 22)]
        first, second = sorted(ops.finished([r.id for r in runs]), key=lambda r: r.start_time)
    finally:
        ops.set_deployment_limit(1)
    assert first.end_time <= second.start_time, (first.start_time, first.end_time, second.start_time)


def test_a_run_triggered_during_the_nights_run_waits_for_it(ops, two_workers):
    # a free worker for the second run: only the deployment's limit holds it back
    night = ops.trigger(**{**QUICK, "epochs": 3}, seed=31)
    ops.wait([night.id], lambda rs: rs[0].state.is_running(), 120, "the night's run did not start")
    manual = ops.trigger(**QUICK, seed=32)  # "Run" clicked in the UI meanwhile
    night, manual = ops.finished([night.id, manual.id])
    assert "AwaitingConcurrencySlot" in ops.states(manual.id)  # queued, not cancelled: see README "Run it nightly"
    assert manual.start_time >= night.end_time, (night.end_time, manual.start_time)


def test_a_killed_workers_run_is_crashed_restarted_elsewhere_and_resumes(ops, two_workers):
    run = ops.trigger(
        epochs=4, train_limit=30000, n_per_class=20, seed=None
    )  # the seed is derived by the run (from the dataset version)
    checkpoints = Path(ops.store.path("checkpoints"))

    def epochs_backed_up() -> int:
        found = list(checkpoints.glob("*/history.json"))
        return len(json.loads(found[0].read_text())) if found else 0

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and epochs_backed_up() < 1:  # the state we wait for: epoch 1 in the store
        assert not ops.client.read_flow_run(run.id).state.is_final(), "the run ended before it could be killed"
        time.sleep(0.5)
    assert epochs_backed_up() >= 1, "epoch 1 was not backed up within 180 s"

    (worker,) = submissions(ops.client, [run.id])[str(run.id)]  # the worker that took the run
    log_name = ops.stack.worker_log_name("gpu", worker)
    infrastructure = ops.client.read_flow_run(run.id).infrastructure_pid  # "host:pid" of the flow run's process
    killed_at = time.monotonic()
    os.killpg(ops.stack._pids()[log_name], signal.SIGKILL)  # the worker's machine dies: worker and flow process
    if infrastructure:
        try:
            os.killpg(os.getpgid(int(infrastructure.rsplit(":", 1)[-1])), signal.SIGKILL)
        except ProcessLookupError:
            pass  # it was in the worker's group
    at_kill = epochs_backed_up()  # nothing writes after the kill: this is what the restart finds
    assert 1 <= at_kill < 4, f"the run was killed after {at_kill} of 4 epochs: it should still have been training"

    ops.wait([run.id], lambda rs: rs[0].state.is_crashed() or rs[0].state.is_scheduled(), SILENT_AFTER + 60, "not crashed")
    crashed_after = time.monotonic() - killed_at
    # Crashed is a final state: wait for the restart automation to take the run out of it before waiting for the end
    ops.wait([run.id], lambda rs: not rs[0].state.is_crashed(), 60, "the crashed run was not scheduled again")
    (done,) = ops.finished([run.id], timeout=300)
    recovered_after = time.monotonic() - killed_at
    print(f"\nkilled after {at_kill} epochs: Crashed after {crashed_after:.0f} s, completed after {recovered_after:.0f} s")

    states = ops.client.read_flow_run_states(run.id)
    crashed = [s for s in states if s.is_crashed()]
    assert len(crashed) == 1 and crashed[0].message == CRASH_MESSAGE.format(automation="mnist-crash-silent-runs")
    assert any(
        s.name == "AwaitingRetry" and s.message == RESTART_MESSAGE.format(automation="mnist-restart-crashed-runs") for s in states
    )
    took = submissions(ops.client, [run.id], at_least=2)[str(run.id)]
    assert len(took) == 2 and worker in took and len(set(took)) == 2, took  # the second attempt ran on the other machine

    rows = read_table(ops.store, "runs")
    mine = rows[rows["run_id"] == str(run.id)]
    assert len(mine) == 1  # the crashed attempt left no row; the restart wrote one
    (row,) = mine.itertuples()
    assert row.attempt == 2 and row.resumed_from_epoch == at_kill, (row.attempt, row.resumed_from_epoch, at_kill)
    assert json.loads(row.parameters)["seed"] is not None  # the derived seed, the same both attempts (same training key)
    assert len(list(checkpoints.glob("*/history.json"))) == 0  # the checkpoint went with the published model
    summary = ops.summary(run.id)
    assert (
        "| attempt | **2**: a retry of this run's crashed attempt (1 crash: No heartbeat from this flow run's process" in summary
    )
    assert f"training resumed from the checkpoint after epoch {row.resumed_from_epoch}" in summary
    assert done.state.is_completed()


def test_a_night_due_while_workers_were_away_runs_when_they_return(ops):
    ops.pause_pool(True)  # no worker takes runs: as if they were down at 02:00
    try:
        run = ops.trigger(**QUICK, seed=41)
        ops.wait([run.id], lambda rs: rs[0].state.name == "Late", 90, "the run was not marked Late")
    finally:
        ops.pause_pool(False)
    (done,) = ops.finished([run.id])
    rows = read_table(ops.store, "runs")
    (row,) = rows[rows["run_id"] == str(run.id)].itertuples()
    late = (row.started_at - row.scheduled_start).total_seconds()
    assert late >= 15, (row.scheduled_start, row.started_at)  # Prefect marks a run Late 15 s after it was due
    assert row.attempt == 1 and done.state.is_completed()
    assert (
        f"| scheduled / started | {row.scheduled_start:%Y-%m-%d %H:%M:%S} UTC / {row.started_at:%Y-%m-%d %H:%M:%S} UTC"
        in ops.summary(run.id)
    )


def test_a_run_that_keeps_crashing_fails_instead_of_looping():
    from datetime import UTC, datetime

    from flows.recovery import Attempt, check_attempt

    crashes = [CRASH_MESSAGE.format(automation="mnist-crash-silent-runs")] * MAX_ATTEMPTS
    check_attempt(Attempt(number=MAX_ATTEMPTS, crashed=crashes[:-1], started_at=datetime.now(UTC)))  # may still try
    with pytest.raises(RuntimeError, match=f"This run crashed {MAX_ATTEMPTS} times .* not trying again"):
        check_attempt(Attempt(number=MAX_ATTEMPTS + 1, crashed=crashes, started_at=datetime.now(UTC)))
