"""The nightly deployment operated on the production topology, on one machine: the stack `make serve DB=postgres`
starts (a PostgreSQL-backed Prefect server, authenticated, the ``gpu`` pool, `prefect deploy --all` from this
repository's prefect.yaml, the alert and recovery automations), the store in an S3-compatible bucket, the
alerts received by a webhook on loopback, and two process workers with their own homes and directories, as two
machines would run them. One stack for the module (conftest.SHARED_WORKER keeps the module on one xdist worker);
each test leaves two live workers behind, whichever order the tests run in.

- a run triggered while the night's run trains is queued behind it (ENQUEUE, as the README says), then finds
  every heavy step cached; the summary artifact in a real browser; a run pointed at another store fails and
  alerts;
- three runs due while the workers were away (two identical) are Late, run when they return, one at a time on each worker, and
  identical ones train once.

A machine killed during a training, its run crashed and resumed on another machine, is tested on the production
topology, in tests/test_ha.py (the same recovery code on both).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from flows.night.alerts import AUTOMATION_NAME
from flows.night.recovery import BUCKET_BUFFER, BUCKET_BUFFER_ENV, CRASH_MESSAGE, MAX_ATTEMPTS
from flows.stack.database import LocalPostgres, postgres_binary
from flows.stack.serve import LocalStack, free_port
from storage import Store
from storage.tables import TABLES, read_table
from tests.conftest import S3Server, submissions, with_mnist

pytestmark = pytest.mark.slow

DEPLOYMENT = "mnist-retrain/nightly"
QUICK = {"epochs": 1, "train_limit": 3000, "n_per_class": 20}
SILENT_AFTER = 60  # two heartbeats (30 s apart, Prefect's minimum) missed; make serve uses 90


class Receiver:
    """A webhook endpoint on loopback that keeps every JSON body it is sent."""

    def __init__(self) -> None:
        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alert"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, alerts: set[str], timeout: float = 90) -> dict[str, dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not alerts <= {b["alert"] for b in self.received}:
            time.sleep(1)
        return {b["alert"]: b for b in self.received}


class Ops:
    """The running stack, the store its runs write to, the webhook's receiver and a client of the API."""

    def __init__(self, stack: LocalStack, store: Store, receiver: Receiver, machines: Path, client) -> None:
        self.stack, self.store, self.receiver, self.machines, self.client = stack, store, receiver, machines, client
        self.deployment = client.read_deployment_by_name(DEPLOYMENT)

    def trigger(self, name: str | None = None, **params):
        from prefect.deployments import run_deployment

        return run_deployment(DEPLOYMENT, parameters={"params": params}, flow_run_name=name, timeout=0)

    def wait(self, ids, until, timeout: float, what: str, every: float = 1.0):
        """Poll the runs ``ids`` (one API call for all) until ``until(runs)``: not faster than ``every`` seconds,
        since each call is CPU the server and the runs share."""
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        deadline = time.monotonic() + timeout
        query = FlowRunFilter(id=FlowRunFilterId(any_=list(ids)))
        while time.monotonic() < deadline:
            found = {r.id: r for r in self.client.read_flow_runs(flow_run_filter=query)}
            runs = [found[i] for i in ids]
            if until(runs):
                return runs
            time.sleep(every)
        raise AssertionError(f"{what} within {timeout:.0f} s: {[(r.name, r.state.name, r.state.message) for r in runs]}")

    def finished(self, ids, timeout: float = 300, completed: bool = True):
        runs = self.wait(ids, lambda rs: all(r.state.is_final() for r in rs), timeout, "runs did not finish")
        if completed:
            assert all(r.state.is_completed() for r in runs), [(r.state.name, r.state.message) for r in runs]
        return runs

    def states(self, run_id) -> list[str]:
        return [s.name for s in sorted(self.client.read_flow_run_states(run_id), key=lambda s: s.timestamp)]

    def step_states(self, run_id) -> dict[str, str]:
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        runs = self.client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
        return {r.name.rsplit("-", 1)[0]: r.state.name for r in runs}

    def artifacts(self, run_id) -> list:
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

        return self.client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))

    def summary(self, run_id) -> str:
        """The run's summary artifact, as the UI shows it (markdown)."""
        (artifact,) = [a for a in self.artifacts(run_id) if a.key == "mnist-run-summary"]
        return artifact.data

    def rows(self, table: str, ids) -> pd.DataFrame:
        """The rows of ``table`` the runs ``ids`` wrote (the store is the module's: other tests' runs are in it)."""
        self.store.fs.invalidate_cache()  # the workers' runs wrote them: not this process's listings
        rows = read_table(self.store, table)
        return rows[rows["run_id"].isin([str(i) for i in ids])]

    def pause_pool(self, paused: bool) -> None:
        from prefect.client.schemas.actions import WorkPoolUpdate

        self.client.update_work_pool("gpu", WorkPoolUpdate(is_paused=paused))

    def set_deployment_limit(self, limit: int) -> None:
        from prefect.client.schemas.actions import DeploymentUpdate

        self.client.update_deployment(self.deployment.id, DeploymentUpdate(concurrency_limit=limit))

    def scheduled_nights(self) -> list:
        """The Scheduled runs the server's scheduler made for the nightly deployment, by start time."""
        from prefect.client.schemas.filters import (
            DeploymentFilter,
            DeploymentFilterId,
            FlowRunFilter,
            FlowRunFilterState,
            FlowRunFilterStateType,
        )
        from prefect.client.schemas.objects import StateType

        query = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])))
        mine = DeploymentFilter(id=DeploymentFilterId(any_=[self.deployment.id]))
        runs = self.client.read_flow_runs(flow_run_filter=query, deployment_filter=mine)
        return sorted((r for r in runs if r.auto_scheduled), key=lambda r: r.expected_start_time)

    def take_the_schedule(self, timeout: float = 90) -> list:
        """The nights the server's scheduler created from prefect.yaml's cron; then the schedule is switched off (the
        server deletes its future runs), so that a suite running across 02:00 UTC does not train a real night."""
        deadline = time.monotonic() + timeout
        while not (nights := self.scheduled_nights()) and time.monotonic() < deadline:
            time.sleep(2)
        (schedule,) = self.deployment.schedules
        self.client.update_deployment_schedule(self.deployment.id, schedule.id, active=False)
        left = self.scheduled_nights()
        assert not left, f"{len(left)} nights still scheduled after the schedule was switched off"
        return nights

    def heartbeats(self, run_id) -> list:
        """When the server received the run's heartbeats (the events it stored)."""
        from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

        query = EventFilter(
            event=EventNameFilter(name=["prefect.flow-run.heartbeat"]),
            resource=EventResourceFilter(id=[f"prefect.flow-run.{run_id}"]),
        )
        return sorted(e.received for e in self.client.read_events(query, limit=50).events)

    def checkpoints(self) -> list[str]:
        """The resume points in the bucket now: each training's ``latest.json`` (tasks/training/checkpoints.py)."""
        self.store.fs.invalidate_cache()  # s3fs keeps listings: this process would see the bucket as it first listed it
        return self.store.fs.glob(self.store.path("checkpoints") + "/*/latest.json")


