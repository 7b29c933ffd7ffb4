"""One reader for every table: no other code reads Parquet from the store, and what it reads is checked for value.

A damaged partition (empty after a crash, truncated, foreign) is skipped with a warning; a row whose values no
run of ours writes (a null timestamp, a NaN or out-of-range figure, an unknown decision) is dropped with one
warning per table per read. These tests use a real store on disk and the project's own writers.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage import Store
from storage.tables import read_partition, read_table, schema, write_table
from tasks.publish.report import nightly_trend, trend_frame, weakest_digit
from tasks.publish.tabulate import EVALUATION_TABLES, tabulated_by
from tests.conftest import sample_frames

REPO = Path(__file__).resolve().parent.parent
# The reader module, and the one module that parses *incoming* batch files (not the store) behind its own bounds.
READERS = {"storage/tables.py", "tasks/data/batch_format.py", "tasks/data/batch_parser.py"}
PARQUET_MODULES = {"pyarrow.parquet", "pyarrow.dataset", "pyarrow.feather", "pyarrow.orc"}
READ_NAMES = {
    "read_parquet",
    "read_table",
    "read_pandas",
    "read_schema",
    "read_metadata",
    "ParquetFile",
    "ParquetDataset",
    "make_fragment",
    "dataset",
    "read_feather",
}
PANDAS_READ = {"read_parquet", "read_feather", "read_orc"}


def parquet_reads(root: Path = REPO) -> list[str]:
    """Every place in flows/, tasks/ and storage/ that could read Parquet without the reader: an import of pyarrow's
    Parquet or dataset modules, a call of one of their readers, or pandas' ``read_parquet``."""
    found = []
    for package in ("flows", "tasks", "storage"):
        for path in sorted((root / package).rglob("*.py")):
            where = path.relative_to(root).as_posix()
            tree = ast.parse(path.read_text())
            aliases: set[str] = set()  # names bound to pyarrow's Parquet modules in this file
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    for alias in node.names:
                        if alias.name in PARQUET_MODULES or alias.name == "pyarrow":
                            aliases.add(alias.asname or alias.name.split(".")[0])
                        if alias.name in PARQUET_MODULES:
                            found.append(f"{where}:{node.lineno} imports {alias.name}")
                elif isinstance(node, ast.ImportFrom) and node.module:
                    if node.module in PARQUET_MODULES or (
                        node.module == "pyarrow" and {"parquet", "dataset", "feather", "orc"} & {a.name for a in node.names}
                    ):
                        found.append(f"{where}:{node.lineno} imports from {node.module}")
                    if node.module in {"pandas"} and PANDAS_READ & {a.name for a in node.names}:
                        found.append(f"{where}:{node.lineno} imports a pandas Parquet reader")
            for node in ast.walk(tree):
                if isinstance(node, ast.Attribute):
                    if node.attr in PANDAS_READ:
                        found.append(f"{where}:{node.lineno} calls .{node.attr}")
                    elif node.attr in READ_NAMES and _base(node) in aliases:
                        found.append(f"{where}:{node.lineno} calls {_base(node)}….{node.attr}")
    return found


def _base(node: ast.Attribute) -> str:
    value = node.value
    while isinstance(value, ast.Attribute):
        value = value.value
    return value.id if isinstance(value, ast.Name) else ""


def test_no_code_reads_parquet_outside_the_reader_module():
    outside = [line for line in parquet_reads() if line.split(":")[0] not in READERS]
    assert outside == [], "read tables and stored frames through storage/tables.py (read_table, read_partition, read_frame)"


