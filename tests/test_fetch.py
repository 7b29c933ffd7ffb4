"""The source chain against real HTTP servers on loopback and real directories: fallback, verification, reuse."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from storage import Store
from tasks.data.fetch import (
    DamagedMnist,
    DirectorySource,
    HttpMirror,
    MnistUnavailable,
    dataset_digest,
    fetch_mnist,
    load_mnist,
)
from tests.conftest import Mirror


@pytest.fixture
def mirrors():
    started: list[Mirror] = []

    def start(files: dict[str, bytes]) -> Mirror:
        started.append(Mirror(files))
        return started[-1]

    yield start
    for m in started:
        m.close()


def gz_files(synthetic, corrupt: dict[str, bytes] | None = None) -> dict[str, bytes]:
    files = {f"{name}.gz": synthetic.gz(name) for name in synthetic.raw}
    for name, raw in (corrupt or {}).items():
        files[f"{name}.gz"] = gzip.compress(raw)
    return files


def stored_objects(store: Store) -> set[str]:
    root = store.path("objects")
    return {p.rsplit("/", 1)[-1] for p in store.fs.find(root)} if store.exists(root) else set()


def test_corrupt_mirror_falls_back_to_the_next_and_never_stores_bad_bytes(synthetic, store, mirrors):
    name = "train-images-idx3-ubyte"
    altered = bytearray(synthetic.raw[name])
    altered[100] ^= 0xFF
    bad = mirrors(
        gz_files(
            synthetic, corrupt={name: bytes(altered), "t10k-labels-idx1-ubyte": synthetic.raw["t10k-labels-idx1-ubyte"][:-3]}
        )
    )
    good = mirrors(gz_files(synthetic))
    logs: list[str] = []

    ref = fetch_mnist(store, sources=[HttpMirror(bad.url), HttpMirror(good.url)], files=synthetic.specs, log=logs.append)

    assert stored_objects(store) == {s.sha256 for s in synthetic.specs}
    assert ref.sha256 == dataset_digest(synthetic.specs)
    assert ref.sources == [f"mirror {bad.url}", f"mirror {good.url}"]
    # only the two files the first mirror got wrong were asked of the second
    assert sorted(good.requests) == ["/t10k-labels-idx1-ubyte.gz", "/train-images-idx3-ubyte.gz"]
    assert any("Rejected train-images-idx3-ubyte" in line and "altered" in line for line in logs)
    assert any("Rejected t10k-labels-idx1-ubyte" in line and "truncated" in line for line in logs)
    mnist = load_mnist(store, ref)
    np.testing.assert_array_equal(mnist.x_train, synthetic.arrays[name])


def test_second_fetch_uses_the_store_and_touches_no_source(synthetic, store, mirrors):
    server = mirrors(gz_files(synthetic))
    fetch_mnist(store, sources=[HttpMirror(server.url)], files=synthetic.specs, log=lambda _: None)
    asked = len(server.requests)

    class Untouchable:
        label = "untouchable"

        def get(self, name: str, limit: int | None = None) -> bytes:
            raise AssertionError("a source was asked although the store holds every file")

    ref = fetch_mnist(store, sources=[Untouchable()], files=synthetic.specs, log=lambda _: None)
    assert ref.sources == ["store"]
    assert len(server.requests) == asked


def test_a_corrupted_object_in_the_store_is_fetched_again(synthetic, store, mirrors):
    server = mirrors(gz_files(synthetic))
    fetch_mnist(store, sources=[HttpMirror(server.url)], files=synthetic.specs, log=lambda _: None)
    victim = synthetic.specs[0]
    store.write_bytes(store.object_path(victim.sha256), b"bit rot")
    fetch_mnist(store, sources=[HttpMirror(server.url)], files=synthetic.specs, log=lambda _: None)
    assert store.digest(store.object_path(victim.sha256)) == (victim.sha256, victim.size)


def test_directory_source_takes_raw_and_gz_files(synthetic, store, tmp_path):
    directory = tmp_path / "mixed"
    directory.mkdir()
    for i, (name, raw) in enumerate(synthetic.raw.items()):
        if i % 2:
            (directory / f"{name}.gz").write_bytes(gzip.compress(raw))
        else:
            (directory / name).write_bytes(raw)
    ref = fetch_mnist(store, sources=[DirectorySource(directory)], files=synthetic.specs, log=lambda _: None)
    assert ref.sources == [f"directory {directory}"]
    assert len(load_mnist(store, ref).y_test) == len(synthetic.arrays["t10k-labels-idx1-ubyte"])


def test_every_source_failing_gives_one_error_naming_each_source(synthetic, store, mirrors, tmp_path):
    truncated = {f"{n}.gz": gzip.compress(raw[: len(raw) // 2]) for n, raw in synthetic.raw.items()}
    bad = mirrors(truncated)
    missing_dir = tmp_path / "nowhere"
    unreachable = "http://127.0.0.1:9/"  # discard port: connection refused at once

    with pytest.raises(MnistUnavailable) as info:
        fetch_mnist(
            store,
            sources=[DirectorySource(missing_dir), HttpMirror(unreachable, timeout=2), HttpMirror(bad.url)],
            files=synthetic.specs,
            log=lambda _: None,
        )
    message = str(info.value)
    assert f"directory {missing_dir}: not a directory" in message
    assert f"mirror {unreachable}: cannot reach it" in message
    assert f"mirror {bad.url}: train-images-idx3-ubyte is" in message and "truncated" in message
    assert "MNIST_SOURCE" in message
    assert stored_objects(store) == set()


def test_wrong_file_under_the_right_name_is_named_in_the_error(synthetic, store, tmp_path):
    """A label file served where the image file should be fails verification, never reaching the parser."""
    directory = synthetic.write_raw(tmp_path / "swapped")
    (directory / "train-images-idx3-ubyte").write_bytes(synthetic.raw["train-labels-idx1-ubyte"])
    with pytest.raises(MnistUnavailable, match="train-images-idx3-ubyte is .* bytes, expected"):
        fetch_mnist(store, sources=[DirectorySource(directory)], files=synthetic.specs, log=lambda _: None)


def test_loading_checks_the_stored_bytes_again(synthetic, store):
    ref = fetch_mnist(store, sources=[DirectorySource(synthetic.write_raw())], files=synthetic.specs, log=lambda _: None)
    path = ref.files["t10k-labels-idx1-ubyte"].key
    store.write_bytes(path, b"\x00" * 20)
    with pytest.raises(DamagedMnist, match="no longer matches its SHA-256"):  # the night fetches it again
        load_mnist(store, ref)
