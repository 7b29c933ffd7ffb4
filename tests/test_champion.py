"""The champion gate on real, small trainings: each test starts from an empty champion history, with
three models trained once per module (weak: 1 epoch on 2000 images; medium: 1 epoch on 6000;
better: 2 epochs on 12000)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from storage import Store, sha256_bytes
from storage.tables import read_table
from tasks.champion.gate import GateRules
from tasks.champion.promotion import ChampionError, find_champion, gate, promote_run, read_pointer, rollback
from tasks.data.fetch import fetch_mnist
from tasks.evaluation.evaluate import evaluate_model
from tasks.publish.run_record import RunRecord
from tasks.publish.tabulate import tabulate
from tasks.training.train import TrainConfig, train_model
from tests.conftest import reference_mcnemar, slow_foreign_model, with_nan_weights

pytestmark = pytest.mark.slow  # conftest.SHARED_WORKER runs this module on one xdist worker: its models are trained once
REPO = Path(__file__).resolve().parent.parent
N_PER_CLASS = 100
LENIENT = GateRules(min_balanced_accuracy=0.5, max_digit_drop=1.0)  # tiny trainings: one digit may lag
CONFIGS = {
    "weak": TrainConfig(epochs=1, train_limit=2000, seed=2),
    "medium": TrainConfig(epochs=1, train_limit=6000, seed=1),
    "better": TrainConfig(epochs=2, train_limit=12000, seed=3),
}


@pytest.fixture(scope="module")
def lab(mnist_store: Store):
    """Models and evaluations, trained once: {name: (dataset, model, evaluation)}."""
    dataset = fetch_mnist(mnist_store, sources=[], log=lambda _: None)
    trained = {}
    for name, config in CONFIGS.items():
        model = train_model(mnist_store, dataset, config, log=lambda _: None)
        evaluation = evaluate_model(mnist_store, dataset, model, N_PER_CLASS, seed=7)
        trained[name] = (dataset, model, evaluation)
    ranked = [trained[n][2].balanced_accuracy for n in ("weak", "medium", "better")]
    assert ranked == sorted(ranked), f"the three trainings should rank weak < medium < better, got {ranked}"
    return trained


@pytest.fixture
def store(tmp_path: Path, mnist_store: Store, lab) -> Store:
    """A copy of the lab's store (data, models, evaluations) with no champion yet."""
    fresh = Store(tmp_path / "store")
    for folder in ("objects", "models", "evaluations"):  # references name files relative to the store
        fresh.fs.put(mnist_store.path(folder) + "/", fresh.path(folder), recursive=True)  # into it, through its door
    return fresh


def decide(store: Store, lab, name: str, run_id: str, rules: GateRules = LENIENT, log=lambda _: None):
    dataset, model, evaluation = lab[name]
    decided = gate(store, dataset, model, evaluation, rules, run_id, log=log)
    record = RunRecord(
        run_id=run_id, parameters={"seed": model.key}, dataset=dataset, model=model, evaluation=evaluation, gate=decided
    )
    tabulate(store, record)  # the runs table
    return decided


def test_the_first_model_becomes_champion(store, lab):
    decided = decide(store, lab, "medium", "run-1")
    assert decided.promoted and decided.reason.startswith("first champion") and decided.comparison is None
    pointer = read_pointer(store)
    assert pointer.model_key == lab["medium"][1].key and pointer.sha256 == lab["medium"][1].sha256 and pointer.run_id == "run-1"
    (row,) = read_table(store, "promotions").itertuples()
    assert row.decision == "promoted" and pd.isna(row.champion_before_model_key) and not row.forced
    runs = read_table(store, "runs")
    assert runs["promoted"].tolist() == [True] and runs["champion_after_model_key"].tolist() == [lab["medium"][1].key]


def test_the_first_model_below_the_floor_is_rejected(store, lab):
    decided = decide(store, lab, "weak", "run-1", rules=GateRules(min_balanced_accuracy=0.99))
    assert not decided.promoted and "below the floor" in decided.reason
    assert read_pointer(store) is None and read_table(store, "runs")["champion_after_model_key"].isna().all()


