"""What a deployed run may point its worker at, and how ``make serve`` guards the API: unit checks, no server
(the real server's refusals are in tests/test_deployment.py)."""

from __future__ import annotations

import os
import stat
import typing

import pytest

from flows.night.confinement import NotServed, check_deployed_run
from flows.night.params import PipelineParameters
from flows.stack.serve import LocalStack


@pytest.fixture
def worker(tmp_path, monkeypatch):
    served = tmp_path / "served"
    other = tmp_path / "other"
    source = tmp_path / "idx"
    monkeypatch.setenv("MNIST_STORE", str(served))
    monkeypatch.setenv("MNIST_ALLOWED_STORES", f"s3://team-bucket/mnist, {other}")
    monkeypatch.setenv("MNIST_SOURCE", str(source))
    monkeypatch.delenv("MNIST_ALLOWED_SOURCES", raising=False)
    monkeypatch.delenv("MNIST_ALLOW_FORCE_PROMOTE", raising=False)
    return tmp_path


def test_the_stores_and_sources_a_worker_serves_pass(worker):
    for store in (None, str(worker / "served"), str(worker / "served") + "/", str(worker / "other"), "s3://team-bucket/mnist"):
        check_deployed_run(PipelineParameters(store=store, mnist_source=str(worker / "idx")))


@pytest.mark.parametrize("store", ["{tmp}/elsewhere", "{tmp}/served/../elsewhere", "s3://attacker-bucket/x", "memory://x"])
def test_a_store_the_worker_does_not_serve_is_refused_naming_the_parameter_and_the_setting(worker, store):
    with pytest.raises(NotServed) as refused:
        check_deployed_run(PipelineParameters(store=store.format(tmp=worker)))
    assert "Parameter store=" in str(refused.value) and "MNIST_ALLOWED_STORES" in str(refused.value)
    assert not (worker / "elsewhere").exists()


def test_a_deployed_run_may_not_bring_credentials_nor_move_the_store_through_a_link(worker, monkeypatch):
    import fsspec.config

    monkeypatch.setattr(fsspec.config, "conf", {})
    monkeypatch.setenv("MNIST_ALLOWED_STORES", "s3://team-bucket/mnist")
    with pytest.raises(NotServed, match="user or password"):
        check_deployed_run(PipelineParameters(store="s3://ATTACKER:secret@team-bucket/mnist"))
    assert fsspec.config.conf == {} and "FSSPEC_S3_KEY" not in os.environ  # the worker's own credentials stand
    link = worker / "link"
    link.symlink_to(worker / "served")
    checked = check_deployed_run(PipelineParameters(store=str(link)))
    assert checked.store == os.path.realpath(worker / "served")  # what the run uses is what was checked


def test_a_source_directory_or_a_forced_promotion_the_worker_does_not_allow_is_refused(worker, monkeypatch):
    with pytest.raises(NotServed, match="mnist_source=.*MNIST_ALLOWED_SOURCES"):
        check_deployed_run(PipelineParameters(mnist_source="/etc"))
    with pytest.raises(NotServed, match="force_promote.*MNIST_ALLOW_FORCE_PROMOTE=1"):
        check_deployed_run(PipelineParameters(gate={"force_promote": True}))
    monkeypatch.setenv("MNIST_ALLOW_FORCE_PROMOTE", "1")
    check_deployed_run(PipelineParameters(gate={"force_promote": True}))


def test_serve_makes_a_private_auth_string_and_refuses_the_network_without_one(tmp_path, monkeypatch):
    monkeypatch.delenv("PREFECT_SERVER_API_AUTH_STRING", raising=False)
    stack = LocalStack(tmp_path / "home", port=4999)
    secret = stack.auth_string
    assert secret.startswith("admin:") and len(secret) > 30 and stack.auth_string == secret  # made once, then kept
    assert stat.S_IMODE(stack.auth_file.stat().st_mode) == 0o600
    assert stack.env["PREFECT_API_AUTH_STRING"] == secret and "PREFECT_SERVER_API_AUTH_STRING" not in stack.env
    assert stack.server_env["PREFECT_SERVER_API_AUTH_STRING"] == secret
    assert stack.server_env["PREFECT_SERVER_CSRF_PROTECTION_ENABLED"] == "true"
    assert LocalStack(tmp_path / "home2", port=4999, host="0.0.0.0").server_env["PREFECT_SERVER_API_HOST"] == "0.0.0.0"
    with pytest.raises(ValueError, match="without authentication"):
        LocalStack(tmp_path / "home3", port=4999, host="0.0.0.0", auth=False)
    assert LocalStack(tmp_path / "home4", port=4999, auth=False).auth_string is None  # loopback may go without
    monkeypatch.setenv("PREFECT_SERVER_API_AUTH_STRING", "ops:given")
    assert LocalStack(tmp_path / "home5", port=4999).auth_string == "ops:given"