def frame_reads(root: Path = REPO) -> list[str]:
    """Every call of ``read_frame`` (the unchecked reader of one stored frame) in flows/ and tasks/."""
    found = []
    for package in ("flows", "tasks"):
        for path in sorted((root / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call):
                    name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                    if name == "read_frame":
                        found.append(f"{path.relative_to(root).as_posix()}:{node.lineno}")
    return found


def test_stored_predictions_are_read_only_through_the_reader_that_checks_their_values():
    """Review 7 (f5): the gate read the champion's stored predictions with ``read_frame``, which checks types, not
    values, and a label of 120 failed every night. Every predictions frame is read with ``read_predictions`` now
    (labels 0–9, probabilities in [0, 1]); ``read_frame`` stays for the training history, whose values
    ``tasks.evaluation.plots.history_problem`` checks."""
    assert [line.split(":")[0] for line in frame_reads()] == ["tasks/evaluation/plots.py"], frame_reads()


def test_the_listing_finds_each_kind_of_read(tmp_path):
    """The check itself: each way of reading Parquet, planted in a module, is listed."""
    (tmp_path / "tasks").mkdir()
    (tmp_path / "flows").mkdir()
    (tmp_path / "storage").mkdir()
    (tmp_path / "tasks" / "sneaky.py").write_text(
        "import pandas as pd\nimport pyarrow.parquet as pq\nimport pyarrow.dataset\nfrom pyarrow import parquet\n"
        "from pandas import read_parquet\n"
        "pd.read_parquet('x')\npq.read_table('x')\npyarrow.dataset.dataset('x')\n"
    )
    found = parquet_reads(tmp_path)
    assert {int(line.split(":")[1].split()[0]) for line in found} == set(range(2, 9)), found


# ---- damaged partitions --------------------------------------------------------------------------------------------
def test_a_cached_night_pointed_at_an_empty_partition_writes_its_own_rows(store):
    """Finding 3: an earlier run wrote this evaluation's rows, then its per_class partition became 0 bytes. The cached
    night no longer points at it (it would end in ``Parquet file size is 0 bytes``), and reading it warns."""
    said: list[str] = []
    store.warn = said.append
    for table, frame in sample_frames(0).items():
        write_table(store, table, "earlier", frame)
    assert tabulated_by(store, "e0") == "earlier"
    damaged = Path(store.path(store.table_file("per_class", "earlier")))
    damaged.write_bytes(b"")
    assert tabulated_by(store, "e0") is None
    assert read_partition(store, "per_class", store.table_file("per_class", "earlier")).empty
    assert any("Skipping the damaged partition" in line and str(damaged) in line for line in said)


@pytest.mark.parametrize("table", EVALUATION_TABLES)
def test_a_truncated_partition_reads_as_empty_with_a_warning(store, table):
    said: list[str] = []
    store.warn = said.append
    key = write_table(store, table, "r", sample_frames(0)[table])
    path = Path(store.path(key))
    path.write_bytes(path.read_bytes()[:-40])
    frame = read_partition(store, table, key)
    assert frame.empty and list(frame.columns) == schema(table).append(pa.field("run_id", pa.string())).names
    (line,) = said
    assert "Skipping the damaged partition" in line and table in line


def test_a_partition_key_of_another_table_is_not_read(store):
    said: list[str] = []
    store.warn = said.append
    key = write_table(store, "runs", "r", sample_frames(0)["runs"])
    assert read_partition(store, "per_class", key).empty
    assert "not a partition of table 'per_class'" in said[0]


def test_the_report_names_no_weakest_digit_when_the_rows_are_gone():
    frame = schema("per_class").empty_table().to_pandas()
    assert weakest_digit(frame).startswith("unknown")


# ---- values, not only types ----------------------------------------------------------------------------------------
def planted(store: Store, table: str, run_id: str, frame: pd.DataFrame, **raw: object) -> None:
    """Write a partition as a foreign writer would: this release's schema and metadata, nullability unenforced, and
    ``raw`` columns set as Arrow values (a NaN stays a NaN, not a null as pandas would make it)."""
    target = schema(table)
    loose = pa.schema([f.with_nullable(True) for f in target], metadata=target.metadata)
    data = pa.Table.from_pandas(frame[loose.names], schema=loose, preserve_index=False)
    for column, value in raw.items():
        i = data.schema.get_field_index(column)
        data = data.set_column(i, loose.field(i), pa.array([value] * len(data), type=loose.field(i).type, from_pandas=False))
    folder = Path(store.path(store.table_file(table, run_id))).parent
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(data, folder / "part-0.parquet")


def test_a_run_row_with_a_null_finish_time_is_skipped_and_the_trend_still_draws(store):
    """Finding 3: one schema-valid ``runs`` row with ``finished_at = null`` ended every night in ``nightly_trend``
    (``NaTType does not support strftime``). It is dropped on read, with one warning."""
    said: list[str] = []
    store.warn = said.append
    for i, run in enumerate(["a", "b"]):
        write_table(store, "runs", run, sample_frames(i)["runs"])
    for run in ("null-1", "null-2"):
        planted(store, "runs", run, sample_frames(3)["runs"].assign(finished_at=pd.NaT))
    runs = read_table(store, "runs")
    assert sorted(runs["run_id"]) == ["a", "b"]
    (line,) = said  # one warning for the table, however many rows
    assert "Skipping 2 row(s) of table 'runs'" in line and "finished_at is null" in line
    nightly_trend(trend_frame(store), "b")  # draws: no NaT reaches strftime


@pytest.mark.parametrize(
    ("table", "column", "value", "reason"),
    [
        ("runs", "test_balanced_accuracy", np.nan, "NaN or infinite"),
        ("runs", "new_data_balanced_accuracy", float("inf"), "NaN or infinite"),
        ("runs", "selection_balanced_accuracy", 1.5, "outside [0, 1]"),
        ("runs", "epochs", -3, "negative"),
        ("promotions", "decision", "maybe", "unknown decision"),
        ("promotions", "worst_digit", 12, "not a digit"),
        ("promotions", "decided_at", None, "decided_at is null"),
        ("batches", "decision", "trusted", "unknown decision"),
        ("batches", "decided_by", "sender", "unknown decider"),
        ("per_class", "recall", -0.1, "outside [0, 1]"),
    ],
)
def test_a_row_no_run_writes_is_skipped_with_one_warning(store, table, column, value, reason):
    said: list[str] = []
    store.warn = said.append
    write_table(store, table, "good", sample_frames(0)[table])
    planted(store, table, "bad", sample_frames(1)[table], **{column: value})
    frame = read_table(store, table)
    assert set(frame["run_id"]) == {"good"} and len(frame) == len(sample_frames(0)[table])
    (line,) = said
    assert reason in line and "run bad" in line


def test_an_old_store_reads_without_dropping_rows(store):
    """The value checks do not drop what earlier releases wrote: the schema-upgrade fixtures read whole."""
    for table, frame in sample_frames(2).items():
        write_table(store, table, "r", frame)
        assert len(read_table(store, table)) == len(frame)


def test_the_warning_names_the_first_partition_with_a_bad_row_and_its_own_reason(store):
    """The rows are checked once over the whole table; the warning still names the first partition holding a bad
    row, with that partition's reason, and counts every row dropped."""
    said: list[str] = []
    store.warn = said.append
    write_table(store, "runs", "a-good", sample_frames(0)["runs"])
    planted(store, "runs", "b-bad", sample_frames(1)["runs"], epochs=-3)
    planted(store, "runs", "c-bad", sample_frames(2)["runs"], test_accuracy=float("nan"))
    frame = read_table(store, "runs")
    assert set(frame["run_id"]) == {"a-good"}
    (line,) = said
    assert "Skipping 2 row(s)" in line and "epochs is negative (run b-bad)" in line and "run_id=b-bad" in line


def test_a_read_of_some_columns_returns_those_checked_and_skips_damage_as_a_whole_read_does(store):
    """``columns``: only those and ``run_id`` come back; a bad value in one of them still drops its row, a damaged
    partition is still skipped with its warning; a column not read is not judged (``runs show`` reads them all)."""
    said: list[str] = []
    store.warn = said.append
    write_table(store, "promotions", "a-good", sample_frames(0)["promotions"])
    planted(store, "promotions", "b-bad", sample_frames(1)["promotions"], decision="maybe")
    planted(store, "promotions", "c-odd", sample_frames(2)["promotions"], worst_digit=12)
    key = write_table(store, "promotions", "d-cut", sample_frames(3)["promotions"])
    Path(store.path(key)).write_bytes(Path(store.path(key)).read_bytes()[:-40])

    frame = read_table(store, "promotions", columns=["decided_at", "decision"])
    assert list(frame.columns) == ["decided_at", "decision", "run_id"]
    assert set(frame["run_id"]) == {"a-good", "c-odd"}
    damaged, dropped = said
    assert "Skipping the damaged partition" in damaged and "run_id=d-cut" in damaged
    assert "unknown decision (run b-bad)" in dropped

    said.clear()
    assert set(read_table(store, "promotions", columns=["decided_at"])["run_id"]) == {"a-good", "b-bad", "c-odd"}
    assert set(read_table(store, "promotions")["run_id"]) == {"a-good"}
    with pytest.raises(ValueError, match="has no column"):
        read_table(store, "promotions", columns=["nonsense"])


# ---- what a partition decodes to, not only what its footer declares ----------------------------------------------
# Review 7: a footer declares a dictionary-encoded column's size as its dictionary's, so one 60 KB `reason` on 1 000
# rows declares 61 KB and decodes to 57 MiB; find_champion (ingest, the gate) read every such partition whole.
PEAK = r"""
import json, os, sys
import pyarrow as pa
from storage import Store
from storage.tables import read_table
pool = pa.proxy_memory_pool(pa.default_memory_pool())  # counts only what this read allocates through Arrow
pa.set_memory_pool(pool)
rows = read_table(Store(sys.argv[1]), "promotions")
print(json.dumps({"peak": pool.max_memory(), "runs": sorted(rows["run_id"])}), flush=True)
os._exit(0)  # the pool must outlive every buffer it allocated: no teardown
"""


def test_a_partition_whose_strings_decode_past_the_tables_bound_is_skipped_before_they_are_decoded(store):
    """A `promotions` partition of 1 000 rows (the footer's row limit) whose `reason` is one 60 KB string (under the
    longest a text column may hold): 11 KB on disk, its footer under every limit, 57 MiB decoded. It is skipped with
    a warning, the real partition beside it reads, and the read allocates a few MiB, not the 57."""
    import json
    import os
    import subprocess
    import sys

    said: list[str] = []
    store.warn = said.append
    real = sample_frames(0)["promotions"]
    write_table(store, "promotions", "a-good", real.assign(reason="r" * 4_000))  # the longest a writer of ours keeps
    planted(store, "promotions", "b-big", pd.concat([real.iloc[:1]] * 1_000, ignore_index=True), reason="r" * 60_000)
    path = Path(store.path(store.table_file("promotions", "b-big")))
    footer = pq.ParquetFile(path).metadata
    assert path.stat().st_size < 100_000 and footer.num_rows == 1_000 and footer.row_group(0).total_byte_size < 200_000

    rows = read_table(store, "promotions")
    assert set(rows["run_id"]) == {"a-good"} and (rows["reason"].str.len() == 4_000).all()
    (line,) = said
    assert "run_id=b-big" in line and "decodes to" in line and "16 MiB" in line, line

    child = subprocess.run(
        [sys.executable, "-c", PEAK, store.root],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=120,
        check=True,
    )
    measured = json.loads(child.stdout.splitlines()[-1])
    assert measured["runs"] == ["a-good"]
    assert measured["peak"] < 8 << 20, f"the read allocated {measured['peak'] >> 20} MiB"


@pytest.mark.parametrize(
    ("table", "column", "value"),
    [
        ("promotions", "reason", "r" * 300_000),  # a free-text column: at most 64 KiB a value
        ("runs", "model_key", "k" * 2_000),  # a key: at most 1 KiB
        ("promotions", "slices", [{"slice": "mnist-selection", "note": "n" * 100_000, "failed_rules": ["x"]}]),
    ],
)
def test_a_partition_holding_one_string_longer_than_a_run_writes_is_skipped(store, table, column, value):
    """One row is enough: a 300 KB `reason`, a 2 KB model key, a 100 KB note nested in the gate's per-slice rules."""
    said: list[str] = []
    store.warn = said.append
    write_table(store, table, "a-good", sample_frames(0)[table])
    planted(store, table, "b-long", sample_frames(1)[table].iloc[:1], **{column: value})
    assert set(read_table(store, table)["run_id"]) == {"a-good"}
    (line,) = said
    assert "run_id=b-long" in line and f"its column {column!r} holds a string of" in line, line


def test_a_stored_frame_whose_strings_decode_past_the_bound_is_damaged_before_they_are_decoded(store):
    """Review 7's f1b: a champion's stored predictions (digest set to match) of 5 000 rows whose `slice` is one
    100 KB dictionary-encoded string (21 KB on disk, 477 MiB decoded), and the same with a 1 000-byte slice on
    100 000 rows (95 MiB decoded, every value under the length limit): both are DamagedArtifact, as any frame that is
    not ours is, so the gate predicts again."""
    from storage import DamagedArtifact, sha256_bytes
    from storage.tables import read_frame

    for rows, text, why in ((5_000, "s" * 100_000, "holds a string of 100000 bytes"), (100_000, "s" * 1_000, "decodes to")):
        n = np.arange(rows)
        table = pa.table(
            {
                "test_index": pa.array(n, pa.int32()),
                "true_label": pa.array(n % 10, pa.int8()),
                "predicted_label": pa.array(n % 10, pa.int8()),
                "confidence": pa.array(np.ones(rows, np.float32)),
                "probabilities": pa.FixedSizeListArray.from_arrays(pa.array(np.full(rows * 10, 0.1, np.float32)), 10),
                "slice": pa.array([text] * rows),
            }
        )
        path = Path(store.path("evaluations/k/predictions.parquet"))
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path, compression="zstd")
        assert path.stat().st_size < 1_000_000
        with pytest.raises(DamagedArtifact, match=why):
            read_frame(store, "evaluations/k/predictions.parquet", sha256_bytes(path.read_bytes()))


