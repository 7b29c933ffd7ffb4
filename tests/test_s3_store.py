"""The store on an S3-compatible server (moto's, on loopback): the whole flow, Prefect's result records in
the bucket, a second machine that finds every heavy step cached, and the tables read by pyarrow from the bucket."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pytest

from storage import Store
from storage.tables import open_table, read_table
from tasks.data.fetch import fetch_mnist
from tests.conftest import with_mnist

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


def export_idx(mnist_store: Store, directory: Path) -> Path:
    directory.mkdir()
    dataset = fetch_mnist(mnist_store, sources=[], log=lambda _: None)
    for name, stored in dataset.files.items():
        (directory / name).write_bytes(mnist_store.read_bytes(stored.key))
    return directory


def run_on(machine: Path, store_url: str, api: dict[str, str], *extra: str) -> subprocess.CompletedProcess:
    """``mnist-pipeline run`` as a separate machine would: its own working directory, Prefect home and cache
    (the API is the session's: machines of one deployment share a server)."""
    machine.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        **api,
        "PREFECT_HOME": str(machine / "prefect"),
        "XDG_CACHE_HOME": str(machine / "cache"),
        "PYTHONPATH": str(REPO),
    }
    args = ["run", "--epochs", "1", "--train-limit", "3000", "--n-per-class", "20", "--store", store_url, *extra]
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], cwd=machine, env=env, capture_output=True, text=True, timeout=600
    )


def test_the_flow_on_an_s3_store_from_two_machines(s3_server, mnist_store: Store, tmp_path: Path, prefect_api):
    url = s3_server.bucket("mnist") + "/quick"
    source = export_idx(mnist_store, tmp_path / "idx")
    first = run_on(tmp_path / "machine-a", url, prefect_api, "--mnist-source", str(source))
    assert first.returncode == 0, first.stderr[-3000:]
    assert (
        "Steps:              fetch-mnist Completed, ingest Completed, train Completed, evaluate Completed, plot Completed, gate"
        in first.stdout
    )
    assert f"{url}/tables" in first.stdout  # the URL a person can use, not a bare bucket path

    second = run_on(tmp_path / "machine-b", url, prefect_api)  # no MNIST source at all: everything must come from the bucket
    assert second.returncode == 0, second.stderr[-3000:]
    assert (
        "Steps:              fetch-mnist Cached, ingest Completed, train Cached, evaluate Cached, plot Cached, gate"
        in second.stdout
    )

    store = Store(url)
    records = {os.path.basename(p).split("-")[0] for p in store.fs.ls(store.results_dir())}
    assert {"fetch", "train", "evaluate", "plot"} <= records  # Prefect's cache lives in the bucket
    assert not [p for p in store.fs.find(store.root) if "/." in p]  # no temporary objects left behind
    assert len(read_table(store, "runs")) == 2

    # a downstream consumer with pyarrow alone, straight from the bucket
    s3 = pafs.S3FileSystem(
        endpoint_override=s3_server.endpoint, scheme="http", access_key="testing", secret_key="testing", region="us-east-1"
    )
    confusion = ds.dataset("mnist/quick/tables/confusion", filesystem=s3, format="parquet", partitioning="hive")
    assert confusion.count_rows() == 200 and "run_id" in confusion.schema.names  # 1 evaluation × 2 slices × 100 pairs
    assert len(open_table(url, "per_class", slice="mnist-test")) == 10  # the one-call reader, from the bucket
    runs = ds.dataset("mnist/quick/tables/runs", filesystem=s3, format="parquet", partitioning="hive").to_table()
    assert sorted(runs.column("run_id").to_pylist()) == sorted(read_table(store, "runs")["run_id"])


KILLABLE = """
import sys
from storage import Store
from tasks.data.fetch import fetch_mnist
from tasks.training.train import TrainConfig, train_model
store = Store(sys.argv[1])
train_model(store, fetch_mnist(store, sources=[]), TrainConfig.model_validate_json(sys.argv[2]), log=lambda m: print(m, flush=True))
"""


def test_a_training_killed_on_one_worker_resumes_on_another(s3_server, mnist_store: Store, tmp_path: Path, monkeypatch):
    """SIGKILL during training on one machine; another machine, with nothing local, resumes from the last epoch
    backed up in the bucket and ends where an uninterrupted training would."""
    import json
    import signal
    import time

    import keras
    import numpy as np

    from tasks.training.train import TrainConfig, stored_model, train_model, training_key

    store = Store(s3_server.bucket("resume") + "/mnist")
    with_mnist(store, mnist_store)
    dataset = fetch_mnist(store, sources=[], log=lambda _: None)
    config = TrainConfig(epochs=3, train_limit=8000, seed=4)  # epochs of a second or two: time to see the pointer and kill
    key = training_key(dataset, config)
    pointer = store.key("checkpoints", key, "latest.json")

    worker_a = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "worker-a"), "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLABLE, store.url, config.model_dump_json()],
        cwd=REPO,
        env=worker_a,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (store.exists(pointer) and json.loads(store.read_bytes(pointer))["epoch"] >= 1):
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    in_store = json.loads(store.read_bytes(pointer))["epoch"]
    assert 1 <= in_store < 3, "the kill came too late to test a resume"
    assert stored_model(store, key) is None  # nothing half-trained was published as the model

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "worker-b"))  # another machine: nothing local
    logs: list[str] = []
    ref = train_model(store, dataset, config, log=logs.append)
    assert f"Found a checkpoint after epoch {in_store} in the store" in logs
    assert any(line.startswith(f"Resuming from the checkpoint after epoch {in_store}") for line in logs), logs
    assert ref.resumed_from_epoch == in_store
    assert read_history_epochs(store, ref.history_key) == [1, 2, 3]  # history kept across the kill
    local = tmp_path / "model.keras"
    local.write_bytes(store.read_bytes(ref.file_key))
    model = keras.models.load_model(local)
    steps_per_epoch = int(np.ceil(ref.train_images / config.batch_size))
    assert int(model.optimizer.iterations.numpy()) == 3 * steps_per_epoch  # same steps as an uninterrupted training
    assert not store.exists(store.key("checkpoints", ref.key))  # dropped once the model was stored


def read_history_epochs(store: Store, key: str) -> list[int]:
    import pandas as pd

    with store.open(key) as handle:
        return pd.read_parquet(handle)["epoch"].tolist()
