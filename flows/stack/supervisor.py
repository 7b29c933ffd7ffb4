"""The stack's processes kept by supervisord: the process list a stack describes (``Program``) becomes one
``supervisord.conf`` in the stack's folder, and everything else goes through supervisord's XML-RPC interface on a
unix socket in that folder (mode 0700: parallel stacks never meet, and only this user can control one).

What supervisord decides, not this project: start order (``priority``; shutdown runs it backwards, so workers stop
before the server), when a process counts as started (``startsecs``), restarts (``autorestart``), each process's log
(``<home>/<name>.log``) and stop grace (``stopwaitsecs``, SIGTERM then SIGKILL to the whole process group).
``supervisorctl -c <home>/supervisor/supervisord.conf status`` shows the same thing ``mnist-pipeline serve status`` does.

Each program's environment is a JSON file (mode 0600) that ``python -m flows.stack.supervisor`` reads just before
replacing itself with the command (same pid, same process group): supervisord's ``environment=`` can only add to its
own environment (the server must not inherit the workers' store and its credentials) and cannot carry every value a
shell may hold (quotes, commas, newlines).
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
import xmlrpc.client
from dataclasses import dataclass
from pathlib import Path

UP = ("STARTING", "RUNNING")  # supervisord's states of a process that is, or is about to be, serving
SOCKET_PATH_MAX = 100  # AF_UNIX paths: 108 bytes on Linux, with room for supervisord's own temporary name


@dataclass(frozen=True)
class Program:
    """One process of a stack, as supervisord keeps it."""

    name: str
    command: list[str]
    env: dict[str, str]
    cwd: Path
    priority: int  # lower starts first and stops last
    autorestart: bool = False
    startsecs: int = 1  # up this long after its start, or its start failed
    stopwaitsecs: int = 15  # SIGTERM, then SIGKILL to its process group after this long


def _quoted(text: str) -> str:
    """A value as supervisord's configuration reads it: ``%`` would start one of its expansions."""
    return text.replace("%", "%%")


