"""Protections that an earlier test let pass even with the protection removed: each test here fails without its
protection. Every one uses real stores (a local folder, and moto's S3 server for the conditional writes), real
references and real tables; nothing of the code under test is mocked.

1. a deployed run's ``mnist_source`` is judged against ``MNIST_SOURCE`` *and* ``MNIST_ALLOWED_SOURCES``, resolved;
2. the champion pointer is written on the version read: a rival write between read and write is a
   ``WriteConflict``, and the gate and the operator's rollback decide again on what the rival left;
3. an evaluation's predictions or a plot whose bytes changed after its sidecar was written is not reused,
   and ``read_frame`` refuses bytes that do not match their digest;
4. a sidecar over 1 MiB is refused unparsed, one just at the limit is read;
5. a ``promotions`` row naming a model (or a model naming a file) outside the store is never a fallback champion,
   and no file outside the store is read for it.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flows.night.confinement import NotServed, check_deployed_run
from flows.night.params import PipelineParameters
from storage import DamagedArtifact, Store, StoreError, WriteConflict, sha256_bytes
from storage.tables import PREDICTIONS_FILE, read_frame, write_frame, write_table
from tasks.champion.gate import GateRules
from tasks.champion.pointer import first_intact, intact_model, write_pointer
from tasks.champion.promotion import Champion, find_champion, gate, promotions, read_pointer, rollback
from tasks.data.fetch import DatasetRef
from tasks.data.splits import SLICE_SELECTION, SLICE_TEST
from tasks.evaluation.evaluate import EvaluationRef, predictions_frame, stored_evaluation
from tasks.evaluation.plots import FIGURES, PlotsRef, stored_plots
from tasks.training.model import ModelRef
from tasks.training.train import stored_model
from tests.conftest import S3Server, model_ref, sample_frames
from tests.conftest import stand_in as stand_in_model

MIB = 1 << 20  # the documented sidecar limit, spelled here so that a changed constant is caught, not followed
DATASET = DatasetRef(sha256="d" * 64, files={}, sources=["store"])  # not read: every prediction is stored
PROMOTE = GateRules(min_balanced_accuracy=0.0, max_regression=1.0, max_digit_drop=1.0)


# ---- 1. MNIST_ALLOWED_SOURCES ---------------------------------------------------------------------------------------
@pytest.fixture
def sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """A worker whose own source is ``idx`` and whose allow-list names ``team``, ``archive`` and a link ``alias``
    (to ``aliased``); ``elsewhere`` is a directory of the worker's that no setting names."""
    dirs = {name: tmp_path / name for name in ("idx", "team", "archive", "aliased", "elsewhere")}
    for folder in dirs.values():
        folder.mkdir()
    dirs["alias"] = tmp_path / "alias"
    dirs["alias"].symlink_to(dirs["aliased"])
    monkeypatch.setenv("MNIST_STORE", str(tmp_path / "served"))
    monkeypatch.setenv("MNIST_SOURCE", str(dirs["idx"]))
    monkeypatch.setenv("MNIST_ALLOWED_SOURCES", f"{dirs['team']}, {dirs['archive']},{dirs['alias']}")
    for name in ("MNIST_ALLOWED_STORES", "MNIST_ALLOW_FORCE_PROMOTE", "MNIST_ALLOW_LOOSER_RULES"):
        monkeypatch.delenv(name, raising=False)
    return dirs


@pytest.mark.parametrize("own_source", [True, False], ids=["with-MNIST_SOURCE", "allow-list-alone"])
def test_a_source_in_mnist_allowed_sources_passes_resolved_and_one_not_listed_is_refused(sources, monkeypatch, own_source):
    """The allow-list is a second way in, not a decoration: a directory named only there passes (with or without the
    worker's own ``MNIST_SOURCE``), a listed link stands for its target, and what no setting names is refused."""
    if not own_source:
        monkeypatch.delenv("MNIST_SOURCE")
    allowed = ["team", "archive", "aliased", "alias"] + (["idx"] if own_source else [])
    for name in allowed:
        checked = check_deployed_run(PipelineParameters(mnist_source=str(sources[name])))
        assert checked.mnist_source == os.path.realpath(sources[name]), name
    refused = [sources["elsewhere"], sources["team"] / ".." / "elsewhere", sources["team"].parent]
    refused += [] if own_source else [sources["idx"]]
    for path in refused:
        with pytest.raises(NotServed, match="mnist_source=.*MNIST_SOURCE and \\$MNIST_ALLOWED_SOURCES"):
            check_deployed_run(PipelineParameters(mnist_source=str(path)))


