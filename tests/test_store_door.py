"""The one door to a local store (storage/door.py): links, pipes and folders planted where the pipeline reads or
writes change nothing outside the store, block nothing, and stop nothing.

Each attack is made on a real local store, as whoever can write into it would make it."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from storage import Store
from storage.door import NotARegularFile
from storage.tables import read_table, write_table
from tests.conftest import sample_frames, with_mnist


@pytest.fixture(autouse=True)
def no_hang():
    """A pipe that blocked would hang the suite: fail instead, after a minute."""

    def hung(*_):
        raise TimeoutError("blocked on a planted pipe")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder of another user's: nothing the store does may read or change it."""
    folder = tmp_path / "home-of-someone-else"
    folder.mkdir()
    (folder / ".bashrc").write_text("# theirs\n")
    (folder / "history.json").write_text("[]")
    return folder


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def plant(store: Store, key: str) -> Path:
    path = Path(store.root) / key
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def test_a_link_at_any_component_is_not_followed_a_read_is_a_miss_and_a_write_stays_inside(store, outside):
    before = snapshot(outside)
    os.symlink(outside, plant(store, "reports"))  # a folder component
    os.symlink(outside / ".bashrc", plant(store, "models/k/model.json"))  # the last component
    assert not store.exists("reports/.bashrc") and not store.exists("models/k/model.json")
    with pytest.raises(NotARegularFile):
        store.read_bytes("reports/.bashrc")
    with pytest.raises(NotARegularFile):
        store.read_bytes("models/k/model.json")
    store.write_text("reports/run1/index.md", "report")  # the link is set aside, a real folder takes its place
    store.write_text("models/k/model.json", "{}")  # the rename replaces the link itself
    assert snapshot(outside) == before
    assert store.read_bytes("reports/run1/index.md") == b"report" and store.read_bytes("models/k/model.json") == b"{}"
    assert [p.name for p in Path(store.root).iterdir() if p.name.startswith(".damaged-reports")]


def test_a_pipe_where_a_file_or_lock_is_expected_blocks_nothing(store):
    for key in ("champion.json", "locks/champion.lock", "batches/abc/batch.json"):
        os.mkfifo(plant(store, key))
    assert not store.exists("champion.json")  # a miss, read without waiting for a writer
    with pytest.raises(NotARegularFile):
        store.read_bytes("champion.json", limit=1 << 20)
    said: list[str] = []
    store.warn = said.append
    with store.lock("champion"):  # the pipe is set aside, a lock file made
        store.write_text("champion.json", "{}")  # the rename replaces the pipe
    assert store.read_bytes("champion.json") == b"{}" and any("not a lock file" in line for line in said)
    assert [e["type"] for e in store.fs.ls(store.path("batches/abc"), detail=True)] == ["other"]


def test_a_folder_where_a_file_is_written_is_set_aside(store):
    plant(store, "champion.json/inner").mkdir(parents=True)
    assert store.exists("champion.json")  # a folder: reading it as a file is refused, not hung on
    with pytest.raises(NotARegularFile):
        store.read_bytes("champion.json")
    store.write_text("champion.json", '{"ok": 1}')
    assert store.read_bytes("champion.json") == b'{"ok": 1}'
    assert [p for p in Path(store.root).iterdir() if p.name.startswith(".damaged-champion.json")]


def test_table_discovery_skips_a_partition_linked_out_of_the_store_and_a_planted_pipe(store, outside):
    frames = sample_frames(seed=1)
    write_table(store, "runs", "run-a", frames["runs"])
    elsewhere = outside / "run_id=evil"
    elsewhere.mkdir()
    (elsewhere / "part-0.parquet").write_bytes(Path(store.path(store.table_file("runs", "run-a"))).read_bytes())
    os.symlink(elsewhere, plant(store, "tables/runs/run_id=evil"))
    os.mkfifo(plant(store, "tables/runs/run_id=pipe/part-0.parquet"))
    rows = read_table(store, "runs")
    assert set(rows["run_id"]) == {"run-a"} and len(rows) == len(frames["runs"])


