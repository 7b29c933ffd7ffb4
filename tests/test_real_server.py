"""The nightly deployment against a real Prefect server: `prefect server start`, pools, `prefect deploy --all`
from this repository's prefect.yaml, the alert automation, a process worker, two triggered runs (cold, then all
cached), a failing run, webhook alerts received on loopback, and the summary artifact in a real browser."""

from __future__ import annotations

import json
import shutil
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from flows.serve import LocalStack, free_port
from storage import Store
from storage.tables import read_table
from tests.conftest import with_mnist

pytestmark = pytest.mark.slow

PARAMS = {"params": {"epochs": 1, "train_limit": 3000, "n_per_class": 20, "seed": 11}}


class Receiver:
    """A webhook endpoint on loopback that keeps every JSON body it is sent."""

    def __init__(self) -> None:
        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alert"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, alerts: set[str], timeout: float = 90) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not alerts <= {b["alert"] for b in self.received}:
            time.sleep(1)
        return self.received


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.server.shutdown()


@pytest.fixture
def stack(tmp_path: Path, mnist_store: Store, receiver: Receiver, monkeypatch: pytest.MonkeyPatch):
    """The stack `make serve` starts, on SQLite (tests/test_workers.py runs the PostgreSQL one)."""
    monkeypatch.setenv("MNIST_ALERT_WEBHOOK", receiver.url)
    store = Store(tmp_path / "store")
    with_mnist(store, mnist_store)
    monkeypatch.delenv("PREFECT_API_DATABASE_CONNECTION_URL", raising=False)
    local = LocalStack(tmp_path / "prefect-home", port=free_port(), store=store.url, poll_seconds=2)
    try:
        local.start()
        yield local, store
    finally:
        stopped = local.stop()
        assert any(s.startswith("server") for s in stopped)


def test_nightly_deployment_runs_and_reruns_from_cache(stack, receiver, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterId
    from prefect.deployments import run_deployment
    from prefect.settings import temporary_settings

    local, store = stack
    with pytest.raises(urllib.error.HTTPError) as refused:  # the API without the auth string
        urllib.request.urlopen(f"{local.api_url}/admin/version", timeout=10)
    assert refused.value.code == 401
    worker_env = Path(f"/proc/{local._pids()['worker-gpu']}/environ").read_bytes()
    assert b"PREFECT_API_DATABASE_CONNECTION_URL" not in worker_env and b"PREFECT_API_AUTH_STRING=" in worker_env
    with temporary_settings(local.client_settings()):
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

            artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[warm.id])))
            by_key = {a.key: a for a in artifacts if a.key}
            assert {"mnist-per-digit-accuracy", "mnist-confusion-matrix", "mnist-run-summary"} <= set(by_key)
            assert by_key["mnist-per-digit-accuracy"].type == "table" and by_key["mnist-run-summary"].type == "markdown"
            assert "| train | Cached |" in by_key["mnist-run-summary"].data
            progress = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[cold.id])))
            assert any(a.type == "progress" and float(a.data) == 100.0 for a in progress)

            # one epoch on 3000 images is far below the default floor: the gate rejects, the run still completes
            assert "**REJECTED**" in by_key["mnist-run-summary"].data and "below the floor" in by_key["mnist-run-summary"].data
            # a run pointed at a store this worker does not serve fails before any work, and writes nothing there;
            # its name holds a quote, and the alert still arrives as valid JSON
            elsewhere = tmp_path / "elsewhere"
            failing = run_deployment(
                "mnist-retrain/nightly",
                parameters={"params": {**PARAMS["params"], "store": str(elsewhere)}},
                flow_run_name='a"b',
                timeout=300,
                poll_interval=2,
            )
            assert failing.state.is_failed(), failing.state
            assert "Parameter store=" in failing.state.message and "MNIST_ALLOWED_STORES" in failing.state.message
            assert not elsewhere.exists()
            bodies = receiver.wait_for({"mnist.model.rejected", "prefect.flow-run.Failed"})
            alerts = {b["alert"]: b for b in bodies}
            assert {"mnist.model.rejected", "prefect.flow-run.Failed"} <= set(alerts), bodies
            assert (
                "below the floor" in alerts["mnist.model.rejected"]["reason"]
                and alerts["mnist.model.rejected"]["decision"] == "rejected"
            )
            assert alerts["prefect.flow-run.Failed"]["resource"] == f"prefect.flow-run.{failing.id}"
            assert alerts["prefect.flow-run.Failed"]["name"] == 'a"b'
            check_images_in_browser(local.ui_url, by_key["mnist-run-summary"].id, local.auth_string, run_name=cold.name)

    runs = read_table(store, "runs")
    assert set(runs["run_id"]) == {str(cold.id), str(warm.id)}
    assert len(read_table(store, "confusion")) == 400  # 2 runs × 2 slices (mnist-selection, mnist-test) × 100 pairs


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