def test_a_weak_model_is_rejected_against_a_better_champion(store, lab):
    decide(store, lab, "better", "run-1")
    decided = decide(store, lab, "weak", "run-2")
    cmp = decided.comparison
    assert not decided.promoted and "significantly worse" in decided.reason
    assert cmp.mcnemar_b > cmp.mcnemar_c and cmp.mcnemar_p < 0.05
    assert cmp.mcnemar_p == pytest.approx(reference_mcnemar(cmp.mcnemar_b, cmp.mcnemar_c), rel=1e-9, abs=1e-300)
    assert cmp.n_test == cmp.n_sample == 5000  # every mnist-selection image: the gate reads no test image
    assert read_pointer(store).run_id == "run-1"
    rows = read_table(store, "promotions", run_id="run-2")
    assert rows["decision"].item() == "rejected" and rows["mcnemar_p"].item() < 0.05
    assert rows["champion_before_model_key"].item() == lab["better"][1].key
    runs = read_table(store, "runs", run_id="run-2")
    assert not runs["promoted"].item() and runs["champion_after_model_key"].item() == lab["better"][1].key


def test_a_better_model_replaces_a_weaker_champion(store, lab):
    decide(store, lab, "weak", "run-1")
    decided = decide(store, lab, "better", "run-2")
    assert decided.promoted and decided.comparison.significantly_better and "significantly better" in decided.reason
    assert read_pointer(store).model_key == lab["better"][1].key
    assert decided.champion_before.run_id == "run-1" and decided.champion_after.run_id == "run-2"


def test_a_forced_promotion_is_recorded_as_forced(store, lab):
    decide(store, lab, "better", "run-1")
    decided = decide(store, lab, "weak", "run-2", rules=LENIENT.model_copy(update={"force_promote": True}))
    assert decided.promoted and decided.forced and "significantly worse" in decided.reason
    assert read_pointer(store).forced and read_pointer(store).run_id == "run-2"
    assert read_table(store, "promotions", run_id="run-2")["forced"].item()


def test_a_broken_pointer_falls_back_to_the_last_intact_champion(store, lab):
    decide(store, lab, "weak", "run-1")
    decide(store, lab, "medium", "run-2")
    medium_file = Path(store.path(lab["medium"][1].file_key))
    medium_file.write_bytes(medium_file.read_bytes() + b"tampered")
    said = []
    decided = decide(store, lab, "better", "run-3", log=said.append)
    (problem,) = said
    assert f"names model {lab['medium'][1].key} from run run-2, but its model file {medium_file} does not match" in problem
    assert "using the last intact champion, run run-1" in problem
    assert decided.promoted and decided.champion_before.run_id == "run-1"  # compared with the weak model
    assert read_pointer(store).run_id == "run-3"


def test_a_broken_pointer_with_no_intact_champion_promotes_nothing(store, lab):
    decide(store, lab, "weak", "run-1")
    os.remove(store.path(lab["weak"][1].file_key))
    decided = decide(store, lab, "better", "run-2")
    assert not decided.promoted and "no comparison could be made" in decided.reason and "is missing" in decided.reason
    assert read_pointer(store).run_id == "run-1"  # left as it was: the operator decides
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "champion", "--store", store.url],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert done.returncode == 1 and "is missing" in done.stderr and "no earlier champion is intact" in done.stderr


def plant_champion_file(store: Store, model, data: bytes) -> None:
    """Finding 1 and 2 of issue 39: the champion's .keras file replaced, and its model record's and the pointer's
    digests set to match, so every digest check passes."""
    Path(store.path(model.file_key)).write_bytes(data)
    digest = sha256_bytes(data)
    store.write_text(store.model_info_file(model.key), model.model_copy(update={"sha256": digest}).model_dump_json())
    store.write_text(store.champion_file(), read_pointer(store).model_copy(update={"sha256": digest}).model_dump_json())


