"""The parser of one incoming batch file, and the child process that runs it (``parse_untrusted`` in
``tasks/data/batch_format.py`` starts ``python -m tasks.data.batch_parser``).

Why a module of its own: the child starts once per incoming file, and its start-up was most of a small batch's
parse (0.47 CPU-s, importing the store's code, fsspec and pydantic it never uses); this module imports only
NumPy, pyarrow and the batch limits, so the child starts in about half that. Nothing here reads the store.
"""

from __future__ import annotations

import json
import resource
import struct
import sys
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tasks.data.batch_limits import MAX_BATCH_BYTES, MAX_BATCH_ROWS, PIXELS

MAX_UNCOMPRESSED_BYTES = 2 * MAX_BATCH_ROWS * PIXELS  # what the footer may say the columns decompress to
COLUMNS = ("image", "label")


class BatchRejected(ValueError):
    """The file is not a batch we can read: the message says what is wrong and how to fix it."""


class Batch(NamedTuple):
    images: np.ndarray  # (n, 28, 28) uint8
    labels: np.ndarray  # (n,) int64, 0–9
    source: str | None = None  # the optional ``source`` column's values, as text for the batches table


def _integers(column: pa.ChunkedArray | pa.Array, what: str, low: int, high: int) -> np.ndarray:
    """The values as uint8 (every range here fits), checked in Arrow before any copy."""
    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    if not pa.types.is_integer(column.type):
        raise BatchRejected(f"{what} must be integers, not {column.type}")
    if column.null_count:
        raise BatchRejected(f"{what} holds {column.null_count} missing values")
    if len(column):
        lo, hi = pc.min_max(column).values()
        if lo.as_py() < low or hi.as_py() > high:
            raise BatchRejected(f"{what} must lie in {low}–{high}; this file has values from {lo.as_py()} to {hi.as_py()}")
    return np.asarray(pc.cast(column, pa.uint8()).to_numpy(zero_copy_only=False), dtype=np.uint8)