def test_a_link_to_an_allowed_source_passes_as_its_target_and_a_link_elsewhere_is_refused(sources, tmp_path):
    """What the run reads is the directory that was checked: the resolved path is returned, so a link swapped
    after the check cannot move the run; a link to a directory no setting names is refused."""
    link = tmp_path / "run-form-link"
    link.symlink_to(sources["archive"])
    checked = check_deployed_run(PipelineParameters(mnist_source=str(link)))
    assert checked.mnist_source == str(sources["archive"].resolve())
    link.unlink()
    link.symlink_to(sources["elsewhere"])  # swapped after the check: the checked parameters do not follow it
    assert checked.mnist_source == str(sources["archive"].resolve())
    with pytest.raises(NotServed, match="mnist_source="):
        check_deployed_run(PipelineParameters(mnist_source=str(link)))


# ---- 2. the champion pointer: a rival write between read and write, on a real S3 endpoint ---------------------------
@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory):
    """moto's real S3 server (conftest's ``S3Server``), started once for this module's S3 tests: a start costs
    about ten seconds on two shared cores. Each test uses a bucket of its own."""
    import s3fs

    server = S3Server(tmp_path_factory.mktemp("moto"))
    with pytest.MonkeyPatch.context() as env:
        server.use(env)
        yield server
    server.stop()
    s3fs.S3FileSystem.clear_instance_cache()


def no_lock(_name: str):
    """Two machines with nothing in common: only the conditional write keeps them apart."""
    return contextlib.nullcontext()


class RivalFirst(Store):
    """A real store whose next write of ``champion.json`` is preceded by ``rival()`` (another machine's write,
    landing exactly between this writer's read and its write); it notes each version of the pointer it reads
    and each ``WriteConflict`` it gets. Reads and writes are the real ``Store``'s."""

    def __init__(self, url: str) -> None:
        super().__init__(url, distributed_lock=no_lock)
        self.rival = None
        self.pointer_reads: list[str | None] = []
        self.conflicts = 0

    def read_versioned(self, key, limit=MIB):
        data, version = super().read_versioned(key, limit)
        if key == self.champion_file():
            self.pointer_reads.append(version)
        return data, version

    def write_if_unchanged(self, key, data, version):
        if key == self.champion_file() and self.rival is not None:
            rival, self.rival = self.rival, None
            rival()
        try:
            super().write_if_unchanged(key, data, version)
        except WriteConflict:
            self.conflicts += 1
            raise


N = 200
LABELS = np.arange(N) % 10


def stand_in(store: Store, key: str, correct: float) -> tuple[ModelRef, EvaluationRef]:
    """A model (bytes with a digest) whose stored predictions are right on the first ``correct`` share of the images."""
    predicted = np.where(np.arange(N) < correct * N, LABELS, (LABELS + 1) % 10)
    slices = (SLICE_SELECTION, SLICE_TEST)
    return stand_in_model(
        store, key, dict.fromkeys(slices, LABELS), dict.fromkeys(slices, predicted), DATASET, np.arange(0, N, 2)
    )


def two_machines(moto: S3Server, bucket: str, names: str = "abc") -> tuple[RivalFirst, Store, dict]:
    """A worker and a laptop on one bucket; models ``names`` (of a, b, c) stored; a then b promoted by the worker's gate."""
    url = moto.bucket(bucket) + "/store"
    worker, laptop = RivalFirst(url), Store(url, distributed_lock=no_lock)
    assert worker.conditional_writes
    models = {name: stand_in(worker, name, {"a": 0.90, "b": 0.92, "c": 0.95}[name]) for name in names}
    gate(worker, DATASET, *models["a"], PROMOTE, "run-a", log=lambda _: None)
    gate(worker, DATASET, *models["b"], PROMOTE, "run-b", log=lambda _: None)
    assert read_pointer(laptop).model_key == "b"
    return worker, laptop, models