@pytest.fixture(scope="module")
def ops(tmp_path_factory: pytest.TempPathFactory, mnist_store: Store):
    import s3fs
    from prefect.client.orchestration import get_client
    from prefect.settings import temporary_settings

    tmp = tmp_path_factory.mktemp("deployment")
    receiver = Receiver()
    s3 = S3Server(tmp)
    stack = None
    with pytest.MonkeyPatch.context() as env:
        try:
            s3.use(env)  # this process and the stack's: the bucket's endpoint
            env.setenv("MNIST_ALERT_WEBHOOK", receiver.url)
            env.setenv("XDG_CACHE_HOME", str(tmp / "machine-local" / "cache"))  # the stack's own worker: a cache of its own
            env.delenv("PREFECT_API_DATABASE_CONNECTION_URL", raising=False)
            url = s3.bucket("nightly") + "/mnist"
            store = with_mnist(Store(url), mnist_store)
            stack = LocalStack(
                tmp / "server",
                port=free_port(),
                store=url,
                poll_seconds=2,
                db="postgres",
                silent_after=SILENT_AFTER,
                slot_wait_seconds=5,
            )
            stack.start()  # with its own worker, "gpu-worker-local", --limit 1 on this GPU-less machine
            with temporary_settings(stack.client_settings()), get_client(sync_client=True) as client:
                ops = Ops(stack, store, receiver, tmp / "machines", client)
                ops.nightly = ops.take_the_schedule()
                yield ops
        finally:
            if stack is not None:
                stopped = stack.stop()
                assert any(s.startswith("server") for s in stopped), stopped
                assert any(s.startswith("postgres") for s in stopped) and not stack.postgres_file.exists(), stopped
            s3.stop()
            receiver.server.shutdown()
            s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def two_workers(ops):
    """Two live workers for the test, whichever tests ran before, each as its own
    machine: its own Prefect home, directory and cache, so a resumed training can only come from the bucket."""
    while len(ops.stack.workers()) < 2:
        home = ops.machines / f"machine-{time.monotonic_ns()}"
        home.mkdir(parents=True)
        ops.stack.add_worker("gpu", f"gpu-worker-{home.name}", prefect_home=home / "prefect", cwd=home, cache_home=home / "cache")
    return ops.stack.workers()


