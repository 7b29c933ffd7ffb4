"""Parquet round trip with the documented schema and hive layout, read as downstream consumers read it."""

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from storage import Store
from storage.dictionary import data_dictionary, describe
from storage.tables import NO_RUN, SCHEMA_VERSION, SCHEMAS, TABLES, open_table, read_table, to_arrow, write_table
from tests.conftest import sample_frames


@pytest.fixture
def two_runs(store: Store):
    frames = {run: sample_frames(i) for i, run in enumerate(["run-a", "run-b"])}
    for run, tables in frames.items():
        for table, frame in tables.items():
            write_table(store, table, run, frame)
    return frames


def test_layout_is_hive_partitioned_by_run_id_with_schema_version(store, two_runs):
    for table in TABLES:
        path = store.table_file(table, "run-a")
        assert path.endswith(f"tables/{table}/run_id=run-a/part-0.parquet")
        meta = pq.read_schema(store.path(path)).metadata
        assert meta[b"schema_version"] == SCHEMA_VERSION.encode() and meta[b"table"] == table.encode()


def test_round_trip_keeps_values_and_types(store, two_runs):
    back = read_table(store, "predictions", run_id="run-b").sort_values("image_index").reset_index(drop=True)
    original = two_runs["run-b"]["predictions"]
    np.testing.assert_array_equal(back["image_index"], original["image_index"])
    np.testing.assert_array_equal(np.stack(back["probabilities"]), np.stack(original["probabilities"]))
    assert back["probabilities"].map(len).eq(10).all()
    schema = ds.dataset(store.path(store.table_dir("predictions")), partitioning="hive").schema
    probabilities = schema.field("probabilities").type
    assert pa.types.is_fixed_size_list(probabilities) and probabilities.list_size == 10
    assert probabilities.value_type == pa.float32()
    per_class = read_table(store, "per_class", run_id="run-a")
    assert list(per_class.columns) == [
        "true_label",
        "support",
        "correct",
        "recall",
        "recall_ci_low",
        "recall_ci_high",
        "precision",
        "f1",
        "slice",
        "evaluation_key",
        "run_id",
    ]


def test_downstream_readers_see_every_run_at_once(store, two_runs):
    confusion = pd.read_parquet(store.path(store.table_dir("confusion")))  # what the README shows
    assert len(confusion) == 200
    assert sorted(confusion["run_id"].astype(str).unique()) == ["run-a", "run-b"]
    runs = ds.dataset(store.path(store.table_dir("runs")), partitioning="hive").to_table().to_pandas()
    assert len(runs) == 2 and str(runs["finished_at"].dt.tz) == "UTC"


def test_readers_ignore_in_flight_temporary_files(store, two_runs):
    # a writer caught mid-write leaves a hidden temporary file next to the finished ones
    with store.writing(store.table_file("confusion", "run-c")) as tmp:  # the store's own temporary name
        with store.fs.open(tmp, "wb") as half:
            half.write(b"PAR1 half a file")
        assert len(pd.read_parquet(store.path(store.table_dir("confusion")))) == 200
        assert len(read_table(store, "confusion")) == 200
    assert len(read_table(store, "confusion")) == 200  # once renamed into place, half a file is a damaged partition: skipped


def test_a_frame_missing_a_column_is_refused(store):
    frame = sample_frames(0)["confusion"].drop(columns=["share_of_true"])
    with pytest.raises(ValueError, match="missing columns \\['share_of_true'\\]"):
        write_table(store, "confusion", "run-x", frame)
    assert not store.exists(store.table_file("confusion", "run-x"))


def test_promotions_has_exactly_the_documented_columns(store, two_runs):
    promotions = read_table(store, "promotions")
    assert list(promotions.columns) == [
        "decided_at",
        "decision",
        "reason",
        "forced",
        "decided_by",
        "challenger_model_key",
        "champion_before_model_key",
        "challenger_selection_balanced_accuracy",
        "champion_selection_balanced_accuracy",
        "challenger_test_accuracy",
        "champion_test_accuracy",
        "mcnemar_b",
        "mcnemar_c",
        "mcnemar_p",
        "worst_digit",
        "worst_digit_drop",
        "slices",
        "run_id",
    ]
    assert len(promotions) == 2 and promotions["champion_before_model_key"].isna().all()


def old_partition(store: Store, table: str, run_id: str, frame: pd.DataFrame, version: str | None) -> None:
    """A partition as an earlier release wrote it: its own columns, and its schema version in the metadata."""
    path = store.path(store.table_file(table, run_id))
    store.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    arrow = pa.Table.from_pandas(frame, preserve_index=False)
    if version is not None:
        arrow = arrow.replace_schema_metadata({"schema_version": version, "table": table})
    pq.write_table(arrow, path)


