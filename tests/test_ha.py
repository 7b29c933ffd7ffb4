"""The HA topology (``make serve TOPOLOGY=ha``, flows/stack/topology.py) on this machine, the production shape:
PostgreSQL, Redis, two API replicas behind HAProxy, the services apart, the watchdog and a worker, kept by
supervisord, the store in an S3-compatible bucket. One stack for the module (conftest.SHARED_WORKER keeps it on one
xdist worker); nights are short (one or two epochs on a few thousand images).

- every Prefect server process carries the Redis settings, the replicas run ``--no-services``, Docket is on Redis,
  workers know only the balancer, auth holds through it, Redis wants its password, deploy/ says the same;
- a run whose worker died during submission is Crashed by the watchdog and frees the slot; the night queued behind
  it survives an API replica, the services process and Redis each killed with SIGKILL and restarted by supervisord:
  Completed, no Crashed state, one training, the same scheduled nights, alerts still sent;
- after the services process and Redis restarted, a machine killed with SIGKILL during epoch 2 of 3: its run is
  Crashed for its missing heartbeats by the zombie automation (its buckets in Redis, evaluated by the restarted
  services), scheduled again, picked up by another machine, resumed from the checkpoint in the bucket, one row in
  ``runs``;
- the watchdog alerts when the schedule is paused; a worker without a fast enough heartbeat refuses to start.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from flows.night.recovery import CRASH_MESSAGE, RESTART_MESSAGE
from flows.stack.database import URL_ENV
from flows.stack.serve import REPO, free_port
from flows.stack.topology import REDIS, SERVICES, HAStack, binary
from flows.stack.watchdog import SCHEDULE_MISSING, STUCK_MESSAGE, WatchdogSettings
from storage import Store
from tests.conftest import S3Server, submissions, with_mnist
from tests.test_deployment import QUICK, Ops, Receiver

pytestmark = pytest.mark.slow

SILENT_AFTER = 60
WATCHDOG = WatchdogSettings(grace=3600, pending_after=45, every=5, settle=20)


def far_timezone(now: datetime) -> str:
    """A fixed-offset zone in which 02:00 is about 12 hours away: the deployed cron (02:00) keeps making nights,
    none of which falls due while the module runs."""
    offset = (now.hour + 10) % 24  # hours west of UTC: 02:00 there is (2 + offset) UTC = now + 12 h
    return f"Etc/GMT+{offset}" if offset <= 12 else f"Etc/GMT-{24 - offset}"


def nights(ops: Ops) -> list:
    """The scheduled runs the scheduler made for the nightly deployment, by start time."""
    return ops.scheduled_nights()


@pytest.fixture(scope="module")
def ha(tmp_path_factory: pytest.TempPathFactory, mnist_store: Store):
    import s3fs
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.settings import temporary_settings

    tmp = tmp_path_factory.mktemp("ha")
    receiver = Receiver()
    s3 = S3Server(tmp)
    stack = None
    with pytest.MonkeyPatch.context() as env:
        try:
            s3.use(env)  # this process and the stack's: the bucket's endpoint
            env.setenv("MNIST_ALERT_WEBHOOK", receiver.url)
            env.setenv("XDG_CACHE_HOME", str(tmp / "cache"))
            env.delenv(URL_ENV, raising=False)
            url = s3.bucket("nightly") + "/mnist"
            store = with_mnist(Store(url), mnist_store)
            stack = HAStack(
                tmp / "server",
                port=free_port(),
                store=url,
                poll_seconds=2,
                silent_after=SILENT_AFTER,
                slot_wait_seconds=5,
                watchdog=WATCHDOG,
            )
            started = time.monotonic()
            stack.start()
            print(f"\nHA stack started in {time.monotonic() - started:.0f} s")
            with temporary_settings(stack.client_settings()), get_client(sync_client=True) as client:
                ops = Ops(stack, store, receiver, tmp / "machines", client)
                (schedule,) = ops.deployment.schedules
                zone = far_timezone(datetime.now(UTC))
                client.update_deployment_schedule(
                    ops.deployment.id, schedule.id, schedule=CronSchedule(cron="0 2 * * *", timezone=zone)
                )
                yield ops  # the scheduler makes the moved nights on its next pass (a minute): the first tests need none
        finally:
            if stack is not None:
                stopped = stack.stop()
                names = {s.split(" (")[0] for s in stopped}
                wanted = {"supervisor", "redis", "haproxy", "services", "api-1", "api-2", "watchdog", "postgres"}
                assert wanted <= names, stopped
                assert not [s for s in stopped if running(int(s.split(" (")[1].rstrip(")")))], stopped
            s3.stop()
            receiver.server.shutdown()
            s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def one_worker(ha) -> str:
    """The stack's own worker, and no other: whichever machines an earlier test added or killed."""
    rpc = ha.stack.supervisor.rpc()
    for process in ha.stack.supervisor.processes():
        if (
            process["name"].startswith("worker-")
            and process["name"] != "worker-gpu"
            and process["statename"] in ("STARTING", "RUNNING")
        ):
            rpc.stopProcess(process["name"], True)
    if "worker-gpu" not in ha.stack.pids():
        ha.stack.supervisor.start("worker-gpu")
    return "worker-gpu"