@pytest.mark.parametrize("rival_writes", ["another-champion", "the-same-champion"])
def test_a_pointer_write_after_a_rival_write_is_a_conflict_on_s3(moto, rival_writes):
    """The write is conditional on the version read (If-Match). Even a rival that rewrites the very champion read
    (a gate confirming it) makes a new version, since every write carries a new revision."""
    worker, laptop, _ = two_machines(moto, f"direct-{rival_writes}", "ab")
    lookup = find_champion(worker)
    assert lookup.champion.model_key == "b" and lookup.version is not None
    if rival_writes == "another-champion":
        rival = rollback(laptop)["challenger_model_key"]  # the laptop's whole read-decide-write: a becomes champion
    else:
        rival = write_pointer(laptop, lookup.champion, lookup.version).model_key  # b again, a new revision
    written_by_rival = laptop.read_bytes(laptop.champion_file())
    with pytest.raises(WriteConflict, match="was replaced by another writer after it was read"):
        write_pointer(worker, lookup.champion.model_copy(update={"reason": "stale"}), lookup.version)
    assert laptop.read_bytes(laptop.champion_file()) == written_by_rival  # the rival's decision stands, untouched
    assert read_pointer(laptop).model_key == rival


def test_a_rollback_raced_by_a_gate_decides_again_on_the_rivals_pointer(moto):
    """Rolling back from b would choose a; a gate on another machine makes c champion between the rollback's read
    and its write. The rollback must lose the write, read again, and roll back from c (to b): the pointer is the
    last decision, and that decision names c, the rival's champion, as the one it replaced."""
    worker, laptop, models = two_machines(moto, "rollback-race")
    seen = {}

    def rival_gate() -> None:
        gate(laptop, DATASET, *models["c"], PROMOTE, "run-c", log=lambda _: None)
        seen["version"] = laptop.version(laptop.champion_file())

    worker.rival = rival_gate
    reads_before = len(worker.pointer_reads)
    row = rollback(worker)
    assert worker.conflicts == 1
    reads = worker.pointer_reads[reads_before:]
    assert len(reads) == 2 and reads[1] == seen["version"] != reads[0]  # it read again, and read the rival's pointer
    assert row["champion_before_model_key"] == "c" and row["challenger_model_key"] == "b"
    history = promotions(laptop)
    last = history.iloc[-1]
    assert history["run_id"].iloc[-2] == "run-c" and pd.isna(last["run_id"])  # the rival's night kept; the rollback: none
    assert last["reason"] == "manual" and last["champion_before_model_key"] == "c" and last["challenger_model_key"] == "b"
    assert last["decided_by"] == "operator" and history["decided_by"].iloc[-2] == "gate"
    assert read_pointer(laptop).model_key == "b" == last["challenger_model_key"]
    assert read_pointer(laptop).run_id == "run-b"  # the pointer names the night that trained b, from its gate's row


REJECT = GateRules(min_balanced_accuracy=1.0)


@pytest.mark.parametrize("rules", [PROMOTE, REJECT], ids=["promoting", "rejecting"])
def test_a_gate_raced_by_a_rollback_compares_again_with_the_rivals_champion(moto, rules):
    """The gate compared c with b; a rollback on another machine makes a champion before the gate writes. The gate
    must not publish a decision about a champion that is no longer there: it compares again, with a. A rejecting
    gate writes too (it confirms the champion it compared against), or its row would name b while a is champion."""
    worker, laptop, models = two_machines(moto, f"gate-race-{rules is PROMOTE}".lower())
    worker.rival = lambda: rollback(laptop)
    reads_before = len(worker.pointer_reads)
    said: list[str] = []
    decided = gate(worker, DATASET, *models["c"], rules, "run-c", log=said.append)
    assert worker.conflicts == 1 and len(worker.pointer_reads) - reads_before == 2
    assert any("deciding again" in line for line in said)
    assert decided.promoted == (rules is PROMOTE) and decided.champion_before.model_key == "a"  # the rival's champion
    assert decided.comparison.champion_balanced_accuracy == pytest.approx(0.90)
    history = promotions(laptop)
    last = history.iloc[-1]
    assert last["run_id"] == "run-c" and last["champion_before_model_key"] == "a"
    assert history.iloc[-2]["reason"] == "manual" and history.iloc[-2]["challenger_model_key"] == "a"
    assert read_pointer(laptop).model_key == ("c" if rules is PROMOTE else "a")


