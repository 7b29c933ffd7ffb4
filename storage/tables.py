"""The Parquet tables downstream consumers read: their schemas, their hive layout, and how old partitions read.

Each table is a dataset under ``<store>/tables/<name>/`` partitioned by ``run_id``
(``run_id=<id>/part-0.parquet``). The partition column lives in the path, as pyarrow's
``write_to_dataset`` does, so ``pyarrow.dataset`` and ``pandas.read_parquet`` return it as a
column. ``schema_version`` sits in each file's schema metadata; it changes when a column is added,
renamed, or changes meaning. Every column's meaning is its field's ``description`` metadata: the data
dictionary in the docs is generated from it (``data_dictionary``), so it cannot drift from the files.

``read_table`` (and ``open_table`` for a reader with only a path or URL) reads every partition as the
latest schema: each file is upgraded from the version it declares (``UPGRADES``), so one call over a store
written by several releases returns one set of columns with one meaning each.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable, Collection
from datetime import UTC, datetime, timedelta
from urllib.parse import unquote

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from storage.files import DamagedArtifact, listed_mtime
from storage.keys import confine_key, confine_run_id, is_run_id
from storage.listing import ForeignNames
from storage.store import Store

SCHEMA_VERSION = "4"
NUM_CLASSES = 10  # MNIST's digits: the width of the probabilities column, and every per-digit table
# An operator's decision (``champion promote``/``rollback``, ``batches release``/``quarantine``) belongs to no night: its
# rows are in the partition Hive names for a null value, which pyarrow, pandas and DuckDB all read as a null run_id,
# so a join of ``runs`` to ``promotions`` or ``batches`` on ``run_id`` meets only what each night itself decided.
NO_RUN = "__HIVE_DEFAULT_PARTITION__"
RUN_ID = pa.field(
    "run_id",
    pa.string(),
    nullable=True,
    metadata={
        "description": "The Prefect flow run of the night that wrote the row (the partition's name); null for an "
        "operator's decision, which no night made (`decided_by = operator`, partition `run_id=" + NO_RUN + "`)."
    },
)
SLICES_DOC = "`mnist-test` (the balanced test sample), `mnist-selection` (the held-out selection split) or `new-data`."


def col(name: str, kind: pa.DataType, description: str, nullable: bool = True) -> pa.Field:
    """A column with its meaning attached: what the generated data dictionary prints."""
    return pa.field(name, kind, nullable=nullable, metadata={"description": description})


EVALUATION_KEY = col(
    "evaluation_key",
    pa.string(),
    "The evaluation the row belongs to (model, data and sample). Each evaluation's rows are written once, by the "
    "first run that made it; `runs.evaluation_key` joins a run to them.",
    nullable=False,
)
SLICE = col("slice", pa.string(), f"The images evaluated: {SLICES_DOC}", nullable=False)
SLICE_RULES = pa.struct(
    [
        pa.field("slice", pa.string()),
        pa.field("images", pa.int64()),
        pa.field("challenger_balanced_accuracy", pa.float64()),
        pa.field("champion_balanced_accuracy", pa.float64()),
        pa.field("mcnemar_b", pa.int64()),
        pa.field("mcnemar_c", pa.int64()),
        pa.field("mcnemar_p", pa.float64()),
        pa.field("worst_digit", pa.int8()),
        pa.field("worst_digit_drop", pa.float64()),
        pa.field("passed", pa.bool_()),
        pa.field("failed_rules", pa.list_(pa.string())),
        pa.field("note", pa.string()),  # why a slice was not compared although there was a champion
    ]
)

SCHEMAS: dict[str, pa.Schema] = {
    "confusion": pa.schema(
        [
            col("true_label", pa.int8(), "The digit the image shows.", nullable=False),
            col("predicted_label", pa.int8(), "The digit the model predicted.", nullable=False),
            col(
                "images", pa.int64(), "Images of `true_label` predicted as `predicted_label` (every pair, zeros included).", False
            ),
            col("share_of_true", pa.float64(), "`images` over all images of `true_label` in the slice.", nullable=False),
            SLICE,
            EVALUATION_KEY,
        ]
    ),
    "per_class": pa.schema(
        [
            col("true_label", pa.int8(), "The digit.", nullable=False),
            col("support", pa.int64(), "Images of this digit in the slice.", nullable=False),
            col("correct", pa.int64(), "Of those, predicted correctly.", nullable=False),
            col("recall", pa.float64(), "`correct / support`: the digit's accuracy.", nullable=False),
            col("recall_ci_low", pa.float64(), "Lower end of the 95 % Wilson interval of `recall`.", nullable=False),
            col("recall_ci_high", pa.float64(), "Upper end of the 95 % Wilson interval of `recall`.", nullable=False),
            col("precision", pa.float64(), "Of the images predicted as this digit, the share that are; null if never predicted."),
            col("f1", pa.float64(), "Harmonic mean of precision and recall; null with precision."),
            SLICE,
            EVALUATION_KEY,
        ]
    ),
    "predictions": pa.schema(
        [
            col(
                "image_index",
                pa.int32(),
                "The image's position in its slice (on `mnist-test`, its index in MNIST's test set).",
                nullable=False,
            ),
            col("true_label", pa.int8(), "The digit the image shows.", nullable=False),
            col("predicted_label", pa.int8(), "The digit the model predicted.", nullable=False),
            col("confidence", pa.float32(), "The predicted digit's probability.", nullable=False),
            col("probabilities", pa.list_(pa.float32(), NUM_CLASSES), "All ten probabilities, digit 0 first.", nullable=False),
            col(
                "sampled",
                pa.bool_(),
                "True when `confusion` and `per_class` count the image: on `mnist-test` the balanced sample "
                "(`runs.n_per_class` per digit), on the other slices every image. `mnist-test` holds all 10 000 test "
                "images (partitions before schema 4: the sample only).",
                nullable=False,
            ),
            SLICE,
            EVALUATION_KEY,
        ]
    ),
    "runs": pa.schema(
        [
            col("finished_at", pa.timestamp("us", tz="UTC"), "When the run wrote its row (UTC).", nullable=False),
            col(
                "night",
                pa.date32(),
                "The night the run belongs to: the UTC date of `scheduled_start` (Prefect's expected start time), "
                "else of `started_at`, else of `finished_at`. Group by it to count nights.",
                nullable=False,
            ),
            col("dataset_sha256", pa.string(), "SHA-256 over MNIST's four files as verified.", nullable=False),
            col(
                "dataset_version", pa.string(), "MNIST plus the accepted batches the run trained on (a digest of their digests)."
            ),
            col("batches_accepted", pa.int32(), "Accepted batches in that version."),
            col(
                "model_key",
                pa.string(),
                "The trained model's key in the store (`models/<key>/`); the same key is the same model.",
            ),
            col("model_sha256", pa.string(), "SHA-256 of the saved `.keras` file.", nullable=False),
            col("evaluation_key", pa.string(), "The evaluation whose rows `confusion`, `per_class` and `predictions` hold."),
            col(
                "reused_evaluation",
                pa.bool_(),
                "True when an earlier run already wrote this evaluation's rows (a cached rerun): this run wrote no "
                "`confusion`, `per_class` or `predictions` rows.",
            ),
            col("parameters", pa.string(), "The run's parameters as JSON (credentials removed).", nullable=False),
            col("model", pa.string(), "The network: `seed` (the user's CNN) or `strong`.", nullable=False),
            col("epochs", pa.int32(), "Epochs trained.", nullable=False),
            col("backend", pa.string(), "The Keras backend it trained on (tensorflow, jax or torch)."),
            col("device", pa.string(), "The device it trained on.", nullable=False),
            col(
                "test_accuracy",
                pa.float64(),
                "Accuracy on all 10 000 MNIST test images, the evaluation's `mnist-test` rows of `predictions` "
                "(reported, never decided on).",
                nullable=False,
            ),
            col(
                "test_balanced_accuracy",
                pa.float64(),
                "Mean per-digit recall on the balanced test sample (`n_per_class` images per digit): the mean "
                "`recall` of `per_class` on `mnist-test`, or of the `sampled` rows of `predictions`.",
                nullable=False,
            ),
            col("n_per_class", pa.int32(), "Test images per digit in the balanced sample.", nullable=False),
            col(
                "selection_balanced_accuracy",
                pa.float64(),
                "Mean per-digit recall on `mnist-selection`: what the gate decides on.",
            ),
            col("new_data_balanced_accuracy", pa.float64(), "The same on the `new-data` holdout; null before any batch."),
            col("new_data_images", pa.int32(), "Images in the `new-data` holdout."),
            col("promoted", pa.bool_(), "True when this run's gate made its model the champion (the pointer changed)."),
            col("champion_after_model_key", pa.string(), "The champion after this run's gate (null: none)."),
            col("attempt", pa.int32(), "1, or 2 and up when the run restarted after crashing."),
            col("resumed_from_epoch", pa.int32(), "Training resumed from the checkpoint after this epoch (0: from scratch)."),
            col("scheduled_start", pa.timestamp("us", tz="UTC"), "When the schedule meant the run to start."),
            col("started_at", pa.timestamp("us", tz="UTC"), "When this attempt began."),
            col(
                "published",
                pa.bool_(),
                "True when the night finished: its tables, report and artifacts were all written. False while it is "
                "still publishing, when it stopped before it finished, or when a publication step failed "
                "(`publish_problem` says which; the champion decision stands). Null in rows of schema 3 and before.",
            ),
            col("publish_problem", pa.string(), "Why the night is not published, in words; null when it is."),
        ]
    ),
    "promotions": pa.schema(
        [
            col(
                "decided_at",
                pa.timestamp("us", tz="UTC"),
                "When the decision was taken, between reading and writing the pointer.",
                False,
            ),
            col(
                "decision",
                pa.string(),
                "`promoted` (the champion pointer changed to the challenger: one row per change), `rejected` (it stayed) "
                "or `unchanged` (the challenger already was the champion: a cached rerun).",
                nullable=False,
            ),
            col(
                "reason",
                pa.string(),
                "Why, in words: the rules that failed, `first champion`, or for an operator's promote or rollback `manual` "
                "(`manual: <why>` when given `--reason`).",
                nullable=False,
            ),
            col(
                "forced",
                pa.bool_(),
                "True for an operator's decision (`champion promote`, `rollback`, `--force-promote`).",
                False,
            ),
            col(
                "decided_by",
                pa.string(),
                "`gate` (a night's gate, `--force-promote` included: `run_id` is that night) or `operator` "
                "(`champion promote` / `champion rollback`: `run_id` is null).",
                nullable=False,
            ),
            col(
                "challenger_model_key", pa.string(), "The model decided on; after a `promoted` row, the champion.", nullable=False
            ),
            col("champion_before_model_key", pa.string(), "The champion compared against (null: there was none)."),
            col(
                "challenger_selection_balanced_accuracy",
                pa.float64(),
                "The challenger's mean per-digit recall on `mnist-selection` (null in rows written before that split existed).",
            ),
            col("champion_selection_balanced_accuracy", pa.float64(), "The champion's, on the same images."),
            col("challenger_test_accuracy", pa.float64(), "The challenger's accuracy on the test set (reported only).", False),
            col("champion_test_accuracy", pa.float64(), "The champion's accuracy on the test set (reported only)."),
            col("mcnemar_b", pa.int64(), "`mnist-selection` images only the champion got right."),
            col("mcnemar_c", pa.int64(), "`mnist-selection` images only the challenger got right."),
            col("mcnemar_p", pa.float64(), "Exact two-sided McNemar p-value of b against c."),
            col("worst_digit", pa.int8(), "The digit whose recall dropped most from champion to challenger."),
            col("worst_digit_drop", pa.float64(), "That drop (positive: the challenger is worse)."),
            col("slices", pa.list_(SLICE_RULES), "Every deciding slice's comparison and the rules it failed."),
        ]
    ),
    "batches": pa.schema(
        [
            col("digest", pa.string(), "SHA-256 of the incoming file: the batch's identity.", nullable=False),
            col("file", pa.string(), "Its name in the incoming location.", nullable=False),
            col("rows", pa.int64(), "Images in the file.", nullable=False),
            col("decision", pa.string(), "`accepted` or `quarantined`; an operator's later row overrules.", nullable=False),
            col("reason", pa.string(), "Why, in words.", nullable=False),
            col(
                "decided_by",
                pa.string(),
                "`ingest` (a night: `run_id` is that night), or `operator` (`batches release` / `batches quarantine`: "
                "`run_id` is null).",
                nullable=False,
            ),
            col("decided_at", pa.timestamp("us", tz="UTC"), "When (UTC).", nullable=False),
            col(
                "source",
                pa.string(),
                "The distinct values of the batch file's optional `source` column (at most three shown, then "
                "`and N more`); null when the file has no such column.",
            ),
            col("duplicates", pa.int64(), "Exact repeats of an image within the batch, dropped."),
            col("leaked_test", pa.int64(), "Copies or near copies of MNIST test images, dropped."),
            col("leaked_selection", pa.int64(), "Copies or near copies of selection-split images, dropped."),
            col("leaked_holdout", pa.int64(), "Copies or near copies of `new-data` holdout images, dropped."),
            col("train_rows", pa.int64(), "Images added to training."),
            col("holdout_rows", pa.int64(), "Images added to the `new-data` holdout."),
            col("label_chi2_p", pa.float64(), "Chi-square p-value of the label distribution against MNIST's training set."),
            col("label_shift", pa.float64(), "Total variation distance of the two label distributions."),
            col("mean_intensity", pa.float64(), "Mean pixel value (0–1) of the batch; MNIST's is about 0.13."),
            col(
                "mean_intensity_ks", pa.float64(), "Two-sample Kolmogorov–Smirnov statistic of per-image intensity against MNIST."
            ),
            col("mean_intensity_p", pa.float64(), "Its p-value."),
            col("ink_fraction", pa.float64(), "Share of pixels above half intensity."),
            col("ink_fraction_ks", pa.float64(), "Kolmogorov–Smirnov statistic of the ink fraction against MNIST."),
            col("ink_fraction_p", pa.float64(), "Its p-value."),
            col("disagreement", pa.float64(), "Share of labels the champion disagrees with."),
            col("confident_disagreement", pa.float64(), "The same, on images the champion is confident about."),
            col(
                "champion_confident_disagreement", pa.float64(), "The champion's own confident disagreement on `mnist-selection`."
            ),
            col("champion_model_key", pa.string(), "The champion that judged the labels."),
        ]
    ),
}
TABLES = tuple(SCHEMAS)

# An evaluation's own stored predictions (not a table: one file per slice under the evaluation's key), in the
# layout evaluations have always had, so a champion's predictions from an earlier release still read.
PREDICTIONS_FILE = "predictions-file"
FILE_SCHEMAS: dict[str, pa.Schema] = {
    PREDICTIONS_FILE: pa.schema(
        [
            pa.field("test_index", pa.int32(), nullable=False),  # the image's index within its slice
            pa.field("true_label", pa.int8(), nullable=False),
            pa.field("predicted_label", pa.int8(), nullable=False),
            pa.field("confidence", pa.float32(), nullable=False),
            pa.field("probabilities", pa.list_(pa.float32(), NUM_CLASSES), nullable=False),
            pa.field("slice", pa.string()),
        ]
    )
}


def schema(table: str) -> pa.Schema:
    """The on-disk schema of ``table`` (or of a stored file kind) with its metadata (a table's run_id is in the path)."""
    if table in FILE_SCHEMAS:
        return FILE_SCHEMAS[table].with_metadata({"schema_version": "2", "file": table})
    return SCHEMAS[table].with_metadata({"schema_version": SCHEMA_VERSION, "table": table})


def to_arrow(table: str, frame: pd.DataFrame) -> pa.Table:
    """Convert and validate: a missing column or a value of the wrong type fails here, not downstream."""
    target = schema(table)
    if table in FILE_SCHEMAS and "slice" not in frame.columns:  # one slice's own file: the slice is its name
        frame = frame.assign(slice=None)
    missing = [f.name for f in target if f.name not in frame.columns]
    if missing:
        raise ValueError(f"table {table!r} is missing columns {missing}")
    return pa.Table.from_pandas(frame[target.names], schema=target, preserve_index=False)


# ---- reading every schema version as the latest ------------------------------------------------------------------
# Schema 2 (nights with new data) added ``slice``; a schema-1 row is of ``mnist-test``, the only slice it had.
# Schema 3 renamed columns so each says what it measures, added the model and evaluation keys to
# ``runs``, the evaluation key to the evaluation tables, and the ``unchanged`` decision. Schema 4 (this release)
# added whether the night finished publishing (``runs.published``, ``runs.publish_problem``).
RENAMED_IN_3: dict[str, dict[str, str]] = {
    "confusion": {"count": "images"},
    "per_class": {"label": "true_label", "accuracy_ci_low": "recall_ci_low", "accuracy_ci_high": "recall_ci_high"},
    "predictions": {"test_index": "image_index"},
    "runs": {"balanced_accuracy": "test_balanced_accuracy", "champion_model_key": "champion_after_model_key"},
    "promotions": {
        "challenger_balanced_accuracy": "challenger_selection_balanced_accuracy",
        "champion_balanced_accuracy": "champion_selection_balanced_accuracy",
        "champion_model_key": "champion_before_model_key",
    },
}
ALREADY = "already the champion"  # how schema 1 and 2 worded a cached rerun's "promoted" row


def _to_3(table: str, version: str, frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.rename(columns=RENAMED_IN_3.get(table, {}))
    if "slice" in SCHEMAS[table].names:
        frame["slice"] = frame["slice"].fillna("mnist-test") if "slice" in frame else "mnist-test"
    if "evaluation_key" in SCHEMAS[table].names and "evaluation_key" not in frame:
        frame["evaluation_key"] = "run:" + frame["run_id"].astype(str)  # one evaluation per run, as those releases wrote it
    if table == "promotions":
        if version == "1":  # the gate compared on the test sample then: not a selection figure
            frame["challenger_selection_balanced_accuracy"] = None
            frame["champion_selection_balanced_accuracy"] = None
        again = (frame["decision"] == "promoted") & frame["reason"].astype(str).str.startswith(ALREADY)
        frame.loc[again, "decision"] = "unchanged"
    if table == "runs" and "reused_evaluation" not in frame:
        frame["reused_evaluation"] = False
    return frame


# Schema 4 (this release) added ``runs.published`` and ``runs.publish_problem`` (unknown, null, for the nights
# before it), and gave each column one meaning: ``run_id`` is the night that wrote the row, null for an
# operator's decision (before, filed under the champion's or the ingest run); ``promotions.decided_by`` says who
# decided; ``runs.night`` is the scheduled date; ``predictions`` on ``mnist-test`` holds every test image, ``sampled``
# marking the balanced sample (every earlier row was one: those partitions held the sample only).
MANUAL_REASON = "manual"  # how an operator's promote or rollback has always begun its reason (`manual: <why>`)


def _night(frame: pd.DataFrame) -> pd.Series:
    when = frame["finished_at"]
    for column in ("started_at", "scheduled_start"):  # the first present wins: scheduled, else started, else finished
        if column in frame:
            when = frame[column].where(frame[column].notna(), when)
    return pd.to_datetime(when, utc=True).dt.date


def _to_4(table: str, version: str, frame: pd.DataFrame) -> pd.DataFrame:
    if table == "promotions":
        reason = frame["reason"].astype(str)
        by_hand = (reason == MANUAL_REASON) | reason.str.startswith(MANUAL_REASON + ":")  # no gate's reason begins so
        if "forced" in frame:
            by_hand &= frame["forced"].fillna(True).astype(bool)
        frame["decided_by"] = by_hand.map({True: "operator", False: "gate"})
        frame["run_id"] = frame["run_id"].where(~by_hand, None)
    if table == "batches":
        if "decided_by" in frame:
            frame["run_id"] = frame["run_id"].where(frame["decided_by"] != "operator", None)
    if table == "runs":
        frame["night"] = _night(frame)
    if table == "predictions":
        frame["sampled"] = True
    return frame


UPGRADES: dict[str, Callable[[str, str, pd.DataFrame], pd.DataFrame]] = {
    "1": lambda table, version, frame: _to_4(table, version, _to_3(table, version, frame)),
    "2": lambda table, version, frame: _to_4(table, version, _to_3(table, version, frame)),
    "3": _to_4,
}


def _latest(store: Store, table: str, fragment: ds.ParquetFileFragment, full: pa.Schema) -> pa.Table:
    """One partition as the latest schema (the columns of ``full``): its file opened once, its footer checked
    against what a night writes (``_check_footer``) before any column is decoded, its strings counted before any is
    decoded (``_read_bounded``: at most ``DECODED_BYTES`` of the table), then read as written (of a file of the
    latest version, only the columns asked for) and upgraded from the version its metadata declares. Its run
    id (the folder's name, URL-decoded) must be a run id of ours (``confine_run_id``: ``run_id=%2E%2E`` decodes to
    ``..``, which no check of the whole key sees) naming a partition this store could hold: every reader uses it as a
    key (``UnsafeKey``, a ``ValueError``, otherwise, and the partition is skipped)."""
    run_id = ds.get_partition_keys(fragment.partition_expression).get("run_id")
    if run_id is not None and run_id != NO_RUN:
        confine_run_id(run_id if isinstance(run_id, str) else repr(run_id))
    confine_key(store.table_file(table, NO_RUN if run_id is None else str(run_id)))
    with fragment.open() as handle:
        size = handle.size()
        _check_footer_length(handle.read_at(8, size - 8) if size >= 8 else b"")
        parquet = pq.ParquetFile(handle)
        _check_footer(parquet.metadata, PARTITION_ROWS.get(table, PARTITION_ROWS_DEFAULT))
        physical = parquet.schema_arrow
        version = (physical.metadata or {}).get(b"schema_version", b"1").decode()
        if version != SCHEMA_VERSION and version not in UPGRADES:
            raise ValueError(
                f"it declares schema version {version!r}, which this release does not know (newest: {SCHEMA_VERSION})"
            )
        # One thread: a partition is a few rows, and the reader's thread pool costs more than it saves on them.
        # Decoding costs per column and file (about 65 µs on the benchmark's machine), so only what is asked is read.
        wanted = [n for n in full.names if n in physical.names] if version == SCHEMA_VERSION else None
        data = _read_bounded(parquet, handle, DECODED_BYTES.get(table, DECODED_BYTES_DEFAULT), wanted)
    if version == SCHEMA_VERSION:
        return _as_schema(data, full, run_id)
    frame = data.to_pandas(ignore_metadata=True)  # the file's own pandas metadata is not obeyed: not ours to trust
    frame["run_id"] = run_id
    try:
        frame = UPGRADES[version](table, version, frame)
    except (KeyError, TypeError, AttributeError, IndexError) as exc:  # a file that is not what its version says
        raise ValueError(f"its columns are not those of schema version {version} ({type(exc).__name__}: {exc})") from None
    for name in full.names:
        if name not in frame:
            frame[name] = None
    return pa.Table.from_pandas(frame[full.names], schema=full, preserve_index=False)  # only the columns asked for


def _as_schema(data: pa.Table, full: pa.Schema, run_id: object) -> pa.Table:
    """A partition of the latest version with exactly ``full``'s columns, as a dataset scan returns it: each column
    cast to its type (``ArrowInvalid`` when it cannot be: the partition is skipped), a column the file lacks as
    nulls, one it has beyond them dropped, and ``run_id`` the folder's, whatever the file holds."""
    if len(set(data.column_names)) != len(data.column_names):
        raise ValueError(f"it names a column twice ({', '.join(data.column_names)})")  # column() would be ambiguous
    rows = data.num_rows
    columns = []
    for field in full:
        if field.name == RUN_ID.name:
            columns.append(pa.array([run_id] * rows, type=field.type))
        elif field.name in data.column_names:
            columns.append(data.column(field.name).cast(field.type))
        else:
            columns.append(pa.nulls(rows, type=field.type))
    return pa.Table.from_arrays(columns, schema=full)


def write_frame(store: Store, path: str, table: str, frame: pd.DataFrame) -> str:
    """Write ``frame`` with the schema of ``table`` to ``path``, atomically."""
    arrow = to_arrow(table, frame)
    with store.writing(path) as tmp, store.fs.open(tmp, "wb") as handle:
        pq.write_table(arrow, handle, compression="zstd")
    return path


def write_table(store: Store, table: str, run_id: str | None, frame: pd.DataFrame, part: str = "part-0") -> str:
    """Write one run's partition of ``table`` (or another part of it) atomically; returns its path. ``run_id`` None:
    an operator's decision, in the partition read as a null run id (``NO_RUN``)."""
    return write_frame(store, store.table_file(table, NO_RUN if run_id is None else run_id, part), table, frame)


def read_frame(store: Store, path: str, sha256: str | None = None, columns: Collection[str] = ()) -> pd.DataFrame:
    """One Parquet file as a DataFrame, read once into memory (at most ``PARTITION_BYTES``), its footer checked
    against the limits of a night's partition before any column is decoded and its strings counted before any is
    decoded (at most ``FRAME_DECODED_BYTES``, each no longer than a run writes); with ``sha256``, the bytes parsed are
    the bytes checked (``DamagedArtifact`` if they do not match). A file whose digest matches but whose content is
    not the frame we wrote (not Parquet, truncated, without one of ``columns``) is ``DamagedArtifact`` too, never
    a parser's own error: callers treat it as a miss, never as the end of a night."""
    data = (
        store.verified_bytes(path, sha256, limit=PARTITION_BYTES)
        if sha256 is not None
        else store.read_bytes(path, limit=PARTITION_BYTES)
    )
    try:
        _check_footer_length(bytes(data[-8:]))
        parquet = pq.ParquetFile(pa.BufferReader(data))
        _check_footer(parquet.metadata, PARTITION_ROWS_DEFAULT)
        decoded = _read_bounded(parquet, pa.BufferReader(data), FRAME_DECODED_BYTES)
        frame = decoded.to_pandas(ignore_metadata=True)  # the file's pandas metadata is not obeyed
    except Exception as exc:  # noqa: BLE001 (whatever the decoder raises on bytes a writer planted, they are damage)
        raise DamagedArtifact(f"{store.location(path)} is not a frame this pipeline wrote: {exc}") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DamagedArtifact(f"{store.location(path)} lacks the column(s) {', '.join(missing)}")
    return frame


PREDICTION_COLUMNS = ("test_index", "true_label", "predicted_label", "confidence", "probabilities")


def read_predictions(store: Store, path: str, sha256: str, images: int | None = None) -> pd.DataFrame:
    """An evaluation's stored predictions (a ``PREDICTIONS_FILE``): read as ``read_frame`` reads it, then every value
    checked as our evaluation writes it (``predictions_problem``). A frame whose digest matches but whose values no
    evaluation of ours makes (a ``predicted_label`` of 120, a NaN confidence) is ``DamagedArtifact``, as one that is
    not Parquet is: every caller treats it as a miss, never as a crash in a confusion matrix or a figure."""
    frame = read_frame(store, path, sha256, columns=PREDICTION_COLUMNS)
    problem = predictions_problem(frame, images)
    if problem:
        raise DamagedArtifact(f"{store.location(path)} holds predictions no evaluation of ours makes: {problem}")
    return frame


def predictions_problem(frame: pd.DataFrame, images: int | None = None) -> str:
    """What in a predictions frame no evaluation of ours writes, in words ("" when nothing): ``test_index`` whole
    numbers, each once, from 0 (below ``images`` when given: the slice's or test set's size); both labels digits
    0–9; ``confidence`` and each of the ten ``probabilities`` finite and in [0, 1]."""
    if frame.columns.duplicated().any():
        return "a column is named twice"
    for name in ("test_index", "true_label", "predicted_label"):
        if not pd.api.types.is_integer_dtype(frame[name].dtype):
            return f"{name} holds values that are not whole numbers ({frame[name].dtype})"
    index = frame["test_index"]
    if len(index) and (index.min() < 0 or (images is not None and index.max() >= images)):
        return f"test_index runs from {index.min()} to {index.max()}, outside 0–{'' if images is None else images - 1}"
    if index.duplicated().any():
        return "test_index names an image twice"
    for name in ("true_label", "predicted_label"):
        column = frame[name]
        if len(column) and (column.min() < 0 or column.max() > NUM_CLASSES - 1):
            return f"{name} holds {column.max() if column.max() > NUM_CLASSES - 1 else column.min()}, not a digit 0–9"
    if not pd.api.types.is_float_dtype(frame["confidence"].dtype):
        return f"confidence holds values that are not numbers ({frame['confidence'].dtype})"
    try:
        rows = frame["probabilities"].to_numpy()
        probabilities = np.stack(list(rows)).astype(np.float64) if len(rows) else np.empty((0, NUM_CLASSES))
    except (TypeError, ValueError) as exc:
        return f"probabilities are not ten numbers an image ({exc})"
    if probabilities.shape != (len(frame), NUM_CLASSES):
        return f"probabilities are not ten numbers an image (shape {probabilities.shape})"
    for name, values in (("confidence", frame["confidence"].to_numpy(np.float64)), ("probabilities", probabilities)):
        if not np.isfinite(values).all():
            return f"{name} holds a NaN or an infinity"
        if values.size and (values.min() < 0 or values.max() > 1):
            return f"{name} holds {values.max() if values.max() > 1 else values.min()}, outside [0, 1]"
    return ""


HIDDEN = (".", "_")  # in-flight temporary files, folders set aside: never read as data, never warned about


def partition_files(store: Store, table: str) -> list[str]:
    """The files of ``table``'s partitions, listed as the store writes them and no deeper:
    ``<table>/run_id=<id>/<part>.parquet``. Anything else there (a file or link beside the partitions, a folder or
    pipe inside one, a folder planted thousands of levels deep, which made pyarrow's recursive discovery raise
    ``RecursionError``) is skipped with one warning naming the first of them; hidden names are skipped silently.

    A local store is listed one level at a time through its door (two listings deep, whatever is planted); a remote
    store in one flat listing of its prefix (an object store has no folders to recurse into), of which only the
    keys at a partition's depth are kept."""
    return sorted(_partition_entries(store, table))


def newest_partition_files(store: Store, table: str, limit: int) -> list[str]:
    """The files of ``table``'s ``limit`` newest partition files by the listing's modification time (S3: the time
    the server stored the object, which no writer sets), newest first: what a reader that must stay bounded however
    many partitions a writer planted reads (the champion search of a broken pointer, ``tasks/champion/pointer.py``)."""
    entries = _partition_entries(store, table)
    return sorted(entries, key=lambda path: (entries[path], path), reverse=True)[:limit]


def _partition_entries(store: Store, table: str) -> dict[str, float]:
    """``partition_files``' files, each with its modification time as listed."""
    top = store.path(store.table_dir(table)).rstrip("/")
    files: dict[str, float] = {}
    odd: list[str] = []
    foreign: list[str] = []  # run_id=<not a run id of ours, as pyarrow decodes it>: no run's partition

    def keep(rel: list[str], entry: dict, path: str) -> None:
        if any(part.startswith(HIDDEN) for part in rel):
            return
        if len(rel) == 2 and rel[0].startswith("run_id=") and rel[1].endswith(".parquet") and entry.get("type") == "file":
            run_id = unquote(rel[0].removeprefix("run_id="))  # as hive partitioning decodes it: %2E%2E is ..
            if run_id == NO_RUN or is_run_id(run_id):
                files[path] = listed_mtime(entry)
            else:
                foreign.append("/".join(rel))
        else:
            odd.append("/".join(rel))

    if store.is_local:
        for folder in store.listing(top):
            name = posixpath.basename(folder["name"].rstrip("/"))
            if folder["type"] != "directory" or not name.startswith("run_id="):
                keep([name], folder, folder["name"])
                continue
            for entry in store.listing(folder["name"]):
                keep([name, posixpath.basename(entry["name"].rstrip("/"))], entry, entry["name"])
    else:
        for path, info in store.fs.find(top, withdirs=False, detail=True).items():
            path = store.fs._strip_protocol(path).rstrip("/")
            keep(path[len(top) + 1 :].split("/"), info, path)
    if odd:
        store.warn(
            f"Skipping {len(odd)} entr{'y' if len(odd) == 1 else 'ies'} of table {table!r} that are not partitions "
            f"this pipeline writes (run_id=<id>/<part>.parquet), first: {odd[0][:200]!r}"
        )
    if foreign:
        store.warn(
            ForeignNames(
                f"Skipping {len(foreign)} partition(s) of table {table!r} whose folder does not name a run id "
                f"(one name of letters, digits, '.', '_' or '-'), first: {foreign[0][:200]!r}; "
                "no run writes such a folder: remove it by hand"
            )
        )
    return files


def dataset(store: Store, table: str, files: list[str] | None = None) -> ds.Dataset:
    """Every run of ``table`` (or only ``files`` of it) as one pyarrow dataset, of the files ``partition_files``
    lists: pyarrow is given the files, never asked to discover them (its discovery recurses into whatever a writer
    planted)."""
    partitioning = ds.partitioning(pa.schema([RUN_ID]), flavor="hive")
    return ds.dataset(
        partition_files(store, table) if files is None else files,
        filesystem=store.fs,
        format="parquet",
        schema=schema(table).append(RUN_ID),
        partitioning=partitioning,
        partition_base_dir=store.path(store.table_dir(table)).rstrip("/"),
    )


# What one run's partition of a table may hold before it is read: its footer's row count and uncompressed size are
# checked first, so a small file that decodes to millions of rows (146 KiB → 500 MiB) is skipped, never materialised.
# A night writes one row to runs, a few to promotions and batches, and every prediction of its slices.
PARTITION_ROWS = {"runs": 1_000, "promotions": 1_000, "batches": 10_000}
PARTITION_ROWS_DEFAULT = 500_000
PARTITION_BYTES = 256 << 20
# What a partition may DECODE to, strings included, checked before any string is decoded (``_read_bounded``). A
# footer declares a dictionary-encoded column's size as its dictionary's: one 60 KB `reason` repeated on 1 000 rows
# declares 61 KB and decodes to 57 MiB (review 7), so the footer alone does not bound memory. A night's `runs` row
# is a few KB, its `promotions` rows a few KB each, a batch row under 5 KB; a `predictions` row about 100 bytes (the
# stores measured on 2026-12-07: 103), so 500 000 of them take about 50 MiB.
DECODED_BYTES = {"runs": 16 << 20, "promotions": 16 << 20, "batches": 64 << 20}
DECODED_BYTES_DEFAULT = 128 << 20
FRAME_DECODED_BYTES = 64 << 20  # a stored frame (a slice's predictions, a training history): 10 000 rows are ~1 MiB
# The longest string a column may hold, checked before any is decoded. Free text (reasons, problems, parameters,
# the gate's per-slice rules and notes, a batch's sources) is cut by its writers at 4 000 characters (an operator's
# reason at MAX_REASON_CHARS); parameters are a few KB of JSON. Every other string is a key, a digest, a name or a
# word: under 300 characters (the longest in the stores measured on 2026-12-07: 64).
TEXT_COLUMNS = {"reason", "parameters", "publish_problem", "slices", "source"}
TEXT_BYTES = 64 << 10
NAME_BYTES = 1 << 10
SMALL_BYTES = 1 << 10  # a column this small even if every row held all its distinct strings is not measured further


# The footer a Parquet file ends with (its schema and every column chunk's metadata) is parsed whole before any of
# its figures can be checked, at about 230 bytes of memory per byte of footer (review 11, 2026-12-08: a 9 MB file
# that is only a footer listing a million 3-byte column chunks took 2 GiB). Ours are small: 4.7–21 KB in the stores
# measured that day (`runs` the largest); free text's statistics (a 4 000-character reason's min and max) add a few
# KB a column. So the length the file's last 8 bytes declare is checked first, and a longer footer is not parsed.
FOOTER_BYTES = 1 << 20


def _check_footer_length(tail: bytes) -> None:
    """``tail``: a Parquet file's last 8 bytes (the footer's length, then ``PAR1``)."""
    if len(tail) != 8 or tail[4:] != b"PAR1":
        raise ValueError("it does not end as a Parquet file does")
    length = int.from_bytes(tail[:4], "little")
    if length > FOOTER_BYTES:
        raise ValueError(f"its footer is {length} bytes, more than a night writes ({FOOTER_BYTES >> 20} MiB): not parsed")


def _check_footer(metadata: pq.FileMetaData, limit: int) -> None:
    rows = metadata.num_rows
    size = sum(metadata.row_group(i).total_byte_size for i in range(metadata.num_row_groups))
    if rows > limit or size > PARTITION_BYTES:
        raise ValueError(
            f"it declares {rows} rows and {size} uncompressed bytes, more than a night writes "
            f"({limit} rows, {PARTITION_BYTES >> 20} MiB): not read"
        )


def _read_bounded(parquet: pq.ParquetFile, source: object, limit: int, columns: list[str] | None = None) -> pa.Table:
    """``columns`` of an opened file (all when None) with every string decoded, refused (``ValueError``) before any
    string is decoded when a column holds a string longer than its kind allows (``TEXT_BYTES`` for the columns in
    ``TEXT_COLUMNS``, ``NAME_BYTES`` for the others) or the whole would take more than ``limit`` bytes.

    Every string and binary column (nested ones too, such as `promotions.slices`' notes) is read as a dictionary,
    which holds each distinct value once and an index per row, whatever encoding the file used: what decoding would
    produce is then counted from the dictionary's value lengths taken by the indices, in a few bytes a row. A
    dictionary-encoded column of a 60 KB value on 1 000 rows reads as 60 KB and 4 KB of indices, not 57 MiB."""
    schema_ = parquet.schema
    strings = [c.path for c in (schema_.column(i) for i in range(len(schema_))) if c.physical_type == "BYTE_ARRAY"]
    reader = pq.ParquetFile(source, metadata=parquet.metadata, read_dictionary=strings) if strings else parquet
    data = reader.read(columns=columns, use_threads=False)
    decoded = data.nbytes
    for name, column in zip(data.column_names, data.columns, strict=True):
        allowed = TEXT_BYTES if name in TEXT_COLUMNS else NAME_BYTES
        for chunk in column.chunks:
            size, longest = _decoded_strings(chunk)
            if longest > allowed:
                raise ValueError(
                    f"its column {name!r} holds a string of {longest} bytes, longer than any a run writes "
                    f"({allowed} bytes): not read"
                )
            decoded += size
    if decoded > limit:
        raise ValueError(f"it decodes to {decoded} bytes, more than a night writes ({limit >> 20} MiB): not read")
    dense = pa.schema([f.with_type(_dense(f.type)) for f in data.schema], metadata=data.schema.metadata)
    columns_ = [c if c.type == f.type else c.cast(f.type) for c, f in zip(data.columns, dense, strict=True)]
    return pa.Table.from_arrays(columns_, schema=dense)


def _decoded_strings(array: pa.Array) -> tuple[int, int]:
    """The bytes ``array``'s dictionary-read strings take once decoded (values and offsets), and the longest string
    in it (a string that is not a dictionary's, were the file's reader to return one, is counted in its ``nbytes``)."""
    if isinstance(array, pa.DictionaryArray):
        if not _is_text(array.type.value_type):
            return 0, 0
        most = array.dictionary.nbytes  # no value is longer than all of them: a night's few short strings stop here
        if most * len(array) <= SMALL_BYTES:
            return most * len(array), most
        lengths = pc.take(pc.binary_length(array.dictionary), array.indices)
        return (pc.sum(lengths).as_py() or 0) + 4 * len(array), pc.max(lengths).as_py() or 0
    if _is_text(array.type):
        return 0, pc.max(pc.binary_length(array)).as_py() or 0
    if isinstance(array, (pa.ListArray, pa.LargeListArray, pa.FixedSizeListArray)):
        return _decoded_strings(array.values)
    if isinstance(array, pa.StructArray):
        parts = [_decoded_strings(array.field(i)) for i in range(array.type.num_fields)]
        return sum(p[0] for p in parts), max((p[1] for p in parts), default=0)
    return 0, 0


def _is_text(kind: pa.DataType) -> bool:
    return any(
        test(kind) for test in (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary, pa.types.is_large_binary)
    )


def _dense(kind: pa.DataType) -> pa.DataType:
    """``kind`` with every dictionary (at any depth) replaced by its values' type: what decoding returns."""
    if pa.types.is_dictionary(kind):
        return kind.value_type
    if pa.types.is_fixed_size_list(kind):
        return pa.list_(kind.value_field.with_type(_dense(kind.value_type)), kind.list_size)
    if pa.types.is_large_list(kind):
        return pa.large_list(kind.value_field.with_type(_dense(kind.value_type)))
    if pa.types.is_list(kind):
        return pa.list_(kind.value_field.with_type(_dense(kind.value_type)))
    if pa.types.is_struct(kind):
        return pa.struct([kind.field(i).with_type(_dense(kind.field(i).type)) for i in range(kind.num_fields)])
    return kind


def columns_of(table: str, columns: Collection[str] | None = None) -> pa.Schema:
    """The schema a read returns: every column of ``table`` and ``run_id``, or only ``columns`` (and ``run_id``),
    in the table's order. A name the table lacks is a mistake in the caller, said at once."""
    full = schema(table).append(RUN_ID)
    if columns is None:
        return full
    unknown = sorted(set(columns) - set(full.names))
    if unknown:
        raise ValueError(f"Table {table!r} has no column {', '.join(unknown)}; its columns are {', '.join(full.names)}.")
    return pa.schema([f for f in full if f.name in columns or f.name == RUN_ID.name], metadata=full.metadata)


def read_table(
    store: Store,
    table: str,
    run_id: str | Collection[str] | None = None,
    columns: Collection[str] | None = None,
    newest: int | None = None,
) -> pd.DataFrame:
    """All runs of ``table`` (or one, or those in a collection of run ids, where None names the operators'
    partition, ``NO_RUN``) as a DataFrame, ``run_id`` included. Only the named runs' partitions are opened: on a
    store of a year of nights, what one night's view reads.
    With ``columns``, only those (and ``run_id``) are decoded and checked: a list of a year of nights reads the
    columns it shows, not the thirty a night writes; a row is then dropped for a value no writer produces in one
    of those columns, and a view of a whole row (``runs show``) reads every column.

    Each partition is read on its own after its footer is checked (``_check_footer``). One that cannot be read (empty
    after a crash, truncated, not Parquet, another schema, too large, its strings decoding to more than a night
    writes or one longer than a run writes) is skipped with a warning naming its file, so
    one bad file in a shared store cannot stop every later night's report, trend and gate history. Rows whose values
    no writer of ours produces (``invalid_rows``: a null timestamp, a NaN or out-of-range figure, an unknown
    decision) are dropped too, with one warning per table per read. Only the partition layout the store writes is listed
    (``partition_files``): links, pipes, folders at any depth and files outside it are skipped with one warning,
    hidden names silently (``storage/door.py``). With ``newest``, only that many partition files are read, the
    newest by modification time (``newest_partition_files``): a reader whose cost must not grow with what was planted.
    """
    full = columns_of(table, columns)
    named = None if run_id is None or isinstance(run_id, str) else sorted({r for r in run_id if r is not None})
    operators = not isinstance(run_id, str) and run_id is not None and None in set(run_id)
    if (named == [] and not operators) or not store.exists(store.table_dir(table)):  # no run named; none written yet
        return full.empty_table().to_pandas()
    if run_id is None:
        flt = None
    elif isinstance(run_id, str):
        flt = ds.field("run_id") == run_id
    else:
        flt = ds.field("run_id").isin(named)
        if operators:  # the partition Hive reads as a null run id
            flt = flt | ds.field("run_id").is_null()
    try:
        data = dataset(store, table, None if newest is None else newest_partition_files(store, table, newest))
        fragments = list(data.get_fragments(filter=flt))
    except (pa.ArrowException, OSError, ValueError, RecursionError) as exc:  # the listing failed: no partition is trusted
        store.warn(f"Table {table!r} cannot be listed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}): read as empty")
        return full.empty_table().to_pandas()
    where = {id(f): store.fs.unstrip_protocol(f.path) if not store.is_local else f.path for f in fragments}
    return _read_fragments(store, table, [(f, where[id(f)]) for f in fragments], full)


def read_partition(store: Store, table: str, key: str) -> pd.DataFrame:
    """One run's partition of ``table`` by its key (what a ``TablesRef`` names), read exactly as ``read_table`` reads
    it: bounded, upgraded, its invalid rows dropped, and a damaged file skipped with a warning (an empty frame), so
    a cached night pointed at an earlier run's damaged partition still publishes."""
    folder, name = posixpath.split(key)
    run_id = posixpath.basename(folder).removeprefix("run_id=")
    part = name.removesuffix(".parquet")
    full = schema(table).append(RUN_ID)
    try:
        if store.table_file(table, run_id, part) != key:
            raise ValueError(f"it is not a partition of table {table!r}")
        data = store.read_bytes(key, limit=PARTITION_BYTES)
        fragment = ds.ParquetFileFormat().make_fragment(pa.BufferReader(data), partition_expression=ds.field("run_id") == run_id)
    except (pa.ArrowException, OSError, ValueError, RuntimeError) as exc:  # missing, too large, outside the store
        store.warn(f"Skipping the damaged partition {store.location(key)} of table {table!r}: {str(exc).splitlines()[0][:200]}")
        return full.empty_table().to_pandas()
    return _read_fragments(store, table, [(fragment, store.location(key))], full)


def _read_fragments(
    store: Store, table: str, fragments: list[tuple[ds.ParquetFileFragment, str]], full: pa.Schema
) -> pd.DataFrame:
    """The partitions read one by one (a damaged one skipped with a warning naming it), then checked for invalid
    rows together: one pass of ``invalid_rows`` over a year of nights costs what one partition's did."""
    parts, places = [], []
    for fragment, where in fragments:
        try:
            parts.append(_latest(store, table, fragment, full))
        except Exception as exc:  # noqa: BLE001 (a partition a writer planted: whatever its decoding raises, it is skipped)
            store.warn(f"Skipping the damaged partition {where} of table {table!r}: {str(exc).splitlines()[0][:200]}")
            continue
        places.append(where)
    data = pa.concat_tables(parts) if parts else full.empty_table()
    bad, _ = invalid_rows(table, data)
    if bad.any():
        # The example named is the first partition holding such a row, with the reason it gives on its own.
        first = int(np.searchsorted(np.cumsum([part.num_rows for part in parts]), int(np.argmax(bad)), side="right"))
        _, why = invalid_rows(table, parts[first])
        store.warn(
            f"Skipping {int(bad.sum())} row(s) of table {table!r} whose values no run writes (first: {why} in "
            f"{places[first]}); the rest of the table is read"
        )
        data = data.filter(pa.array(~bad))
    return data.to_pandas()


# ---- values, not only types ----------------------------------------------------------------------------------------
# A partition can match its schema and still hold what no writer of ours produces: a null timestamp in a column the
# schema declares non-null (pyarrow does not enforce nullability on read), a NaN or infinite figure, a share outside
# [0, 1], a digit outside 0–9, a negative count, a decision no code makes. Such rows are dropped on read, so every
# reader (trend, report, gate history, promote, rollback, CLI lists) sees only values it can format and compare.
DECISIONS = {"promotions": {"promoted", "rejected", "unchanged"}, "batches": {"accepted", "quarantined", "pending"}}
DECIDED_BY = {"ingest", "operator"}
DIGIT_COLUMNS = {"true_label", "predicted_label", "worst_digit"}
SIGNED_SHARES = {"worst_digit_drop"}  # a difference of two shares: [-1, 1]; every other figure is a share, p or KS in [0, 1]
EARLIEST, LATEST = datetime(2000, 1, 1, tzinfo=UTC), datetime(2200, 1, 1, tzinfo=UTC)  # pandas holds 1677–2262
# A run's times lie in the past: one dated later than now (beyond clocks that differ by a day at most) was planted,
# and would otherwise rank as the newest run, pushing real runs out of "the last 30" whose reports a prune keeps.
CLOCK_SKEW = timedelta(days=1)
NOT_FUTURE = {"runs": ("started_at", "finished_at")}


def invalid_rows(table: str, data: pa.Table) -> tuple[np.ndarray, str]:
    """Which rows of one partition hold a value no writer of ours produces, and the first reason, in words."""
    bad = np.zeros(data.num_rows, dtype=bool)
    why = ""

    def mark(mask: pa.ChunkedArray | pa.Array, reason: str) -> None:
        nonlocal bad, why
        hits = np.asarray(pc.fill_null(mask, False).to_numpy(zero_copy_only=False), dtype=bool)
        if hits.any() and not why:
            why = f"{reason} (run {data.column('run_id')[int(np.argmax(hits))].as_py()})"
        bad |= hits

    for field in data.schema:
        column = data.column(field.name)
        if not field.nullable:
            mark(pc.is_null(column), f"{field.name} is null")
        kind = field.type
        if pa.types.is_floating(kind):
            mark(pc.invert(pc.is_finite(column)), f"{field.name} is NaN or infinite")
            low = -1 if field.name in SIGNED_SHARES else 0
            mark(pc.or_(pc.less(column, low), pc.greater(column, 1)), f"{field.name} is outside [{low}, 1]")
        elif pa.types.is_timestamp(kind):
            early, late = (pa.scalar(t, type=kind) for t in (EARLIEST, LATEST))
            mark(pc.or_(pc.less(column, early), pc.greater(column, late)), f"{field.name} is not a date of a night")
            if field.name in NOT_FUTURE.get(table, ()):
                ahead = pa.scalar(datetime.now(UTC) + CLOCK_SKEW, type=kind)
                mark(
                    pc.greater(column, ahead),
                    f"{field.name} is in the future (more than {CLOCK_SKEW.days} day(s) after this clock)",
                )
        elif pa.types.is_integer(kind):
            if field.name in DIGIT_COLUMNS:
                mark(pc.or_(pc.less(column, 0), pc.greater(column, NUM_CLASSES - 1)), f"{field.name} is not a digit")
            else:
                mark(pc.less(column, 0), f"{field.name} is negative")
    if table in DECISIONS and "decision" in data.column_names:
        mark(pc.invert(pc.is_in(data.column("decision"), pa.array(sorted(DECISIONS[table])))), "an unknown decision")
    if table == "batches" and "decided_by" in data.column_names:
        mark(pc.invert(pc.is_in(data.column("decided_by"), pa.array(sorted(DECIDED_BY)))), "an unknown decider")
    return bad, why


def open_table(location: str, table: str, **equals: object) -> pd.DataFrame:
    """The one-call reader for downstream code: every run of ``table`` in the store at ``location`` (a path or an
    fsspec URL such as ``s3://bucket/prefix``), every partition upgraded to the latest schema, keeping the rows whose
    columns equal ``equals`` (``open_table("artifacts", "runs", model="seed")``; the evaluation tables hold every
    night's model: filter them on an ``evaluation_key`` too, docs/reading-tables.md)."""
    if table not in SCHEMAS:
        raise ValueError(f"There is no table {table!r}: the tables are {', '.join(TABLES)}.")
    columns = [*SCHEMAS[table].names, RUN_ID.name]
    unknown = sorted(set(equals) - set(columns))
    if unknown:
        raise ValueError(f"Table {table!r} has no column {', '.join(unknown)}; its columns are {', '.join(columns)}.")
    run_id = equals.pop(RUN_ID.name, None)
    frame = read_table(Store(location), table, run_id=None if run_id is None else str(run_id))
    for column, value in equals.items():
        frame = frame[frame[column] == value]
    return frame.reset_index(drop=True)