def test_an_operators_long_reason_is_kept_short_enough_for_the_reader_to_read_its_row(store):
    """`champion promote --reason` takes any text: what is written is its first ``MAX_REASON_CHARS`` characters, so
    the operator's partition is never one the reader refuses (100 000 euro signs are 300 KB of UTF-8)."""
    from tasks.champion.promotion import MAX_REASON_CHARS, manual_reason

    said: list[str] = []
    store.warn = said.append
    reason = manual_reason("€" * 100_000)
    write_table(store, "promotions", None, sample_frames(0)["promotions"].assign(reason=reason, forced=True))
    rows = read_table(store, "promotions")
    assert rows["reason"].tolist() == ["manual: " + "€" * MAX_REASON_CHARS] and not said, said


# ---- a footer is parsed only when its length is one a night writes ------------------------------------------------
def footer_only_parquet(chunks: int) -> bytes:
    """A Parquet file that is only a footer (Thrift compact ``FileMetaData``): one INT32 column, 0 rows, one row group
    of ``chunks`` column chunks written as 3 bytes each (``file_offset`` 0), which pyarrow's parser holds as structs
    of hundreds of bytes: review 11's file (2026-12-08: 9 MB of it took 2 GiB)."""
    import struct

    def varint(n: int) -> bytes:
        out = bytearray()
        while True:
            low, n = n & 0x7F, n >> 7
            out.append(low | 0x80 if n else low)
            if not n:
                return bytes(out)

    def zz(n: int) -> bytes:
        return varint((n << 1) ^ (n >> 63))

    def text(s: str) -> bytes:
        return varint(len(s)) + s.encode()

    def list_of(size: int, kind: int) -> bytes:
        return bytes([(size << 4) | kind]) if size < 15 else bytes([0xF0 | kind]) + varint(size)

    meta = b"\x15" + zz(1) + b"\x19" + list_of(2, 12)  # version; schema:
    meta += b"\x48" + text("schema") + b"\x15" + zz(1) + b"\x00"  # the root, one child
    meta += b"\x15" + zz(1) + b"\x25" + zz(0) + b"\x18" + text("a") + b"\x00"  # INT32 REQUIRED "a"
    meta += b"\x16" + zz(0) + b"\x19" + list_of(1, 12)  # num_rows 0; one row group:
    meta += b"\x19" + list_of(chunks, 12) + (b"\x26" + zz(0) + b"\x00") * chunks + b"\x16" + zz(0) + b"\x16" + zz(0) + b"\x00"
    meta += b"\x00"
    return b"PAR1" + meta + struct.pack("<I", len(meta)) + b"PAR1"


