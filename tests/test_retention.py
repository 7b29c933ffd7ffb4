"""``mnist-pipeline store prune``: what it keeps (planted references), what it removes, that a dry run changes
nothing, that it refuses rather than guess, and that a prune killed half-way loses nothing kept.

Stores are planted by hand (models as bytes with digests, their references, table rows): no network is trained.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import re
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest

from storage import Store, sha256_bytes
from storage.nights import mark_running
from storage.tables import write_table
from tasks.champion.pointer import Champion
from tasks.evaluation.evaluate import EvaluationRef, ModelPredictionsRef, SliceEvaluation
from tasks.evaluation.plots import FIGURES, PlotsRef, plots_key
from tasks.publish.report import MANIFEST, ReportFile, ReportManifest, read_manifest
from tasks.publish.retention import KEEP_REPORTS, PruneRefused, prune, prune_store
from tasks.publish.retention_rules import RetentionRules
from tests.conftest import model_ref, sample_frames

REPO = Path(__file__).resolve().parent.parent
T0 = datetime(2026, 11, 1, 2, 0, tzinfo=UTC)


def put(store: Store, key: str, data: bytes) -> str:
    store.write_bytes(key, data)
    return sha256_bytes(data)


def plant_model(store: Store, key: str) -> tuple:
    """A model, its evaluation, its predictions record and its plots, as the steps store them."""
    blob = key.encode() * 50
    model = model_ref(key=key, file_key=store.model_file(key), sha256=sha256_bytes(blob), history_key=store.history_file(key))
    put(store, model.file_key, blob)
    put(store, model.history_key, b"history of " + key.encode())
    store.write_text(store.model_info_file(key), model.model_dump_json())
    e = f"e{key}"
    sample = store.key("evaluations", e, "predictions-1.parquet")
    test = store.key("evaluations", f"p{key}", "mnist-test-1.parquet")
    evaluation = EvaluationRef(
        key=e,
        predictions_key=sample,
        model_sha256=model.sha256,
        dataset_sha256="d" * 64,
        n_per_class=1,
        seed=0,
        predictions_sha256=put(store, sample, b"sample " + key.encode()),
        test_predictions_key=test,
        test_predictions_sha256=put(store, test, b"test " + key.encode()),
        n_evaluated=10,
        test_images=10,
        test_accuracy=0.9,
        balanced_accuracy=0.9,
        slices=[
            SliceEvaluation(
                name="mnist-selection",
                predictions_key=(selection := store.slice_predictions_file(e, "mnist-selection")),
                predictions_sha256=put(store, selection, b"selection " + key.encode()),
                images=10,
                accuracy=0.9,
                balanced_accuracy=0.9,
            )
        ],
    )
    store.write_text(store.evaluation_info_file(e), evaluation.model_dump_json())
    predictions = ModelPredictionsRef(
        key=f"p{key}", model_sha256=model.sha256, file_key=test, sha256=evaluation.test_predictions_sha256
    )
    store.write_text(store.model_predictions_info_file(f"p{key}"), predictions.model_dump_json())
    p = plots_key(model, evaluation)
    pngs = {name: store.plots_file(p, name.replace(".png", "-1.png")) for name in FIGURES}
    plots = PlotsRef(
        key=p,
        file_keys=pngs,
        sha256={name: put(store, png, b"png " + key.encode()) for name, png in pngs.items()},
        most_confused=None,
    )
    store.write_text(store.plots_file(p, "plots.json"), plots.model_dump_json())
    return model, evaluation


def runs_row(run_id: str, model_key: str, evaluation_key: str, night: int) -> pd.DataFrame:
    return sample_frames(0)["runs"].assign(
        model_key=model_key, evaluation_key=evaluation_key, finished_at=T0 + timedelta(days=night)
    )


def promotions_row(challenger: str, before: str | None, decision: str, night: int) -> pd.DataFrame:
    return sample_frames(0)["promotions"].assign(
        challenger_model_key=challenger,
        champion_before_model_key=before,
        decision=decision,
        decided_at=T0 + timedelta(days=night, minutes=5),
    )


def plant_report(store: Store, run_id: str, own: dict[str, bytes], reused: dict[str, ReportFile] | None = None) -> None:
    files = {
        name: ReportFile(key=store.report_file(run_id, name), sha256=put(store, store.report_file(run_id, name), data))
        for name, data in own.items()
    }
    files |= reused or {}
    store.write_text(store.report_file(run_id, MANIFEST), ReportManifest(run_id=run_id, files=files).model_dump_json())
    store.write_text(store.report_file(run_id, "index.md"), f"# run {run_id}")


@pytest.fixture
def planted(tmp_path: Path) -> Store:
    return plant(Store(tmp_path / "store"))


def plant(store: Store) -> Store:
    """Five nights: model a promoted (night 1), b rejected (2), c promoted over a (3), d rejected (4), c unchanged
    (5, its report pointing at a figure of night 1's); a checkpoint of c (trained: may go) and of x (training never
    finished: kept); a pending batch in incoming/ and a quarantined one in batches/."""
    refs = {k: plant_model(store, k * 32) for k in "abcd"}
    nights = [
        ("r1", "a", "promoted", None),
        ("r2", "b", "rejected", "a"),
        ("r3", "c", "promoted", "a"),
        ("r4", "d", "rejected", "c"),
    ]
    for night, (run_id, k, decision, before) in enumerate(nights, start=1):
        model, evaluation = refs[k]
        write_table(store, "runs", run_id, runs_row(run_id, model.key, evaluation.key, night))
        write_table(store, "promotions", run_id, promotions_row(model.key, before and before * 32, decision, night))
        plant_report(store, run_id, {"trend.png": f"trend {night}".encode(), "confusion.png": f"cm {k}".encode()})
    model, evaluation = refs["c"]
    write_table(store, "runs", "r5", runs_row("r5", model.key, evaluation.key, 5))
    write_table(store, "promotions", "r5", promotions_row(model.key, model.key, "unchanged", 5))
    r1 = ReportFile(key=store.report_file("r1", "confusion.png"), sha256=sha256_bytes(b"cm a"))
    plant_report(store, "r5", {"trend.png": b"trend 5"}, {"legend.png": r1})
    pointer = Champion(
        model_key=model.key,
        sha256=model.sha256,
        run_id="r3",
        selection_balanced_accuracy=0.9,
        test_accuracy=0.9,
        promoted_at=T0,
        reason="better",
    )
    store.write_text(store.champion_file(), pointer.model_dump_json())
    for key in ("c" * 32, "x" * 32):
        put(store, store.checkpoint_key(key, "latest.json"), b'{"epoch": 1, "folder": "epoch-0001-abcd"}')
        put(store, store.checkpoint_key(key, "epoch-0001-abcd", "weights.h5"), b"weights")
    put(store, "incoming/night-6.parquet", b"a pending batch")
    put(store, store.batch_file("f" * 64, "batch.json"), b"{}")
    put(store, store.batch_file("f" * 64, "incoming.parquet"), b"a quarantined batch")
    return store


def files(store: Store) -> dict[str, str]:
    """Every file of the store (hidden names included), with its digest; the empty files flocks are taken on are not content."""
    store.fs.invalidate_cache()
    found = {posixpath.relpath(p, store.root): p for p in store.fs.find(store.root)}
    return {
        k: sha256_bytes(store.fs.cat_file(p)) for k, p in found.items() if not (k.startswith("locks/") and k.endswith(".lock"))
    }


GOES = {
    "models/" + "b" * 32,
    "models/" + "d" * 32,
    "evaluations/e" + "b" * 32,
    "evaluations/e" + "d" * 32,
    "evaluations/p" + "b" * 32,
    "evaluations/p" + "d" * 32,
    "evaluations/by-model/p" + "b" * 32,
    "evaluations/by-model/p" + "d" * 32,
    "reports/r2",
    "checkpoints/" + "c" * 32,
}


def plots_of(store: Store, k: str) -> str:
    return [
        p
        for p in os.listdir(store.path("plots"))
        if f"png {k * 32}".encode() in Path(store.path("plots", p, "confusion-1.png")).read_bytes()
    ][0]


def test_a_dry_run_lists_what_goes_and_changes_nothing(planted: Store):
    before = files(planted)
    result = prune(planted, keep_reports=3)
    assert files(planted) == before
    listed = {d.key for d in result.plan.doomed}
    assert listed == GOES | {f"plots/{plots_of(planted, 'b')}", f"plots/{plots_of(planted, 'd')}"}
    assert result.plan.bytes == sum(len(Path(planted.path(f)).read_bytes()) for f in result.plan.files) > 0


def test_apply_removes_exactly_what_the_dry_run_listed_and_every_planted_reference_stays(planted: Store):
    before = files(planted)
    listed = set(prune(planted, keep_reports=3).plan.files)
    result = prune(planted, apply=True, keep_reports=3)
    after = files(planted)
    assert set(before) - set(after) == listed == set(result.removed)
    assert all(after[f] == before[f] for f in after)  # nothing kept was changed
    for kept in (
        "champion.json",
        "incoming/night-6.parquet",  # a pending batch
        f"batches/{'f' * 64}/incoming.parquet",
        f"models/{'a' * 32}/model.keras",  # a promotions row's: promoted, and the champion before c
        f"models/{'c' * 32}/model.keras",  # the pointer's
        f"evaluations/e{'a' * 32}/evaluation.json",
        f"evaluations/p{'c' * 32}/mnist-test-1.parquet",  # what the gate pairs the champion's predictions from
        f"evaluations/by-model/p{'c' * 32}/test_predictions.json",
        f"plots/{plots_of(planted, 'c')}/plots.json",
        f"checkpoints/{'x' * 32}/latest.json",  # a training that never finished
        "reports/r1/index.md",  # the last three reports' figures point into it
        "reports/r5/index.md",
        "tables/promotions/run_id=r2/part-0.parquet",
    ):
        assert kept in after, kept
    assert not os.path.exists(planted.path("models", "b" * 32))  # the folder goes, not only its files
    assert prune(planted, keep_reports=3).plan.doomed == []  # nothing left to prune


def test_a_promotions_row_naming_a_key_outside_the_store_keeps_nothing_and_stops_nothing(planted: Store):
    write_table(planted, "promotions", "r9", promotions_row("../../etc", "/tmp", "promoted", 9))
    assert {d.key for d in prune(planted, keep_reports=3).plan.doomed} >= GOES


def test_keep_reports_keeps_that_many_of_the_last_runs(planted: Store):
    doomed = {d.key for d in prune(planted, keep_reports=1).plan.doomed if d.kind == "reports"}
    assert doomed == {"reports/r2", "reports/r3", "reports/r4"}  # r5 stays, and r1, whose figure r5 shows


def test_a_running_night_refuses_the_prune_and_nothing_goes(planted: Store):
    mark_running(planted, "night-6")
    before = files(planted)
    with pytest.raises(PruneRefused, match="while a night runs: night-6"):
        prune(planted, apply=True)
    assert files(planted) == before


@pytest.mark.parametrize("started", [timedelta(days=-3), timedelta(days=365 * 170)], ids=["long ago", "in the future"])
def test_a_night_marker_left_by_a_killed_night_long_ago_is_reported_not_obeyed(planted: Store, started):
    """A marker from the future (2199, say) would never grow old: obeyed, it stopped every prune for good."""
    old = {"run_id": "killed", "started_at": (datetime.now(UTC) + started).isoformat()}
    planted.write_text(planted.night_marker_file("killed"), json.dumps(old))
    result = prune(planted, keep_reports=3)
    assert [m.run_id for m in result.left_behind] == ["killed"] and result.plan.doomed


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda s: s.write_text(s.champion_file(), "{not json"), "champion pointer"),
        (lambda s: s.write_bytes("tables/promotions/run_id=r9/part-0.parquet", b""), "promotions table"),
        (lambda s: s.write_bytes("tables/runs/run_id=r9/part-0.parquet", b"PAR1garbage"), "runs table"),
        (lambda s: s.write_text(s.night_marker_file("r9"), "{}"), "night marker"),
        (lambda s: s.fs.makedirs(s.path(s.night_marker_file("r8")), exist_ok=True), "night marker"),
        (
            lambda s: s.write_text(s.report_file("r5", MANIFEST), '{"run_id": "r5", "files": {"a.png": {"key": "/etc"}}}'),
            "manifest",
        ),
    ],
    ids=["pointer", "promotions", "runs", "marker", "marker-folder", "report-manifest"],
)
def test_what_cannot_be_read_refuses_the_prune_and_nothing_goes(planted: Store, damage, message):
    damage(planted)
    before = files(planted)
    with pytest.raises(PruneRefused, match=message):
        prune(planted, apply=True)
    assert files(planted) == before


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", "store", "prune", *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_the_cli_dry_run_json_apply_and_refusal(planted: Store):
    before = files(planted)
    dry = cli("--store", planted.url, "--keep-reports", "3", "--json")
    assert dry.returncode == 0, dry.stderr
    listed = json.loads(dry.stdout)
    assert files(planted) == before and not listed["applied"] and listed["bytes"] > 0
    applied = cli("--store", planted.url, "--keep-reports", "3", "--apply")
    assert applied.returncode == 0, applied.stderr
    assert "Removed 12 folders" in applied.stdout
    assert set(before) - set(files(planted)) == {f for folder in listed["folders"] for f in folder["files"]}
    assert f"(default {KEEP_REPORTS})" in " ".join(cli("--help").stdout.split())  # the help says the default in force
    mark_running(planted, "night-7")
    refused = cli("--store", planted.url, "--apply")
    assert refused.returncode == 1 and "while a night runs: night-7" in refused.stderr


CHILD = """
import sys, time
from storage import Store
from storage.files import StoreFiles
from tasks.publish.retention import prune