def _socket_path(home: Path, inside: Path) -> Path:
    """The socket in the stack's own folder; where that path is longer than a unix socket's may be (a deep test
    folder), in a short folder of this user's under the temporary directory, named by the stack's folder."""
    if len(str(inside)) <= SOCKET_PATH_MAX:
        return inside
    digest = hashlib.sha256(str(home.resolve()).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"mnist-supervisor-{os.getuid()}-{digest}" / "supervisor.sock"


def _private(folder: Path) -> None:
    """The socket's folder must be this user's alone: a folder someone else made there first is refused."""
    info = folder.stat()
    if info.st_uid != os.getuid():
        raise PermissionError(f"{folder} belongs to another user: refusing to put the stack's socket there")
    folder.chmod(0o700)


class Supervisor:
    """supervisord for the stack kept in ``home``: its configuration, socket and own log in ``home/supervisor/``."""

    def __init__(self, home: Path) -> None:
        self.home = Path(home)
        self.folder = self.home / "supervisor"
        self.conf = self.folder / "supervisord.conf"
        self.socket = _socket_path(self.home, self.folder / "supervisor.sock")
        self.added = self.folder / "added"  # programs added while it runs (workers of other machines)

    def program_conf(self, program: Program, folder: Path) -> str:
        from flows.stack.environment import write_secret  # not at the top: `-m flows.stack.supervisor` stays light

        env_file = folder / f"{program.name}.env.json"
        write_secret(env_file, json.dumps(program.env))
        command = [sys.executable, "-m", "flows.stack.supervisor", str(env_file), *program.command]
        return (
            f"[program:{program.name}]\ncommand={_quoted(shlex.join(command))}\ndirectory={_quoted(str(program.cwd))}\n"
            f"priority={program.priority}\nautostart=false\nautorestart={str(program.autorestart).lower()}\n"
            f"startsecs={program.startsecs}\nstartretries=3\nstopwaitsecs={program.stopwaitsecs}\n"
            "stopasgroup=true\nkillasgroup=true\nredirect_stderr=true\n"
            f"stdout_logfile={_quoted(str(self.home / program.name))}.log\nstdout_logfile_maxbytes=50MB\n\n"
        )

    def configure(self, programs: list[Program]) -> None:
        """Write ``supervisord.conf`` for ``programs``. ``autostart=false``: the stack starts each at its stage
        (the API ready before the deployments, the deployments before the workers); ``priority`` orders the rest."""
        if len(str(self.socket)) > SOCKET_PATH_MAX:
            raise ValueError(
                f"The stack's folder {self.home} is too deep for supervisord's socket ({len(str(self.socket))} characters, "
                f"at most {SOCKET_PATH_MAX}), and so is the temporary folder: give a shorter --home."
            )
        self.socket.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        _private(self.socket.parent)
        from flows.stack.environment import write_secret  # not at the top: `-m flows.stack.supervisor` stays light

        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.folder.chmod(0o700)  # made before this version, or under another umask
        self.added.mkdir(exist_ok=True)
        umask = os.umask(0)
        os.umask(umask)  # the processes create files as they would have from this shell, as this shell's user
        text = (
            f"[unix_http_server]\nfile={_quoted(str(self.socket))}\nchmod=0700\n\n"
            f"[supervisord]\nlogfile={_quoted(str(self.home / 'supervisord.log'))}\n"
            f"pidfile={_quoted(str(self.folder / 'supervisord.pid'))}\nchildlogdir={_quoted(str(self.folder))}\n"
            f"umask={umask:03o}\nuser={os.getuid()}\nidentifier=mnist-{_quoted(str(self.home))}\n\n"
            "[rpcinterface:supervisor]\nsupervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n\n"
            f"[supervisorctl]\nserverurl=unix://{_quoted(str(self.socket))}\n\n"
            f"[include]\nfiles={_quoted(str(self.added))}/*.conf\n\n"
        )
        for stale in self.added.iterdir():
            stale.unlink()
        write_secret(self.conf, text + "".join(self.program_conf(p, self.folder) for p in programs))

    def launch(self, env: dict[str, str]) -> None:
        """Start supervisord; it returns once its socket answers (it daemonizes after opening it)."""
        done = subprocess.run(
            [sys.executable, "-m", "supervisor.supervisord", "-c", str(self.conf)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if done.returncode != 0:
            raise RuntimeError(f"supervisord did not start (exit {done.returncode}): {done.stdout[-2000:]}{done.stderr[-2000:]}")

    def rpc(self):
        """supervisord's XML-RPC namespace (``supervisor.*``)."""
        from supervisor.xmlrpc import SupervisorTransport

        transport = SupervisorTransport(serverurl=f"unix://{self.socket}")
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport).supervisor

    def answering(self) -> bool:
        try:
            self.rpc().getState()
        except (OSError, xmlrpc.client.Error):
            return False
        return True

    def processes(self) -> list[dict]:
        """Every program supervisord keeps (name, statename, pid: 0 when not running); none when it is not running."""
        try:
            return self.rpc().getAllProcessInfo()
        except (OSError, xmlrpc.client.Error):
            return []

    def pids(self) -> dict[str, int]:
        """The programs that are up, with their pids."""
        return {p["name"]: p["pid"] for p in self.processes() if p["statename"] in UP and p["pid"]}

    def state(self, name: str) -> str:
        return next((p["statename"] for p in self.processes() if p["name"] == name), "UNKNOWN")

    def start(self, name: str) -> int:
        """Start ``name`` and return its pid once supervisord counts it started (up for ``startsecs``)."""
        try:
            self.rpc().startProcess(name, True)
        except xmlrpc.client.Fault as fault:
            raise RuntimeError(f"{name} did not start ({fault.faultString}); see {self.home / f'{name}.log'}") from None
        return self.pids()[name]

    def add(self, program: Program) -> int:
        """Add ``program`` to the running supervisord and start it."""
        (self.added / f"{program.name}.conf").write_text(self.program_conf(program, self.added))
        rpc = self.rpc()
        rpc.reloadConfig()
        rpc.addProcessGroup(program.name)
        return self.start(program.name)

    def shutdown(self, timeout: float = 120) -> list[str]:
        """Stop every program (workers first, by priority) and supervisord; ``name (pid)`` of each that ran."""
        try:
            rpc = self.rpc()
            own = rpc.getPID()
            running = [f"{p['name']} ({p['pid']})" for p in rpc.getAllProcessInfo() if p["pid"]]
            rpc.shutdown()
        except (OSError, xmlrpc.client.Error):
            return []
        deadline = time.monotonic() + timeout
        while Path(f"/proc/{own}").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        return [*running, f"supervisor ({own})"]


def main(argv: list[str]) -> None:
    """``python -m flows.stack.supervisor ENV_JSON COMMAND...``: become COMMAND with exactly that environment."""
    env_file, *command = argv
    os.execvpe(command[0], command, json.loads(Path(env_file).read_text()))


if __name__ == "__main__":
    main(sys.argv[1:])
