"""``mnist-pipeline`` as a person types it: noun groups with verbs, lists as tables or JSON, help and version,
the nightly deployment's seed, and the old flat names for one more release."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flows.cli import build_parser, main, parameters_from
from storage import Store

REPO = Path(__file__).resolve().parent.parent


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        code = main(list(args))
    except SystemExit as exc:  # --help, --version, usage errors: argparse exits
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def test_no_arguments_print_the_commands_and_the_environment_they_read(capsys):
    code, out, _ = run_cli(capsys)
    assert code == 0
    for command in ("run", "champion", "batches", "runs", "serve", "demo"):
        assert f"\n    {command} " in out
    assert "MNIST_STORE" in out and "PREFECT_API_URL" in out
    assert "simulate-arrivals" not in out and "\n    promote " not in out  # the old flat names are not offered


def test_version_names_the_installed_package(capsys):
    from importlib.metadata import version

    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and out.strip() == f"mnist-pipeline {version('mnist-nightly-retrain')}"


READ_COMMANDS = [
    ["runs", "list"],
    ["runs", "show", "run-a"],
    ["champion", "show"],
    ["champion", "history"],
    ["batches", "list"],
    ["batches", "show", "00000000"],
]


@pytest.mark.parametrize("command", READ_COMMANDS, ids=" ".join)
@pytest.mark.parametrize("where", ["missing", "file", "folder"])
def test_a_read_command_refuses_a_store_that_is_not_there_in_one_sentence(capsys, tmp_path, command, where):
    """A mistyped --store is an error (exit 1), never an empty store: a script would conclude there is no champion."""
    path = tmp_path / "store"
    if where == "file":
        path.write_text("not a store")
    elif where == "folder":
        path.mkdir()
        (path / "notes.txt").write_text("a folder, but not a store")
    said = {"missing": "There is no store at", "file": "is a file, not a store", "folder": "is a folder but not a store"}
    for extra in ([], ["--json"]):
        code, out, err = run_cli(capsys, *command, "--store", str(path), *extra)
        assert code == 1 and out == "" and said[where] in err, (code, out, err)
        assert len(err.strip().splitlines()) == 1 and "--store" in err  # one sentence, saying what to give


@pytest.mark.parametrize(
    ("command", "empty"),
    [
        (["batches", "list"], "No batch has arrived"),
        (["champion", "history"], "No model has been champion"),
        (["runs", "list"], "No run has finished"),
        (["champion", "show"], "No champion in"),
    ],
)
def test_a_store_with_nothing_yet_exits_3_as_text_and_json(capsys, tmp_path, command, empty):
    store = tmp_path / "store"
    store.mkdir()  # a store nothing has written yet
    code, out, err = run_cli(capsys, *command, "--store", str(store))
    assert code == 3 and empty in out, err
    assert f"Store: {store} (--store)" in err  # which store was read, and why that one
    code, out, err = run_cli(capsys, *command, "--store", str(store), "--json")
    assert code == 3 and json.loads(out) in ([], None) and err == "", err


def test_the_default_store_is_named_with_where_it_came_from(capsys, tmp_path, monkeypatch):
    (tmp_path / "artifacts" / "tables").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MNIST_STORE", raising=False)
    code, _, err = run_cli(capsys, "runs", "list")
    assert code == 3 and f"Store: {tmp_path / 'artifacts'} (the default, ./artifacts in the current folder" in err
    monkeypatch.setenv("MNIST_STORE", str(tmp_path / "elsewhere"))
    code, _, err = run_cli(capsys, "runs", "list")
    assert code == 1 and f"There is no store at {tmp_path / 'elsewhere'}" in err


def test_run_names_a_file_given_as_its_store(capsys, tmp_path):
    path = tmp_path / "store"
    path.write_text("not a store")
    code, _, err = run_cli(capsys, "run", "--store", str(path))
    assert code == 1 and "is a file, not a folder" in err and "cannot be written" not in err


# ---- a store with three nights, made without training: stand-in models whose stored predictions the gate pairs ----
N = 1000
LABELS = np.arange(N) % 10
DATASET_SHA = "d" * 64
LENIENT_FLOOR = 0.5


def night(store: Store, key: str, correct: float, run_id: str) -> None:
    """One night: a stand-in model right on the first ``correct`` share of every slice, gated and tabulated."""
    from tasks.champion.gate import GateRules
    from tasks.champion.promotion import gate
    from tasks.data.fetch import DatasetRef
    from tasks.data.splits import SLICE_SELECTION, SLICE_TEST
    from tasks.publish.run_record import RunRecord
    from tasks.publish.tabulate import tabulate
    from tests.conftest import stand_in

    dataset = DatasetRef(sha256=DATASET_SHA, files={}, sources=["store"])  # not read: the predictions are stored
    predicted = np.where(np.arange(N) < correct * N, LABELS, (LABELS + 1) % 10)
    slices = (SLICE_SELECTION, SLICE_TEST)
    model, evaluation = stand_in(
        store, key, dict.fromkeys(slices, LABELS), dict.fromkeys(slices, predicted), dataset, np.arange(500)
    )
    rules = GateRules(min_balanced_accuracy=LENIENT_FLOOR, max_digit_drop=1.0)
    decided = gate(store, dataset, model, evaluation, rules, run_id, log=lambda _: None)
    tabulate(store, RunRecord(run_id=run_id, parameters={}, dataset=dataset, model=model, evaluation=evaluation, gate=decided))


@pytest.fixture(scope="module")
def nights_store(tmp_path_factory) -> Store:
    """run-a (first champion), run-b (better: promoted), run-c (worse: rejected) and one batch ingested by run-c."""
    from storage.tables import write_table
    from tests.conftest import sample_frames

    store = Store(tmp_path_factory.mktemp("nights") / "store")
    for key, correct, run_id in (("a" * 32, 0.90, "run-a"), ("b" * 32, 0.95, "run-b"), ("c" * 32, 0.80, "run-c")):
        night(store, key, correct, run_id)
    write_table(store, "batches", "run-c", sample_frames(seed=3)["batches"])
    return store


@pytest.fixture
def nights(nights_store: Store, tmp_path) -> Store:
    """A copy of the three nights that a test may change."""
    shutil.copytree(nights_store.root, tmp_path / "store")
    return Store(tmp_path / "store")


def as_json(capsys, *args: str):
    code, out, err = run_cli(capsys, *args, "--json")
    assert code == 0, err
    return json.loads(out)


def test_runs_list_tells_a_rejected_night_from_a_promoted_one_and_says_why(capsys, nights_store):
    rows = as_json(capsys, "runs", "list", "--store", nights_store.url)
    assert [(r["run_id"], r["decision"], r["forced"]) for r in rows] == [
        ("run-c", "rejected", False),
        ("run-b", "promoted", False),
        ("run-a", "promoted", False),
    ]
    assert "below the champion's" in rows[0]["reason"] and rows[2]["reason"].startswith("first champion")
    code, out, _ = run_cli(capsys, "runs", "list", "--store", nights_store.url, "--last", "1")
    assert code == 0 and "run-c" in out and "rejected" in out and "run-b" not in out
    code, _, err = run_cli(capsys, "runs", "list", "--store", nights_store.url, "--last", "-3")
    assert code == 2 and "invalid count value: '-3'" in err


def test_runs_show_gives_the_nights_figures_per_slice_its_batches_and_its_report(capsys, nights_store):
    shown = as_json(capsys, "runs", "show", "run-c", "--store", nights_store.url)
    assert shown["decision"] == "rejected" and shown["selection_balanced_accuracy"] == 0.8
    (selection,) = shown["slices"]
    assert selection["slice"] == "mnist-selection" and selection["champion_balanced_accuracy"] == 0.95
    assert not selection["passed"] and selection["failed_rules"]
    assert [b["file"] for b in shown["batches"]] == ["night-1.parquet"]
    assert shown["report_path"] is None  # no report step ran here
    code, out, _ = run_cli(capsys, "runs", "show", "run-c", "--store", nights_store.url)
    assert code == 0 and "REJECTED" in out and "mnist-selection" in out and "champion 0.9500" in out
    assert "night-1.parquet" in out and nights_store.location(nights_store.report_index("run-c")) in out
    code, _, err = run_cli(capsys, "runs", "show", "no-such-run", "--store", nights_store.url)
    assert code == 1 and "`mnist-pipeline runs list` lists the run ids" in err


def _keys(value, where: str, found: dict[str, set[str]]) -> None:
    """Every field name of a JSON answer, by where it sits: the top level, or a nested list's name."""
    rows = value if isinstance(value, list) else [value]
    for row in rows:
        for key, item in row.items():
            found.setdefault(where, set()).add(key)
            if isinstance(item, list) and item and isinstance(item[0], dict):
                _keys(item, key, found)