SCHEMA_2_RENAMES = {  # the latest name → the name schema 2 wrote
    "runs": {"test_balanced_accuracy": "balanced_accuracy", "champion_after_model_key": "champion_model_key"},
    "per_class": {"true_label": "label", "recall_ci_low": "accuracy_ci_low", "recall_ci_high": "accuracy_ci_high"},
    "confusion": {"images": "count"},
    "predictions": {"image_index": "test_index"},
    "promotions": {
        "champion_before_model_key": "champion_model_key",
        "challenger_selection_balanced_accuracy": "challenger_balanced_accuracy",
        "champion_selection_balanced_accuracy": "champion_balanced_accuracy",
    },
}
ADDED_IN_3 = {"runs": ["model_key", "evaluation_key", "reused_evaluation"], "promotions": []}
ADDED_IN_4 = {"runs": ["night"], "promotions": ["decided_by"], "predictions": ["sampled"]}


def as_schema_3(table: str, frame: pd.DataFrame) -> pd.DataFrame:
    return frame.drop(columns=ADDED_IN_4.get(table, []))


def as_schema_2(table: str, frame: pd.DataFrame) -> pd.DataFrame:
    frame = as_schema_3(table, frame)
    frame = frame.drop(columns=ADDED_IN_3.get(table, ["evaluation_key"])).rename(columns=SCHEMA_2_RENAMES[table])
    return frame.assign(accuracy=frame["recall"]) if table == "per_class" else frame


def test_runs_written_before_the_gate_read_with_empty_gate_columns(store, two_runs):
    old = as_schema_2("runs", sample_frames(3)["runs"]).drop(columns=["promoted", "champion_model_key"])
    old_partition(store, "runs", "run-old", old, version=None)  # before schema versions were recorded
    runs = read_table(store, "runs").set_index("run_id")
    assert pd.isna(runs.loc["run-old", "promoted"]) and runs.loc["run-b", "promoted"] == True  # noqa: E712
    assert runs.loc["run-old", "test_balanced_accuracy"] == 0.98 and pd.isna(runs.loc["run-old", "model_key"])


@pytest.mark.parametrize("table", ["runs", "per_class", "confusion", "predictions", "promotions"])
def test_every_schema_version_reads_as_the_latest(store, two_runs, table):
    """A store written by three releases reads as one set of columns with one meaning each: renamed columns
    mapped, ``slice`` filled for schema 1, the evaluation key of a pre-3 run its own run."""
    latest = two_runs["run-a"][table]
    old_partition(store, table, "run-v3", as_schema_3(table, latest), version="3")
    old_partition(store, table, "run-v2", as_schema_2(table, latest), version="2")
    v1 = as_schema_2(table, latest).drop(columns=["slice"], errors="ignore")
    old_partition(store, table, "run-v1", v1, version="1")
    frame = read_table(store, table)
    assert list(frame.columns) == [*SCHEMAS[table].names, "run_id"]
    by_run = {run: rows.drop(columns=["run_id"]).reset_index(drop=True) for run, rows in frame.groupby("run_id")}
    assert set(by_run) == {"run-a", "run-b", "run-v1", "run-v2", "run-v3"}
    pd.testing.assert_frame_equal(by_run["run-v3"], by_run["run-a"], check_dtype=False)
    for run in ("run-v1", "run-v2"):
        expected = by_run["run-a"].copy()
        if "evaluation_key" in expected:  # an old run's rows are its own evaluation's: runs joins them on it as before
            expected["evaluation_key"] = f"run:{run}"
        if table == "runs":
            expected["model_key"] = np.nan
        if table == "promotions" and run == "run-v1":  # schema 1 compared on the test sample: no selection figure
            expected["challenger_selection_balanced_accuracy"] = np.nan
        pd.testing.assert_frame_equal(by_run[run], expected, check_dtype=False)
    if "slice" in frame:
        assert frame["slice"].eq("mnist-test").all()


def test_a_cached_reruns_promoted_row_from_an_earlier_release_reads_as_unchanged(store):
    row = sample_frames(0)["promotions"].assign(reason="already the champion (promoted with run r0); first champion")
    old_partition(store, "promotions", "run-again", as_schema_2("promotions", row), version="2")
    assert read_table(store, "promotions")["decision"].tolist() == ["unchanged"]


def test_a_partition_from_a_newer_release_is_skipped_with_a_warning(store, two_runs):
    warnings = []
    store.warn = warnings.append
    old_partition(store, "runs", "run-v9", sample_frames(4)["runs"], version="9")
    assert sorted(read_table(store, "runs")["run_id"]) == ["run-a", "run-b"]
    assert any("schema version '9'" in w and "run-v9" in w for w in warnings)


