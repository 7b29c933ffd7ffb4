"""A real local Prefect stack: server (SQLite, loopback), the ``gpu`` work pool, deployments from
``prefect.yaml``, the alert and recovery automations (``flows/night/alerts.py``, ``flows/night/recovery.py``), and a
process worker that runs as many flow runs at once as the machine has GPUs (at least one).
``make serve`` starts it, ``make stop`` stops it by pid.

The API is authenticated by default (Prefect's basic auth, with CSRF protection on): a random
``admin:<secret>`` kept in ``<home>/auth`` (mode 0600), or ``$PREFECT_SERVER_API_AUTH_STRING``. The
server alone gets the auth string as a server setting and the database URL; every client (CLI,
workers, automation set-up, ``prefect deploy``) gets ``PREFECT_API_AUTH_STRING``. Without auth it
listens on loopback only.

The same class drives the real-server test, so what CI proves is what ``make serve`` runs.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import ipaddress
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from flows.night.recovery import BUCKET_BUFFER, BUCKET_BUFFER_ENV, HEARTBEAT_ENV, HEARTBEAT_SECONDS, SILENT_AFTER_SECONDS
from flows.stack.database import DATABASES, URL_ENV, LocalPostgres
from flows.stack.watchdog import WatchdogSettings
from flows.stack.worker import locked_template
from storage.credentials import CredentialsInUrl, split_credentials

REPO = Path(__file__).resolve().parents[2]
POOLS = ("gpu",)
AUTH_ENV = "PREFECT_SERVER_API_AUTH_STRING"  # the server's setting
CLIENT_AUTH_ENV = "PREFECT_API_AUTH_STRING"  # what every client sends
AUTH_USER = "admin"
TOPOLOGIES = ("single", "ha")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def write_secret(path: Path, text: str) -> None:
    """Create ``path`` readable by its owner alone, before anything is written into it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    path.chmod(0o600)


def shown_url(url: str) -> str:
    """``url`` as it may be printed: without a user or password (they stay in the workers' environment)."""
    try:
        return split_credentials(url)[0]
    except CredentialsInUrl:
        return "(a URL with credentials that cannot be parsed: not shown)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def _reaped(pid: int) -> bool:
    """Reap ``pid`` if it is an exited child of this process (a zombie still answers signal 0); True if it was."""
    try:
        return os.waitpid(pid, os.WNOHANG)[0] == pid
    except ChildProcessError:  # not our child, or reaped already
        return False