def _leaves(value):
    if isinstance(value, dict):
        for key, item in value.items():
            yield from ((f"{key}.{k}" if k else key, v) for k, v in _leaves(item))
    elif isinstance(value, list):
        for item in value:
            yield from _leaves(item)
    else:
        yield "", value


def test_every_commands_json_uses_the_tables_column_names_full_keys_and_one_time_format(capsys, nights_store):
    from flows.cli import LOCATIONS
    from storage.tables import SCHEMAS, SLICE_RULES

    columns = {name for schema in SCHEMAS.values() for name in schema.names} | {"run_id"}
    nested = {"slices": {f.name for f in SLICE_RULES}, "batches": set(SCHEMAS["batches"].names) | {"run_id"}}
    nested["decisions"] = nested["batches"]  # `batches show`: each decision about the batch, as its table rows
    answers = {
        " ".join(command): as_json(capsys, *command, "--store", nights_store.url)
        for command in (
            ["runs", "list"],
            ["runs", "show", "run-c"],
            ["champion", "show"],
            ["champion", "history"],
            ["batches", "list"],
            ["batches", "show", "00000000"],
        )
    }
    for command, answer in answers.items():
        found: dict[str, set[str]] = {}
        _keys(answer, "", found)
        top = found.pop("")
        assert top <= columns | set(LOCATIONS) | set(nested), (command, sorted(top - columns - set(LOCATIONS)))
        for name, keys in found.items():
            assert keys <= nested[name], (command, name, sorted(keys - nested[name]))
        for path, value in _leaves(answer):
            name = path.rsplit(".", 1)[-1]
            if name.endswith("_at") or name in ("finished_at", "scheduled_start"):
                assert value is None or re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", value), (command, path, value)
            if name.endswith("model_key") and value is not None:
                assert len(value) == 32, (command, path, value)  # whole, never cut to 12
            if name in ("digest", "model_sha256", "dataset_sha256") and value is not None:
                assert len(value) == 64, (command, path, value)
            if isinstance(value, float):
                assert float(f"{value:.12g}") == value, (command, path, value)  # no 0.8034000000000001
    # the same name holds the same value for the same thing, whichever command printed it
    champion = answers["champion show"]
    (night_b,) = [r for r in answers["runs list"] if r["run_id"] == champion["run_id"]]
    assert night_b["model_key"] == champion["model_key"] == answers["champion history"][-1]["challenger_model_key"]
    assert champion["decided_at"] == answers["champion history"][-1]["decided_at"]
    assert (
        answers["batches list"][0]["digest"]
        == answers["batches show 00000000"]["digest"]
        == answers["runs show run-c"]["batches"][0]["digest"]
    )


