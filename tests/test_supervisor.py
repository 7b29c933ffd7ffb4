"""flows/stack/supervisor.py on a real supervisord, with processes that only sleep (seconds, no Prefect): each
program gets exactly its environment and command, supervisord restarts what has ``autorestart`` and leaves the rest
dead, two stacks' supervisords never see each other's processes, and shutdown stops everything with itself."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from flows.stack.supervisor import SOCKET_PATH_MAX, Program, Supervisor

SLEEP = [sys.executable, "-c", "import time; time.sleep(600)"]
ODD = "quotes ' and \", commas, a 100% and %(here)s, a = sign\nand a second line"  # what supervisord's own syntax mangles


def environ(pid: int) -> dict[str, str]:
    return dict(e.split("=", 1) for e in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in e)


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def until(condition, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while not (found := condition()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return found


@pytest.fixture
def two(tmp_path: Path):
    """Two supervisords, as two stacks on one machine would run them, each with a ``kept`` and a ``once`` program."""
    env = {"PATH": os.environ["PATH"], "ODD": ODD}
    made = []
    for name in ("a", "b"):
        supervisor = Supervisor(tmp_path / name)
        programs = [
            Program("kept", SLEEP, {**env, "STACK": name}, tmp_path, 10, autorestart=True),
            Program("once", SLEEP, {**env, "STACK": name}, tmp_path, 20),
        ]
        supervisor.configure(programs)
        supervisor.launch({**os.environ, "MNIST_STORE": "not for the programs"})
        made.append(supervisor)
    yield made
    for supervisor in made:
        supervisor.shutdown()


def test_each_program_gets_exactly_its_environment_and_command(two):
    a, b = two
    for supervisor in (a, b):
        for name in ("kept", "once"):
            supervisor.start(name)
    for supervisor, stack in ((a, "a"), (b, "b")):
        pids = supervisor.pids()
        assert set(pids) == {"kept", "once"}  # its own two, not the other stack's
        for pid in pids.values():
            assert environ(pid) == {"PATH": os.environ["PATH"], "ODD": ODD, "STACK": stack}  # nothing of supervisord's
            assert Path(f"/proc/{pid}/cmdline").read_text().split("\0")[:-1] == SLEEP
            assert os.getpgid(pid) == pid  # a group of its own: stopasgroup/killasgroup reach its children
    assert a.socket.parent.stat().st_mode & 0o077 == 0 and a.conf.stat().st_mode & 0o077 == 0
    assert (a.home / "kept.log").exists()


def test_supervisord_restarts_what_autorestarts_and_shutdown_stops_everything(two):
    a, b = two
    for name in ("kept", "once"):
        a.start(name)
    b.start("kept")
    before = a.pids()
    for pid in before.values():
        os.killpg(pid, signal.SIGKILL)
    restarted = until(lambda: (pid := a.pids().get("kept")) and pid != before["kept"] and alive(pid) and pid)
    assert restarted, a.processes()
    assert until(lambda: a.state("once") == "EXITED"), a.processes()  # autorestart=false: left dead
    assert "once" not in a.pids()

    other = b.pids()["kept"]
    stopped = a.shutdown()
    assert {s.split(" (")[0] for s in stopped} == {"kept", "supervisor"}, stopped
    assert not [s for s in stopped if alive(int(s.split(" (")[1].rstrip(")")))], stopped
    assert not a.answering() and a.pids() == {}
    assert alive(other) and b.pids() == {"kept": other}  # the other stack's supervisord and process untouched


def test_a_folder_too_deep_for_the_socket_keeps_its_socket_in_a_private_temporary_folder(tmp_path: Path, monkeypatch):
    """A stack folder deeper than a unix socket's path may be (pytest's own folders are, under xdist) puts its socket
    in a short folder of this user's alone; one that is too deep even so is refused, saying what to do."""
    import os
    import stat
    import tempfile

    deep = tmp_path / ("d" * (SOCKET_PATH_MAX - len(str(tmp_path))))
    supervisor = Supervisor(deep)
    assert len(str(supervisor.socket)) <= SOCKET_PATH_MAX and str(supervisor.socket).startswith(tempfile.gettempdir())
    supervisor.configure([])
    folder = supervisor.socket.parent
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700 and folder.stat().st_uid == os.getuid()
    assert Supervisor(deep).socket == supervisor.socket  # stop and status find it again
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path / ("t" * SOCKET_PATH_MAX)))
    with pytest.raises(ValueError, match="too deep for supervisord's socket.*shorter --home"):
        Supervisor(tmp_path / ("e" * SOCKET_PATH_MAX)).configure([])