def test_the_database_url_reaches_the_server_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_API_DATABASE_CONNECTION_URL", "postgresql+asyncpg://prefect:pw@db:5432/prefect")
    stack = LocalStack(tmp_path / "home", port=4999, db="postgres")
    assert "PREFECT_API_DATABASE_CONNECTION_URL" not in stack.env
    assert stack.server_env["PREFECT_API_DATABASE_CONNECTION_URL"].endswith("@db:5432/prefect")


def test_a_store_url_is_judged_by_its_text_alone_no_connection_before_the_allow_list(worker):
    """An ``ftp://`` store makes fsspec connect as it is constructed: a refused one must not even be dialled."""
    import socket

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(0.5)
        port = listener.getsockname()[1]
        for url in (f"ftp://127.0.0.1:{port}/x", f"http://127.0.0.1:{port}/x", f"simplecache::ftp://127.0.0.1:{port}/x"):
            with pytest.raises(NotServed, match="Parameter store="):
                check_deployed_run(PipelineParameters(store=url))
        with pytest.raises(TimeoutError):
            listener.accept()  # nobody dialled


LOOSER = [
    ("gate", "min_balanced_accuracy", 0.5),
    ("gate", "max_regression", 0.5),
    ("gate", "max_digit_drop", 0.9),
    ("gate", "min_digit_images", 10_000),
    ("gate", "min_new_data_images", 100_000),
    ("ingest", "max_leaked_share", 1.0),
    ("ingest", "drift_p", 1e-12),
    ("ingest", "max_label_shift", 1.0),
    ("ingest", "max_image_drift", 1.0),
    ("ingest", "confident_probability", 1.0),
    ("ingest", "max_disagreement_excess", 1.0),
    ("ingest", "min_batch_images", 1),
    ("ingest", "holdout_share", 1e-9),  # issue 39, finding 7: the night's batches would get no new-data holdout
    ("retention", "keep_reports", 0),  # a run that erases every report but its own
]


@pytest.mark.parametrize(("group", "field", "value"), LOOSER)
def test_a_deployed_run_may_tighten_a_rule_but_not_loosen_it_unless_the_worker_allows(worker, monkeypatch, group, field, value):
    with pytest.raises(NotServed, match=f"{group}.{field}=.*MNIST_ALLOW_LOOSER_RULES=1"):
        check_deployed_run(PipelineParameters(**{group: {field: value}}))
    monkeypatch.setenv("MNIST_ALLOW_LOOSER_RULES", "1")
    check_deployed_run(PipelineParameters(**{group: {field: value}}))


def unclassified(model: type, prefix: str = "") -> list[str]:
    """Every parameter under ``model`` (recursively, through groups) that ``classification`` does not know."""
    from pydantic import BaseModel

    from flows.night.confinement import classification

    def groups(annotation) -> list[type]:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return [annotation]
        return [g for arg in typing.get_args(annotation) for g in groups(arg)]

    missing = []
    for name, info in model.model_fields.items():
        path, kind = prefix + name, classification(prefix + name)
        nested = groups(info.annotation)
        if kind is None or (nested and kind != "rule group") or (kind == "rule group" and not nested):
            missing.append(path)
        for group in nested:
            missing += unclassified(group, path + ".")
    return missing


