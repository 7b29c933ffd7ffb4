"""`make serve` as a newcomer runs it, on its default SQLite database: the stack starts, deploys prefect.yaml,
starts its worker, answers only with its auth string, `serve status` lists its processes from supervisord, and
`make stop` stops it all. No flow run here:
tests/test_deployment.py operates the deployment on the PostgreSQL topology."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from flows.stack.serve import LocalStack, free_port, main

pytestmark = pytest.mark.slow


def test_make_serve_starts_the_default_sqlite_stack_and_make_stop_stops_it(tmp_path: Path, monkeypatch, capsys):
    from prefect.client.orchestration import get_client
    from prefect.settings import temporary_settings

    monkeypatch.delenv("PREFECT_API_DATABASE_CONNECTION_URL", raising=False)
    monkeypatch.delenv("PREFECT_SERVER_API_AUTH_STRING", raising=False)
    home, port = tmp_path / "serve", free_port()
    where = ["--home", str(home), "--port", str(port)]
    try:
        assert main(["start", *where, "--store", str(tmp_path / "store")]) == 0  # what `make serve` runs
        said = capsys.readouterr().out
        assert f"Prefect UI:     http://127.0.0.1:{port}" in said and "Database:       sqlite" in said, said
        stack = LocalStack(home, port=port)  # the same home: what `make stop` reads
        assert (home / "prefect.db").exists() and (home / "auth").stat().st_mode & 0o077 == 0
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{stack.api_url}/admin/version", timeout=10)
        assert refused.value.code == 401
        with temporary_settings(stack.client_settings()), get_client(sync_client=True) as client:
            deployment = client.read_deployment_by_name("mnist-retrain/nightly")
            assert deployment.work_pool_name == "gpu" and deployment.global_concurrency_limit.limit == 1
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not client.read_workers_for_work_pool("gpu"):
                time.sleep(1)  # a worker shows in the pool once it has polled
            assert [w.name for w in client.read_workers_for_work_pool("gpu")] == ["gpu-worker-local"]
        capsys.readouterr()
        assert main(["status", *where]) == 0  # what `mnist-pipeline serve status` says, from the stack's supervisord
        status = capsys.readouterr().out
        for name in ("server", "watchdog", "worker-gpu"):
            assert any(line.split()[:2] == [name, "RUNNING"] for line in status.splitlines()), status
    finally:
        assert main(["stop", *where]) == 0  # what `make stop` runs
    stopped = capsys.readouterr().out
    assert "server (" in stopped and "worker-gpu (" in stopped, stopped
    assert not LocalStack(home, port=port).workers()
    assert main(["status", *where]) == 3 and "Nothing of" in capsys.readouterr().out
