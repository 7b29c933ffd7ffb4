"""The suite's own scheduling: a module that shares a module-scoped fixture runs on one xdist worker, so the
fixture (a server stack, trained models) is built once. Checked on a real two-worker run of part of this suite,
because the grouping pytest-xdist offers (``xdist_group``) was silently ignored under pytest 9.2."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.conftest import SHARED_WORKER, shared_scope

REPO = Path(__file__).resolve().parent.parent

RECORDER = textwrap.dedent(
    """
    import json, os
    def pytest_runtest_logreport(report):
        if report.when == "call" and os.environ.get("PYTEST_XDIST_WORKER"):  # a worker's own, not as relayed
            with open(os.environ["WHO_RAN"], "a") as f:
                f.write(json.dumps([report.nodeid, os.environ["PYTEST_XDIST_WORKER"]]) + "\\n")
    """
)


def test_every_shared_module_exists_and_only_its_tests_share_a_scope():
    for module in SHARED_WORKER:
        assert (REPO / "tests" / f"{module}.py").exists(), module
    assert shared_scope("tests/test_champion.py::test_a") == shared_scope("tests/test_champion.py::test_b[x]")
    assert shared_scope("tests/test_gate.py::test_a") == "tests/test_gate.py::test_a"


def test_every_module_with_a_module_scoped_fixture_is_shared():
    """A module fixture on two workers is built twice (a second server stack, a second set of trainings)."""
    with_module_fixtures = {
        path.stem for path in (REPO / "tests").glob("test_*.py") if re.search(r"scope=[\"']module[\"']", path.read_text())
    }
    assert with_module_fixtures and with_module_fixtures <= set(SHARED_WORKER), with_module_fixtures - set(SHARED_WORKER)


def test_a_shared_module_runs_on_one_of_two_workers(tmp_path: Path):
    (tmp_path / "who_ran_plugin.py").write_text(RECORDER)
    record = tmp_path / "who-ran.jsonl"
    selected = "keys_inside or symbolic_link or plots_json or model_json or champion_json or fsynced or mcnemar"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "who_ran_plugin", "-n", "2", "--dist", "loadgroup", "-k", selected]
        + ["tests/test_untrusted_store.py", "tests/test_gate.py", "-p", "no:cacheprovider"],
        cwd=REPO,
        env={  # a pytest of its own: not one of this session's xdist workers (PYTEST_XDIST_WORKER, …)
            **{k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")},
            "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}",
            "WHO_RAN": str(record),
        },
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ran = [json.loads(line) for line in record.read_text().splitlines()]
    shared = {worker for nodeid, worker in ran if nodeid.startswith("tests/test_untrusted_store.py")}
    assert len([n for n, _ in ran if n.startswith("tests/test_untrusted_store.py")]) >= 6
    assert {worker for _, worker in ran} == {"gw0", "gw1"}  # both workers had work
    assert len(shared) == 1, ran  # and one of them ran the whole shared module