# ---- 3. evaluations and plots changed after their digest ------------------------------------------------------------
@pytest.fixture
def evaluation(store: Store) -> EvaluationRef:
    """A stored evaluation (its sidecar written last, as the evaluation step does), of a stand-in model."""
    _, ref = stand_in(store, "k", 0.9)
    store.write_text(store.evaluation_info_file(ref.key), ref.model_dump_json(indent=2))
    assert stored_evaluation(store, ref.key) == ref  # intact: reused
    return ref


def another_valid_frame(store: Store, key: str) -> None:
    """Replace ``key`` with a well-formed predictions file of other values: readable, but not what was hashed."""
    frame = read_frame(store, key)
    changed = predictions_frame(
        frame["test_index"].to_numpy(),
        frame["true_label"].to_numpy(),
        np.eye(10, dtype=np.float32)[(frame["predicted_label"].to_numpy() + 3) % 10],
    )
    write_frame(store, key, PREDICTIONS_FILE, changed.assign(slice=frame["slice"]))


@pytest.mark.parametrize("which", ["balanced-sample", "test-predictions", "selection-slice"])
def test_an_evaluation_whose_predictions_changed_after_its_sidecar_is_not_reused(store, evaluation, which):
    """Every file the sidecar names is checked, not only the first: a changed one makes the evaluation a miss
    (the step runs again), and reading it through its digest raises ``DamagedArtifact``."""
    key, sha256 = {
        "balanced-sample": (evaluation.predictions_key, evaluation.predictions_sha256),
        "test-predictions": (evaluation.test_predictions_key, evaluation.test_predictions_sha256),
        "selection-slice": (
            evaluation.slice(SLICE_SELECTION).predictions_key,
            evaluation.slice(SLICE_SELECTION).predictions_sha256,
        ),
    }[which]
    assert read_frame(store, key, sha256)["test_index"].size > 0  # intact: read
    another_valid_frame(store, key)
    assert store.exists(store.evaluation_info_file(evaluation.key))
    assert stored_evaluation(store, evaluation.key) is None
    with pytest.raises(DamagedArtifact, match="does not match its SHA-256"):
        read_frame(store, key, sha256)


@pytest.mark.parametrize("which", ["confusion.png", "samples.png"])
def test_a_plot_whose_png_changed_after_plots_json_is_not_reused(store, which):
    """``stored_plots`` checks every figure against its digest: one changed PNG makes the plots a miss."""
    key, files, digests = "p" * 32, {}, {}
    for name in FIGURES:
        png = b"\x89PNG\r\n\x1a\n" + name.encode() * 50
        files[name] = store.unique(store.plots_file(key, name))
        digests[name] = sha256_bytes(png)
        store.write_bytes(files[name], png)
    ref = PlotsRef(key=key, file_keys=files, sha256=digests, most_confused=(4, 9))
    store.write_text(store.plots_file(key, "plots.json"), ref.model_dump_json(indent=2))
    assert stored_plots(store, key) == ref
    original = store.read_bytes(files[which])
    store.write_bytes(files[which], original[:-1] + bytes([original[-1] ^ 1]))  # same size, one bit
    assert stored_plots(store, key) is None


# ---- 4. the 1 MiB sidecar limit -------------------------------------------------------------------------------------
def padded(text: str, size: int) -> bytes:
    """``text`` (a JSON object) with spaces before its closing brace, ``size`` bytes in all: still valid JSON."""
    assert text.endswith("}") and len(text) < size
    return (text[:-1] + " " * (size - len(text)) + "}").encode()


def intact(store: Store, key: str) -> ModelRef:
    """A model in ``store`` whose file matches its record: bytes with a digest, no network trained."""
    blob = key.encode() * 64
    store.write_bytes(store.model_file(key), blob)
    ref = model_ref(key=key, file_key=store.model_file(key), sha256=sha256_bytes(blob), history_key=store.history_file(key))
    store.write_text(store.model_info_file(key), ref.model_dump_json())
    return ref


SIZES = [(MIB - 1, True), (MIB, True), (MIB + 1, False), (2 * MIB, False)]