def test_every_parameter_is_classified():
    """A field of PipelineParameters, or of a group in it, that nobody said how to confine fails here: each is a
    rule with a direction, a plain setting, or allow-listed (flows/night/confinement.py)."""
    from pydantic import create_model

    from flows.night.confinement import classification
    from tasks.intake.checks import IngestRules

    assert unclassified(PipelineParameters) == []
    assert classification("ingest.holdout_share") == "lower is looser"
    # what the check catches: a new setting, a new group of fields, and a new rule inside a known group
    grown = create_model("Grown", __base__=PipelineParameters, cache_to=(str, ""), extra=(IngestRules, IngestRules()))
    found = unclassified(grown)
    assert found[:2] == ["cache_to", "extra"] and all(path.startswith("extra.") for path in found[2:])
    newer = create_model("NewerIngest", __base__=IngestRules, max_source_share=(float, 0.5))
    assert unclassified(create_model("P", ingest=(newer, newer()))) == ["ingest.max_source_share"]


def test_every_rule_is_judged_in_one_direction_and_the_defaults_pass(worker):
    from flows.night.confinement import LOOSER_WHEN_HIGHER, LOOSER_WHEN_LOWER, NOT_A_RULE
    from tasks.champion.gate import GateRules
    from tasks.intake.checks import IngestRules
    from tasks.publish.retention_rules import RetentionRules

    for group, rules in (("gate", GateRules), ("ingest", IngestRules), ("retention", RetentionRules)):
        named = [LOOSER_WHEN_LOWER[group], LOOSER_WHEN_HIGHER[group], NOT_A_RULE[group]]
        for field in rules.model_fields:
            assert sum(field in names for names in named) == 1, f"{group}.{field}: say which way it loosens"
    tighter = PipelineParameters(gate={"min_balanced_accuracy": 0.99, "max_regression": 0.0}, ingest={"drift_p": 0.5})
    check_deployed_run(tighter)
    check_deployed_run(PipelineParameters())
    check_deployed_run(PipelineParameters(retention={"prune": False, "keep_reports": 365}))  # keeping more: any run may


def test_the_pool_template_exposes_nothing_that_changes_what_or_where_a_run_executes():
    from flows.stack.worker import locked_template

    template = locked_template()
    assert set(template["variables"]["properties"]) == {"name", "labels", "stream_output"}
    assert template["variables"]["additionalProperties"] is False
    assert not {"command", "env", "working_dir"} & set(template["job_configuration"])


def test_the_worker_runs_only_this_checkouts_deployment():
    import uuid

    from prefect.client.schemas.responses import DeploymentResponse

    from flows.stack.worker import CODE, ENTRYPOINT, WORKING_DIRECTORY_STEP, RefusedRun, check_deployment

    def deployment(entrypoint: str = ENTRYPOINT, steps: list | None = None) -> DeploymentResponse:
        steps = [{WORKING_DIRECTORY_STEP: {"directory": str(CODE)}}] if steps is None else steps
        return DeploymentResponse(id=uuid.uuid4(), name="nightly", flow_id=uuid.uuid4(), entrypoint=entrypoint, pull_steps=steps)

    check_deployment(deployment())
    with pytest.raises(RefusedRun, match="without a deployment"):
        check_deployment(None)
    with pytest.raises(RefusedRun, match="entrypoint 'evil.py:flow'"):
        check_deployment(deployment(entrypoint="evil.py:flow"))
    with pytest.raises(RefusedRun, match=r"made before the flow moved .*Redeploy from this checkout: `make serve`"):
        check_deployment(deployment(entrypoint="flows/pipeline.py:mnist_retrain"))  # deployed before flows/night/
    shell = {"prefect.deployments.steps.run_shell_script": {"script": "touch /tmp/marker"}}
    for steps in (
        [],
        [shell],
        [{WORKING_DIRECTORY_STEP: {"directory": str(CODE)}}, shell],
        [{WORKING_DIRECTORY_STEP: {"directory": "/tmp"}}],
        [{WORKING_DIRECTORY_STEP: {"directory": str(CODE)}, "prefect.deployments.steps.git_clone": {"repository": "x"}}],
        [{WORKING_DIRECTORY_STEP: {"directory": str(CODE), "requires": ["evil @ https://example.invalid/evil.tgz"]}}],
        [{WORKING_DIRECTORY_STEP: {"directory": f"{CODE}/{{{{ prefect.variables.code }}}}/.."}}],  # a template
        [{WORKING_DIRECTORY_STEP: {"directory": f"{CODE}/flows/.."}}],  # the same folder, not the same text
    ):
        with pytest.raises(RefusedRun, match="pull steps"):
            check_deployment(deployment(steps=steps))


