"""deploy/ (systemd units, environment files, HAProxy and Redis configuration) says what the HA stack of
flows/stack/topology.py runs: the same Prefect and Redis settings, the same balancer, every process restarted."""

from __future__ import annotations

import json
from pathlib import Path

from flows.night.recovery import HEARTBEAT_ENV, HEARTBEAT_SECONDS
from flows.stack.topology import REDIS_MODULES, HAStack

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
PRODUCTION_PORTS = {"redis": 6379, "api-1": 4201, "api-2": 4202}
SECRET = "CHANGE_ME"


def env_file(name: str) -> dict[str, str]:
    lines = (DEPLOY / name).read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def stack(tmp_path: Path) -> HAStack:
    """An HA stack (not started) on the production ports, its Redis password the placeholder."""
    home = tmp_path / "serve"
    home.mkdir()
    (home / "topology.json").write_text(json.dumps(PRODUCTION_PORTS))
    (home / "redis-password").write_text(SECRET)
    return HAStack(home, port=4200)


def test_the_server_units_get_the_settings_of_the_local_ha_stack(tmp_path: Path):
    local = stack(tmp_path)
    shipped = env_file("server.env")
    assert {k: shipped.get(k) for k in local.redis_settings()} == local.redis_settings()
    assert {k: shipped[k] for k in REDIS_MODULES} == REDIS_MODULES
    server = local.server_env
    for key in ("PREFECT_SERVER_CSRF_PROTECTION_ENABLED", "PREFECT_SERVER_EVENTS_EXPIRED_BUCKET_BUFFER"):
        assert shipped[key] == server[key], key
    assert shipped["PREFECT_SERVER_CORS_ALLOWED_ORIGINS"] == server["PREFECT_SERVER_CORS_ALLOWED_ORIGINS"]
    clients = env_file("client.env")
    assert clients["PREFECT_API_URL"] == local.api_url == shipped["PREFECT_API_URL"]  # the balancer
    assert clients[HEARTBEAT_ENV] == str(HEARTBEAT_SECONDS) == local.env[HEARTBEAT_ENV]
    assert not any(k.startswith(("PREFECT_REDIS", "PREFECT_SERVER_DOCKET", "PREFECT_API_DATABASE")) for k in clients)


def test_the_balancer_and_redis_are_configured_as_the_local_stack_configures_them(tmp_path: Path):
    local = stack(tmp_path)
    assert (DEPLOY / "haproxy.cfg").read_text() == local.haproxy_cfg()

    def settings(text: str) -> set[str]:
        return {line for line in text.splitlines() if not line.startswith("dir ")}

    assert settings((DEPLOY / "redis.conf").read_text()) == settings(local.redis_conf())


def test_every_unit_restarts_its_process_and_runs_what_the_stack_runs(tmp_path: Path):
    units = {p.name: p.read_text() for p in (DEPLOY / "systemd").glob("*.service")}
    assert set(units) == {
        "mnist-redis.service",
        "mnist-prefect-api@.service",
        "mnist-prefect-services.service",
        "mnist-watchdog.service",
        "mnist-worker.service",
    }
    for name, text in units.items():
        assert "\nRestart=always\n" in text, name
    local = stack(tmp_path)
    programs = {p.name: p for p in local.programs()}
    assert all(p.autorestart for p in programs.values()), programs  # locally supervisord restarts each, as systemd does

    def exec_start(unit: str) -> list[str]:
        (line,) = [line for line in units[unit].splitlines() if line.startswith("ExecStart=")]
        return line.removeprefix("ExecStart=").split()

    assert exec_start("mnist-prefect-api@.service")[1:-1] == programs["api-1"].command[1:-1]  # all but python and port
    assert exec_start("mnist-prefect-api@.service")[-1] == "%i"
    assert exec_start("mnist-prefect-services.service")[1:] == programs["services"].command[1:]
    assert exec_start("mnist-watchdog.service")[1:] == programs["watchdog"].command[1:3] == ["-m", "flows.stack.watchdog"]
    assert (
        exec_start("mnist-worker.service")[1:4] == programs["worker-gpu"].command[1:4] == ["-m", "flows.stack.worker", "--pool"]
    )
    assert "server.env" in units["mnist-prefect-api@.service"] and "server.env" in units["mnist-prefect-services.service"]
    assert "client.env" in units["mnist-worker.service"] and "client.env" in units["mnist-watchdog.service"]