@pytest.mark.slow
def test_training_writes_its_checkpoints_and_history_through_the_store_never_through_a_planted_link(
    tmp_path, outside, mnist_store
):
    """Keras' backup folder and the epoch recorder's history.json live in a private temporary folder; the store only
    sees copies written through its door. Links planted at the checkpoint folder and a pipe at the training lock
    change nothing outside and the training completes."""
    from tasks.data.fetch import fetch_mnist
    from tasks.training.train import TrainConfig, train_model, training_key

    store = with_mnist(Store(tmp_path / "store"), mnist_store)
    dataset = fetch_mnist(store, sources=[], log=lambda _: None)
    config = TrainConfig(epochs=2, train_limit=500, seed=5)
    key = training_key(dataset, config)
    before = snapshot(outside)
    os.symlink(outside, plant(store, f"checkpoints/{key}"))
    os.mkfifo(plant(store, f"locks/train-{key}.lock"))
    said: list[str] = []
    store.warn = said.append
    ref = train_model(store, dataset, config, log=said.append)
    assert snapshot(outside) == before, "a file outside the store was written"
    assert ref.epochs == 2 and store.exists(ref.file_key)
    history = pd.read_parquet(store.path(ref.history_key))
    assert list(history["epoch"]) == [1, 2] and np.isfinite(history["val_accuracy"]).all()
    assert not store.exists(f"checkpoints/{key}/latest.json")  # dropped once the model is stored


def test_a_small_partition_that_decodes_to_millions_of_rows_is_skipped_before_it_is_read(store):
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_table(store, "runs", "run-a", sample_frames(seed=2)["runs"])
    bomb = pa.table({"model_key": pa.array(["x"] * 2_000_000)})  # dictionary-encoded: a few KiB on disk
    path = plant(store, "tables/runs/run_id=bomb/part-0.parquet")
    pq.write_table(bomb, path, compression="zstd")
    assert path.stat().st_size < 200_000
    said: list[str] = []
    store.warn = said.append
    rows = read_table(store, "runs")
    assert set(rows["run_id"]) == {"run-a"}
    assert any("run_id=bomb" in line and "2000000 rows" in line for line in said), said


@pytest.mark.parametrize("planted", ["pipe", "folder", "link"])
def test_an_odd_object_at_champion_json_is_a_damaged_pointer_not_a_stopped_night(store, tmp_path, planted):
    from tasks.champion.pointer import find_champion

    path = plant(store, "champion.json")
    if planted == "pipe":
        os.mkfifo(path)
    elif planted == "folder":
        path.mkdir()
    else:
        (tmp_path / "theirs.json").write_text("{}")
        os.symlink(tmp_path / "theirs.json", path)
    lookup = find_champion(store)  # no champion was ever promoted here: none, and the night goes on
    assert lookup.champion is None and lookup.model is None


def test_a_folder_like_entry_in_a_checkpoint_on_s3_is_a_damaged_checkpoint_not_a_failed_training(s3_server, tmp_path):
    import s3fs

    from tasks.training.checkpoints import pull_checkpoint, push_checkpoint

    s3_server.bucket("mnist")
    store = Store("s3://mnist/store")
    said: list[str] = []
    store.warn = said.append
    work = tmp_path / "work"
    work.mkdir()
    (work / "history.json").write_text("[]")
    push_checkpoint(store, "k", 2, work)
    fs = s3fs.S3FileSystem(endpoint_url=s3_server.endpoint, key="testing", secret="testing")
    (folder,) = [p for p in fs.ls("mnist/store/checkpoints/k") if not p.endswith("latest.json")]
    fs.pipe(f"{folder}/nested/inner.bin", b"x")  # the checkpoint folder now lists a folder-like entry
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    assert pull_checkpoint(store, "k", fresh) is None  # training starts from epoch 0 instead of failing
    assert list(fresh.iterdir()) == [] and any("checkpoint" in line and "not a file" in line for line in said), said


def test_a_link_or_file_at_prefect_results_sends_no_record_outside_and_stops_no_step(store, outside):
    from flows.night.results import CheckedStoreResults, UntrustedRecord

    before = snapshot(outside)
    store.write_text("x", "1")
    os.symlink(outside, plant(store, "prefect-results"))
    results = CheckedStoreResults(basepath=store.results_dir())
    results.write_path("train-abc", b"{}")  # the link is set aside; the record lands inside the store
    assert snapshot(outside) == before and (Path(store.root) / "prefect-results" / "train-abc").is_file()
    with pytest.raises(UntrustedRecord):  # read through the door, then checked as before
        results.read_path("train-abc")
    os.remove(Path(store.root) / "prefect-results" / "train-abc")
    os.rmdir(Path(store.root) / "prefect-results")
    plant(store, "prefect-results").write_text("a file where the folder belongs")
    store.remove(store.result_record("train-abc"))  # what forgetting a stale record does: nothing there, no error
    CheckedStoreResults(basepath=store.results_dir()).write_path("train-abc", b"{}")


