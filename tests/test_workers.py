"""The production topology on one machine: a PostgreSQL-backed Prefect server, the store in an S3-compatible
bucket, and two workers on the `gpu` pool with their own homes and directories. Five runs triggered at once.
The database takes no connection without its password, which only the server process has."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from flows.database import LocalPostgres, postgres_binary
from flows.serve import LocalStack, free_port
from storage import Store
from storage.tables import TABLES, read_table
from tests.conftest import submissions, with_mnist

pytestmark = pytest.mark.slow

SAME = {"epochs": 1, "train_limit": 3000, "n_per_class": 20, "seed": 5}
RUNS = [SAME, SAME, SAME, {**SAME, "seed": 6}, {**SAME, "seed": 7}]


@pytest.fixture
def topology(tmp_path: Path, mnist_store: Store, s3_server, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("PREFECT_API_DATABASE_CONNECTION_URL", raising=False)
    monkeypatch.delenv("MNIST_ALERT_WEBHOOK", raising=False)
    url = s3_server.bucket("nightly") + "/mnist"
    store = Store(url)
    with_mnist(store, mnist_store)
    stack = LocalStack(tmp_path / "server", port=free_port(), store=url, poll_seconds=2, db="postgres")
    try:
        stack.start()  # with its own worker, "gpu-worker-local"
        machine = tmp_path / "machine-b"
        machine.mkdir()
        stack.add_worker("gpu", "gpu-worker-b", prefect_home=machine / "prefect", cwd=machine)
        yield stack, store
    finally:
        stopped = stack.stop()
        assert any(s.startswith("postgres") for s in stopped) and not stack.postgres_file.exists()


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


def check_the_database_password_stays_with_the_server(stack: LocalStack) -> None:
    assert len(stack.workers()) == 2, stack.workers()  # both machines' workers are up, and both are checked
    cluster = LocalPostgres(stack.home, json.loads(stack.postgres_file.read_text())["port"])
    for worker in stack.workers():
        environment = Path(f"/proc/{stack._pids()[worker]}/environ").read_bytes()
        assert b"PREFECT_API_DATABASE_CONNECTION_URL" not in environment and b"PREFECT_API_AUTH_STRING=" in environment
        assert cluster.password.encode() not in environment, worker
    env = {k: v for k, v in os.environ.items() if k != "PGPASSWORD"}
    refused = psql(cluster, env)
    assert refused.returncode != 0 and "password" in refused.stderr, refused.stderr
    allowed = psql(cluster, {**env, "PGPASSWORD": cluster.password})
    assert allowed.stdout.strip() == "1", allowed.stderr


def test_five_runs_on_two_workers_of_a_postgres_server_train_each_key_once(topology):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentUpdate
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.deployments import run_deployment
    from prefect.settings import temporary_settings

    stack, store = topology
    check_the_database_password_stays_with_the_server(stack)
    with temporary_settings(stack.client_settings()), get_client(sync_client=True) as client:
        # a backfill: the nightly deployment's limit of one run (prefect.yaml) lifted, so runs overlap on the two
        # workers (each still one run at a time) and identical ones meet at the training lock
        deployment = client.read_deployment_by_name("mnist-retrain/nightly")
        client.update_deployment(deployment.id, DeploymentUpdate(concurrency_limit=len(RUNS)))
        runs = [run_deployment("mnist-retrain/nightly", parameters={"params": p}, timeout=0) for p in RUNS]
        ids = [r.id for r in runs]
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            states = [client.read_flow_run(i).state for i in ids]
            if all(s.is_final() for s in states):
                break
            time.sleep(3)
        assert all(s.is_completed() for s in states), [(s.name, s.message) for s in states]

        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)))
        trainings = [log for log in logs if log.message.startswith("Training seed on")]
        assert len(trainings) == 3, [log.message for log in trainings]  # seeds 5, 6 and 7: the three identical runs trained once

        limits = [lim.name for lim in client.read_global_concurrency_limits(limit=200)]
        assert any(name.startswith("mnist-artifact-") and "train-" in name for name in limits), limits
        took = submissions(client, ids)  # the server gives each run to one worker: the other's claim is refused
        print(f"\nworkers that took each run: {took}")
        assert all(len(workers) == 1 for workers in took.values()), took

    table = read_table(store, "runs")
    assert len(table) == 5 and table["model_sha256"].nunique() == 3
    for name in TABLES:
        for path in store.fs.glob(store.path("tables", name) + "/*/*.parquet"):
            with store.fs.open(path, "rb") as handle:  # glob gives filesystem paths, not store keys
                pq.read_table(handle)
    assert not [p for p in store.fs.find(store.root) if "/." in p]  # no temporary objects left in the bucket
    assert set(table["run_id"]) == {str(i) for i in ids}  # each run's row is its own: none ran twice
