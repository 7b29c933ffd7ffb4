"""The Parquet tables downstream consumers read: their schemas and their hive layout.

Each table is a dataset under ``<store>/tables/<name>/`` partitioned by ``run_id``
(``run_id=<id>/part-0.parquet``). The partition column lives in the path, as pyarrow's
``write_to_dataset`` does, so ``pyarrow.dataset`` and ``pandas.read_parquet`` return it as a
column. ``schema_version`` sits in each file's schema metadata; it changes only when a column
changes meaning or type.

Schema 2 (nights with new data): ``confusion``, ``per_class`` and ``predictions`` gain ``slice``
(``mnist-selection``, ``mnist-test``, ``new-data``); the promotions' balanced accuracy and McNemar
columns are now those of ``mnist-selection`` (schema 1: the test set), and ``slices`` holds the rules
on every deciding slice; ``runs`` gains the dataset version and the deciding slices' accuracies; the
``batches`` table is new. A schema-1 partition read through these schemas gets nulls in the new
columns (a null ``slice`` is ``mnist-test``, the only slice schema 1 had), so old and new partitions
read side by side with one ``pyarrow.dataset`` call.
"""

from __future__ import annotations

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from storage.files import DamagedArtifact
from storage.store import Store

SCHEMA_VERSION = "2"
NUM_CLASSES = 10  # MNIST's digits: the width of the probabilities column, and every per-digit table
RUN_ID = pa.field("run_id", pa.string(), nullable=False)
SLICE = pa.field("slice", pa.string())  # schema 2; null in schema-1 partitions, which hold mnist-test only
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
            pa.field("true_label", pa.int8(), nullable=False),
            pa.field("predicted_label", pa.int8(), nullable=False),
            pa.field("count", pa.int64(), nullable=False),
            pa.field("share_of_true", pa.float64(), nullable=False),
            SLICE,
        ]
    ),
    "per_class": pa.schema(
        [
            pa.field("label", pa.int8(), nullable=False),
            pa.field("support", pa.int64(), nullable=False),
            pa.field("correct", pa.int64(), nullable=False),
            pa.field("accuracy", pa.float64(), nullable=False),
            pa.field("precision", pa.float64()),
            pa.field("recall", pa.float64(), nullable=False),
            pa.field("f1", pa.float64()),
            pa.field("accuracy_ci_low", pa.float64(), nullable=False),
            pa.field("accuracy_ci_high", pa.float64(), nullable=False),
            SLICE,
        ]
    ),
    "predictions": pa.schema(
        [
            pa.field("test_index", pa.int32(), nullable=False),
            pa.field("true_label", pa.int8(), nullable=False),
            pa.field("predicted_label", pa.int8(), nullable=False),
            pa.field("confidence", pa.float32(), nullable=False),
            pa.field("probabilities", pa.list_(pa.float32(), NUM_CLASSES), nullable=False),
            SLICE,  # test_index: the image's index within its slice (for mnist-test, the test-set index)
        ]
    ),
    "runs": pa.schema(
        [
            pa.field("finished_at", pa.timestamp("us", tz="UTC"), nullable=False),
            pa.field("dataset_sha256", pa.string(), nullable=False),
            pa.field("model_sha256", pa.string(), nullable=False),
            pa.field("parameters", pa.string(), nullable=False),  # JSON
            pa.field("test_accuracy", pa.float64(), nullable=False),
            pa.field("balanced_accuracy", pa.float64(), nullable=False),
            pa.field("n_per_class", pa.int32(), nullable=False),
            pa.field("epochs", pa.int32(), nullable=False),
            pa.field("model", pa.string(), nullable=False),
            pa.field("device", pa.string(), nullable=False),
            # added with the champion gate: null in partitions written before it
            pa.field("promoted", pa.bool_()),
            pa.field("champion_model_key", pa.string()),
            # added with crash restarts and late nights: null in partitions written before them
            pa.field("attempt", pa.int32()),  # 1, or 2 and up when the run restarted after crashing
            pa.field("resumed_from_epoch", pa.int32()),  # training resumed from the checkpoint after this epoch (0: fresh)
            pa.field("scheduled_start", pa.timestamp("us", tz="UTC")),  # when the schedule meant it to run
            pa.field("started_at", pa.timestamp("us", tz="UTC")),  # when this attempt actually began
            pa.field("backend", pa.string()),  # the Keras backend the model was trained on (null before the choice)
            # schema 2: the data the night used and the slices the gate decided on
            pa.field("dataset_version", pa.string()),  # MNIST plus the accepted batches (a digest over their digests)
            pa.field("batches_accepted", pa.int32()),  # accepted batches in that version
            pa.field("selection_balanced_accuracy", pa.float64()),
            pa.field("new_data_balanced_accuracy", pa.float64()),  # null before any batch was accepted
            pa.field("new_data_images", pa.int32()),
        ]
    ),
    "promotions": pa.schema(
        [
            pa.field("challenger_model_key", pa.string(), nullable=False),
            pa.field("champion_model_key", pa.string()),
            pa.field("challenger_balanced_accuracy", pa.float64(), nullable=False),
            pa.field("champion_balanced_accuracy", pa.float64()),
            pa.field("challenger_test_accuracy", pa.float64(), nullable=False),
            pa.field("champion_test_accuracy", pa.float64()),
            pa.field("mcnemar_b", pa.int64()),
            pa.field("mcnemar_c", pa.int64()),
            pa.field("mcnemar_p", pa.float64()),
            pa.field("worst_digit", pa.int8()),
            pa.field("worst_digit_drop", pa.float64()),
            pa.field("decision", pa.string(), nullable=False),
            pa.field("reason", pa.string(), nullable=False),
            pa.field("forced", pa.bool_(), nullable=False),
            pa.field("decided_at", pa.timestamp("us", tz="UTC"), nullable=False),
            pa.field("slices", pa.list_(SLICE_RULES)),  # schema 2: the rules on every deciding slice
        ]
    ),
    "batches": pa.schema(
        [
            pa.field("digest", pa.string(), nullable=False),  # SHA-256 of the incoming file: the batch's identity
            pa.field("file", pa.string(), nullable=False),  # its name in the incoming location
            pa.field("rows", pa.int64(), nullable=False),
            pa.field("decision", pa.string(), nullable=False),  # accepted or quarantined
            pa.field("reason", pa.string(), nullable=False),
            pa.field("decided_by", pa.string(), nullable=False),  # ingest, or operator (release / quarantine)
            pa.field("decided_at", pa.timestamp("us", tz="UTC"), nullable=False),
            pa.field("source", pa.string()),
            pa.field("duplicates", pa.int64()),  # exact repeats of an image within the batch, dropped
            pa.field("leaked_test", pa.int64()),  # exact copies of MNIST test images, dropped
            pa.field("leaked_selection", pa.int64()),  # exact copies of selection-split images, dropped
            pa.field("leaked_holdout", pa.int64()),  # exact copies of new-data holdout images, dropped
            pa.field("train_rows", pa.int64()),
            pa.field("holdout_rows", pa.int64()),
            pa.field("label_chi2_p", pa.float64()),  # label distribution against MNIST's training set
            pa.field("label_shift", pa.float64()),  # total variation distance of the two label distributions
            pa.field("mean_intensity", pa.float64()),  # mean pixel value (0–1) of the batch; MNIST's is about 0.13
            pa.field("mean_intensity_ks", pa.float64()),  # two-sample Kolmogorov–Smirnov statistic against MNIST
            pa.field("mean_intensity_p", pa.float64()),
            pa.field("ink_fraction", pa.float64()),  # share of pixels above half intensity
            pa.field("ink_fraction_ks", pa.float64()),
            pa.field("ink_fraction_p", pa.float64()),
            pa.field("disagreement", pa.float64()),  # share of labels the champion disagrees with
            pa.field("confident_disagreement", pa.float64()),  # the same, on images it is confident about
            pa.field("champion_confident_disagreement", pa.float64()),  # the champion's own, on mnist-selection
            pa.field("champion_model_key", pa.string()),
        ]
    ),
}
TABLES = tuple(SCHEMAS)