class LocalStack:
    """Processes are started in their own sessions and recorded in ``<home>/pids.json``."""

    api_process = "server"  # the process that answers on ``port``

    def __init__(
        self,
        home: Path,
        port: int = 4200,
        store: str | None = None,
        poll_seconds: int = 5,
        db: str = "sqlite",
        silent_after: float = SILENT_AFTER_SECONDS,
        slot_wait_seconds: float = 30,
        host: str = "127.0.0.1",
        auth: bool = True,
        watchdog: WatchdogSettings = WatchdogSettings(),
    ) -> None:
        if db not in DATABASES:
            raise ValueError(f"db={db!r}: choose one of {', '.join(DATABASES)}")
        if not auth and not is_loopback(host):
            raise ValueError(
                f"Refusing to serve the API on {host} without authentication: anyone who reaches it could run code on the "
                "workers' stores. Keep auth on (the default) to listen beyond loopback."
            )
        self.host = host
        self.auth = auth
        self.auth_file = Path(home).resolve() / "auth"
        self.db = db
        self.database_url = os.environ.get(URL_ENV) if db == "postgres" else None
        self.home = Path(home).resolve()
        self.port = port
        self.store = store or str(REPO / "artifacts")
        self.poll_seconds = poll_seconds
        self.silent_after = silent_after
        self.slot_wait_seconds = slot_wait_seconds  # how soon a run queued behind the deployment's limit asks again
        self.watchdog = watchdog
        local = "127.0.0.1" if host in ("0.0.0.0", "::") or not is_loopback(host) else host
        self.api_url = f"http://{local}:{port}/api"
        self.ui_url = f"http://{local}:{port}"
        self.pids_file = self.home / "pids.json"
        self.postgres_file = self.home / "postgres.json"  # a cluster this stack started: stopped by `make stop`
        self.alerts = ""
        self.recovery = ""

    @property
    def auth_string(self) -> str | None:
        """``admin:<secret>``: from ``$PREFECT_SERVER_API_AUTH_STRING``, else ``<home>/auth``, else made now."""
        if not self.auth:
            return None
        if given := os.environ.get(AUTH_ENV):
            return given
        if not self.auth_file.exists():
            write_secret(self.auth_file, f"{AUTH_USER}:{secrets.token_urlsafe(24)}")
        return self.auth_file.read_text().strip()

    def client_settings(self) -> dict:
        """Prefect settings for a client of this stack in this process (``temporary_settings``)."""
        from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL

        return {PREFECT_API_URL: self.api_url, PREFECT_API_AUTH_STRING: self.auth_string}

    @property
    def server_env(self) -> dict[str, str]:
        """The server's environment: the client one, plus the auth string as a server setting and the database."""
        env = {k: v for k, v in self.env.items() if k != "MNIST_STORE"}  # the store and its credentials: workers' only
        env.update(
            PREFECT_SERVER_API_HOST=self.host,
            PREFECT_SERVER_CSRF_PROTECTION_ENABLED="true",
            # the UI's own origin only (Prefect allows every origin by default): another site's page in a logged-in
            # browser gets no CSRF token, so CSRF protection holds
            PREFECT_SERVER_CORS_ALLOWED_ORIGINS=self.ui_origins,
        )
        env[BUCKET_BUFFER_ENV] = BUCKET_BUFFER  # flows/night/recovery.py: a silent run's bucket is never swept unseen
        if self.auth_string:
            env[AUTH_ENV] = self.auth_string
        if self.database_url:
            env[URL_ENV] = self.database_url
        return env

    @property
    def ui_origins(self) -> str:
        """The origins the UI is served from: loopback by default, the host's name too when it listens beyond it."""
        origins = [self.ui_url]
        if not is_loopback(self.host):
            origins.append(f"http://{socket.gethostname()}:{self.port}")
            if self.host not in ("0.0.0.0", "::"):
                origins.append(f"http://{self.host}:{self.port}")
        return ",".join(origins)

    @property
    def env(self) -> dict[str, str]:
        """Every client's environment (CLI, workers, their flow runs): the API and its auth string, no database URL."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(
            PREFECT_HOME=str(self.home),
            PREFECT_API_URL=self.api_url,
            PREFECT_SERVER_API_PORT=str(self.port),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT="false",
            PREFECT_WORKER_QUERY_SECONDS=str(self.poll_seconds),
            PREFECT_WORKER_PREFETCH_SECONDS=str(self.poll_seconds),
            PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS=str(self.slot_wait_seconds),
            DO_NOT_TRACK="1",
            TF_CPP_MIN_LOG_LEVEL="2",
            MNIST_STORE=self.store,
        )
        env[HEARTBEAT_ENV] = os.environ.get(HEARTBEAT_ENV) or str(HEARTBEAT_SECONDS)  # the recovery automation needs them
        if self.auth_string:
            env[CLIENT_AUTH_ENV] = self.auth_string
        return env

    def _prefect(self, *args: str, timeout: float = 300) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "prefect", *args], cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"`prefect {' '.join(args)}` failed (exit {done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
            )
        return done.stdout

    def _python(self, *args: str, timeout: float = 120) -> str:
        done = subprocess.run([sys.executable, *args], cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"`python {' '.join(args)}` failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
        return done.stdout

    def _spawn(self, name: str, *args: str, cwd: Path = REPO, env: dict[str, str] | None = None, module: str = "prefect") -> int:
        base = self.server_env if name == "server" else self.env
        return self._spawn_command(name, [sys.executable, "-m", module, *args], {**base, **(env or {})}, cwd)

    def _spawn_command(self, name: str, command: list[str], env: dict[str, str], cwd: Path = REPO) -> int:
        """Start ``command`` in a session of its own, its output in ``<home>/<name>.log``, its pid recorded."""
        with open(self.home / f"{name}.log", "ab") as log:  # the child keeps its own copy of the handle
            proc = subprocess.Popen(
                command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        with self._pids_locked() as pids:
            pids[name] = proc.pid
        return proc.pid

    @contextlib.contextmanager
    def _pids_locked(self) -> Iterator[dict[str, int]]:
        """``pids.json`` to change, under a lock, replaced whole: the HA topology's supervisor process writes it
        too, and neither may lose the other's change or read half a file."""
        self.home.mkdir(parents=True, exist_ok=True)
        with open(self.home / "pids.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            pids = self._pids()
            yield pids
            partial = self.pids_file.with_name(f".pids.{os.getpid()}.json")
            partial.write_text(json.dumps(pids))
            partial.replace(self.pids_file)

    def _pids(self) -> dict[str, int]:
        return json.loads(self.pids_file.read_text()) if self.pids_file.exists() else {}

    def wait_healthy(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if not self._alive(self.api_process):
                raise RuntimeError(f"the Prefect server exited; see {self.home / f'{self.api_process}.log'}")
            time.sleep(0.5)
        raise TimeoutError(
            f"the Prefect server did not answer on {self.api_url} within {timeout:.0f} s; see {self.home / 'server.log'}"
        )

    def _alive(self, name: str) -> bool:
        pid = self._pids().get(name)
        if pid is None:
            return False
        if _reaped(pid):  # a killed child answers signal 0 until reaped; forget it, its pid may be reused
            with self._pids_locked() as pids:
                if pids.get(name) == pid:
                    pids.pop(name)
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    def start(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        if self._alive(self.api_process):
            raise RuntimeError(f"a stack is already running from {self.home} (pids {self._pids()}); run `make stop` first")
        self.pids_file.unlink(missing_ok=True)
        if self.db == "postgres" and not self.database_url:
            cluster = LocalPostgres(self.home, free_port())
            self.postgres_file.write_text(json.dumps({"data_dir": str(cluster.data_dir), "port": cluster.port}))
            self.database_url = cluster.start()
        self.start_api()
        self.wait_healthy()
        template = self.home / "job-template.json"  # flows/stack/worker.py: no variable changes what a run executes
        template.write_text(json.dumps(locked_template(), indent=2))
        for pool in POOLS:
            self._prefect("work-pool", "create", pool, "--type", "process", "--base-job-template", str(template), "--overwrite")
        self._prefect("deploy", "--all", "--no-prompt")
        self.alerts = self._python("-m", "flows.night.alerts").strip()
        self.recovery = self._python("-m", "flows.night.recovery", "--silent-after", str(self.silent_after)).strip()
        self._spawn(
            "watchdog", *self.watchdog.args(), module="flows.stack.watchdog"
        )  # flows/stack/watchdog.py: not the scheduler
        for pool in POOLS:
            self.add_worker(pool, f"{pool}-worker-local")

    def describe(self) -> str:
        """The topology in a line, for ``make serve``'s output."""
        return "single: one Prefect server process with every background service (make serve TOPOLOGY=ha: docs/scaling.md)"

    def start_api(self) -> None:
        """The API and every background service in one process (the HA topology overrides this)."""
        self._spawn("server", "server", "start", "--host", self.host, "--port", str(self.port))

    @staticmethod
    def worker_log_name(pool: str, name: str) -> str:
        """How a worker is named in ``pids.json`` and its log file: ``worker-<pool>`` for this machine's own."""
        return f"worker-{pool}" if name == f"{pool}-worker-local" else f"worker-{name}"

    def add_worker(
        self,
        pool: str,
        name: str,
        prefect_home: Path | None = None,
        cwd: Path = REPO,
        limit: int | None = None,
        cache_home: Path | None = None,
    ) -> int:
        """A process worker on ``pool``, as another machine would run it: its own Prefect home, directory and
        cache (``XDG_CACHE_HOME``: checkpoint working copies and the remote store's local locks), at most
        ``limit`` flow runs at once (default: this machine's GPUs, at least one)."""
        env = {"PREFECT_HOME": str(prefect_home)} if prefect_home else {}
        if cache_home:
            env["XDG_CACHE_HOME"] = str(cache_home)
        log_name = self.worker_log_name(pool, name)
        limit = limit or worker_limit()
        return self._spawn(
            log_name, "--pool", pool, "--name", name, "--limit", str(limit), cwd=cwd, env=env, module="flows.stack.worker"
        )

    def _terminate(self, pid: int, grace: float) -> bool:
        """SIGTERM the process group, SIGKILL after ``grace`` seconds; False when it was gone already."""
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            return False
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            _reaped(pid)  # our own child must not linger as a zombie
            time.sleep(0.2)
        else:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return True

    def workers(self) -> list[str]:
        """The names (log names, ``worker-…``) of this stack's workers that are alive."""
        return [name for name in self._pids() if name.startswith("worker-") and self._alive(name)]

    def remove_worker(self, name: str, grace: float = 15) -> None:
        """Stop one worker (its log name, as ``workers()`` gives it), as when a machine leaves the pool."""
        with self._pids_locked() as pids:
            pid = pids.pop(name, None)
        if pid is not None:
            self._terminate(pid, grace)

    def stop(self, grace: float = 15) -> list[str]:
        """Stop every recorded process group (SIGTERM, then SIGKILL after ``grace`` seconds)."""
        stopped = []
        pids = self._pids()
        # the HA topology's supervisor first (it would start the others again), then workers before the server
        for name, pid in sorted(reversed(list(pids.items())), key=lambda item: item[0] != "supervisor"):
            if self._terminate(pid, grace):
                stopped.append(f"{name} ({pid})")
        self.pids_file.unlink(missing_ok=True)
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
    parser.add_argument("--home", default=str(REPO / ".serve"), help="PREFECT_HOME, logs and pids (default .serve/)")
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
        "a supervisor (PostgreSQL implied; docs/scaling.md)",
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
    if args.command == "status":
        running = {name: pid for name, pid in stack._pids().items() if stack._alive(name)}
        print("\n".join(f"{name:<24} pid {pid}" for name, pid in running.items()) or f"Nothing of {stack.home} is running.")
        if "server" in running or "haproxy" in running:
            print(f"API: {stack.api_url}")
        return 0 if running else 3  # as `systemctl status` says of a unit that is not running
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
        f"Logs:           {stack.home}/*.log      Stop with: make stop"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
