"""The HA topology (``make serve TOPOLOGY=ha``): Prefect as its self-hosting guide runs it at scale, on one machine.

::

    clients, workers ──▶ HAProxy :port ──▶ api-1 ─┐  (prefect server start --no-services)
                         (/api/health)  └▶ api-2 ─┤
                                                  ├──▶ PostgreSQL (scram, loopback)
    services (prefect server services start) ─────┤
                                                  └──▶ Redis (password, loopback): events, ordering,
                                                       concurrency leases, Docket

Every API and services process gets the same Redis settings (``redis_settings``): events go through Redis
streams (``prefect_redis.messaging``), causal ordering and the deployment's concurrency leases live there, and
Docket (the background services' task queue) runs on it, so a restarted process loses nothing it held in memory
and two services processes would not schedule a night twice. Workers and clients know only the balancer.

A supervisor process (``python -m flows.stack.topology supervise``, recorded last in ``pids.json`` so that ``make stop``
stops it first) restarts any of them that dies, with the command and environment it was started with: what
systemd's ``Restart=always`` does in production (``deploy/systemd/``, checked against ``redis_settings`` by
tests/test_ha.py).
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import sys
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

from flows.stack.serve import REPO, LocalStack, _reaped, free_port, write_secret

REPLICAS = 2
SUPERVISOR = "supervisor"
REDIS = "redis"
BALANCER = "haproxy"
SERVICES = "services"
BINARIES = {REDIS: "redis-server", BALANCER: "haproxy"}
# Prefect's settings for the Redis-backed server (names read from Prefect 3.9's and prefect-redis 0.3's settings)
REDIS_MODULES = {
    "PREFECT_SERVER_EVENTS_MESSAGING_BROKER": "prefect_redis.messaging",
    "PREFECT_SERVER_EVENTS_MESSAGING_CACHE": "prefect_redis.messaging",
    "PREFECT_SERVER_EVENTS_CAUSAL_ORDERING": "prefect_redis.ordering",
    "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect_redis.lease_storage",
}
DOCKET_DB = 1  # Docket apart from the event streams (db 0), as Prefect's guide suggests


def binary(name: str) -> str:
    found = shutil.which(name) or next((p for p in (f"/usr/bin/{name}", f"/usr/sbin/{name}") if Path(p).exists()), None)
    if found is None:
        raise RuntimeError(
            f"The HA topology needs `{name}`: install it (Debian: `apt-get install {'redis-server' if name == 'redis-server' else name}`)."
        )
    return found


class HAStack(LocalStack):
    """``LocalStack`` with the API split into replicas behind HAProxy, the services apart, Redis, a supervisor."""

    api_process = BALANCER

    def __init__(self, home: Path, *args, replicas: int = REPLICAS, **kwargs) -> None:
        kwargs["db"] = "postgres"  # SQLite cannot be shared by several server processes
        super().__init__(home, *args, **kwargs)
        self.replicas = replicas
        self.topology_file = self.home / "topology.json"  # ports (no secrets): what the supervisor starts again
        self.redis_password_file = self.home / "redis-password"
        self.supervised_file = self.home / "supervised.json"  # what the supervisor watches, written by it

    def describe(self) -> str:
        ports = self.ports
        replicas = ", ".join(f"{n} :{ports[n]}" for n in self.replicas_names())
        return (
            f"ha: HAProxy :{self.port} → {replicas} (--no-services); services apart; Redis :{ports[REDIS]} "
            "(password in redis-password); restarted by the supervisor"
        )

    # -- what each process gets ---------------------------------------------------------------------------------
    @property
    def ports(self) -> dict[str, int]:
        if not self.topology_file.exists():
            self.home.mkdir(parents=True, exist_ok=True)
            ports = {REDIS: free_port(), **{f"api-{i}": free_port() for i in range(1, self.replicas + 1)}}
            self.topology_file.write_text(json.dumps(ports))
        return json.loads(self.topology_file.read_text())

    @property
    def redis_password(self) -> str:
        if not self.redis_password_file.exists():
            write_secret(self.redis_password_file, secrets.token_urlsafe(24))
        return self.redis_password_file.read_text().strip()

    def redis_settings(self) -> dict[str, str]:
        """What every API and services process needs to share Redis (and what deploy/systemd's units set)."""
        port = self.ports[REDIS]
        return {
            **REDIS_MODULES,
            "PREFECT_REDIS_MESSAGING_HOST": "127.0.0.1",
            "PREFECT_REDIS_MESSAGING_PORT": str(port),
            "PREFECT_REDIS_MESSAGING_DB": "0",
            "PREFECT_REDIS_MESSAGING_PASSWORD": self.redis_password,
            "PREFECT_SERVER_DOCKET_URL": f"redis://:{self.redis_password}@127.0.0.1:{port}/{DOCKET_DB}",
            "PREFECT_API_DATABASE_MIGRATE_ON_START": "false",  # migrated once, before the replicas start
        }

    @property
    def server_env(self) -> dict[str, str]:
        return {**super().server_env, **self.redis_settings()}

    def replicas_names(self) -> list[str]:
        return [f"api-{i}" for i in range(1, self.replicas + 1)]

    def commands(self) -> dict[str, tuple[list[str], dict[str, str]]]:
        """Each supervised process: its command and environment, the same at every (re)start."""
        python = [sys.executable, "-m", "prefect"]
        found = {
            REDIS: ([binary("redis-server"), str(self.home / "redis.conf")], self.env),
            BALANCER: ([binary("haproxy"), "-db", "-f", str(self.home / "haproxy.cfg")], self.env),
            SERVICES: ([*python, "server", "services", "start"], self.server_env),
        }
        for name in self.replicas_names():
            found[name] = (
                [*python, "server", "start", "--no-services", "--host", "127.0.0.1", "--port", str(self.ports[name])],
                self.server_env,
            )
        return found

    def redis_conf(self) -> str:
        """Loopback, a password, and an append-only file: a restarted Redis keeps the streams, leases and Docket."""
        data = self.home / "redis"
        data.mkdir(parents=True, exist_ok=True)
        return (
            f"bind 127.0.0.1\nport {self.ports[REDIS]}\nrequirepass {self.redis_password}\nprotected-mode yes\n"
            f"dir {data}\nappendonly yes\nappendfsync everysec\nsave ''\ndaemonize no\n"
        )

    def haproxy_cfg(self) -> str:
        """Round robin over the replicas that answer ``/api/health``; a connection refused is retried on the other."""
        bind = f"{self.host}:{self.port}" if ":" not in self.host else f"[{self.host}]:{self.port}"
        servers = "".join(f"    server {n} 127.0.0.1:{self.ports[n]} check\n" for n in self.replicas_names())
        return (
            "global\n    maxconn 512\n"
            "defaults\n    mode http\n    timeout connect 2s\n    timeout client 300s\n    timeout server 300s\n"
            "    timeout tunnel 1h\n    option redispatch\n    retries 3\n    retry-on conn-failure empty-response 503\n"
            f"frontend prefect\n    bind {bind}\n    default_backend api\n"
            "backend api\n    balance roundrobin\n    option httpchk GET /api/health\n    http-check expect status 200\n"
            f"    default-server inter 1s fall 2 rise 1\n{servers}"
        )

    # -- starting and supervising -------------------------------------------------------------------------------
    def spawn(self, name: str) -> int:
        command, env = self.commands()[name]
        return self._spawn_command(name, command, env)

    def start_api(self) -> None:
        self.commands()  # fails early, naming what to install
        write_secret(self.home / "redis.conf", self.redis_conf())  # it holds the password
        (self.home / "haproxy.cfg").write_text(self.haproxy_cfg())
        self.spawn(REDIS)
        self._prefect_server("database", "upgrade", "-y")  # once, before any replica: none migrates on start
        for name in self.replicas_names():  # one after the other: each registers Prefect's block types on its first
            self.spawn(name)  # start, and two at once collide on the same rows (the second exits)
            self.wait_replica(name)
        for name in (BALANCER, SERVICES):
            self.spawn(name)

    def wait_replica(self, name: str, timeout: float = 180) -> None:
        """Until replica ``name`` answers ``/api/health`` on its own port."""
        url = f"http://127.0.0.1:{self.ports[name]}/api/health"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                pass
            if not self._alive(name):
                raise RuntimeError(f"the API replica {name} exited; see {self.home / f'{name}.log'}")
            time.sleep(0.5)
        raise TimeoutError(f"the API replica {name} did not answer on {url} within {timeout:.0f} s; see {self.home}/{name}.log")

    def _prefect_server(self, *args: str) -> None:
        import subprocess

        done = subprocess.run(
            [sys.executable, "-m", "prefect", "server", *args],
            cwd=REPO,
            env=self.server_env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if done.returncode != 0:
            raise RuntimeError(f"`prefect server {' '.join(args)}` failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")

    def start(self) -> None:
        self.topology_file.unlink(missing_ok=True)  # fresh ports for a fresh stack
        for stale in (self.supervised_file, self.home / "removed.json"):
            stale.unlink(missing_ok=True)
        super().start()
        self._spawn(SUPERVISOR, "supervise", "--home", str(self.home), "--port", str(self.port), module="flows.stack.topology")
        self.wait_supervised()

    def wait_supervised(self, timeout: float = 60) -> None:
        """Until the supervisor watches every process of the stack (it reads how each was started from /proc)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            wanted = set(self._pids()) - {SUPERVISOR} - self.removed()
            if self.supervised_file.exists() and wanted <= set(json.loads(self.supervised_file.read_text())):
                return
            if not self._alive(SUPERVISOR):
                raise RuntimeError(f"the supervisor exited; see {self.home / 'supervisor.log'}")
            time.sleep(0.3)
        raise TimeoutError(f"the supervisor did not take up every process within {timeout:.0f} s; see {self.home}/supervisor.log")

    def supervise(self, every: float = 1.0) -> None:
        """Restart whatever of this stack died, as it was started: Redis, the balancer, the replicas and the services
        from ``commands``; the watchdog and the local workers with the command, directory and environment they were
        started with (read from ``/proc``). A worker stopped on purpose (``remove_worker``) stays stopped."""
        known: dict[str, tuple[list[str], dict[str, str], Path]] = {}
        last: dict[str, float] = {}
        while True:
            pids = self._pids()
            for name, pid in pids.items():
                if name not in known and name != SUPERVISOR and running(pid):
                    known[name] = self.spec(name, pid)
            if not self.supervised_file.exists() or set(json.loads(self.supervised_file.read_text())) != set(known):
                self.supervised_file.write_text(json.dumps(sorted(known)))
            for name, (command, env, cwd) in known.items():
                if name in self.removed() or running(self._pids().get(name)):
                    continue
                if time.monotonic() - last.get(name, -60.0) < 5:  # one that keeps dying: not faster than every 5 s
                    continue
                last[name] = time.monotonic()
                pid = self._spawn_command(name, command, env, cwd)
                print(f"{datetime.now(UTC):%H:%M:%S} {name} was not running: started again (pid {pid})", flush=True)
            for pid in list(self._pids().values()):
                _reaped(pid)  # this supervisor's own children that died
            time.sleep(every)

    def spec(self, name: str, pid: int) -> tuple[list[str], dict[str, str], Path]:
        """How ``name`` was started: the command, directory and environment ``/proc`` shows (Redis rewrites its
        command line, so its own is made again here: it reads everything from its configuration file)."""
        proc = Path(f"/proc/{pid}")
        env = dict(e.decode().split("=", 1) for e in (proc / "environ").read_bytes().split(b"\0") if b"=" in e)
        if name == REDIS:
            return [binary("redis-server"), str(self.home / "redis.conf")], env, REPO
        command = [a.decode() for a in (proc / "cmdline").read_bytes().split(b"\0")[:-1]]
        return command, env, (proc / "cwd").resolve()

    def removed(self) -> set[str]:
        """Processes stopped on purpose (``remove_worker``): ``<home>/removed.json``, not restarted."""
        path = self.home / "removed.json"
        return set(json.loads(path.read_text())) if path.exists() else set()

    def remove_worker(self, name: str, grace: float = 15) -> None:
        path = self.home / "removed.json"
        path.write_text(json.dumps(sorted(self.removed() | {name})))
        super().remove_worker(name, grace)


def running(pid: int | None) -> bool:
    """Whether ``pid`` runs: not gone, and not a zombie (a process this one did not start cannot be reaped here)."""
    if pid is None:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def serve(argv: list[str]) -> int:
    """``mnist-pipeline serve start|stop|status`` (``make serve``), with both topologies to choose from."""
    from flows.stack import serve as single

    return single.main(argv, stacks={"single": LocalStack, "ha": HAStack})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.stack.topology", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["supervise"])
    parser.add_argument("--home", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    stack = HAStack(Path(args.home), port=args.port)
    print(f"{datetime.now(UTC):%H:%M:%S} supervising {', '.join(n for n in stack._pids() if n != SUPERVISOR)}", flush=True)
    try:
        stack.supervise()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