def schema(table: str) -> pa.Schema:
    """The on-disk schema of ``table`` with its metadata (the run_id partition is in the path)."""
    return SCHEMAS[table].with_metadata({"schema_version": SCHEMA_VERSION, "table": table})


def to_arrow(table: str, frame: pd.DataFrame) -> pa.Table:
    """Convert and validate: a missing column or a value of the wrong type fails here, not downstream."""
    target = schema(table)
    if SLICE.name in target.names and SLICE.name not in frame.columns:  # one slice's own file: the slice is its name
        frame = frame.assign(slice=None)
    missing = [f.name for f in target if f.name not in frame.columns]
    if missing:
        raise ValueError(f"table {table!r} is missing columns {missing}")
    return pa.Table.from_pandas(frame[target.names], schema=target, preserve_index=False)


def write_frame(store: Store, path: str, table: str, frame: pd.DataFrame) -> str:
    """Write ``frame`` with the schema of ``table`` to ``path``, atomically."""
    arrow = to_arrow(table, frame)
    with store.writing(path) as tmp, store.fs.open(tmp, "wb") as handle:
        pq.write_table(arrow, handle, compression="zstd")
    return path


def write_table(store: Store, table: str, run_id: str, frame: pd.DataFrame, part: str = "part-0") -> str:
    """Write one run's partition of ``table`` (or another part of it) atomically; returns its path."""
    return write_frame(store, store.table_file(table, run_id, part), table, frame)