remove = StoreFiles.remove
def slow(self, key, recursive=False):
    remove(self, key, recursive)
    print(key, flush=True)
    time.sleep(0.05)
StoreFiles.remove = slow
prune(Store(sys.argv[1]), apply=True, keep_reports=3)
print("DONE", flush=True)
"""


def references_intact(store: Store) -> list[str]:
    """Every reference in the store that names a file that is not there."""
    broken = []
    for info in Path(store.root).glob("models/*/model.json"):
        ref = json.loads(Path(info).read_text())
        broken += [k for k in (ref["file_key"],) if not store.exists(k)]
    for info in Path(store.root).glob("evaluations/*/evaluation.json"):
        broken += [k for k in EvaluationRef.model_validate_json(Path(info).read_text()).files() if not store.exists(k)]
    for info in Path(store.root).glob("evaluations/by-model/*/test_predictions.json"):
        broken += [k for k in (json.loads(Path(info).read_text())["file_key"],) if not store.exists(k)]
    for info in Path(store.root).glob("plots/*/plots.json"):
        broken += [k for k in json.loads(Path(info).read_text())["file_keys"].values() if not store.exists(k)]
    for info in Path(store.root).glob(f"reports/*/{MANIFEST}"):
        broken += [
            f.key for f in ReportManifest.model_validate_json(Path(info).read_text()).files.values() if not store.exists(f.key)
        ]
    return broken


@pytest.mark.parametrize("after", [2, 13])
def test_a_prune_killed_half_way_loses_nothing_kept_and_the_next_one_finishes(planted: Store, after: int):
    before = files(planted)
    listed = set(prune(planted, keep_reports=3).plan.files)
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, planted.url], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    for _ in range(after):  # SIGKILL after that many files went: mid-folder, between folders
        assert child.stdout.readline().strip() != "DONE"
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=60)
    half = files(planted)
    gone = set(before) - set(half)
    assert listed > gone and len(gone) >= after  # stopped half-way, and only what was listed went
    assert all(half[f] == before[f] for f in half)
    assert references_intact(planted) == []  # no reference names a removed file
    again = prune(planted, apply=True, keep_reports=3)
    assert set(before) - set(files(planted)) == listed and set(again.removed) == listed - gone


def point_at(store: Store, k: str) -> None:
    pointer = Champion.model_validate_json(store.read_bytes(store.champion_file()))
    store.write_text(store.champion_file(), pointer.model_copy(update={"model_key": k * 32}).model_dump_json())


@pytest.mark.parametrize(
    "pointer, dropped",
    [
        ("c", ("r3", "r4", "r5")),  # the pointer alone names c
        ("a", ("r4", "r5")),  # r3's promoted row alone
        ("a", ("r3", "r5")),  # r4's row, whose champion before was c, alone
    ],
    ids=["pointer", "promoted-row", "champion-before"],
)
def test_each_reference_alone_keeps_the_champion_and_what_its_decisions_rest_on(planted: Store, pointer, dropped):
    point_at(planted, pointer)
    for run_id in dropped:
        planted.remove(f"tables/promotions/run_id={run_id}", recursive=True)
    prune(planted, apply=True, keep_reports=0)
    c = "c" * 32
    for key in (
        f"models/{c}/model.keras",
        f"evaluations/e{c}/evaluation.json",
        f"evaluations/by-model/p{c}/test_predictions.json",
    ):
        assert planted.exists(key), key
    assert planted.exists(f"evaluations/p{c}/mnist-test-1.parquet") and plots_of(planted, "c")


def test_an_evaluation_is_kept_by_its_runs_row_or_by_its_model_digest_alone(planted: Store):
    a = "a" * 32
    planted.remove(f"evaluations/e{a}/evaluation.json")  # only the runs row names it now
    c = "c" * 32
    for night, run_id in ((3, "r3"), (5, "r5")):  # only its evaluation.json's model digest names e<c> now
        write_table(planted, "runs", run_id, runs_row(run_id, c, "other", night))
    prune(planted, apply=True, keep_reports=0)
    assert planted.exists(f"evaluations/e{a}/predictions-1.parquet") and planted.exists(f"evaluations/e{c}/evaluation.json")


def test_after_each_single_removal_no_reference_names_a_removed_file(planted: Store, monkeypatch):
    """Every point a prune can be killed at (a file's removal is atomic), checked in one process."""
    from storage.files import StoreFiles

    removed, remove = [], StoreFiles.remove

    def checking(self, key, recursive=False):
        remove(self, key, recursive)
        assert references_intact(planted) == [], f"after removing {key}"
        removed.append(key)

    monkeypatch.setattr(StoreFiles, "remove", checking)
    listed = prune(planted, apply=True, keep_reports=3).plan.files
    assert removed == listed


@pytest.mark.slow
def test_an_unchanged_night_writes_only_what_changed_and_points_at_the_last_report(mnist_store: Store, prefect_harness, tmp_path):
    from flows.night.params import PipelineParameters
    from flows.night.pipeline import mnist_retrain
    from tasks.champion.gate import GateRules
    from tests.conftest import with_mnist

    store = Store(tmp_path / "store")
    store.fs.makedirs(store.path("objects"), exist_ok=True)
    with_mnist(store, mnist_store)
    lenient = GateRules(min_balanced_accuracy=0.0, max_digit_drop=1.0)  # a 1-epoch model becomes champion
    params = PipelineParameters(epochs=1, train_limit=1000, n_per_class=10, seed=3, store=store.url, gate=lenient)
    nights = [mnist_retrain(params) for _ in range(3)]
    third = nights[-1]
    assert third.decision == "unchanged" and third.step_states["train"] == "Cached"
    folder = store.path(store.report_dir(third.run_id))
    assert sorted(os.listdir(folder)) == ["index.md", "report.json", "slice_trend.png", "trend.png"]  # the night's own
    manifest = read_manifest(store, third.run_id)
    index = Path(third.report_index).read_text()
    assert len(manifest.files) == 9 and manifest.folders() == {nights[0].run_id, nights[1].run_id, third.run_id}
    for name, file in manifest.files.items():  # every figure is there, and index.md's link reaches it
        assert store.matches(file.key, file.sha256), name
        (link,) = re.findall(rf"\]\(([^)]*/)?{re.escape(name)}\)", index) or [None]
        assert os.path.normpath(os.path.join(folder, (link or "") + name)) == store.path(file.key), name
    assert not os.listdir(store.path(store.night_markers_dir()))  # each night removed its marker at its end
    # and the figures an earlier night holds for a kept report survive a prune keeping only the last report
    prune(store, apply=True, keep_reports=1)
    assert all(store.matches(f.key, f.sha256) for f in manifest.files.values())


def test_prune_on_an_s3_store_as_on_a_folder(s3_server, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # a bucket without a server: this machine's flocks
    s3_server.bucket("mnist")
    store = plant(Store("s3://mnist/store"))
    before = files(store)
    listed = prune(store, keep_reports=3)
    assert files(store) == before and {d.key for d in listed.plan.doomed} >= GOES
    mark_running(store, "night-6")
    with pytest.raises(PruneRefused, match="while a night runs: night-6"):
        prune(store, apply=True)
    store.remove(store.night_marker_file("night-6"))
    prune(store, apply=True, keep_reports=3)
    after = files(store)
    assert set(before) - set(after) == set(listed.plan.files) and all(after[f] == before[f] for f in after)
    assert prune(store, keep_reports=3).plan.doomed == []


def test_a_night_that_fails_removes_its_marker(prefect_harness, tmp_path, monkeypatch):
    from flows.night.params import PipelineParameters
    from flows.night.pipeline import mnist_retrain

    monkeypatch.setenv("MNIST_MIRRORS", "")  # no source has MNIST: the night fails at its first step
    monkeypatch.setenv("MNIST_NPM_PACKAGE", "")
    (tmp_path / "empty").mkdir()
    store = Store(tmp_path / "store")
    with pytest.raises(Exception, match="MNIST"):
        mnist_retrain(PipelineParameters(store=store.url, mnist_source=str(tmp_path / "empty")))
    assert store.exists(store.night_markers_dir()) and not store.list_files(store.night_markers_dir())
    assert prune(store).plan.doomed == []  # and a prune is not held back by it


def test_a_nights_own_prune_keeps_what_it_made_and_its_report_and_its_own_marker_does_not_stop_it(planted: Store):
    """The nightly step (``retention`` parameters): run inside night r6, whose model e was rejected and whose runs
    row was never written (its tables failed), keeping no report but its own."""
    e = "e" * 32
    plant_model(planted, e)
    write_table(planted, "promotions", "r6", promotions_row(e, "c" * 32, "rejected", 6))
    plant_report(planted, "r6", {"trend.png": b"trend 6"})
    mark_running(planted, "r6")
    result = prune_store(planted, "r6", [e], RetentionRules(keep_reports=0))
    for key in (
        f"models/{e}/model.keras",  # tonight's model: tomorrow's night on the same data reuses it
        f"evaluations/e{e}/evaluation.json",
        f"evaluations/by-model/p{e}/test_predictions.json",
        f"evaluations/p{e}/mnist-test-1.parquet",
        f"plots/{plots_of(planted, 'e')}/plots.json",
        "reports/r6/index.md",  # tonight's report
        f"models/{'c' * 32}/model.keras",  # the champion
        "incoming/night-6.parquet",  # a pending batch
        planted.night_marker_file("r6"),
    ):
        assert planted.exists(key), key
    assert {d.key for d in result.plan.doomed} >= GOES | {"reports/r1", "reports/r3", "reports/r4", "reports/r5"}
    assert not planted.exists(f"models/{'b' * 32}/model.keras") and not planted.exists("reports/r5/index.md")


def test_a_nights_prune_refuses_while_another_night_runs_and_nothing_goes(planted: Store):
    mark_running(planted, "r6")
    mark_running(planted, "r7")
    before = files(planted)
    with pytest.raises(PruneRefused, match="while a night runs: r7"):
        prune_store(planted, "r6", [], RetentionRules())
    assert files(planted) == before


def test_pruned_every_night_the_store_holds_the_champions_the_last_reports_and_tonight_whatever_came_before(tmp_path: Path):
    """A year of rejected nights, compressed: one folder of each kind a night, pruned each night; what stays is
    bounded by the policy, not by the number of nights."""
    store = plant(Store(tmp_path / "store"))
    c = "c" * 32
    sizes = []
    for night in range(6, 18):
        run_id, k = f"r{night}", f"{night:032x}"
        mark_running(store, run_id)
        model, evaluation = plant_model(store, k)
        write_table(store, "runs", run_id, runs_row(run_id, model.key, evaluation.key, night))
        write_table(store, "promotions", run_id, promotions_row(k, c, "rejected", night))
        plant_report(store, run_id, {"trend.png": f"trend {night}".encode()})
        prune_store(store, run_id, [k], RetentionRules(keep_reports=2))
        store.remove(store.night_marker_file(run_id))
        sizes.append({kind: len(os.listdir(store.path(kind))) for kind in ("models", "reports", "plots")})
        assert store.exists(f"models/{k}/model.keras") and not store.exists(f"models/{night - 1:032x}")
    assert sizes[-1] == sizes[2] == {"models": 3, "reports": 2, "plots": 3}  # a, c (champions) and tonight's


@pytest.mark.slow
def test_each_night_prunes_after_publishing_and_a_refused_prune_removes_nothing_never_changing_the_decision(
    mnist_store: Store, prefect_harness, tmp_path
):
    from flows.night.params import PipelineParameters
    from flows.night.pipeline import mnist_retrain
    from storage.tables import read_table
    from tasks.champion.gate import GateRules
    from tests.conftest import with_mnist

    store = Store(tmp_path / "store")
    store.fs.makedirs(store.path("objects"), exist_ok=True)
    with_mnist(store, mnist_store)
    lenient = GateRules(min_balanced_accuracy=0.0, max_digit_drop=1.0)  # night 1's 1-epoch model becomes champion
    strict = GateRules(min_balanced_accuracy=1.0)  # the nights after are rejected
    base = PipelineParameters(epochs=1, train_limit=1000, n_per_class=10, store=store.url)
    first = mnist_retrain(base.model_copy(update={"seed": 1, "gate": lenient}))
    second = mnist_retrain(base.model_copy(update={"seed": 2, "gate": strict}))
    third = mnist_retrain(base.model_copy(update={"seed": 3, "gate": strict}))
    assert (first.decision, second.decision, third.decision) == ("promoted", "rejected", "rejected")
    assert first.published and second.published and third.published, third.publish_problem
    runs = read_table(store, "runs").set_index("run_id")["model_key"]
    models = set(os.listdir(store.path("models")))
    assert models == {runs[first.run_id], runs[third.run_id]}  # the champion and tonight's; night 2's went at night 3
    assert sorted(os.listdir(store.path("reports"))) == sorted(r.run_id for r in (first, second, third))

    mark_running(store, "another-night")  # a prune that must refuse: the night goes on, published, and says so
    said: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: said.append(record.getMessage())
    logging.getLogger("prefect").addHandler(handler)
    try:
        fourth = mnist_retrain(base.model_copy(update={"seed": 4, "gate": strict}))
    finally:
        logging.getLogger("prefect").removeHandler(handler)
    assert fourth.decision == "rejected" and fourth.published, fourth.publish_problem
    (refused,) = [line for line in said if "not pruned tonight" in line]
    assert "while a night runs: another-night" in refused
    assert read_table(store, "runs").set_index("run_id").loc[fourth.run_id, "published"]
    assert runs[third.run_id] in os.listdir(store.path("models"))  # nothing went
    off = mnist_retrain(base.model_copy(update={"seed": 5, "gate": strict, "retention": RetentionRules(prune=False)}))
    assert off.published and runs[third.run_id] in os.listdir(store.path("models"))


# ---- names in the store that are not ours (review 10): skipped with a warning, never removed, never a failure ----


def plant_foreign_runs_partition(store: Store, folder: str, run_id: str, night: int) -> Path:
    """A ``runs`` partition written beside the store's writer, in a folder ``write_table`` would refuse."""
    import pyarrow.parquet as pq

    from storage.tables import to_arrow

    path = Path(store.path("tables", "runs")) / folder / "part-0.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(to_arrow("runs", runs_row(run_id, "b" * 32, "e" + "b" * 32, night)), path)
    return path


def plant_file(store: Store, below: str) -> Path:
    path = Path(store.root) / below
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("planted by a store writer")
    return path


FOREIGN = {
    "file in a folder that goes": lambda s: (plant_file(s, "reports/r2/a#b"), "a#b"),
    "empty folder in a folder that goes": lambda s: (
        plant_file(s, "reports/r2/a#b/x").parent.joinpath("x").unlink() or Path(s.root, "reports/r2/a#b"),
        "a#b",
    ),
    "folder of a kind": lambda s: (plant_file(s, "models/a#b/model.json"), "a#b"),
    "night marker": lambda s: (plant_file(s, "locks/nights/a#b.json"), "a#b.json"),
    "runs partition run_id=%2E%2E, dated last": lambda s: (plant_foreign_runs_partition(s, "run_id=%2E%2E", "x", 9), "%2E%2E"),
}


@pytest.mark.parametrize("plant_name", list(FOREIGN), ids=list(FOREIGN))
def test_a_name_that_is_not_ours_is_skipped_with_a_warning_and_the_prune_removes_what_it_should(planted: Store, plant_name):
    """One planted name stopped every prune for good (an UnsafeKey from the listing, or a run id '..' decoded from a
    partition folder making reports/../report.json): now it is left where it is, said once, and the rest goes."""
    path, shown = FOREIGN[plant_name](planted)
    heard: list[str] = []
    planted.warn = heard.append
    listed = prune(planted, keep_reports=3)
    assert {d.key for d in listed.plan.doomed} == GOES | {f"plots/{plots_of(planted, k)}" for k in "bd"}
    result = prune(planted, apply=True, keep_reports=3)
    assert set(result.removed) == set(listed.plan.files) and path.exists()
    assert not Path(planted.path("reports", "r2", "index.md")).exists() and Path(planted.path("reports", "r5")).exists()
    assert heard and all(shown in message for message in heard), heard
    assert prune(planted, keep_reports=3).plan.files == []  # the folder holding the planted file stays, with it alone


def test_the_cli_prunes_past_a_planted_name_and_answers_runs_show_dotdot_in_a_sentence(planted: Store):
    plant_file(planted, "reports/r2/a#b")
    plant_foreign_runs_partition(planted, "run_id=%2E%2E", "x", 9)
    applied = cli("--store", planted.url, "--keep-reports", "3", "--apply")
    assert applied.returncode == 0, applied.stderr
    assert "a#b" in applied.stderr and "Traceback" not in applied.stderr
    assert Path(planted.path("reports", "r2")).joinpath("a#b").exists()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    shown = subprocess.run(
        [sys.executable, "-m", "flows.cli", "runs", "show", "..", "--store", planted.url],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert shown.returncode != 0 and "Traceback" not in shown.stderr and "'..' is not in the runs table" in shown.stderr


def test_runs_dated_in_the_future_cannot_push_the_real_runs_reports_out(planted: Store):
    """30 planted rows dated 2199 were "the last 30 runs", and prune --apply removed the real runs' reports."""
    for i in range(30):
        frame = runs_row(f"planted-{i:02d}", "b" * 32, "e" + "b" * 32, 0).assign(finished_at=datetime(2199, 1, 1, tzinfo=UTC))
        write_table(planted, "runs", f"planted-{i:02d}", frame)
    before = files(planted)
    with pytest.raises(PruneRefused, match="finished_at is in the future"):
        prune(planted, apply=True)
    assert files(planted) == before
    from storage.tables import read_table

    heard: list[str] = []
    planted.warn = heard.append
    assert set(read_table(planted, "runs")["run_id"]) == {"r1", "r2", "r3", "r4", "r5"} and len(heard) == 1


def test_an_s3_object_whose_key_climbs_with_dotdot_is_skipped_and_the_prune_goes_on(s3_server, tmp_path, monkeypatch):
    """S3 object keys are literal: ``reports/r2/../planted.txt`` lists inside reports/r2, which goes."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    s3_server.bucket("mnist")
    store = plant(Store("s3://mnist/store"))
    planted = f"{store.root}/reports/r2/../planted.txt"
    store.fs.pipe_file(planted, b"planted by a store writer")
    heard: list[str] = []
    store.warn = heard.append
    listed = prune(store, keep_reports=3)
    result = prune(store, apply=True, keep_reports=3)
    assert "reports/r2/index.md" in result.removed and set(result.removed) == set(listed.plan.files)
    store.fs.invalidate_cache()
    assert planted in store.fs.find(store.root) and not store.exists("reports/r2/index.md")
    assert heard and all("../planted.txt" in message for message in heard), heard