def _check_footer(data: bytes) -> pq.ParquetFile:
    try:
        parquet = pq.ParquetFile(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as exc:
        raise BatchRejected(f"it is not a readable Parquet file ({str(exc).splitlines()[0][:160]})") from exc
    meta = parquet.metadata
    all_names = parquet.schema_arrow.names
    doubled = sorted({n for n in all_names if all_names.count(n) > 1})
    if doubled:
        raise BatchRejected(f"it has more than one column named {', '.join(doubled)[:120]}")
    names = set(all_names)
    missing = [c for c in COLUMNS if c not in names]
    if missing:
        raise BatchRejected(f"it has no column {' or '.join(missing)} (columns: {', '.join(sorted(names))[:200]})")
    if meta.num_rows == 0:
        raise BatchRejected("it holds no rows")
    if meta.num_rows > MAX_BATCH_ROWS:
        raise BatchRejected(f"it holds {meta.num_rows} rows, more than the {MAX_BATCH_ROWS} a batch may hold: split it")
    groups = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
    if sum(groups) != meta.num_rows or any(n < 0 or n > MAX_BATCH_ROWS for n in groups):
        raise BatchRejected(f"its row groups ({sum(groups)} rows) disagree with the {meta.num_rows} rows it declares: refused")
    chunks = [
        meta.row_group(g).column(i)
        for g in range(meta.num_row_groups)
        for i in range(meta.num_columns)
        if meta.schema.column(i).path.split(".")[0] in COLUMNS
    ]
    unpacked = sum(c.total_uncompressed_size for c in chunks)
    if unpacked > MAX_UNCOMPRESSED_BYTES:
        raise BatchRejected(f"its columns would decompress to {unpacked} bytes, more than {MAX_UNCOMPRESSED_BYTES}: refused")
    # run-length encoding packs a million equal values in a few bytes: count the values, not the bytes
    values = sum(c.num_values for c in chunks if c.path_in_schema.split(".")[0] == "image")
    if values > meta.num_rows * PIXELS:
        raise BatchRejected(f"it declares {values} pixel values for {meta.num_rows} images (at most {PIXELS} each): refused")
    return parquet


def parse_batch(data: bytes) -> Batch:
    """The images and labels of one batch file, or ``BatchRejected`` saying why not. In this process: for
    an untrusted file use ``parse_untrusted``."""
    try:
        return _parse(data)
    except BatchRejected:
        raise
    except Exception as exc:  # noqa: BLE001 (whatever a crafted file makes pyarrow raise, it is a bad batch)
        raise BatchRejected(
            f"it cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''})"
        ) from exc


PARSE_ROWS = 8192  # rows decoded at a time: a 100 000-row file of int64 pixels is 627 MB decoded whole, 51 MB so


def _parse(data: bytes) -> Batch:
    """Decoded ``PARSE_ROWS`` rows at a time into one uint8 array, so that the largest batch a sender may send
    (``MAX_BATCH_ROWS``, as pandas writes it: 64-bit integers) parses within ``PARSE_MEMORY``: decoded whole, a
    batch of 90 000 rows or more needed more and was refused as unreadable (a review, 2026-12-07)."""
    if len(data) > MAX_BATCH_BYTES:
        raise BatchRejected(f"it is {len(data)} bytes, more than the {MAX_BATCH_BYTES} a batch file may be: split it")
    parquet = _check_footer(data)
    rows = parquet.metadata.num_rows
    pixels = np.empty((rows, PIXELS), dtype=np.uint8)
    labels = np.empty(rows, dtype=np.int64)
    done = 0
    try:
        for part in parquet.iter_batches(batch_size=PARSE_ROWS, columns=list(COLUMNS), use_pandas_metadata=False):
            if done + part.num_rows > rows:
                raise BatchRejected(f"it holds more rows than the {rows} its footer declares: refused")
            x, y = _rows(pa.Table.from_batches([part]), first=done)
            pixels[done : done + len(y)], labels[done : done + len(y)] = x, y
            done += len(y)
        source = _source(parquet.read(columns=["source"])) if "source" in parquet.schema_arrow.names else None
    except (pa.ArrowException, OSError) as exc:
        raise BatchRejected(f"its columns cannot be read ({str(exc).splitlines()[0][:160]})") from exc
    if done != rows:
        raise BatchRejected(f"it holds {done} rows, not the {rows} its footer declares: refused")
    return Batch(pixels.reshape(-1, 28, 28), labels, source)


def _rows(table: pa.Table, first: int) -> tuple[np.ndarray, np.ndarray]:
    """One part's pixels (n, 784) and labels, every value's type and range checked; ``first``: its first row's number."""
    image = table.column("image").combine_chunks()
    if not (pa.types.is_list(image.type) or pa.types.is_large_list(image.type) or pa.types.is_fixed_size_list(image.type)):
        raise BatchRejected(f"column image must be a list of {PIXELS} integers per row, not {image.type}")
    if image.null_count:
        raise BatchRejected(f"column image has {image.null_count} missing rows")
    lengths = pc.list_value_length(image).to_numpy(zero_copy_only=False)
    if len(lengths) and (lengths.min() != PIXELS or lengths.max() != PIXELS):
        bad = int(np.flatnonzero(lengths != PIXELS)[0])
        raise BatchRejected(
            f"row {first + bad}'s image has {lengths[bad]} values; every image must have {PIXELS} (28×28, row-major)"
        )
    pixels = _integers(pc.list_flatten(image), "pixel values (column image)", 0, 255)
    labels = _integers(table.column("label"), "column label", 0, 9).astype(np.int64)
    return pixels.reshape(-1, PIXELS), labels


def _source(table: pa.Table) -> str | None:
    if "source" not in table.column_names or not pa.types.is_string(table.schema.field("source").type):
        return None
    column = table.column("source")
    if column.nbytes > 1 << 20:
        return None  # metadata only: not worth holding
    values = [v.decode("utf-8", "replace") for v in pc.unique(column.cast(pa.binary())).to_pylist() if v]
    shown = ", ".join(str(v)[:80] for v in values[:3]) + (f" and {len(values) - 3} more" if len(values) > 3 else "")
    return shown or None


def share_bytes(images: np.ndarray, labels: np.ndarray) -> bytes:
    """A share of a batch as the store keeps it: every image's 784 bytes, then every label's byte."""
    return np.ascontiguousarray(images, dtype=np.uint8).tobytes() + np.asarray(labels, dtype=np.uint8).tobytes()


def _limit_memory(limit: int) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _child() -> None:
    """The parsing child: its own memory limit first (set here, not by a ``preexec_fn`` in the parent, which is
    unsafe in a worker running TensorFlow's or JAX's threads), then the one batch on stdin."""
    _limit_memory(int(sys.argv[1]))
    data = sys.stdin.buffer.read()
    try:
        batch = parse_batch(data)
        header = {"ok": True, "rows": len(batch.labels), "source": batch.source}
        body = share_bytes(batch.images, batch.labels)
    except BatchRejected as exc:
        header, body = {"ok": False, "reason": str(exc)}, b""
    encoded = json.dumps(header).encode()
    sys.stdout.buffer.write(struct.pack(">I", len(encoded)) + encoded + body)


if __name__ == "__main__":
    _child()