def test_figures_lose_their_floating_point_noise_and_times_are_utc_to_the_microsecond():
    from datetime import datetime, timedelta, timezone

    from flows.cli import plain

    assert plain(0.1 + 0.2) == 0.3 and plain(4017 / 5000 + 1e-17) == 0.8034 and plain(1.4e-45) == 1.4e-45
    assert plain(float("nan")) is None and plain(np.float32(0.5)) == 0.5 and plain(np.int64(3)) == 3
    paris = timezone(timedelta(hours=1))
    assert plain(datetime(2026, 12, 7, 5, 0, tzinfo=paris)) == "2026-12-07T04:00:00.000000Z"
    assert plain(pd.Timestamp("2026-12-07 04:00:00.5", tz="UTC")) == "2026-12-07T04:00:00.500000Z"
    assert plain(pd.NaT) is None


def test_a_manual_promote_of_the_champion_changes_nothing_and_an_operators_reason_is_recorded(capsys, nights):
    from storage.tables import read_table

    before = read_table(nights, "promotions")
    code, out, err = run_cli(capsys, "champion", "promote", "run-b", "--store", nights.url)
    assert code == 0 and "already is the champion: nothing changed, nothing recorded" in out, err
    assert len(read_table(nights, "promotions")) == len(before)  # one `promoted` row per change of the champion
    code, out, err = run_cli(capsys, "champion", "promote", "run-a", "--reason", "run-b  fails on digit 7", "--store", nights.url)
    assert code == 0 and "Champion is now model " + "a" * 32 in out and "manual: run-b fails on digit 7" in out, err
    code, out, err = run_cli(capsys, "champion", "rollback", "--reason", "digit 7 was a labelling error", "--store", nights.url)
    assert code == 0, err
    manual = read_table(nights, "promotions").sort_values("decided_at").tail(2)
    assert manual["reason"].tolist() == ["manual: run-b fails on digit 7", "manual: digit 7 was a labelling error"]
    assert manual["forced"].all() and manual["challenger_model_key"].tolist() == ["a" * 32, "b" * 32]
    # an operator's decisions belong to no night: joining runs to promotions gives each night's gate decision once
    assert manual["run_id"].isna().all() and manual["decided_by"].eq("operator").all()
    joined = read_table(nights, "runs").merge(read_table(nights, "promotions"), on="run_id")
    assert sorted(joined["run_id"]) == ["run-a", "run-b", "run-c"] and joined["decided_by"].eq("gate").all()
    assert as_json(capsys, "champion", "show", "--store", nights.url)["reason"] == "manual: digit 7 was a labelling error"
    code, out, err = run_cli(capsys, "champion", "promote", "not-a-run", "--store", nights.url)
    assert code == 1 and "`mnist-pipeline runs list` lists the run ids" in err


