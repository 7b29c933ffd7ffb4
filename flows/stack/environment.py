"""Who a stack is and what each of its processes is given: its address, authentication, database and store, and from
them the clients' environment (CLI, workers, their flow runs) and the server's (the clients' plus the auth string as
a server setting and the database; never the store).

The API is authenticated by default (Prefect's basic auth, with CSRF protection on): a random ``admin:<secret>``
kept in ``<home>/auth`` (mode 0600), or ``$PREFECT_SERVER_API_AUTH_STRING``. Every client gets
``PREFECT_API_AUTH_STRING``. Without auth the API listens on loopback only.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import socket
from pathlib import Path

from flows.night.recovery import BUCKET_BUFFER, BUCKET_BUFFER_ENV, HEARTBEAT_ENV, HEARTBEAT_SECONDS, SILENT_AFTER_SECONDS
from flows.stack.database import DATABASES, URL_ENV
from flows.stack.watchdog import WatchdogSettings

REPO = Path(__file__).resolve().parents[2]
AUTH_ENV = "PREFECT_SERVER_API_AUTH_STRING"  # the server's setting
CLIENT_AUTH_ENV = "PREFECT_API_AUTH_STRING"  # what every client sends
AUTH_USER = "admin"


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ui_origins(host: str, port: int, ui_url: str) -> str:
    """The origins the UI is served from: loopback by default, the host's name too when it listens beyond it."""
    origins = [ui_url]
    if not is_loopback(host):
        origins.append(f"http://{socket.gethostname()}:{port}")
        if host not in ("0.0.0.0", "::"):
            origins.append(f"http://{host}:{port}")
    return ",".join(origins)


class StackEnvironment:
    """A stack's address, auth, database and store, and the environment each of its processes gets."""

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
        self.host, self.auth, self.db, self.port = host, auth, db, port
        self.home = Path(home).resolve()
        self.auth_file = self.home / "auth"
        self.database_url = os.environ.get(URL_ENV) if db == "postgres" else None
        self.store = store or str(REPO / "artifacts")
        self.poll_seconds, self.silent_after, self.watchdog = poll_seconds, silent_after, watchdog
        self.slot_wait_seconds = slot_wait_seconds  # how soon a run queued behind the deployment's limit asks again
        local = "127.0.0.1" if host in ("0.0.0.0", "::") or not is_loopback(host) else host
        self.api_url, self.ui_url = f"http://{local}:{port}/api", f"http://{local}:{port}"

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
            PREFECT_SERVER_CORS_ALLOWED_ORIGINS=ui_origins(self.host, self.port, self.ui_url),
        )
        env[BUCKET_BUFFER_ENV] = BUCKET_BUFFER  # flows/night/recovery.py: a silent run's bucket is never swept unseen
        if self.auth_string:
            env[AUTH_ENV] = self.auth_string
        if self.database_url:
            env[URL_ENV] = self.database_url
        return env

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
