"""A real local Prefect stack: server (SQLite, loopback), the ``gpu`` work pool, deployments from
``prefect.yaml``, the alert and recovery automations (``flows/night/alerts.py``, ``flows/night/recovery.py``), and a
process worker that runs as many flow runs at once as the machine has GPUs (at least one), its processes kept by
supervisord (flows/stack/supervisor.py). ``make serve`` starts it, ``make stop`` stops it through supervisord.

The API is authenticated by default; who gets which settings (auth string, database, store) is
flows/stack/environment.py's.

The same class drives the real-server test, so what CI proves is what ``make serve`` runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from flows.stack.database import DATABASES, URL_ENV, LocalPostgres
from flows.stack.environment import AUTH_ENV, REPO, StackEnvironment, free_port, is_loopback
from flows.stack.supervisor import UP, Program, Supervisor
from flows.stack.worker import locked_template
from storage.credentials import CredentialsInUrl, split_credentials

POOLS = ("gpu",)
TOPOLOGIES = ("single", "ha")


def shown_url(url: str) -> str:
    """``url`` as it may be printed: without a user or password (they stay in the workers' environment)."""
    try:
        return split_credentials(url)[0]
    except CredentialsInUrl:
        return "(a URL with credentials that cannot be parsed: not shown)"


def gpu_count() -> int:
    """GPUs this machine's worker may use: ``CUDA_VISIBLE_DEVICES`` if set, else what ``nvidia-smi -L`` lists."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(line.startswith("GPU ") for line in listed.stdout.splitlines()) if listed.returncode == 0 else 0


def worker_limit() -> int:
    """Flow runs one worker runs at once: one per GPU, so two trainings never share a GPU; one on a CPU-only machine."""
    return max(gpu_count(), 1)


class LocalStack(StackEnvironment):
    """The single topology: what each process is (``programs``) and the order the stack comes up in (the API ready
    before the deployments, those before the watchdog and the workers); supervisord keeps the processes
    (flows/stack/supervisor.py). The single topology restarts none of them (the HA one restarts every one)."""

    api_process = "server"  # the process that answers on ``port``
    restarts = False  # supervisord's autorestart for every process of the stack

    def __init__(self, home: Path, *args, **kwargs) -> None:
        super().__init__(home, *args, **kwargs)
        self.postgres_file = self.home / "postgres.json"  # a cluster this stack started: stopped by `make stop`
        self.supervisor = Supervisor(self.home)
        self.alerts = self.recovery = ""

    def _run(self, *args: str, env: dict[str, str] | None = None, timeout: float = 300) -> str:
        """``python ARGS`` to its end, in the clients' environment unless ``env`` is given."""
        done = subprocess.run(
            [sys.executable, *args], cwd=REPO, env=env or self.env, capture_output=True, text=True, timeout=timeout
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"`{' '.join(args)}` failed (exit {done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
            )
        return done.stdout

    def _prefect(self, *args: str) -> str:
        return self._run("-m", "prefect", *args)

    def program(self, name: str, command: list[str], env: dict[str, str], priority: int, cwd: Path = REPO) -> Program:
        return Program(name, command, env, cwd, priority, autorestart=self.restarts)

    def api_programs(self) -> list[Program]:
        """The API and every background service in one process (the HA topology overrides this)."""
        serve = ["server", "start", "--host", self.host, "--port", str(self.port)]
        return [self.program("server", [sys.executable, "-m", "prefect", *serve], self.server_env, 100)]

    def programs(self) -> list[Program]:
        """Every process of the stack, from which supervisord's configuration is written."""
        watchdog = [sys.executable, "-m", "flows.stack.watchdog", *self.watchdog.args()]  # not the scheduler
        workers = [self.worker_program(pool, f"{pool}-worker-local") for pool in POOLS]
        return [*self.api_programs(), self.program("watchdog", watchdog, self.env, 800), *workers]

    def wait_ready(self, url: str, name: str, timeout: float = 180) -> None:
        """Until ``url`` answers 200 (the API is ready, which supervisord cannot tell), while ``name`` is up."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return
            if self.supervisor.state(name) not in UP:
                raise RuntimeError(f"{name} exited before it answered on {url}; see {self.home / f'{name}.log'}")
            time.sleep(0.5)
        raise TimeoutError(f"{name} did not answer on {url} within {timeout:.0f} s; see {self.home / f'{name}.log'}")

    def start(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        if self.supervisor.answering():
            raise RuntimeError(f"a stack is already running from {self.home}; run `make stop` first")
        if self.db == "postgres" and not self.database_url:
            cluster = LocalPostgres(self.home, free_port())
            self.postgres_file.write_text(json.dumps({"data_dir": str(cluster.data_dir), "port": cluster.port}))
            self.database_url = cluster.start()
        self.supervisor.configure(self.programs())
        self.supervisor.launch(self.env)
        self.start_api()
        self.wait_ready(f"{self.api_url}/health", self.api_process)
        template = self.home / "job-template.json"  # flows/stack/worker.py: no variable changes what a run executes
        template.write_text(json.dumps(locked_template(), indent=2))
        for pool in POOLS:
            self._prefect("work-pool", "create", pool, "--type", "process", "--base-job-template", str(template), "--overwrite")
        self._prefect("deploy", "--all", "--no-prompt")
        self.alerts = self._run("-m", "flows.night.alerts").strip()
        self.recovery = self._run("-m", "flows.night.recovery", "--silent-after", str(self.silent_after)).strip()
        for name in ["watchdog", *(self.worker_log_name(pool, f"{pool}-worker-local") for pool in POOLS)]:
            self.supervisor.start(name)

    def describe(self) -> str:
        """The topology in a line, for ``make serve``'s output."""
        return "single: one Prefect server process with every background service (make serve TOPOLOGY=ha: docs/scaling.md)"

    def start_api(self) -> None:
        """The API's processes, in their order (the HA topology's: Redis, a migration, the replicas one by one)."""
        self.supervisor.start("server")

    @staticmethod
    def worker_log_name(pool: str, name: str) -> str:
        """How a worker is named in supervisord and its log file: ``worker-<pool>`` for this machine's own."""
        return f"worker-{pool}" if name == f"{pool}-worker-local" else f"worker-{name}"

    def worker_program(
        self, pool: str, name: str, env: dict[str, str] | None = None, cwd: Path = REPO, limit: int = 0
    ) -> Program:
        command = ["-m", "flows.stack.worker", "--pool", pool, "--name", name, "--limit", str(limit or worker_limit())]
        return self.program(self.worker_log_name(pool, name), [sys.executable, *command], {**self.env, **(env or {})}, 900, cwd)

    def add_worker(
        self,
        pool: str,
        name: str,
        prefect_home: Path | None = None,
        cwd: Path = REPO,
        limit: int = 0,
        cache_home: Path | None = None,
    ) -> int:
        """A process worker on ``pool``, as another machine would run it: its own Prefect home, directory and
        cache (``XDG_CACHE_HOME``: checkpoint working copies and the remote store's local locks), at most
        ``limit`` flow runs at once (default: this machine's GPUs, at least one)."""
        env = {"PREFECT_HOME": str(prefect_home)} if prefect_home else {}
        if cache_home:
            env["XDG_CACHE_HOME"] = str(cache_home)
        return self.supervisor.add(self.worker_program(pool, name, env, cwd, limit))

    def pids(self) -> dict[str, int]:
        """The stack's processes that are up, by name, as supervisord reports them."""
        return self.supervisor.pids()

    def workers(self) -> list[str]:
        """The names (log names, ``worker-…``) of this stack's workers that are up."""
        return [name for name in self.pids() if name.startswith("worker-")]

    def stop(self) -> list[str]:
        """Every process through supervisord (by priority, workers first; SIGTERM, then SIGKILL to the group after
        its ``stopwaitsecs``), supervisord itself, then the PostgreSQL cluster this stack started."""
        stopped = self.supervisor.shutdown()
        if self.postgres_file.exists():  # after the server, which holds connections to it
            recorded = json.loads(self.postgres_file.read_text())
            cluster = LocalPostgres(self.home, recorded["port"])
            pid = cluster.pid()
            if cluster.stop():
                stopped.append(f"postgres ({pid})")
            self.postgres_file.unlink()
        return stopped


def main(argv: list[str] | None = None, stacks: dict[str, type[LocalStack]] | None = None) -> int:
    """``make serve``/``make stop``; ``stacks`` maps each topology to its class (flows/stack/topology.py ``serve`` passes
    both: this module cannot import the HA stack, which is built on it)."""
    stacks = stacks or {"single": LocalStack}
    parser = argparse.ArgumentParser(prog="mnist-pipeline serve", description=__doc__)
    parser.add_argument("command", choices=["start", "stop", "status"])
    parser.add_argument(
        "--home", default=str(REPO / ".serve"), help="PREFECT_HOME, logs and supervisord's socket (default .serve/)"
    )
    parser.add_argument("--port", type=int, default=int(os.environ.get("PREFECT_PORT", 4200)))
    parser.add_argument(
        "--store", default=os.environ.get("MNIST_STORE"), help="artifact store for deployed runs (default ./artifacts)"
    )
    parser.add_argument(
        "--db",
        choices=DATABASES,
        default=os.environ.get("DB") or "sqlite",
        help=f"the server's database: sqlite (default) or postgres (${URL_ENV}, else a local cluster)",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address the API listens on (default 127.0.0.1; 0.0.0.0 for workers on other machines, with auth)",
    )
    parser.add_argument(
        "--no-auth", action="store_true", help="serve without authentication (refused unless --host is a loopback address)"
    )
    parser.add_argument(
        "--topology",
        choices=TOPOLOGIES,
        default=os.environ.get("TOPOLOGY") or "single",
        help="single (default): one server process; ha: Redis, two API replicas behind HAProxy, the services apart, "
        "every process restarted by supervisord (PostgreSQL implied; docs/scaling.md)",
    )
    args = parser.parse_args(argv)
    try:
        options = dict(port=args.port, store=args.store, db=args.db, host=args.host, auth=not args.no_auth)
        if args.topology not in stacks:
            raise ValueError(f"topology {args.topology!r} is started by `mnist-pipeline serve` (make serve TOPOLOGY=ha)")
        stack = stacks[args.topology](Path(args.home), **options)
    except ValueError as exc:
        print(f"make serve: {exc}", file=sys.stderr)
        return 2
    if args.command == "status":  # what `supervisorctl status` says, from the same supervisord
        processes = stack.supervisor.processes()
        print(
            "\n".join(f"{p['name']:<24} {p['statename']:<9} pid {p['pid']}" for p in processes)
            or f"Nothing of {stack.home} is running."
        )
        if stack.supervisor.state(stack.api_process) in UP:
            print(f"API: {stack.api_url}")
        return 0 if stack.pids() else 3  # as `systemctl status` says of a unit that is not running
    if args.command == "stop":
        stopped = stack.stop()
        print("Stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
        return 0
    try:
        stack.start()
    except Exception as exc:
        stack.stop()
        print(f"make serve failed: {exc}", file=sys.stderr)
        return 1
    secret = f"$(cat {stack.auth_file})" if not os.environ.get(AUTH_ENV) else f"${AUTH_ENV}"
    if stack.auth_string:
        remote = stack.api_url if is_loopback(args.host) else f"http://{socket.gethostname()}:{stack.port}/api"
        login = (
            f"Login:          the UI asks for a password: enter the whole line in {stack.auth_file} (mode 0600)\n"
            if not os.environ.get(AUTH_ENV)
            else f"Login:          the UI asks for a password: enter ${AUTH_ENV}\n"
        ) + (
            f"Remote workers: export PREFECT_API_URL={remote} PREFECT_API_AUTH_STRING={secret}; "
            "python -m flows.stack.worker --pool gpu --limit <GPUs>\n"
        )
    else:
        secret, login = "", "Login:          none (--no-auth; loopback only)\n"
    print(
        f"Prefect UI:     {stack.ui_url}\n"
        f"{login}"
        f"Topology:       {stack.describe()}\n"
        f"Database:       {stack.db}" + (f" ({stack.database_url.split('@')[-1]})" if stack.database_url else "") + "\n"
        f"API:            {stack.api_url}   (the CLI against it: export PREFECT_API_URL={stack.api_url} "
        f"PREFECT_API_AUTH_STRING={secret})\n"
        f"Deployments:    mnist-retrain/nightly (cron 0 2 * * * UTC, pool gpu; one run at a time, others queue)\n"
        f"Artifact store: {shown_url(stack.store)}\n"
        f"Workers:        gpu-worker-local, at most {worker_limit()} flow run(s) at once (one per GPU)\n"
        f"{stack.alerts}\n"
        f"{stack.recovery}\n"
        f"Processes:      mnist-pipeline serve status (supervisord: supervisorctl -c {stack.supervisor.conf} status)\n"
        f"Logs:           {stack.home}/*.log      Stop with: make stop"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
