"""``mnist-pipeline`` as a person types it: noun groups with verbs, lists as tables or JSON, help and version,
the nightly deployment's seed, and the old flat names for one more release."""

from __future__ import annotations

import json

import pytest

from flows.cli import build_parser, main, parameters_from
from storage import Store


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


@pytest.mark.parametrize(
    ("command", "empty"),
    [
        (["batches", "list"], "No batch has arrived"),
        (["champion", "history"], "No model has been champion"),
        (["runs", "list"], "No run has finished"),
        (["champion", "show"], "No champion in"),
    ],
)
def test_list_commands_work_on_a_fresh_store_as_text_and_json(capsys, tmp_path, command, empty):
    store = str(tmp_path / "store")
    code, out, err = run_cli(capsys, *command, "--store", store)
    assert code == 0 and empty in out, err
    code, out, err = run_cli(capsys, *command, "--store", store, "--json")
    assert code == 0 and json.loads(out) in ([], None), err


def test_a_list_shows_the_rows_of_the_store(capsys, tmp_path):
    from storage.tables import write_table
    from tests.conftest import sample_frames

    store = Store(tmp_path / "store")
    frames = sample_frames(seed=3)
    write_table(store, "runs", "run-a", frames["runs"])
    code, out, _ = run_cli(capsys, "runs", "list", "--store", store.url)
    assert code == 0 and "selection_balanced_accuracy" in out and frames["runs"]["model"].iloc[0] in out
    code, out, _ = run_cli(capsys, "runs", "list", "--store", store.url, "--json")
    (row,) = json.loads(out)
    assert row["run_id"] == "run-a" and row["selection_balanced_accuracy"] == pytest.approx(
        frames["runs"]["selection_balanced_accuracy"].iloc[0]
    )


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