def test_the_worker_runs_its_own_engine_in_its_own_checkout_whatever_the_job_variables_say(prefect_api):
    """The command, environment and directory a confined job gets, from Prefect's default template with hostile
    job variables (as an administrator who re-opened the pool's template would send them)."""
    import asyncio
    import shlex
    import sys
    import uuid

    from prefect.client.schemas.objects import FlowRun
    from prefect.client.schemas.responses import DeploymentResponse
    from prefect.workers.process import ProcessWorker

    from flows.stack.worker import CODE, ENTRYPOINT, WORKING_DIRECTORY_STEP, ConfinedJobConfiguration

    hostile = {"command": "touch /tmp/marker", "env": {"MNIST_ALLOW_FORCE_PROMOTE": "1"}, "working_dir": "/tmp"}
    template = ProcessWorker.get_default_base_job_template()
    job = asyncio.run(ConfinedJobConfiguration.from_template_and_values(template, hostile))
    deployment = DeploymentResponse(
        id=uuid.uuid4(),
        name="nightly",
        flow_id=uuid.uuid4(),
        entrypoint=ENTRYPOINT,
        pull_steps=[{WORKING_DIRECTORY_STEP: {"directory": str(CODE)}}],
    )
    job.prepare_for_flow_run(FlowRun(flow_id=deployment.flow_id, deployment_id=deployment.id, name="n"), deployment)
    assert shlex.split(job.command) == [sys.executable, "-m", "flows.stack.engine"]
    assert job.working_dir == CODE and job.env.get("MNIST_ALLOW_FORCE_PROMOTE") == os.environ.get("MNIST_ALLOW_FORCE_PROMOTE")


def test_the_workers_engine_never_runs_a_deployments_pull_steps_even_edited_after_the_check(prefect_api, tmp_path, worker):
    """``python -m flows.stack.engine`` for a run of a deployment whose pull steps were changed to a shell script (as an
    administrator could do between the worker's check and the run's start): the script never runs; the flow does,
    and refuses the unserved store it was given, so the run ends Failed in seconds."""
    import subprocess
    import sys

    from prefect import get_client

    from flows.night.pipeline import mnist_retrain

    marker = tmp_path / "pull-step-ran"
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow(mnist_retrain)
        deployment_id = client.create_deployment(
            flow_id=flow_id,
            name=f"edited-{tmp_path.name}",
            entrypoint="flows/night/pipeline.py:mnist_retrain",
            pull_steps=[{"prefect.deployments.steps.run_shell_script": {"script": f"touch {marker}"}}],
        )
        run = client.create_flow_run_from_deployment(deployment_id, parameters={"params": {"store": str(tmp_path / "x")}})
        done = subprocess.run(
            [sys.executable, "-m", "flows.stack.engine", str(run.id)],
            cwd=tmp_path,  # not the checkout: the engine's flow comes from the installed code beside it
            env={**os.environ, **prefect_api},
            capture_output=True,
            text=True,
            timeout=240,
        )
        state = client.read_flow_run(run.id).state
    assert not marker.exists(), "a deployment's pull step ran"
    assert state.is_failed() and "is not a store this worker serves" in (state.message or "") + done.stdout + done.stderr


def test_the_workers_hooks_run_this_checkouts_flow_never_the_deployments():
    """A crashed run's hooks: Prefect's process worker loads the flow from the run's deployment (running its pull
    steps in the worker); the confined worker hands it this checkout's flow."""
    import asyncio

    import prefect.workers.process

    from flows.night.pipeline import mnist_retrain
    from flows.stack.worker import this_checkouts_flow

    assert prefect.workers.process.load_flow_from_flow_run is this_checkouts_flow
    assert asyncio.run(this_checkouts_flow(object())) is mnist_retrain