def read_frame(store: Store, path: str, sha256: str | None = None) -> pd.DataFrame:
    """One Parquet file as a DataFrame, read once into memory (at most ``PARTITION_BYTES``), its footer checked
    against the limits of a night's partition before any column is decoded; with ``sha256``, the bytes parsed are
    the bytes checked (``DamagedArtifact`` if they do not match)."""
    data = (
        store.verified_bytes(path, sha256, limit=PARTITION_BYTES)
        if sha256 is not None
        else store.read_bytes(path, limit=PARTITION_BYTES)
    )
    parquet = pq.ParquetFile(pa.BufferReader(data))
    try:
        _check_footer(parquet.metadata, PARTITION_ROWS_DEFAULT)
    except ValueError as exc:
        raise DamagedArtifact(f"{store.location(path)}: {exc}") from None
    return parquet.read().to_pandas()


def dataset(store: Store, table: str) -> ds.Dataset:
    """Every run of ``table`` as one pyarrow dataset; in-flight temporary files are ignored."""
    partitioning = ds.partitioning(pa.schema([RUN_ID]), flavor="hive")
    return ds.dataset(
        store.path(store.table_dir(table)),
        filesystem=store.fs,
        format="parquet",
        schema=schema(table).append(RUN_ID),
        partitioning=partitioning,
        ignore_prefixes=[".", "_"],
    )


# What one run's partition of a table may hold before it is read: its footer's row count and uncompressed size are
# checked first, so a small file that decodes to millions of rows (146 KiB → 500 MiB) is skipped, never materialised.
# A night writes one row to runs, a few to promotions and batches, and every prediction of its slices.
PARTITION_ROWS = {"runs": 1_000, "promotions": 1_000, "batches": 10_000}
PARTITION_ROWS_DEFAULT = 500_000
PARTITION_BYTES = 256 << 20


def _check_size(fragment: ds.ParquetFileFragment, table: str) -> None:
    """Refuse a partition whose footer declares more rows or uncompressed bytes than a night writes."""
    _check_footer(fragment.metadata, PARTITION_ROWS.get(table, PARTITION_ROWS_DEFAULT))


def _check_footer(metadata: pq.FileMetaData, limit: int) -> None:
    rows = metadata.num_rows
    size = sum(metadata.row_group(i).total_byte_size for i in range(metadata.num_row_groups))
    if rows > limit or size > PARTITION_BYTES:
        raise ValueError(
            f"it declares {rows} rows and {size} uncompressed bytes, more than a night writes "
            f"({limit} rows, {PARTITION_BYTES >> 20} MiB): not read"
        )


def read_table(store: Store, table: str, run_id: str | None = None) -> pd.DataFrame:
    """All runs of ``table`` (or one) as a DataFrame, ``run_id`` included.

    Each partition is read on its own after its footer is checked (``_check_size``). One that cannot be read (empty
    after a crash, truncated, not Parquet, another schema, too large) is skipped with a warning naming its file, so
    one bad file in a shared store cannot stop every later night's report, trend and gate history. Links, pipes and
    hidden names in a local store are never discovered (``storage/door.py``).
    """
    full = schema(table).append(RUN_ID)
    if not store.exists(store.table_dir(table)):  # no run has written it yet
        return full.empty_table().to_pandas()
    flt = ds.field("run_id") == run_id if run_id is not None else None
    try:
        data = dataset(store, table)
        fragments = list(data.get_fragments(filter=flt))
    except (pa.ArrowException, OSError, ValueError) as exc:  # discovery itself failed: no partition can be trusted
        store.warn(f"Table {table!r} cannot be listed ({str(exc).splitlines()[0][:200]}): read as empty")
        return full.empty_table().to_pandas()
    parts = []
    for fragment in fragments:
        try:
            _check_size(fragment, table)
            parts.append(fragment.to_table(schema=data.schema, filter=flt))
        except (pa.ArrowException, OSError, ValueError) as exc:
            where = store.fs.unstrip_protocol(fragment.path) if not store.is_local else fragment.path
            store.warn(f"Skipping the damaged partition {where} of table {table!r}: {str(exc).splitlines()[0][:200]}")
    return (pa.concat_tables(parts) if parts else full.empty_table()).to_pandas()
