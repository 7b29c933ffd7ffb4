"""A store URL that carries a password: the run works with it, and it appears nowhere a person or another
user could read it: not in the output, the tables, the store, Prefect's database and logs, nor any
process's command line while the run is going."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from storage import Store, strip_credentials
from storage.credentials import CredentialsInUrl
from storage.tables import read_table
from tests.conftest import alarming, with_mnist

REPO = Path(__file__).resolve().parent.parent
SECRET = "pw-Zq8rT3xK9vLm2"


def test_credentials_leave_the_url_for_fsspec_config(monkeypatch):
    import fsspec.config

    monkeypatch.setattr(fsspec.config, "conf", {})
    for name in ("FSSPEC_SFTP_USERNAME", "FSSPEC_SFTP_PASSWORD", "FSSPEC_S3_KEY", "FSSPEC_S3_SECRET"):
        monkeypatch.setenv(name, "")  # restored (removed) when the test ends
    assert strip_credentials(f"sftp://alice:{SECRET}@host.example/data/mnist") == "sftp://host.example/data/mnist"
    assert fsspec.config.conf["sftp"] == {"username": "alice", "password": SECRET}
    assert os.environ["FSSPEC_SFTP_PASSWORD"] == SECRET  # what child processes read
    assert (
        strip_credentials("s3://AKIA:se%2Fcret@bucket/x") == "s3://bucket/x" and fsspec.config.conf["s3"]["secret"] == "se/cret"
    )
    assert strip_credentials("/plain/path") == "/plain/path" and strip_credentials("s3://bucket/x") == "s3://bucket/x"
    assert strip_credentials(f"simplecache::sftp://bob:{SECRET}@h/x") == "simplecache::sftp://h/x"  # every link of a chain
    with pytest.raises(CredentialsInUrl, match="percent-encode"):  # an unencoded '/' in a secret is not left in the URL
        strip_credentials("s3://AKIA:abc/def+ghi@bucket/mnist")


@pytest.mark.slow
def test_a_password_in_the_store_url_appears_nowhere_during_a_run(s3_server, mnist_store: Store, tmp_path: Path):
    bucket = s3_server.bucket("secret-store")
    with_mnist(Store(f"{bucket}/x"), mnist_store)
    home = tmp_path / "prefect"
    env = {k: v for k, v in os.environ.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    # only the URL holds credentials (moto accepts any), so the run works only if they are used; given through
    # MNIST_STORE, as the README says, since a command line is readable by every user of the machine
    env.update(PREFECT_HOME=str(home), PYTHONPATH=str(REPO), MNIST_STORE=f"s3://testing:{SECRET}@secret-store/x")
    seen: list[str] = []
    done = threading.Event()

    def watch_ps() -> None:  # what `ps -eo args` shows every user: each process's command line, read from /proc
        while not done.is_set():
            for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
                try:
                    line = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
                except OSError:  # the process ended meanwhile
                    continue
                if SECRET in line:
                    seen.append(line)
            time.sleep(0.2)

    watcher = threading.Thread(target=watch_ps, daemon=True)
    watcher.start()
    try:
        run = subprocess.run(
            [sys.executable, "-m", "flows.cli", "run", "--epochs", "1", "--train-limit", "500", "--n-per-class", "5"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        done.set()
        watcher.join()
    assert run.returncode == 0, run.stderr[-3000:]
    assert "s3://secret-store/x" in run.stdout
    assert SECRET not in run.stdout + run.stderr
    # a healthy run on Prefect's temporary server (as `make run` starts one) says nothing a newcomer would read as
    # a failure, TensorFlow's start-up banner included
    assert alarming(run.stdout + run.stderr) == []
    assert not seen, seen
    for file in home.rglob("*"):  # Prefect's database (runs, parameters, logs, artifacts, blocks) and its logs
        if file.is_file():
            assert SECRET.encode() not in file.read_bytes(), file
    store = Store("s3://secret-store/x")
    for key in store.fs.find(store.root):
        if not key.rsplit("/", 1)[-1].startswith(("train-", "t10k-")) and "/objects/" not in key:
            assert SECRET.encode() not in store.fs.cat_file(key), key
    (parameters,) = read_table(store, "runs")["parameters"]
    assert SECRET not in parameters