def test_a_folder_at_any_file_a_reference_names_is_a_miss(tmp_path, mnist_store):
    """Folders planted at a model's file, its record and a downloaded MNIST object: the lookups that decide
    whether a step runs answer "not there", they do not raise."""
    from tasks.champion.pointer import intact_model
    from tasks.data.fetch import fetch_mnist, stored_dataset
    from tasks.training.train import stored_model
    from tests.conftest import model_ref

    store = with_mnist(Store(tmp_path / "store"), mnist_store)
    dataset = fetch_mnist(store, sources=[], log=lambda _: None)
    ref = model_ref(key="k1", file_key="models/k1/model-1.keras")
    store.write_text(store.model_info_file("k1"), ref.model_dump_json())
    plant(store, "models/k1/model-1.keras/inner").mkdir(parents=True)
    assert stored_model(store, "k1") is None
    assert intact_model(store, "k1")[0] is None
    plant(store, "models/k2/model.json/inner").mkdir(parents=True)
    assert intact_model(store, "k2")[0] is None and stored_model(store, "k2") is None
    (name, first), *_ = dataset.files.items()
    os.remove(store.path(first.key))
    plant(store, first.key + "/inner").mkdir(parents=True)
    assert stored_dataset(store) is None  # the download is fetched again instead


def test_a_folder_at_a_cache_record_or_a_checkpoint_pointer_is_set_aside_or_a_miss(store):
    """Folders planted at keys every deployment shares (the fetch step's cache record) or a training's
    checkpoint pointer: forgetting the record sets the folder aside; the pointer is damaged, training starts afresh."""
    from tasks.training.checkpoints import _pointer

    said: list[str] = []
    store.warn = said.append
    record = store.result_record("fetch-0c36ee5df878cc60cfa15d1c190dce40-a085d7dd")
    plant(store, record + "/inner").mkdir(parents=True)
    store.remove(record)
    assert not store.exists(record) and any("is a folder, not a file: set aside" in line for line in said)
    plant(store, "checkpoints/k/latest.json/inner").mkdir(parents=True)
    assert _pointer(store, "k") is None and any("checkpoint pointer" in line for line in said)


def test_a_name_too_long_for_the_filesystem_or_not_utf8_stops_no_lookup(store, tmp_path):
    from storage.keys import UnsafeKey, confine_key
    from tasks.training.train import stored_model
    from tests.conftest import model_ref

    with pytest.raises(UnsafeKey, match="longer than 255 bytes"):
        confine_key("models/" + "a" * 300 + "/model.keras")
    store.write_text(store.model_info_file("k1"), model_ref(key="k1", file_key="models/k1/" + "b" * 250).model_dump_json())
    assert stored_model(store, "k1") is None
    write_table(store, "promotions", "run-a", sample_frames(seed=4)["promotions"])
    os.makedirs(os.path.join(store.root.encode(), b"tables/promotions/run_id=\xff"))
    with open(os.path.join(store.root.encode(), b"tables/promotions/\xff.parquet"), "wb") as f:
        f.write(b"not parquet")
    assert set(read_table(store, "promotions")["run_id"]) == {"run-a"}


def test_a_hard_link_planted_at_a_file_the_store_writes_is_not_written_through(store, outside):
    target = outside / ".bashrc"
    store.write_text("prefect-results/record", "first")
    os.remove(store.path("prefect-results/record"))
    os.link(target, store.path("prefect-results/record"))
    with store.fs.open(store.path("prefect-results/record"), "wb") as f:  # as Prefect's result storage writes
        f.write(b'{"overwritten": true}')
    assert target.read_text() == "# theirs\n" and store.read_bytes("prefect-results/record") == b'{"overwritten": true}'


def test_a_stored_frame_that_decodes_to_millions_of_rows_is_refused_before_it_is_read(store):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from storage import DamagedArtifact, sha256_bytes
    from storage.tables import read_frame

    path = plant(store, "evaluations/k/predictions.parquet")
    pq.write_table(pa.table({"true_label": pa.array([1] * 2_000_000, pa.int8())}), path, compression="zstd")
    digest = sha256_bytes(path.read_bytes())  # a writer of the store can rewrite the sidecar's digest too
    for sha256 in (None, digest):
        with pytest.raises(DamagedArtifact, match="2000000 rows"):
            read_frame(store, "evaluations/k/predictions.parquet", sha256)


