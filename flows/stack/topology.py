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

supervisord (flows/stack/supervisor.py) restarts any of them that dies (``autorestart``), with the command and
environment it was started with: what systemd's ``Restart=always`` does in production (``deploy/systemd/``, compared
with ``programs`` and ``redis_settings`` by tests/test_deploy_units.py).
"""

from __future__ import annotations

import json
import secrets
import shutil
import sys
from pathlib import Path

from flows.stack.environment import free_port, write_secret
from flows.stack.serve import LocalStack
from flows.stack.supervisor import Program

REPLICAS = 2
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
    """``LocalStack`` with the API split into replicas behind HAProxy, the services apart, Redis; every process
    restarted by supervisord."""

    api_process = BALANCER
    restarts = True

    def __init__(self, home: Path, *args, replicas: int = REPLICAS, **kwargs) -> None:
        kwargs["db"] = "postgres"  # SQLite cannot be shared by several server processes
        super().__init__(home, *args, **kwargs)
        self.replicas = replicas
        self.topology_file = self.home / "topology.json"  # ports (no secrets)
        self.redis_password_file = self.home / "redis-password"

    def describe(self) -> str:
        ports = self.ports
        replicas = ", ".join(f"{n} :{ports[n]}" for n in self.replicas_names())
        return (
            f"ha: HAProxy :{self.port} → {replicas} (--no-services); services apart; Redis :{ports[REDIS]} "
            "(password in redis-password); every process restarted by supervisord"
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

    def api_programs(self) -> list[Program]:
        """Redis first, then the replicas, the balancer and the services (``priority``: stopped the other way)."""
        prefect, ports = [sys.executable, "-m", "prefect", "server"], self.ports
        found = [self.program(REDIS, [binary("redis-server"), str(self.home / "redis.conf")], self.env, 10)]
        for name in self.replicas_names():
            serve = ["start", "--no-services", "--host", "127.0.0.1", "--port", str(ports[name])]
            found.append(self.program(name, [*prefect, *serve], self.server_env, 20))
        found.append(self.program(BALANCER, [binary("haproxy"), "-db", "-f", str(self.home / "haproxy.cfg")], self.env, 30))
        return [*found, self.program(SERVICES, [*prefect, "services", "start"], self.server_env, 30)]

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

    # -- starting -----------------------------------------------------------------------------------------------
    def start(self) -> None:
        self.topology_file.unlink(missing_ok=True)  # fresh ports for a fresh stack
        super().start()

    def start_api(self) -> None:
        write_secret(self.home / "redis.conf", self.redis_conf())  # it holds the password
        (self.home / "haproxy.cfg").write_text(self.haproxy_cfg())
        self.supervisor.start(REDIS)
        self._run("-m", "prefect", "server", "database", "upgrade", "-y", env=self.server_env, timeout=600)  # once, first
        for name in self.replicas_names():  # one after the other: each registers Prefect's block types on its first
            self.supervisor.start(name)  # start, and two at once collide on the same rows (the second exits)
            self.wait_replica(name)
        for name in (BALANCER, SERVICES):
            self.supervisor.start(name)

    def wait_replica(self, name: str, timeout: float = 180) -> None:
        """Until replica ``name`` answers ``/api/health`` on its own port."""
        self.wait_ready(f"http://127.0.0.1:{self.ports[name]}/api/health", name, timeout)


def serve(argv: list[str]) -> int:
    """``mnist-pipeline serve start|stop|status`` (``make serve``), with both topologies to choose from."""
    from flows.stack import serve as single

    return single.main(argv, stacks={"single": LocalStack, "ha": HAStack})