def test_a_champion_whose_config_is_not_json_is_set_aside_and_the_gate_decides(store, lab, tmp_path):
    decide(store, lab, "better", "run-1")
    decide(store, lab, "medium", "run-2", rules=LENIENT.model_copy(update={"force_promote": True}))
    medium = lab["medium"][1]
    damaged = tmp_path / "damaged.keras"
    with zipfile.ZipFile(store.path(medium.file_key)) as old, zipfile.ZipFile(damaged, "w") as new:
        for info in old.infolist():
            new.writestr(info, b"{not json" if info.filename == "config.json" else old.read(info))
    plant_champion_file(store, medium, damaged.read_bytes())
    said = []
    decided = decide(store, lab, "weak", "run-3", log=said.append)  # a decision, not an exception
    (sentence,) = said  # reported once, in one sentence
    assert f"The champion model {medium.key} of run run-2 is damaged and set aside" in sentence
    assert "config.json that is not JSON" in sentence and "compared against the last intact champion, run run-1" in sentence
    assert decided.damaged_champion in sentence and decided.champion_before.run_id == "run-1"
    assert not decided.promoted and "significantly worse" in decided.reason  # judged against the better model
    assert read_pointer(store).run_id == "run-1"  # repaired by this gate decision, to the champion it compared against


def test_a_champion_with_nan_weights_is_set_aside_and_the_gate_decides(store, lab, tmp_path):
    """Review 8 f4: the champion's archive kept whole (its config is ours) but its weights all NaN, digests set to
    match: every prediction was NaN and the gate failed every night with a pyarrow error. It is damaged: set aside,
    and the night judged against the last intact champion."""
    decide(store, lab, "better", "run-1")
    decide(store, lab, "medium", "run-2", rules=LENIENT.model_copy(update={"force_promote": True}))
    medium = lab["medium"][1]
    plant_champion_file(store, medium, with_nan_weights(Path(store.path(medium.file_key)), tmp_path / "nan.keras"))
    said = []
    decided = decide(store, lab, "weak", "run-3", log=said.append)  # a decision, not an exception
    (sentence,) = said
    assert f"The champion model {medium.key} of run run-2 is damaged and set aside" in sentence
    assert "not finite numbers" in sentence and "compared against the last intact champion, run run-1" in sentence
    assert decided.champion_before.run_id == "run-1" and not decided.promoted


def test_a_night_sets_aside_at_most_max_set_aside_damaged_champions_then_judges_a_first_champion(store, lab):
    """Eleven nights each promoted a model that is damaged now (not a .keras archive, its digests set to match),
    and before them an intact champion: the night sets aside ``MAX_SET_ASIDE`` of them, in one sentence, and judges
    its model as a first champion without looking further (each set-aside costs a read of up to ``MODEL_LIMIT``)."""
    from storage.tables import write_table
    from tasks.champion.pointer import Champion

    decide(store, lab, "weak", "run-0")  # the intact champion, oldest, beyond the limit
    weak = lab["weak"][1]
    (promoted,) = [read_table(store, "promotions", run_id="run-0")]
    planted = 11  # one more than MAX_SET_ASIDE (10): the eleventh and the intact champion are never read
    for night in range(1, planted + 1):
        key, data = f"damaged-{night:02d}", b"not a keras archive %d" % night
        store.write_bytes(store.model_file(key), data)
        damaged = weak.model_copy(update={"key": key, "file_key": store.model_file(key), "sha256": sha256_bytes(data)})
        store.write_text(store.model_info_file(key), damaged.model_dump_json())
        row = promoted.assign(
            run_id=f"run-{night}", challenger_model_key=key, decided_at=promoted["decided_at"] + pd.Timedelta(hours=night)
        )
        write_table(store, "promotions", f"run-{night}", row)
    pointer = read_pointer(store)
    store.write_text(
        store.champion_file(),
        Champion.model_validate(
            pointer.model_dump() | {"model_key": key, "sha256": damaged.sha256, "run_id": f"run-{planted}", "revision": None}
        ).model_dump_json(),
    )
    said = []
    decided = decide(store, lab, "better", "run-12", log=said.append)
    (sentence,) = said  # once, for all of them
    assert f"The champion model damaged-{planted:02d} of run run-{planted} is damaged and set aside" in sentence
    assert "10 damaged champions were set aside tonight" in sentence and "judged as a first champion" in sentence
    assert decided.champion_before is None and decided.promoted and decided.reason.startswith("first champion")
    assert read_pointer(store).run_id == "run-12"