@pytest.mark.parametrize("plant", ["a second file", "an encoded twin folder", "a twin naming another model"])
def test_promote_of_a_run_with_planted_partitions_says_so_in_a_sentence(capsys, nights, plant):
    """A copy planted beside a run's partition (``part-1.parquet``, or ``run_id=%72un-a``, which decodes to run-a)
    made ``champion promote`` end in ``ValueError: too many values to unpack`` (review 10 #7); a promotions twin
    naming another model would have promoted that model as the run's. The operator gets one sentence instead."""
    table = "promotions" if plant == "a twin naming another model" else "runs"
    source = "run-b" if plant == "a twin naming another model" else "run-a"
    own = Path(nights.path(nights.table_file(table, source)))
    twin = Path(nights.path(nights.table_dir(table))) / "run_id=%72un-a"
    if plant == "a second file":
        shutil.copy(own, own.with_name("part-1.parquet"))
    else:
        twin.mkdir()
        shutil.copy(own, twin / "part-0.parquet")
    before = nights.read_bytes(nights.champion_file())
    code, out, err = run_cli(capsys, "champion", "promote", "run-a", "--store", nights.url)
    found = "rows naming 2 models" if table == "promotions" else "2 rows"
    assert code == 1 and "Traceback" not in err and "too many values" not in err, err
    assert f"Run run-a has {found} in the {table} table of {nights.url}" in err and "then promote it again" in err, err
    assert nights.read_bytes(nights.champion_file()) == before  # nothing promoted


def test_every_verbs_help_page_opens_with_what_it_does_and_states_the_default_store():
    from docs.hooks import _subcommands

    commands = _subcommands(build_parser())
    run_help = " ".join(commands["run"].format_help().split())  # its flags are added when its help is printed
    assert "--store STORE" in run_help and "(default: $MNIST_STORE, else ./artifacts in the current folder)" in run_help
    for name, command in commands.items():
        assert command.description, name
        for verb, sub in _subcommands(command).items():
            if name == "serve":
                continue  # its options are flows/stack/serve.py's
            assert sub.description and sub.description in sub.format_help(), (name, verb)
            assert "exit status:" in sub.format_help()
            store = [a for a in sub._actions if "--store" in a.option_strings]
            if store:
                assert "$MNIST_STORE, else ./artifacts in the current folder" in store[0].help, (name, verb)