def test_the_one_call_reader_takes_a_location_and_filters(store, two_runs):
    old_partition(store, "per_class", "run-v1", sample_frames(5)["per_class"].drop(columns=["slice", "evaluation_key"]), "1")
    frame = open_table(store.url, "per_class", slice="mnist-test", evaluation_key="e1")
    assert sorted(frame["true_label"]) == list(range(10)) and set(frame["run_id"]) == {"run-b"}
    assert len(open_table(store.url, "per_class", slice="mnist-test")) == 30  # three evaluations, each digit once
    with pytest.raises(ValueError, match="has no column accuracy; its columns are true_label"):
        open_table(store.url, "per_class", accuracy=1.0)
    with pytest.raises(ValueError, match="There is no table 'perclass'"):
        open_table(store.url, "perclass")


def test_every_column_says_what_it_holds(store):
    missing = [f"{t}.{f.name}" for t, s in SCHEMAS.items() for f in s if not describe(f)]
    assert missing == []
    written = pq.read_schema(store.path(write_table(store, "runs", "run-x", sample_frames(0)["runs"])))
    assert describe(written.field("model_key")) == describe(SCHEMAS["runs"].field("model_key"))  # in every file too
    dictionary = data_dictionary()
    for table, fields in SCHEMAS.items():
        assert f"### `{table}`" in dictionary and all(f"| `{f.name}` |" in dictionary for f in fields)


def test_a_table_no_run_has_written_reads_as_empty(store):
    assert read_table(store, "promotions").empty


def test_a_partition_whose_run_id_is_no_key_of_the_store_is_skipped(store, two_runs):
    """pyarrow URL-decodes a hive folder name: ``run_id=%2F..%2F..%2Fetc`` reads as the run id ``/../../etc``, which
    every reader (the tables step, ``champion promote``) would use as a key. Such a partition is skipped, not read."""
    warnings = []
    store.warn = warnings.append
    folder = Path(store.path(store.table_dir("runs"))) / "run_id=%2F..%2F..%2Fetc"  # the store itself refuses this key
    folder.mkdir()
    pq.write_table(to_arrow("runs", sample_frames(0)["runs"]), folder / "part-0.parquet")
    assert sorted(read_table(store, "runs")["run_id"]) == ["run-a", "run-b"]
    assert any("does not name a run id" in w and "%2F..%2F..%2Fetc" in w for w in warnings)


def test_a_partition_missing_what_its_schema_version_had_is_skipped_not_fatal(store, two_runs):
    warnings = []
    store.warn = warnings.append
    planted = as_schema_2("promotions", sample_frames(6)["promotions"]).drop(columns=["decision"])
    old_partition(store, "promotions", "run-odd", planted, version="2")
    assert sorted(read_table(store, "promotions")["run_id"]) == ["run-a", "run-b"]
    assert any("not those of schema version 2" in w and "run-odd" in w for w in warnings)


def test_an_old_nights_model_in_the_trend_is_its_gates_not_an_operators_later_promote(store):
    """A run from before ``runs.model_key`` takes its model from its own gate's row; an operator's promote filed in
    its partition (``manual``, or ``manual: <why>`` with ``--reason``) is not the night's model."""
    from datetime import UTC, datetime

    from tasks.publish.report import trend_frame

    old_partition(store, "runs", "run-old", as_schema_2("runs", sample_frames(3)["runs"]), version="2")
    night = sample_frames(0)["promotions"].assign(challenger_model_key="n" * 32)
    by_hand = night.assign(
        challenger_model_key="o" * 32, reason="manual: digit 7", forced=True, decided_at=datetime(2026, 12, 1, tzinfo=UTC)
    )
    write_table(store, "promotions", "run-old", night)
    write_table(store, "promotions", "run-old", by_hand, part="manual-20261201T000000000000")
    assert trend_frame(store).set_index("run_id").loc["run-old", "model_key"] == "n" * 32


def test_a_schema_3_run_row_reads_with_published_unknown(store, two_runs):
    """Schema 4 added whether the night finished publishing; a night written before it reads as unknown (null)."""
    old = sample_frames(3)["runs"].drop(columns=["published", "publish_problem"])
    old_partition(store, "runs", "run-v3", old, version="3")
    runs = read_table(store, "runs").set_index("run_id")
    assert pd.isna(runs.loc["run-v3", "published"]) and runs.loc["run-a", "published"] == True  # noqa: E712


