"""The same network and training code on Keras' JAX and PyTorch backends, on this CPU (tiny subsets).

The pipeline's process stays on TensorFlow; a run that asks for another backend trains in a child
process with that ``KERAS_BACKEND`` (``tasks/training/backends.py``), and evaluation loads the model it wrote.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.night.params import PipelineParameters
from storage import Store
from storage.tables import read_table
from tasks.data.fetch import fetch_mnist
from tasks.training.backends import BACKEND_ENV, Backend, process_backend
from tasks.training.model import keras_file_metadata
from tasks.training.train import TrainConfig, training_key
from tests.conftest import with_mnist

REPO = Path(__file__).resolve().parent.parent
OTHERS = [Backend.jax, Backend.torch]


@pytest.fixture
def store(tmp_path: Path, mnist_store: Store) -> Store:
    fresh = Store(tmp_path / "store")
    with_mnist(fresh, mnist_store)
    return fresh


def test_keras_backend_is_found_the_way_keras_finds_it(monkeypatch, tmp_path):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert process_backend() is Backend.tensorflow
    (tmp_path / "keras.json").write_text(json.dumps({"backend": "torch"}))
    assert process_backend() is Backend.torch
    monkeypatch.setenv(BACKEND_ENV, "jax")
    assert process_backend() is Backend.jax
    assert PipelineParameters().train_config(0).backend is Backend.jax  # an empty parameter follows the worker
    assert PipelineParameters(backend="torch").train_config(0).backend is Backend.torch
    monkeypatch.setenv(BACKEND_ENV, "mxnet")
    with pytest.raises(ValueError, match="KERAS_BACKEND='mxnet' is not a backend this pipeline trains on"):
        process_backend()


def test_the_backend_is_part_of_the_training_key(store):
    dataset = fetch_mnist(store, sources=[], log=lambda _: None)
    keys = {training_key(dataset, TrainConfig(backend=b)) for b in Backend}
    assert len(keys) == 3


@pytest.mark.slow
@pytest.mark.parametrize("backend", OTHERS, ids=lambda b: b.value)
def test_a_killed_training_resumes_and_the_pipeline_finishes_on_its_backend(backend, store, tmp_path, prefect_api):
    """Keras' BackupAndRestore on JAX and PyTorch: the training child killed after epoch 1 of 3; then the issue's
    command, as a user types it, resumes it there, evaluates on TensorFlow, and the runs row and the .keras
    file say which backend trained."""
    dataset = fetch_mnist(store, sources=[], log=lambda _: None)
    params = PipelineParameters(backend=backend, epochs=3, train_limit=3000, seed=3, n_per_class=20, store=store.url)
    config = params.train_config(3)  # what the command below trains: it resumes this very training
    key = training_key(dataset, config)
    pointer = store.checkpoint_key(key, "latest.json")  # the checkpoint as the store holds it after each epoch
    arguments = {
        "store": store.url,
        "dataset": dataset.model_dump(mode="json"),
        "config": config.model_dump(mode="json"),
        "key": key,
    }
    child = subprocess.Popen(
        [sys.executable, "-m", "tasks.training.backend_child", json.dumps(arguments)],
        cwd=REPO,
        env={**os.environ, BACKEND_ENV: backend.value},
        stdout=subprocess.DEVNULL,
    )

    def epochs_backed_up() -> int:
        return json.loads(store.read_bytes(pointer))["epoch"] if store.exists(pointer) else 0

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and epochs_backed_up() < 1:  # the state we wait for: epoch 1 in the store
        assert child.poll() is None, "the training ended before it could be killed"
        time.sleep(0.2)
    child.send_signal(signal.SIGKILL)
    child.wait()
    at_kill = epochs_backed_up()  # the child is gone: this is what the resumed training finds
    assert 1 <= at_kill < 3, f"killed after {at_kill} of 3 epochs: it should have backed up one and still been training"

    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), **prefect_api}
    env.pop(BACKEND_ENV, None)
    args = ["--backend", backend.value, "--epochs", "3", "--train-limit", "3000", "--seed", "3", "--n-per-class", "20"]
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", *args, "--store", store.url],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=REPO,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"({backend.value}, float32)" in done.stdout
    assert f"Resuming from the checkpoint after epoch {at_kill}/3" in output, output[-3000:]
    noisy = [line for line in output.splitlines() if any(w in line for w in ("E0000", "ERROR", "WARNING"))]
    assert not noisy, noisy
    (row,) = read_table(store, "runs").itertuples()
    assert row.backend == backend.value and row.resumed_from_epoch == at_kill
    assert row.test_accuracy > 0.5  # it learned (three epochs of 2 700 images)
    (model_file,) = Path(store.path("models")).rglob("*.keras")
    assert keras_file_metadata(str(model_file))["backend"] == backend.value