FOOTER_PEAK = r"""
import json, re, sys
from storage import Store
from storage.tables import read_table
said = []
rows = read_table(Store(sys.argv[1], warn=said.append), "runs")
peak = int(re.search(r"VmHWM:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) >> 10  # this process's own
print(json.dumps({"peak_mib": peak, "runs": sorted(rows["run_id"]), "said": said}))
"""


def test_a_partition_that_is_a_footer_longer_than_a_night_writes_is_skipped_before_it_is_parsed(store):
    """Review 11 #2: a `runs` partition of 3 MB that is only a footer (a million column chunks, 0 rows) took 680 MiB
    to parse, before any of its figures could be checked, and a file's size was bounded nowhere on that path (a
    1 GiB one: about 240 GiB). The footer's length (the file's last 8 bytes) is checked first: over ``FOOTER_BYTES``
    the partition is skipped, unparsed, with a warning; the real partition beside it reads, in a process that stays
    near its size without the plant."""
    import json
    import subprocess
    import sys

    from storage.tables import FOOTER_BYTES

    write_table(store, "runs", "a-real", sample_frames(0)["runs"])
    planted = footer_only_parquet(1_000_000)
    assert len(planted) > 2 * FOOTER_BYTES
    path = Path(store.path(store.table_file("runs", "b-footer")))
    path.parent.mkdir(parents=True)
    path.write_bytes(planted)
    child = subprocess.run(
        [sys.executable, "-c", FOOTER_PEAK, store.root], capture_output=True, text=True, timeout=300, check=True
    )
    read = json.loads(child.stdout.strip().splitlines()[-1])
    assert read["runs"] == ["a-real"] * len(sample_frames(0)["runs"])
    assert read["peak_mib"] < 400, read  # 133 MiB with the check, 814 without (2026-12-08)
    assert any("its footer is" in line and "b-footer" in line for line in read["said"]), read["said"]