# ---- review 7 (2026-12-07): the shape of what a writer plants --------------------------------------------------------
@pytest.fixture
def plant_deep(tmp_path: Path):
    """Plants a folder ``d/d/…`` ``depth`` levels deep in ``folder`` (made as a writer makes it, one ``mkdirat`` a
    level: no path that long can be named at once), a file ``f`` and a link to ``/`` every 100 levels. What is left
    is cut into pieces of 400 levels beside the store afterwards: pytest's cleanup (``shutil.rmtree``) recurses."""
    planted: list[Path] = []

    def make(folder: Path, depth: int = 1500) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        planted.append(folder)
        fd = os.open(folder, os.O_RDONLY)
        for level in range(depth):
            os.mkdir("d", dir_fd=fd)
            child = os.open("d", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = child
            if level % 100 == 99:
                os.close(os.open("f", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))
                os.symlink("/", "root", dir_fd=fd)
        os.close(fd)
        return folder

    yield make
    top = os.open(tmp_path, os.O_RDONLY)
    for number, folder in enumerate(planted):
        if not os.path.isdir(folder):
            continue
        fd, level = os.open(folder, os.O_RDONLY), 0
        while "d" in os.listdir(fd):
            level += 1
            if level % 400 == 0:
                os.rename("d", f"cut-{number}-{level}", src_dir_fd=fd, dst_dir_fd=top)
                os.close(fd)
                fd = os.open(f"cut-{number}-{level}", os.O_RDONLY, dir_fd=top)
                continue
            child = os.open("d", os.O_RDONLY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = child
        os.close(fd)
    os.close(top)


def test_a_checkpoint_folder_planted_thousands_of_levels_deep_is_removed_and_the_training_goes_on(store, outside, plant_deep):
    """Review 7, f7: the door removed a folder by recursing once per level, so a folder 1 500 levels deep planted in
    ``checkpoints/<key>/`` raised ``RecursionError`` out of ``drop_checkpoint`` and failed the train step. It is
    removed without recursion, with a bounded number of folders open, and no link in it is followed."""
    from tasks.training.checkpoints import drop_checkpoint

    key = "a" * 32
    store.write_text(store.checkpoint_key(key, "latest.json"), "{}")
    deep = plant_deep(Path(store.path(store.checkpoint_key(key))))
    os.symlink(outside, deep / "elsewhere")
    before = snapshot(outside)
    drop_checkpoint(store, key)
    assert not os.path.lexists(deep) and os.listdir(store.path("checkpoints")) == []
    assert snapshot(outside) == before and os.path.isdir("/etc")


def test_a_table_folder_planted_thousands_of_levels_deep_is_a_skipped_entry_not_a_failed_lookup(store, outside, plant_deep):
    """Review 7, f8: pyarrow's discovery walked ``tables/promotions`` recursively, so a folder 1 500 levels deep under
    ``run_id=x/`` (with ``champion.json`` missing) raised ``RecursionError`` out of ``read_table`` and
    ``find_champion``: ingest and the gate failed. Only the layout the store writes is listed now; anything else in
    it is skipped with one warning, and the partitions beside it are read."""
    from tasks.champion.pointer import find_champion

    frames = sample_frames(seed=1)
    write_table(store, "promotions", "run-a", frames["promotions"])
    plant_deep(Path(store.path(store.table_dir("promotions"), "run_id=x")))
    plant_deep(Path(store.path(store.table_dir("promotions"), "deep")), depth=50)
    plant(store, "tables/promotions/stray.parquet").write_bytes(b"not ours")
    os.symlink(outside, plant(store, "tables/promotions/run_id=y/part-0.parquet"))
    said: list[str] = []
    store.warn = said.append
    rows = read_table(store, "promotions")
    assert set(rows["run_id"]) == {"run-a"} and len(rows) == len(frames["promotions"])
    assert len(said) == 1 and said[0].startswith("Skipping 4 entries of table 'promotions' that are not partitions"), said
    assert find_champion(store).champion is None  # a lookup, not an exception


def test_a_prune_lists_a_folder_planted_thousands_of_levels_deep_without_recursion(store, plant_deep):
    """Review 7: fsspec's ``walk`` (under ``find``, which a prune lists a folder with) recursed once per level; the
    door's walks iteratively and stops ``WALK_DEPTH`` levels down, so a planted deep folder is content that stays,
    not a failed prune."""
    from storage import retention
    from storage.door import WALK_DEPTH

    key = "b" * 32
    store.write_text(store.checkpoint_key(key, "latest.json"), "{}")
    plant_deep(Path(store.path(store.checkpoint_key(key))))
    found = store.fs.find(store.path(store.checkpoint_key(key)), withdirs=True)
    assert max(p.count("/d") for p in found) == WALK_DEPTH
    plan = retention.plan(store, retention.Keep())
    (doomed,) = [d for d in plan.doomed if d.kind == "checkpoints"]
    assert [f.key for f in doomed.files] == [store.checkpoint_key(key, "latest.json")]
    assert retention.remove(store, plan) == [store.checkpoint_key(key, "latest.json")]
    assert os.path.isdir(store.path(store.checkpoint_key(key, "d")))  # deeper than a walk goes: left as it is