def test_an_operators_decisions_filed_under_a_night_by_earlier_releases_read_as_no_nights(store, two_runs):
    """Schema 3 filed a manual promote under the champion's run and an operator's batch decision under the ingest
    run: read now, they have no night (``run_id`` null, ``decided_by = operator``), so a join of ``runs`` to
    ``promotions`` on ``run_id`` gives one row per night's gate decision."""
    night = two_runs["run-a"]["promotions"]
    by_hand = night.assign(reason="manual: digit 7", forced=True, decided_at=datetime(2026, 12, 1, tzinfo=UTC))
    old_partition(store, "promotions", "run-a", as_schema_3("promotions", pd.concat([night, by_hand])), version="3")
    promotions = read_table(store, "promotions").sort_values("decided_at")
    assert promotions["decided_by"].tolist() == ["gate", "gate", "operator"]
    assert promotions["run_id"].tolist()[:2] == ["run-a", "run-b"] and pd.isna(promotions["run_id"].iloc[2])
    joined = read_table(store, "runs").merge(promotions, on="run_id")
    assert sorted(joined["run_id"]) == ["run-a", "run-b"]

    batch = two_runs["run-a"]["batches"]
    released = batch.assign(decided_by="operator", decided_at=datetime(2026, 12, 1, tzinfo=UTC))
    old_partition(store, "batches", "run-a", pd.concat([batch, released]), version="3")
    batches = read_table(store, "batches").sort_values("decided_at")
    assert batches["run_id"].iloc[0] == "run-a" and pd.isna(batches["run_id"].iloc[-1])


def test_an_operators_row_is_read_with_a_null_run_id_by_pandas_and_duckdb(store, two_runs):
    """The partition of rows no night wrote is Hive's null partition: every reader sees a null run id."""
    import duckdb  # in the lock (dev extras): never skipped

    row = two_runs["run-a"]["promotions"].assign(decided_by="operator", forced=True, reason="manual")
    path = write_table(store, "promotions", None, row, part="manual-20261201T000000000000")
    assert f"run_id={NO_RUN}/" in path
    assert read_table(store, "promotions")["run_id"].isna().sum() == 1
    plain = ds.HivePartitioning.discover(infer_dictionary=False)  # as docs/reading-tables.md says for plain pandas
    assert pd.read_parquet(store.path(store.table_dir("promotions")), partitioning=plain)["run_id"].isna().sum() == 1
    glob = store.path(store.table_dir("promotions")) + "/*/*.parquet"
    nulls = duckdb.sql(f"SELECT count(*) FROM read_parquet('{glob}', hive_partitioning = true) WHERE run_id IS NULL")
    assert nulls.fetchone()[0] == 1


def test_a_nights_date_is_the_utc_date_it_was_scheduled_for_not_when_it_ran():
    from datetime import date, timedelta, timezone

    from tasks.publish.run_record import Execution
    from tasks.publish.tabulate import night_of

    late = Execution(
        scheduled_start=datetime(2026, 12, 6, 23, 30, tzinfo=UTC), started_at=datetime(2026, 12, 7, 1, 0, tzinfo=UTC)
    )
    assert night_of(late) == date(2026, 12, 6)  # started after midnight: still the 6th's night
    paris = Execution(scheduled_start=datetime(2026, 12, 7, 0, 30, tzinfo=timezone(timedelta(hours=1))))
    assert night_of(paris) == date(2026, 12, 6)  # 23:30 UTC
    by_hand = Execution(started_at=datetime(2026, 12, 7, 9, 0, tzinfo=UTC))
    assert night_of(by_hand) == date(2026, 12, 7)  # no schedule outside a deployment: the day it started


def test_a_slice_without_a_digit_writes_per_class_rows_for_the_digits_it_holds(tmp_path):
    """Review 9: a new-data slice without a 9 (an honest batch of 54 images, none a 9) made every night's tabulate
    fail on the 9's null recall. Its per_class rows are the digits it holds, and the real table takes them."""
    from storage import Store
    from tasks.evaluation.metrics import confusion_matrix
    from tasks.publish.tabulate import PUBLISHED_AS, per_class_rows

    labels = np.arange(54) % 9  # 0–8, six of each, no 9
    rows = per_class_rows(confusion_matrix(labels, labels))
    assert rows["label"].tolist() == list(range(9)) and (rows["recall"] == 1.0).all()
    store = Store(tmp_path / "store")
    frame = rows.rename(columns=PUBLISHED_AS).assign(slice="new-data", evaluation_key="e" * 32)  # as tabulate writes it
    write_table(store, "per_class", "run-1", frame)
    assert read_table(store, "per_class", run_id="run-1")["true_label"].tolist() == list(range(9))