@pytest.mark.parametrize(("size", "accepted"), SIZES, ids=["limit-1", "limit", "limit+1", "2MiB"])
def test_a_model_json_over_one_mib_is_refused_and_one_at_the_limit_is_read(store, size, accepted):
    """A model's sidecar is read with the limit: over it, the reference is not parsed (a miss, reported); up to it,
    the same reference of the right shape is reused."""
    ref = intact(store, "k")
    store.write_bytes(store.model_info_file("k"), padded(ref.model_dump_json(), size))
    assert os.path.getsize(store.path(store.model_info_file("k"))) == size
    said: list[str] = []
    store.warn = said.append
    assert stored_model(store, "k") == (ref if accepted else None)
    if accepted:
        assert said == []
    else:
        (line,) = said
        assert f"is larger than the {MIB} bytes expected of it" in line and store.location(store.model_info_file("k")) in line


@pytest.mark.parametrize(("size", "accepted"), SIZES, ids=["limit-1", "limit", "limit+1", "2MiB"])
def test_a_champion_json_over_one_mib_is_a_damaged_pointer_and_one_at_the_limit_is_the_champion(store, size, accepted):
    """The pointer is read with the limit too: over it, it is a damaged pointer (reported, not parsed); up to it,
    a pointer of the right shape names the champion."""
    ref = intact(store, "k")
    champion = Champion(
        model_key="k",
        sha256=ref.sha256,
        run_id="run-1",
        balanced_accuracy=0.9,
        test_accuracy=0.9,
        promoted_at=datetime(2026, 12, 1, 2, tzinfo=UTC),
        reason="first champion",
        revision="r" * 32,
    )
    store.write_bytes(store.champion_file(), padded(champion.model_dump_json(), size))
    lookup = find_champion(store)
    if accepted:
        assert lookup.champion == champion and lookup.model == ref and lookup.problem is None
    else:
        assert lookup.champion is None and lookup.model is None
        assert f"is larger than the {MIB} bytes expected of it" in lookup.problem


def test_read_bytes_with_a_limit_reads_up_to_it_and_refuses_one_byte_more(store):
    """The bound every sidecar read relies on: exactly ``limit`` bytes are read, one more is refused unread."""
    store.write_bytes("x/at-limit", b"a" * 100)
    store.write_bytes("x/over", b"a" * 101)
    assert store.read_bytes("x/at-limit", limit=100) == b"a" * 100
    with pytest.raises(StoreError, match="larger than the 100 bytes expected of it: not read"):
        store.read_bytes("x/over", limit=100)


# ---- 5. keys in promotions rows -------------------------------------------------------------------------------------
def promoted_row(key: str, run_id: str, minute: int) -> pd.DataFrame:
    """One ``promotions`` row making model ``key`` champion, as the gate writes it (tests/test_champion.py's shape)."""
    row = sample_frames(0)["promotions"].iloc[0].to_dict()
    return pd.DataFrame([row | {"challenger_model_key": key, "decided_at": datetime(2026, 12, 1, 2, minute, tzinfo=UTC)}])


def unread(path: Path) -> Path:
    """Set ``path``'s access time far in the past: a read of its bytes moves it (relatime), a stat or open does not."""
    os.utime(path, (0, time.time()))
    return path


def reads_are_visible(tmp_path: Path) -> bool:
    """Whether this filesystem records reads in the access time (a ``noatime`` mount does not)."""
    probe = unread(tmp_path / "atime-probe")
    probe.read_bytes()
    return os.stat(probe).st_atime != 0


@pytest.fixture
def planted(tmp_path: Path, store: Store) -> dict[str, Path]:
    """A model of an attacker's next to the store (tmp_path/outside), whose record would pass every check if it
    were read: it names a file inside the store with that file's real digest; and a model file outside."""
    (tmp_path / "atime-probe").write_bytes(b"probe")
    outside = tmp_path / "outside"
    outside.mkdir()
    store.write_bytes("models/planted/model.keras", b"planted weights")
    record = model_ref(key="planted", file_key="models/planted/model.keras", sha256=sha256_bytes(b"planted weights"))
    (outside / "model.json").write_text(record.model_dump_json())
    (outside / "model.keras").write_bytes(b"outside weights")
    return {"record": unread(outside / "model.json"), "weights": unread(outside / "model.keras")}