def psql(cluster: LocalPostgres, env: dict[str, str]) -> subprocess.CompletedProcess:
    """``select 1`` through psql as any local user would try it (``-w``: never prompt for a password)."""
    command = shutil.which("psql") or postgres_binary("psql")
    return subprocess.run(
        [command, "-w", "-h", "127.0.0.1", "-p", str(cluster.port), "-U", "prefect", "-d", "prefect", "-tAc", "select 1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )


def test_the_stack_is_configured_as_prefect_yaml_says_and_keeps_its_secrets(ops, two_workers):
    deployment = ops.client.read_deployment_by_name(DEPLOYMENT)  # as it is now: other tests change and restore the limit
    assert deployment.global_concurrency_limit.limit == 1
    assert deployment.concurrency_options.collision_strategy.value == "ENQUEUE"
    (schedule,) = ops.deployment.schedules  # as deployed: the fixture switched it off since
    assert schedule.schedule.cron == "0 2 * * *" and schedule.schedule.timezone == "UTC" and schedule.active
    assert deployment.work_pool_name == "gpu" and deployment.parameters == {"params": {"seed": None}}
    # the server's scheduler made the coming nights from that cron (Prefect 3.9 under SQLAlchemy 2.1 made none)
    starts = [r.expected_start_time for r in ops.nightly]
    assert len(starts) >= 3, "the scheduler created no nightly runs: see the server's log for the scheduler's error"
    assert all(t.hour == 2 and t.minute == 0 and t.utcoffset().total_seconds() == 0 for t in starts), starts
    assert all((b - a).days == 1 for a, b in zip(starts, starts[1:])), starts
    assert all(r.parameters == {"params": {"seed": None}} for r in ops.nightly)
    assert "params" in deployment.parameter_openapi_schema["properties"] and deployment.enforce_parameter_schema
    names = {a.name for a in ops.client.read_automations()}
    assert {"mnist-crash-silent-runs", "mnist-restart-crashed-runs", AUTOMATION_NAME} <= names, names

    # what the UI form or an API call with an out-of-range value gets: refused, naming the field
    with pytest.raises(Exception, match="n_per_class") as refused:
        ops.client.create_flow_run_from_deployment(deployment.id, parameters={"params": {"n_per_class": 900}})
    assert "892" in str(refused.value)
    with pytest.raises(urllib.error.HTTPError) as unauthorized:  # the API without the auth string
        urllib.request.urlopen(f"{ops.stack.api_url}/admin/version", timeout=10)
    assert unauthorized.value.code == 401

    # each worker: one run at a time (no GPU here), the API's auth string, and neither the database URL nor its password
    cluster = LocalPostgres(ops.stack.home, json.loads(ops.stack.postgres_file.read_text())["port"])
    for worker in two_workers:
        pid = ops.stack.pids()[worker]
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert command[command.index(b"--limit") + 1] == b"1", worker
        environment = Path(f"/proc/{pid}/environ").read_bytes()
        assert b"PREFECT_API_DATABASE_CONNECTION_URL" not in environment and b"PREFECT_API_AUTH_STRING=" in environment
        assert cluster.password.encode() not in environment, worker
        assert command[1:3] == [b"-m", b"flows.stack.worker"], command  # the worker that decides (flows/stack/worker.py)
    server = Path(f"/proc/{ops.stack.pids()['server']}/environ").read_bytes().split(b"\0")
    assert f"{BUCKET_BUFFER_ENV}={BUCKET_BUFFER}".encode() in server  # a silent run's bucket is not swept unseen
    assert f"PREFECT_SERVER_CORS_ALLOWED_ORIGINS={ops.stack.ui_url}".encode() in server  # the UI's origin alone
    assert not any(v.startswith(b"MNIST_STORE=") for v in server)  # the store and its credentials: workers' only
    env = {k: v for k, v in os.environ.items() if k != "PGPASSWORD"}
    denied = psql(cluster, env)
    assert denied.returncode != 0 and "password" in denied.stderr, denied.stderr
    allowed = psql(cluster, {**env, "PGPASSWORD": cluster.password})
    assert allowed.stdout.strip() == "1", allowed.stderr


def test_an_api_caller_cannot_change_what_a_run_executes_where_or_with_which_environment(ops, two_workers, tmp_path):
    """Job variables are refused by the pool; a pool template or deployment opened by an administrator changes
    nothing either: the worker runs its own command, in its own environment, on its own checkout's flow only."""
    from prefect.client.schemas.actions import DeploymentUpdate, WorkPoolUpdate
    from prefect.workers.process import ProcessWorker

    marker = tmp_path / "ran-the-callers-command"
    deployment = ops.client.read_deployment_by_name(DEPLOYMENT)
    forced = {"params": {**QUICK, "gate": {"force_promote": True}}}  # refused unless the worker allows it
    hostile = {"command": f"touch {marker}", "env": {"MNIST_ALLOW_FORCE_PROMOTE": "1"}, "working_dir": str(tmp_path)}
    for name, value in hostile.items():  # 1. the pool's own template: refused when the run is created
        with pytest.raises(Exception, match=f"{name}.*(unexpected|not allowed)|(unexpected|not allowed).*{name}") as refused:
            ops.client.create_flow_run_from_deployment(deployment.id, parameters=forced, job_variables={name: value})
        assert "422" in str(refused.value) or "Unprocessable" in repr(refused.value)

    # 2. an administrator puts Prefect's default template back (which offers all three) and starts such a run
    pool = ops.client.read_work_pool("gpu")
    ops.client.update_work_pool("gpu", WorkPoolUpdate(base_job_template=ProcessWorker.get_default_base_job_template()))
    try:
        run = ops.client.create_flow_run_from_deployment(deployment.id, parameters=forced, job_variables=hostile)
        (done,) = ops.finished([run.id], timeout=240, completed=False)
    finally:
        ops.client.update_work_pool("gpu", WorkPoolUpdate(base_job_template=pool.base_job_template))
    assert done.state.is_failed(), (done.state.name, done.state.message)  # our flow ran, in the worker's environment
    assert "MNIST_ALLOW_FORCE_PROMOTE" in done.state.message, done.state.message
    assert not marker.exists()

    # 3. an administrator edits the deployment to run a shell step first: the worker refuses to start it
    shell = {"prefect.deployments.steps.run_shell_script": {"script": f"touch {marker}"}}
    ops.client.update_deployment(deployment.id, DeploymentUpdate(pull_steps=[*deployment.pull_steps, shell]))
    try:
        run = ops.client.create_flow_run_from_deployment(deployment.id, parameters={"params": QUICK})
        (done,) = ops.finished([run.id], timeout=240, completed=False)
    finally:
        ops.client.update_deployment(deployment.id, DeploymentUpdate(pull_steps=deployment.pull_steps))
    assert done.state.is_crashed() and "RefusedRun" in done.state.message and "pull steps" in done.state.message
    assert not marker.exists()


def test_a_run_triggered_during_the_nights_run_waits_for_it_then_finds_every_step_cached(ops, two_workers):
    params = {**QUICK, "seed": 11}
    ops.receiver.received.clear()  # the alerts of this test's runs only
    night = ops.trigger(**params)
    ops.wait([night.id], lambda rs: rs[0].state.is_running(), 120, "the night's run did not start")
    manual = ops.trigger(**params)  # "Run" clicked in the UI meanwhile, a worker free: only the deployment's limit holds it
    night, manual = ops.finished([night.id, manual.id])
    assert "AwaitingConcurrencySlot" in ops.states(manual.id)  # queued, not cancelled: see README "Run it nightly"
    assert manual.start_time >= night.end_time, (night.end_time, manual.start_time)

    cold, warm = ops.step_states(night.id), ops.step_states(manual.id)
    assert cold["train"] == "Completed" and cold["evaluate"] == "Completed", cold
    for step in ("fetch-mnist", "train", "evaluate", "plot"):
        assert warm[step] == "Cached", warm
    by_key = {a.key: a for a in ops.artifacts(manual.id) if a.key}
    assert {"mnist-per-digit-accuracy", "mnist-confusion-matrix", "mnist-run-summary"} <= set(by_key)
    assert by_key["mnist-per-digit-accuracy"].type == "table" and by_key["mnist-run-summary"].type == "markdown"
    summary = by_key["mnist-run-summary"].data
    assert "| train | Cached |" in summary
    assert any(a.type == "progress" and float(a.data) == 100.0 for a in ops.artifacts(night.id))
    # one epoch on 3000 images is far below the default floor: the gate rejects, the run still completes
    assert "**REJECTED**" in summary and "below the floor" in summary

    # a run pointed at a store this worker does not serve fails before any work and writes nothing there; its
    # name holds a quote, and the alert still arrives as valid JSON
    elsewhere = ops.machines / "elsewhere"
    failing = ops.trigger(name='a"b', **params, store=str(elsewhere))
    (failing,) = ops.finished([failing.id], completed=False)
    assert failing.state.is_failed(), failing.state
    assert "Parameter store=" in failing.state.message and "MNIST_ALLOWED_STORES" in failing.state.message
    assert not elsewhere.exists()
    alerts = ops.receiver.wait_for({"mnist.model.rejected", "prefect.flow-run.Failed"})
    assert "below the floor" in alerts["mnist.model.rejected"]["reason"], alerts
    assert alerts["mnist.model.rejected"]["decision"] == "rejected"
    assert alerts["prefect.flow-run.Failed"]["resource"] == f"prefect.flow-run.{failing.id}"
    assert alerts["prefect.flow-run.Failed"]["name"] == 'a"b'
    check_images_in_browser(ops.stack.ui_url, by_key["mnist-run-summary"].id, ops.stack.auth_string, run_name=night.name)

    runs = ops.rows("runs", [night.id, manual.id]).set_index("run_id")
    assert len(runs) == 2 and runs["evaluation_key"].nunique() == 1 and runs.loc[str(manual.id), "reused_evaluation"]
    assert len(ops.rows("confusion", [night.id, manual.id])) == 200  # 1 evaluation × 2 slices (selection, test) × 100 pairs


def test_runs_due_while_the_workers_were_away_run_when_they_return_and_train_each_key_once(ops, two_workers):
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    same = {**QUICK, "seed": 5}
    backfill = [same, same, {**same, "seed": 6}]
    ops.store.fs.invalidate_cache()
    temporaries_before = {p for p in ops.store.fs.find(ops.store.root) if "/." in p}  # a killed writer's, if that test ran first
    ops.set_deployment_limit(len(backfill))  # a backfill: runs overlap on the two workers, each one run at a time
    ops.pause_pool(True)  # no worker takes runs: as if they were down at 02:00
    try:
        ids = [ops.trigger(**p).id for p in backfill]
        ops.wait(ids, lambda rs: all(r.state.name == "Late" for r in rs), 90, "the runs were not marked Late")
    finally:
        ops.pause_pool(False)
    try:
        runs = ops.finished(ids, timeout=600)
    finally:
        ops.set_deployment_limit(1)

    took = submissions(ops.client, ids)  # the server gives each run to one worker: the other's claim is refused
    print(f"\nworkers that took each run: {took}")
    assert all(len(workers) == 1 for workers in took.values()), took
    by_worker: dict[str, list] = {}
    for run in runs:
        by_worker.setdefault(took[str(run.id)][0], []).append(run)
    assert len(by_worker) == 2, took  # both machines worked
    for worker, mine in by_worker.items():  # --limit 1: a worker's runs never overlap
        mine.sort(key=lambda r: r.start_time)
        assert all(a.end_time <= b.start_time for a, b in zip(mine, mine[1:])), (
            worker,
            [(r.start_time, r.end_time) for r in mine],
        )

    def messages(run_id) -> list[str]:  # one run's log (a page holds 200 lines), stored a moment after it is written
        query = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id]))
        return [log.message for log in ops.client.read_logs(log_filter=query, limit=200)]

    deadline = time.monotonic() + 60
    logs = {i: messages(i) for i in ids}
    while not all(any(m.startswith("Steps: ") for m in lines) for lines in logs.values()) and time.monotonic() < deadline:
        time.sleep(1)  # each run's last line, "Steps: …": its earlier lines are stored by then
        logs = {i: messages(i) for i in ids}
    trainings = [m for lines in logs.values() for m in lines if m.startswith("Training seed on")]
    assert all(len(lines) < 200 for lines in logs.values()), "a run's log filled the page: count on more pages"
    assert len(trainings) == 2, trainings  # seeds 5 and 6: the two identical runs, started together, trained once
    limits = [lim.name for lim in ops.client.read_global_concurrency_limits(limit=200)]
    assert any(name.startswith("mnist-artifact-") and "train-" in name for name in limits), limits

    table = ops.rows("runs", ids)
    assert len(table) == 3 and table["model_sha256"].nunique() == 2
    assert set(table["run_id"]) == {str(i) for i in ids}  # each run's row is its own: none ran twice
    for row in table.itertuples():
        late = (row.started_at - row.scheduled_start).total_seconds()
        assert late >= 15, (row.scheduled_start, row.started_at)  # Prefect marks a run Late 15 s after it was due
        assert row.attempt == 1
    row = next(table.itertuples())
    assert (
        f"| scheduled / started | {row.scheduled_start:%Y-%m-%d %H:%M:%S} UTC / {row.started_at:%Y-%m-%d %H:%M:%S} UTC"
        in ops.summary(row.run_id)
    )
    ops.store.fs.invalidate_cache()
    for name in TABLES:
        for path in ops.store.fs.glob(ops.store.path("tables", name) + "/*/*.parquet"):
            with ops.store.fs.open(path, "rb") as handle:  # glob gives filesystem paths, not store keys
                pq.read_table(handle)
    temporaries = {p for p in ops.store.fs.find(ops.store.root) if "/." in p} - temporaries_before
    assert not temporaries  # these runs left no temporary object in the bucket


