"""The nightly deployment against a real Prefect server: `prefect server start`, pools, `prefect deploy --all`
from this repository's prefect.yaml, a process worker, two triggered runs (cold, then all cached)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from flows.serve import LocalStack, free_port
from storage import Store
from storage.tables import read_table

pytestmark = pytest.mark.slow

PARAMS = {"params": {"epochs": 1, "train_limit": 3000, "n_per_class": 20, "seed": 11}}


@pytest.fixture
def stack(tmp_path: Path, mnist_store: Store):
    store = Store(tmp_path / "store")
    store.fs.copy(mnist_store.path("objects"), store.path("objects"), recursive=True)  # the download is tested elsewhere
    local = LocalStack(tmp_path / "prefect-home", port=free_port(), store=store.url, poll_seconds=2)
    try:
        local.start()
        yield local, store
    finally:
        stopped = local.stop()
        assert any(s.startswith("server") for s in stopped)


def test_nightly_deployment_runs_and_reruns_from_cache(stack):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterId
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    local, store = stack
    with temporary_settings({PREFECT_API_URL: local.api_url}):
        with get_client(sync_client=True) as client:
            deployment = client.read_deployment_by_name("mnist-retrain/nightly")
            (schedule,) = deployment.schedules
            assert schedule.schedule.cron == "0 2 * * *" and schedule.schedule.timezone == "UTC" and schedule.active
            assert deployment.work_pool_name == "gpu" and deployment.parameters == {"params": {"seed": None}}
            form = deployment.parameter_openapi_schema
            assert "params" in form["properties"] and deployment.enforce_parameter_schema

            # what the UI form or an API call with an out-of-range value gets: refused, naming the field
            with pytest.raises(Exception, match="n_per_class") as refused:
                client.create_flow_run_from_deployment(deployment.id, parameters={"params": {"n_per_class": 900}})
            assert "892" in str(refused.value)

            def trigger():
                started = time.monotonic()
                run = run_deployment("mnist-retrain/nightly", parameters=PARAMS, timeout=600, poll_interval=2)
                return run, time.monotonic() - started

            def step_states(run_id) -> dict[str, str]:
                runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
                return {r.name.rsplit("-", 1)[0]: r.state.name for r in runs}

            cold, cold_s = trigger()
            assert cold.state.is_completed(), f"cold run ended {cold.state}; worker log: {local.home / 'worker-gpu.log'}"
            warm, warm_s = trigger()
            assert warm.state.is_completed(), f"warm run ended {warm.state}"

            cold_states, warm_states = step_states(cold.id), step_states(warm.id)
            assert cold_states["train"] == "Completed" and cold_states["evaluate"] == "Completed"
            for step in ("fetch-mnist", "train", "evaluate", "plot"):
                assert warm_states[step] == "Cached", warm_states
            print(f"\ncold run {cold_s:.1f} s, warm run {warm_s:.1f} s (wall, trigger to Completed)")
            assert warm_s < cold_s

            artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[warm.id])))
            by_key = {a.key: a for a in artifacts if a.key}
            assert {"mnist-per-digit-accuracy", "mnist-confusion-matrix", "mnist-run-summary"} <= set(by_key)
            assert by_key["mnist-per-digit-accuracy"].type == "table" and by_key["mnist-run-summary"].type == "markdown"
            assert "| train | Cached |" in by_key["mnist-run-summary"].data
            progress = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[cold.id])))
            assert any(a.type == "progress" and float(a.data) == 100.0 for a in progress)

    runs = read_table(store, "runs")
    assert set(runs["run_id"]) == {str(cold.id), str(warm.id)}
    assert len(read_table(store, "confusion")) == 200