def assert_not_read(tmp_path: Path, planted: dict[str, Path]) -> None:
    if reads_are_visible(tmp_path):
        for path in planted.values():
            assert os.stat(path).st_atime == 0, f"{path} outside the store was read"


BAD_MODEL_KEYS = ["../../outside", "{outside}", "s3://other-bucket/x"]


@pytest.mark.parametrize("bad", BAD_MODEL_KEYS, ids=["dotdot", "absolute", "other-bucket"])
def test_a_candidate_from_history_naming_a_model_outside_the_store_is_skipped(store, tmp_path, planted, bad):
    """``first_intact`` is what turns history into a fallback champion: a candidate whose model key leaves the store
    (as a planted row would name it) is refused before any path is built, and the next intact one is used."""
    bad = bad.format(outside=tmp_path / "outside")
    good = intact(store, "good")
    ref, why = intact_model(store, bad)
    assert ref is None and "its model key is refused" in why
    candidates = [
        Champion.model_construct(model_key=bad, sha256="", run_id="run-bad", balanced_accuracy=1.0, test_accuracy=1.0),
        Champion(
            model_key="good",
            sha256="",
            run_id="run-good",
            balanced_accuracy=0.9,
            test_accuracy=0.9,
            promoted_at=datetime(2026, 12, 1, 2, tzinfo=UTC),
            reason="first champion",
        ),
    ]
    champion, model = first_intact(store, candidates)
    assert champion.model_key == "good" and champion.sha256 == good.sha256 and model == good
    assert_not_read(tmp_path, planted)


BAD_FILE_KEYS = ["../outside/model.keras", "{outside}/model.keras", "s3://other-bucket/model.keras"]


@pytest.mark.parametrize("bad", BAD_FILE_KEYS, ids=["dotdot", "absolute", "other-bucket"])
def test_a_promoted_model_whose_record_names_a_file_outside_the_store_is_not_a_fallback_champion(store, tmp_path, planted, bad):
    """The latest promoted row names model ``evil``, whose record in the store names the model file outside it
    with that file's true digest. With the pointer gone, the fallback must skip it (its record is damaged) and
    use the earlier intact champion, without reading the file outside."""
    bad = bad.format(outside=tmp_path / "outside")
    good = intact(store, "good")
    record = model_ref(key="evil", sha256=sha256_bytes(b"outside weights"), history_key=store.history_file("evil"))
    store.write_text(store.model_info_file("evil"), json.dumps(record.model_dump() | {"file_key": bad}))
    write_table(store, "promotions", "run-good", promoted_row("good", "run-good", 0))
    write_table(store, "promotions", "run-evil", promoted_row("evil", "run-evil", 1))
    lookup = find_champion(store)
    assert lookup.fallback and lookup.champion.model_key == "good" and lookup.model == good
    assert "is missing although models were promoted before" in lookup.problem
    assert_not_read(tmp_path, planted)


@pytest.mark.parametrize("bad", BAD_MODEL_KEYS, ids=["dotdot", "absolute", "other-bucket"])
def test_a_promotions_row_naming_a_model_outside_the_store_is_skipped_by_rollback(store, tmp_path, planted, bad):
    """A row planted in ``promotions`` between two real champions: rolling back from ``current`` must go to ``good``,
    past the planted row (reported as damaged), and read nothing outside the store."""
    bad = bad.format(outside=tmp_path / "outside")
    good, current = intact(store, "good"), intact(store, "current")
    write_table(store, "promotions", "run-good", promoted_row("good", "run-good", 0))
    write_table(store, "promotions", "run-bad", promoted_row(bad, "run-bad", 1))
    write_table(store, "promotions", "run-current", promoted_row("current", "run-current", 2))
    pointer = Champion(
        model_key="current",
        sha256=current.sha256,
        run_id="run-current",
        balanced_accuracy=0.9,
        test_accuracy=0.9,
        promoted_at=datetime(2026, 12, 1, 2, 2, tzinfo=UTC),
        reason="first champion",
    )
    write_pointer(store, pointer, None)
    try:
        row = rollback(store)
    finally:
        assert_not_read(tmp_path, planted)
    assert row["challenger_model_key"] == "good" and read_pointer(store).sha256 == good.sha256