def test_usage_errors_are_short_and_name_only_the_commands_there_are(capsys):
    code, out, err = run_cli(capsys, "run", "--epochs", "many")
    assert code == 2 and out == "" and len(err.strip().splitlines()) <= 2 and "--epochs: invalid int value: 'many'" in err
    code, _, err = run_cli(capsys, "frobnicate")
    assert code == 2 and "there is no command 'frobnicate'" in err and "runs" in err
    for hidden in ("'promote'", "'rollback'", "'release'", "'quarantine'", "simulate-arrivals"):
        assert hidden not in err


def test_importing_the_cli_loads_no_heavy_library():
    """--version, --help and the read commands start in a fraction of a second: no pandas, SciPy, TensorFlow or
    Prefect before a command needs them (a read command imports pandas itself, when it reads a table)."""
    probe = (
        "import flows.cli; import sys; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in {'pandas','scipy','tensorflow','prefect','keras'}))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, check=True)
    assert done.stdout.strip() == "[]", done.stdout


def test_a_group_without_its_verb_shows_the_groups_help(capsys):
    code, out, _ = run_cli(capsys, "batches")
    assert code == 0 and "list" in out and "release" in out and "quarantine" in out


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (["rollback"], "champion rollback"),
        (["promote", "run-x"], "champion promote"),
        (["release", "deadbeef00"], "batches release"),
        (["quarantine", "deadbeef00"], "batches quarantine"),
    ],
)
def test_the_old_flat_names_still_work_for_one_release_and_say_what_replaces_them(capsys, tmp_path, old, new):
    (tmp_path / "store").mkdir()
    code, _, err = run_cli(capsys, *old, "--store", str(tmp_path / "store"))
    assert f"is deprecated and goes in the next release: use `mnist-pipeline {new}`" in err
    assert code == 1  # and it ran: an empty store has no champion, no such run, no such batch
    assert "no champion" in err or "not in the runs table" in err or "matches no batch" in err


def test_the_seed_is_empty_by_default_as_the_nightly_deployment_has_it():
    parser = build_parser()
    assert parameters_from(parser.parse_args(["run"])).seed is None  # derived from the dataset version
    assert parameters_from(parser.parse_args(["run", "--seed", ""])).seed is None  # the UI form's empty field
    assert parameters_from(parser.parse_args(["run", "--seed", "7"])).seed == 7
    drawn = parameters_from(parser.parse_args(["run", "--new-seed"]))
    assert drawn.seed is None and drawn.new_seed  # drawn from the run's id, so each run trains a new model


def test_serve_status_says_nothing_runs(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "serve", "status", "--home", str(tmp_path / "serve"))
    assert code == 3 and "Nothing of" in out


def test_batches_show_reads_the_operators_decision_filed_under_no_night(capsys, nights):
    """``batches show`` finds the batch by its digest, then reads whole only the partitions holding it: the
    operators' (a null run id) among them, so an operator's later quarantine is its latest decision."""
    from datetime import timedelta

    from storage.tables import read_table, write_table

    ingested = read_table(nights, "batches").drop(columns=["run_id"])
    overruled = ingested.assign(
        decision="quarantined",
        decided_by="operator",
        reason="quarantined by hand",
        decided_at=ingested["decided_at"] + timedelta(hours=1),
    )
    write_table(nights, "batches", None, overruled)
    digest = ingested["digest"].iloc[0]
    shown = as_json(capsys, "batches", "show", digest[:12], "--store", nights.url)
    assert shown["decision"] == "quarantined" and shown["decided_by"] == "operator" and shown["run_id"] is None
    assert [(d["decided_by"], d["run_id"]) for d in shown["decisions"]] == [("ingest", "run-c"), ("operator", None)]