def running(pid: int | None) -> bool:
    """Whether ``pid`` runs: not gone, and not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def environ(pid: int) -> dict[str, str]:
    return dict(e.split("=", 1) for e in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in e)


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_text().split("\0")[:-1]


def test_every_server_process_shares_redis_and_clients_know_only_the_balancer(ha):
    stack: HAStack = ha.stack
    pids = stack.pids()
    settings = stack.redis_settings()
    redis_port = stack.ports[REDIS]
    assert (
        settings["PREFECT_SERVER_DOCKET_URL"].startswith("redis://")
        and f":{redis_port}/1" in settings["PREFECT_SERVER_DOCKET_URL"]
    )
    for name in ("api-1", "api-2", SERVICES):
        env = environ(pids[name])
        assert {k: env.get(k) for k in settings} == settings, name  # broker, cache, ordering, leases, Docket, password
        assert env["PREFECT_SERVER_EVENTS_MESSAGING_BROKER"] == "prefect_redis.messaging"
        assert env[URL_ENV].startswith("postgresql+asyncpg://") and env["PREFECT_SERVER_CSRF_PROTECTION_ENABLED"] == "true"
    for name in ("api-1", "api-2"):
        assert "--no-services" in cmdline(pids[name]) and str(stack.ports[name]) in cmdline(pids[name])
    assert cmdline(pids[SERVICES])[-3:] == ["server", "services", "start"]
    worker = environ(pids["worker-gpu"])
    assert worker["PREFECT_API_URL"] == f"http://127.0.0.1:{stack.port}/api"  # the balancer, not a replica
    assert not any(k.startswith(("PREFECT_REDIS", "PREFECT_SERVER_DOCKET")) or k == URL_ENV for k in worker)
    assert stack.redis_password not in "\0".join(f"{k}={v}" for k, v in worker.items())
    assert (stack.home / "redis.conf").stat().st_mode & 0o077 == 0
    assert "option httpchk GET /api/health" in (stack.home / "haproxy.cfg").read_text()

    with pytest.raises(urllib.error.HTTPError) as refused:  # auth holds through the balancer
        urllib.request.urlopen(f"{stack.api_url}/admin/version", timeout=10)
    assert refused.value.code == 401
    cli = binary("redis-server").replace("redis-server", "redis-cli")
    if Path(cli).exists():  # Redis answers only with its password
        anonymous = subprocess.run([cli, "-p", str(redis_port), "ping"], capture_output=True, text=True, timeout=10)
        assert "NOAUTH" in anonymous.stdout + anonymous.stderr, anonymous
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.ports['api-2']}/api/health", timeout=10) as answer:
        assert answer.status == 200


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (a flow-run process may sit in a session of its own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process below it, as when its machine dies."""
    for victim in [pid, *descendants(pid)]:
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass


