"""The production topology on one machine: a PostgreSQL-backed Prefect server, the store in an S3-compatible
bucket, and two workers on the `gpu` pool with their own homes and directories. Five runs triggered at once."""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from flows.serve import LocalStack, free_port
from storage import Store
from storage.tables import TABLES, read_table
from tests.conftest import with_mnist

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
        stack.stop()


def test_five_runs_on_two_workers_train_each_key_once(topology):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentUpdate
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.deployments import run_deployment
    from prefect.settings import temporary_settings

    stack, store = topology
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

    table = read_table(store, "runs")
    assert len(table) == 5 and table["model_sha256"].nunique() == 3
    for name in TABLES:
        for path in store.fs.glob(store.path("tables", name) + "/*/*.parquet"):
            with store.fs.open(path, "rb") as handle:  # glob gives filesystem paths, not store keys
                pq.read_table(handle)
    assert not [p for p in store.fs.find(store.root) if "/." in p]  # no temporary objects left in the bucket
    texts = {log.name: log.read_text() for log in stack.home.glob("worker-*.log")}
    ran = {name: text.count("submitting flow run") - text.count("Aborted submission of flow run") for name, text in texts.items()}
    print(f"\nflow runs each worker ran: {ran}")  # the server gives each run to one worker: the other's claim is refused
    assert len(ran) == 2 and sum(ran.values()) == 5