def test_a_foreign_slow_champion_is_refused_before_it_runs_and_the_night_judges_a_first_champion(store, lab, tmp_path):
    from tasks.training.keras_runtime import import_keras

    decide(store, lab, "weak", "run-1")
    foreign = tmp_path / "foreign.keras"
    slow_foreign_model(import_keras(), applications=600).save(foreign)  # hours of predicting on the gate's slices
    plant_champion_file(store, lab["weak"][1], foreign.read_bytes())
    said = []
    decided = decide(store, lab, "better", "run-2", log=said.append)
    (sentence,) = said
    assert "is not the seed network this code builds" in sentence and "judged as a first champion" in sentence
    assert decided.promoted and decided.reason.startswith("first champion") and decided.champion_before is None
    assert read_pointer(store).run_id == "run-2"  # the gate's decision wrote it


def test_two_gates_at_once_leave_one_consistent_pointer(store, lab):
    barrier = threading.Barrier(2)
    results, errors = {}, []

    def run(name: str, run_id: str) -> None:
        try:
            barrier.wait()
            results[name] = decide(store, lab, name, run_id)
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=a) for a in (("weak", "run-w"), ("better", "run-b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    decisions = read_table(store, "promotions").sort_values("decided_at")
    assert len(decisions) == 2
    first, second = decisions.itertuples()
    assert (
        pd.isna(first.champion_before_model_key) and second.champion_before_model_key == first.challenger_model_key
    )  # one after the other
    assert read_pointer(store).model_key == lab["better"][1].key  # whichever went first, the better model ends up champion
    assert json.loads(Path(store.path(store.champion_file())).read_text())["run_id"] == "run-b"


def test_manual_promote_and_rollback_through_the_cli(store, lab, capsys):
    decide(store, lab, "weak", "run-1")
    decide(store, lab, "better", "run-2")

    def cli(*args: str) -> subprocess.CompletedProcess:
        """The CLI's own entry point in this process (a fresh interpreter per command costs seconds of imports;
        test_a_broken_pointer_with_no_intact_champion_promotes_nothing runs one as a user would)."""
        from flows.cli import main

        capsys.readouterr()
        code = main([*args, "--store", store.url])
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)

    done = cli("rollback")
    assert done.returncode == 0, done.stderr
    assert read_pointer(store).model_key == lab["weak"][1].key and read_pointer(store).reason == "manual"
    done = cli("promote", "run-2")
    assert done.returncode == 0, done.stderr
    assert f"Champion is now model {lab['better'][1].key} of run run-2" in done.stdout
    done = cli("champion", "--json")
    shown = json.loads(done.stdout)
    assert shown["run_id"] == "run-2" and shown["model_key"] == lab["better"][1].key and shown["forced"]
    manual = read_table(store, "promotions").query("reason == 'manual'").sort_values("decided_at")
    assert manual["challenger_model_key"].tolist() == [lab["weak"][1].key, lab["better"][1].key]
    assert manual["champion_before_model_key"].tolist() == [lab["better"][1].key, lab["weak"][1].key]
    assert manual["run_id"].isna().all() and manual["decided_by"].eq("operator").all()  # no night made them
    assert len(read_table(store, "promotions", run_id="run-2")) == 1  # the night's partition: its gate's decision only
    done = cli("promote", "no-such-run")
    assert done.returncode == 1 and "Run no-such-run is not in the runs table" in done.stderr


def test_rollback_without_a_champion_says_so(store):
    with pytest.raises(ChampionError, match="no champion"):
        rollback(store)
    with pytest.raises(ChampionError, match="not in the runs table"):
        promote_run(store, "run-x")
    assert find_champion(store).champion is None