def kill_and_wait_restart(stack: HAStack, name: str, timeout: float = 120) -> float:
    """SIGKILL ``name``'s process group and wait until supervisord started it again and it serves; seconds taken."""
    old = stack.pids()[name]
    log = stack.home / f"{name}.log"
    logged = log.stat().st_size
    killed = time.monotonic()
    os.killpg(old, signal.SIGKILL)
    deadline = killed + timeout
    while time.monotonic() < deadline:
        new = stack.pids().get(name)
        if new and new != old and running(new):
            break
        time.sleep(0.3)
    else:
        raise AssertionError(f"supervisord did not start {name} again within {timeout:.0f} s")
    if name.startswith("api-"):
        stack.wait_replica(name, timeout=deadline - time.monotonic())
    elif name == SERVICES:  # its services are up once it says so, in what it logged since the kill
        while "Starting services" not in log.read_text()[logged:] and time.monotonic() < deadline:
            time.sleep(0.3)
        assert "Starting services" in log.read_text()[logged:], log.read_text()[logged:][-2000:]
    return time.monotonic() - killed


NIGHT = {**QUICK, "epochs": 2, "train_limit": 6000, "seed": 41}  # long enough for three kills and restarts


def test_a_run_stuck_in_submission_frees_its_slot_and_the_next_night_survives_a_replica_the_services_and_redis(ha, one_worker):
    """Two scenarios on one training: the watchdog crashes a run whose worker died while submitting it, which
    frees the deployment's slot; the night queued behind it then runs while an API replica, the services process
    and Redis are each killed with SIGKILL, and completes as if nothing happened."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    deadline = time.monotonic() + 120
    while len(before := nights(ha)) < 3 and time.monotonic() < deadline:
        time.sleep(2)
    assert len(before) >= 3, "the scheduler made no nights: see services.log"
    assert all(r.expected_start_time - datetime.now(UTC) > timedelta(hours=6) for r in before), before
    ha.receiver.received.clear()

    stuck = ha.trigger(**NIGHT)
    deadline = time.monotonic() + 120
    while (state := ha.client.read_flow_run(stuck.id).state).is_scheduled() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert state.is_pending(), f"the run went {state.name} before the worker could be killed in submission"
    kill_tree(ha.stack.pids()[one_worker])  # the worker and the flow-run process it was starting
    killed = time.monotonic()
    run = ha.trigger(**NIGHT)  # the next night: queued behind the stuck run's slot
    (crashed,) = ha.finished([stuck.id], timeout=WATCHDOG.pending_after + 120, completed=False)
    crashed_after = time.monotonic() - killed
    assert crashed.state.is_crashed() and crashed.state.message.startswith(STUCK_MESSAGE.split("{")[0]), crashed.state
    assert "Running" not in ha.states(stuck.id), ha.states(stuck.id)
    print(f"\nstuck in Pending: Crashed {crashed_after:.0f} s after its worker died")

    # the slot was released: the next night runs (on the restarted worker), and the stack dies around it
    ha.wait([run.id], lambda rs: rs[0].state.is_running(), 180, "the night did not start")
    took = {}
    for name in ("api-1", SERVICES, REDIS):  # one at a time, each back before the next dies
        assert not ha.client.read_flow_run(run.id).state.is_final(), f"the night ended before {name} was killed"
        took[name] = kill_and_wait_restart(ha.stack, name)
    print(f"killed and restarted while the night ran: {', '.join(f'{n} in {s:.0f} s' for n, s in took.items())}")
    (done,) = ha.finished([run.id], timeout=400)
    states = ha.states(run.id)
    assert "AwaitingConcurrencySlot" in states, states
    assert "Crashed" not in states and states.count("Running") == 1, states
    assert done.state.is_completed()

    assert len(ha.rows("runs", [run.id])) == 1  # one row: the night ran once
    query = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id]))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        logs = [log.message for log in ha.client.read_logs(log_filter=query, limit=200)]
        if any(m.startswith("Steps: ") for m in logs):
            break
        time.sleep(1)
    assert len([m for m in logs if m.startswith("Training seed on")]) == 1, logs

    after = nights(ha)  # the restarted scheduler (services) made no second copy of any night
    starts = [r.expected_start_time for r in after]
    assert len(starts) == len(set(starts)), starts
    assert {r.id for r in before} <= {r.id for r in after}, (before, after)

    failing = ha.trigger(name="after-the-restarts", **QUICK, store=str(ha.machines / "elsewhere"))
    (failing,) = ha.finished([failing.id], completed=False)
    assert failing.state.is_failed(), failing.state
    alerts = ha.receiver.wait_for({"prefect.flow-run.Crashed", "prefect.flow-run.Failed"}, timeout=120)
    assert alerts["prefect.flow-run.Crashed"]["resource"] == f"prefect.flow-run.{stuck.id}", alerts
    # triggers evaluated in the restarted services process, from the restarted Redis
    assert alerts["prefect.flow-run.Failed"]["resource"] == f"prefect.flow-run.{failing.id}", alerts


def add_machine(ha, name: str) -> str:
    """A worker as another machine runs it (its own Prefect home, directory and cache); not restarted when it
    dies, as a machine that died does not restart its worker. Its supervisord name."""
    home = ha.machines / name
    home.mkdir(parents=True)
    env = {"PREFECT_HOME": str(home / "prefect"), "XDG_CACHE_HOME": str(home / "cache")}
    program = replace(ha.stack.worker_program("gpu", name, env, cwd=home), autorestart=False)
    ha.stack.supervisor.add(program)
    return program.name


def test_a_killed_machines_run_is_crashed_restarted_on_another_and_resumes_after_the_services_restarted(ha, one_worker):
    """The zombie automation's buckets live in Redis and its evaluation in the services process: both are
    restarted first. Then the machine training the run dies during epoch 2 of 3; the run is Crashed for its
    missing heartbeats, scheduled again, picked up by another machine (its own home and cache: the checkpoint
    can only come from the bucket), resumed from the epoch the bucket held, and is one row in ``runs``."""
    ha.stack.supervisor.rpc().stopProcess(one_worker, True)  # the run must start on the machine that dies
    doomed = add_machine(ha, f"machine-{time.monotonic_ns()}")
    run = ha.trigger(epochs=3, train_limit=8000, n_per_class=20, seed=None)  # the seed is derived from the dataset version
    restarted = {name: kill_and_wait_restart(ha.stack, name) for name in (SERVICES, REDIS)}  # while the run starts
    print(f"\nrestarted before the kill: {', '.join(f'{n} in {s:.0f} s' for n, s in restarted.items())}")
    ha.wait([run.id], lambda rs: rs[0].state.is_running(), 180, "the run did not start")
    (worker,) = submissions(ha.client, [run.id])[str(run.id)]  # the worker that took the run, known before the kill

    def epochs_backed_up() -> int:
        found = ha.checkpoints()
        return json.loads(ha.store.fs.cat_file(found[0]))["epoch"] if found else 0

    deadline, polls, heard = time.monotonic() + 180, 0, []
    while time.monotonic() < deadline and (epochs_backed_up() < 1 or not heard):  # epoch 1 in the store, a heartbeat heard
        polls += 1
        if polls % 5 == 0:  # the bucket every 0.2 s, the API every second
            assert not ha.client.read_flow_run(run.id).state.is_final(), "the run ended before it could be killed"
            heard = heard or ha.heartbeats(run.id)  # what the recovery automation starts counting from
        time.sleep(0.2)
    assert heard, "the server received no heartbeat from the run within 180 s: nothing could tell it died"
    assert epochs_backed_up() >= 1, "epoch 1 was not backed up within 180 s"

    infrastructure = ha.client.read_flow_run(run.id).infrastructure_pid  # "host:pid" of the flow run's process
    killed_at, killed_on = time.monotonic(), datetime.now(UTC)
    kill_tree(ha.stack.pids()[doomed])  # the machine dies: its worker and the flow run's process
    if infrastructure:
        kill_tree(int(infrastructure.rsplit(":", 1)[-1]))  # in case it left the worker's tree
    at_kill = epochs_backed_up()  # nothing writes after the kill: this is what the restart finds
    assert 1 <= at_kill < 3, f"the run was killed after {at_kill} of 3 epochs: it should still have been training"
    ha.stack.supervisor.start(one_worker)  # another machine, up: it can take the run once the run is rescheduled

    try:  # two missed heartbeats, then Prefect's proactive evaluation, which lags on a loaded server
        ha.wait([run.id], lambda rs: rs[0].state.is_crashed() or rs[0].state.is_scheduled(), SILENT_AFTER + 150, "not crashed")
    except AssertionError as late:
        raise AssertionError(f"{late}; killed at {killed_on:%H:%M:%S}, heartbeats received {ha.heartbeats(run.id)}") from None
    crashed_after = time.monotonic() - killed_at
    # Crashed is a final state: wait for the restart automation to take the run out of it before waiting for the end
    ha.wait([run.id], lambda rs: not rs[0].state.is_crashed(), 60, "the crashed run was not scheduled again")
    (done,) = ha.finished([run.id], timeout=300)
    recovered_after = time.monotonic() - killed_at
    silent = (killed_on - heard[-1]).total_seconds()
    print(f"killed after {at_kill} epochs, {silent:.0f} s after the last heartbeat heard: ", end="")
    print(f"Crashed after {crashed_after:.0f} s, completed after {recovered_after:.0f} s")

    states = ha.client.read_flow_run_states(run.id)
    crashed = [s for s in states if s.is_crashed()]
    assert len(crashed) == 1 and crashed[0].message == CRASH_MESSAGE.format(automation="mnist-crash-silent-runs")
    assert any(
        s.name == "AwaitingRetry" and s.message == RESTART_MESSAGE.format(automation="mnist-restart-crashed-runs") for s in states
    )
    took = submissions(ha.client, [run.id], at_least=2)[str(run.id)]
    assert worker == doomed.removeprefix("worker-") and set(took) == {worker, "gpu-worker-local"}, took  # then the other

    mine = ha.rows("runs", [run.id])
    assert len(mine) == 1  # the crashed attempt left no row; the restart wrote one
    (row,) = mine.itertuples()
    assert row.attempt == 2 and row.resumed_from_epoch == at_kill, (row.attempt, row.resumed_from_epoch, at_kill)
    assert json.loads(row.parameters)["seed"] is not None  # the derived seed, the same both attempts (same training key)
    assert ha.checkpoints() == []  # the checkpoint went with the published model
    summary = ha.summary(run.id)
    from tasks.publish.markdown import md_text  # the crash's message comes from the API: escaped as untrusted text

    crash = md_text("No heartbeat from this flow run's process")
    assert f"| attempt | **2**: a retry of this run's crashed attempt (1 crash: {crash}" in summary
    assert f"training resumed from the checkpoint after epoch {row.resumed_from_epoch}" in summary
    assert done.state.is_completed()


def test_a_worker_whose_heartbeat_is_too_slow_for_the_zombie_automation_refuses_to_start(ha):
    from flows.stack.worker import HeartbeatTooSlow, check_heartbeat

    env = {k: v for k, v in ha.stack.env.items() if k != "PREFECT_FLOWS_HEARTBEAT_FREQUENCY"}
    refused = subprocess.run(  # Prefect's default, 180 s: the window read from the stack's API is 60 s
        [sys.executable, "-m", "flows.stack.worker", "--pool", "gpu", "--name", "slow-heart"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "PREFECT_FLOWS_HEARTBEAT_FREQUENCY=180 s" in refused.stderr and f"{SILENT_AFTER:g} s" in refused.stderr
    with pytest.raises(HeartbeatTooSlow, match="=45 s"):  # beats once in 60 s
        check_heartbeat(45, [SILENT_AFTER])
    check_heartbeat(30, [SILENT_AFTER])  # make serve's: twice


def test_the_watchdog_alerts_when_the_schedule_is_paused(ha):
    assert nights(ha), "no night scheduled before the pause"
    ha.receiver.received.clear()
    (schedule,) = ha.client.read_deployment(ha.deployment.id).schedules
    paused_at = datetime.now(UTC)
    ha.client.update_deployment_schedule(ha.deployment.id, schedule.id, active=False)  # Prefect deletes its nights
    alerts = ha.receiver.wait_for({SCHEDULE_MISSING}, timeout=60)
    assert SCHEDULE_MISSING in alerts, ha.receiver.received
    assert "no Scheduled run in the next 26 h" in alerts[SCHEDULE_MISSING]["reason"]
    assert datetime.fromisoformat(alerts[SCHEDULE_MISSING]["occurred"]) - paused_at < timedelta(seconds=60)
