"""The same network and training code on Keras' JAX and PyTorch backends, on this CPU (tiny subsets).

The pipeline's process stays on TensorFlow; a run that asks for another backend trains in a child
process with that ``KERAS_BACKEND`` (``tasks/training/backends.py``), and evaluation loads the model it wrote.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.night.params import PipelineParameters
from storage import Store
from tasks.data.fetch import fetch_mnist
from tasks.training.backends import BACKEND_ENV, Backend, process_backend
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
