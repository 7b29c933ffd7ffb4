"""Parquet round trip with the documented schema and hive layout, read as downstream consumers read it."""

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from storage import Store
from storage.tables import SCHEMA_VERSION, TABLES, read_table, write_table
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
    back = read_table(store, "predictions", run_id="run-b").sort_values("test_index").reset_index(drop=True)
    original = two_runs["run-b"]["predictions"]
    np.testing.assert_array_equal(back["test_index"], original["test_index"])
    np.testing.assert_array_equal(np.stack(back["probabilities"]), np.stack(original["probabilities"]))
    assert back["probabilities"].map(len).eq(10).all()
    schema = ds.dataset(store.path(store.table_dir("predictions")), partitioning="hive").schema
    probabilities = schema.field("probabilities").type
    assert pa.types.is_fixed_size_list(probabilities) and probabilities.list_size == 10
    assert probabilities.value_type == pa.float32()
    per_class = read_table(store, "per_class", run_id="run-a")
    assert list(per_class.columns) == [
        "label",
        "support",
        "correct",
        "accuracy",
        "precision",
        "recall",
        "f1",
        "accuracy_ci_low",
        "accuracy_ci_high",
        "slice",
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
        "challenger_model_key",
        "champion_model_key",
        "challenger_balanced_accuracy",
        "champion_balanced_accuracy",
        "challenger_test_accuracy",
        "champion_test_accuracy",
        "mcnemar_b",
        "mcnemar_c",
        "mcnemar_p",
        "worst_digit",
        "worst_digit_drop",
        "decision",
        "reason",
        "forced",
        "decided_at",
        "slices",
        "run_id",
    ]
    assert len(promotions) == 2 and promotions["champion_model_key"].isna().all()


def test_runs_written_before_the_gate_read_with_empty_gate_columns(store, two_runs):
    old = sample_frames(3)["runs"].drop(columns=["promoted", "champion_model_key"])
    path = store.path(store.table_file("runs", "run-old"))
    store.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    pq.write_table(pa.Table.from_pandas(old, preserve_index=False), path)  # a partition in the old layout
    runs = read_table(store, "runs").set_index("run_id")
    assert pd.isna(runs.loc["run-old", "promoted"]) and runs.loc["run-b", "promoted"] == True  # noqa: E712


def test_schema_1_and_schema_2_partitions_read_side_by_side(store, two_runs):
    """A consumer's pyarrow.dataset over partitions from before and after the slices, as the README shows it."""
    old = sample_frames(5)["per_class"].drop(columns=["slice"])
    path = store.path(store.table_file("per_class", "run-v1"))
    store.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    arrow = pa.Table.from_pandas(old, preserve_index=False).replace_schema_metadata({"schema_version": "1", "table": "per_class"})
    pq.write_table(arrow, path)  # written by a schema-1 pipeline: no slice column
    root = store.path(store.table_dir("per_class"))
    files = ds.dataset(root, partitioning="hive").files
    unified = pa.unify_schemas([pq.read_schema(f) for f in files]).append(pa.field("run_id", pa.string()))  # the README's recipe
    table = ds.dataset(root, schema=unified, partitioning="hive")
    frame = table.to_table().to_pandas()
    assert frame.groupby("run_id")["slice"].apply(lambda s: s.isna().all()).to_dict() == {
        "run-a": False,
        "run-b": False,
        "run-v1": True,
    }
    assert frame["slice"].fillna("mnist-test").eq("mnist-test").all() and len(frame) == 30
    ours = read_table(store, "per_class")  # and the pipeline's own reader, with the current schema
    assert sorted(ours["run_id"].unique()) == ["run-a", "run-b", "run-v1"] and ours["slice"].isna().sum() == 10


def test_a_table_no_run_has_written_reads_as_empty(store):
    assert read_table(store, "promotions").empty