def test_a_run_that_keeps_crashing_fails_instead_of_looping():

    from flows.night.recovery import Attempt, check_attempt

    crashes = [CRASH_MESSAGE.format(automation="mnist-crash-silent-runs")] * MAX_ATTEMPTS
    check_attempt(Attempt(number=MAX_ATTEMPTS, crashed=crashes[:-1], started_at=datetime.now(UTC)))  # may still try
    with pytest.raises(RuntimeError, match=f"This run crashed {MAX_ATTEMPTS} times .* not trying again"):
        check_attempt(Attempt(number=MAX_ATTEMPTS + 1, crashed=crashes, started_at=datetime.now(UTC)))


CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def log_in(page, auth_string: str) -> None:
    """What a person does on the login page: the password field takes the whole auth string."""
    password = page.locator("input[type=password]")
    password.wait_for(timeout=30_000)
    password.fill(auth_string)
    page.get_by_role("button", name="Login").click()
    password.wait_for(state="detached", timeout=30_000)


def check_images_in_browser(ui_url: str, artifact_id, auth_string: str, run_name: str) -> None:
    """Open the summary artifact as a person would, in both of Prefect's UIs: each asks for the password first,
    then shows the run, and every embedded plot decodes."""
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    assert chromium, "the browser check needs Debian's chromium: `apt-get install chromium` (make test installs it as root)"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            for ui in ("", "/v2"):
                page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()  # a new visitor each time
                page.goto(f"{ui_url}{ui}/runs", wait_until="networkidle")
                assert page.get_by_text(run_name).count() == 0, ui or "/"  # nothing is shown before the password
                log_in(page, auth_string)
                page.get_by_text(run_name).first.wait_for(timeout=30_000)  # the run, once logged in
                page.goto(f"{ui_url}{ui}/artifacts/artifact/{artifact_id}", wait_until="networkidle")
                widths = page.wait_for_function(  # rendered and decoded, not just present; read in the same instant
                    "(() => { const i = [...document.querySelectorAll('img[src^=\"data:image/png\"]')];"
                    " return i.length >= 9 && i.every(e => e.complete && e.naturalWidth > 0) && i.map(e => e.naturalWidth); })()",
                    timeout=30_000,
                ).json_value()
                assert len(widths) == 9 and min(widths) > 0, (ui or "/", widths)  # the nine figures of the summary
                assert page.get_by_text("Champion decision").count() >= 1
        finally:
            browser.close()
