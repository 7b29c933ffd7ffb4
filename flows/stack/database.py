"""Which database the Prefect server keeps its state in: SQLite (the default, one machine) or PostgreSQL
(Prefect's recommendation for production and for several workers).

With ``PREFECT_API_DATABASE_CONNECTION_URL`` set, that database is used as it is. Otherwise
``LocalPostgres`` runs a cluster of the machine's own PostgreSQL binaries on a loopback port: PostgreSQL
refuses to run as root, so under root the cluster belongs to an unprivileged user (``postgres``, else
``nobody``) and lives where that user can reach it. Every connection, local socket or TCP, needs the
password (``scram-sha-256``), generated once and kept in ``<home>/postgres-password`` (mode 0600); the
URL that carries it goes to the server alone (``flows.stack.serve.LocalStack.server_env``).
"""

from __future__ import annotations

import getpass
import glob
import hashlib
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

DATABASES = ("sqlite", "postgres")
URL_ENV = "PREFECT_API_DATABASE_CONNECTION_URL"
DB_NAME = "prefect"
DB_USER = "prefect"


def postgres_binary(name: str) -> str:
    """A PostgreSQL server program (``initdb``, ``pg_ctl``): on PATH, else in Debian's versioned folder."""
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if found is None:
        raise RuntimeError(
            f"PostgreSQL's `{name}` was not found: install the server (Debian: `apt-get install postgresql`), "
            f"or point {URL_ENV} at an existing database (postgresql+asyncpg://user:password@host:5432/prefect)."
        )
    return found


class LocalPostgres:
    """A PostgreSQL cluster on 127.0.0.1:``port`` with a ``prefect`` database that has ``pg_trgm``."""

    def __init__(self, home: Path, port: int) -> None:
        self.port = port
        self.user = None if os.geteuid() != 0 else ("postgres" if _user_exists("postgres") else "nobody")
        if self.user is None:
            self.data_dir = Path(home) / "postgres"
        else:  # the unprivileged owner must be able to reach it: not under root's private temporary folders
            tag = hashlib.sha256(str(Path(home).resolve()).encode()).hexdigest()[:12]
            self.data_dir = Path(tempfile.gettempdir()) / f"mnist-prefect-postgres-{tag}"
        self.log_file = self.data_dir.parent / f"{self.data_dir.name}.log"
        self.password_file = Path(home).resolve() / "postgres-password"

    @property
    def password(self) -> str:
        if not self.password_file.exists():
            self.password_file.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.password_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(24))
        return self.password_file.read_text().strip()

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://{DB_USER}:{self.password}@127.0.0.1:{self.port}/{DB_NAME}"

    def _run(self, *args: str, check: bool = True, password: bool = False) -> subprocess.CompletedProcess:
        command = [*(["runuser", "-u", self.user, "--"] if self.user else []), *args]
        env = {**os.environ, "PGPASSWORD": self.password} if password else None  # never on a command line
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, env=env)
        if check and done.returncode != 0:
            raise RuntimeError(f"`{' '.join(args)}` failed (exit {done.returncode}): {done.stderr.strip()[-1500:]}")
        return done

    def start(self) -> str:
        if (self.data_dir / "PG_VERSION").exists() and not self.password_file.exists():
            shutil.rmtree(self.data_dir)  # a cluster from before passwords (trust): made again, with one
        if not (self.data_dir / "PG_VERSION").exists():
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self.data_dir.chmod(0o700)
            pwfile = self.data_dir.parent / f".{self.data_dir.name}.pwfile"  # readable by the cluster's owner alone
            pwfile.write_text(self.password)
            pwfile.chmod(0o600)
            if self.user:
                record = pwd.getpwnam(self.user)
                for path in (self.data_dir, pwfile):
                    os.chown(path, record.pw_uid, record.pw_gid)
            try:
                self._run(
                    postgres_binary("initdb"),
                    "-D",
                    str(self.data_dir),
                    "-U",
                    DB_USER,
                    "--auth=scram-sha-256",
                    f"--pwfile={pwfile}",
                    "-E",
                    "UTF8",
                )
            finally:
                pwfile.unlink(missing_ok=True)
        if self.user and not self.log_file.exists():
            self.log_file.touch()
            record = pwd.getpwnam(self.user)
            os.chown(self.log_file, record.pw_uid, record.pw_gid)
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.data_dir}"
        self._run(postgres_binary("pg_ctl"), "-D", str(self.data_dir), "-l", str(self.log_file), "-o", options, "-w", "start")
        psql = [
            shutil.which("psql") or postgres_binary("psql"),
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-U",
            DB_USER,
            "-v",
            "ON_ERROR_STOP=1",
        ]
        exists = self._run(
            *psql, "-d", "postgres", "-tAc", f"SELECT 1 FROM pg_database WHERE datname = '{DB_NAME}'", password=True
        ).stdout.strip()
        if exists != "1":
            self._run(*psql, "-d", "postgres", "-c", f"CREATE DATABASE {DB_NAME}", password=True)
        self._run(*psql, "-d", DB_NAME, "-c", "CREATE EXTENSION IF NOT EXISTS pg_trgm", password=True)
        return self.url

    def pid(self) -> int | None:
        try:
            return int((self.data_dir / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self, timeout: float = 30) -> bool:
        """Stop the cluster (fast shutdown); True if one was running."""
        pid = self.pid()
        if pid is None:
            return False
        self._run(postgres_binary("pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w", "stop", check=False)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.2)
        return True


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return name != getpass.getuser()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
