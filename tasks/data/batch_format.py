"""The format of an incoming batch of labelled images, and the one parser every batch goes through.

A batch is one Parquet file: ``image`` (784 uint8 values per row, row-major 28×28, a white digit on
black as in MNIST), ``label`` (0–9), and optional metadata columns (``source``, ``collected_at``).
Whoever can write the incoming location writes these files, so the parser treats them as untrusted:
sizes are checked from the Parquet footer before any column is decompressed, only the two columns are
read, every value's type and range is checked, and nothing in the file is ever executed or imported
(no pandas metadata, no pickled objects). A Parquet file can still lie about what its pages hold (a
footer that says 784 values over a page of a hundred million), so an incoming file is parsed in a child
process with a memory and time limit (``parse_untrusted``); what it yields is kept in the store as a raw,
fixed-size share (``share_bytes``) that later nights read without any Parquet parser.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, Field

from storage import DamagedArtifact, Store, StoreError, StoreKey
from tasks.data.batch_limits import MAX_BATCH_BYTES, MAX_BATCH_ROWS, PIXELS
from tasks.data.batch_parser import (  # noqa: F401 (the batch format's names, where its users import them)
    COLUMNS,
    MAX_UNCOMPRESSED_BYTES,
    Batch,
    BatchRejected,
    parse_batch,
    share_bytes,
)

PARSE_MEMORY = 3 << 29  # 1.5 GiB of address space for the child that parses one incoming file
PARSE_SECONDS = 120
# The parsing child's whole environment, never the worker's secrets: malloc for Arrow, one malloc arena and one
# thread, so the address-space limit measures the batch rather than the threads' reservations (measured 2026-12-06:
# under 400 MiB, 20 images parse and 20 000 are refused on every try; with glibc's default arenas the same limit
# refused 20 images too; 2026-12-07, the child importing only ``tasks/data/batch_parser.py``: under 300 MiB, 20 and
# 2 000 parse and 20 000 are refused, and under 400 MiB 20 000 parse); and the OpenBLAS settings some processors
# need for numpy to load.
PARSE_ENV = {
    "ARROW_DEFAULT_MEMORY_POOL": "system",
    "MALLOC_ARENA_MAX": "1",
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
} | {name: os.environ[name] for name in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if name in os.environ}
SHA256 = r"^[0-9a-f]{64}$"


class BatchPart(BaseModel):
    """One file of batch images that the store holds: the incoming file as it arrived, or a raw share
    (training or holdout, ``share_bytes``), whose size is exactly ``rows`` × 785 bytes."""

    key: StoreKey
    sha256: str = Field(pattern=SHA256)
    # No file of a batch is larger than the incoming file may be, or a share of the most rows a batch holds: a record
    # naming more (a planted share of two million "images", sparse on disk) is not ours and is not used.
    size: int = Field(ge=0, le=max(MAX_BATCH_BYTES, MAX_BATCH_ROWS * (PIXELS + 1)))
    rows: int = Field(ge=0, le=MAX_BATCH_ROWS)


class AcceptedBatch(BaseModel):
    """An accepted batch as training and evaluation use it: its digest and its two checked shares."""

    digest: str = Field(pattern=SHA256)  # SHA-256 of the incoming file: the batch's identity
    train: BatchPart
    holdout: BatchPart


def batch_table(images: np.ndarray, labels: np.ndarray, **metadata) -> pa.Table:
    """A batch in the documented format (what ``simulate-arrivals`` writes and the store keeps)."""
    flat = pa.array(np.asarray(images, dtype=np.uint8).reshape(-1), type=pa.uint8())
    columns = {
        "image": pa.FixedSizeListArray.from_arrays(flat, PIXELS),
        "label": pa.array(np.asarray(labels, dtype=np.int8), type=pa.int8()),
    }
    for name, value in metadata.items():
        columns[name] = pa.array([value] * len(labels)) if not isinstance(value, list | np.ndarray) else pa.array(value)
    return pa.table(columns)


def batch_bytes(images: np.ndarray, labels: np.ndarray, **metadata) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(batch_table(images, labels, **metadata), sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def parse_untrusted(data: bytes) -> Batch:
    """``parse_batch`` in a child process limited to ``PARSE_MEMORY`` and ``PARSE_SECONDS``: a file whose pages
    decode to far more than its footer said is refused instead of taking the worker down."""
    if len(data) > MAX_BATCH_BYTES:
        raise BatchRejected(f"it is {len(data)} bytes, more than the {MAX_BATCH_BYTES} a batch file may be: split it")
    try:
        done = subprocess.run(
            [sys.executable, "-m", "tasks.data.batch_parser", str(PARSE_MEMORY)],  # the child limits itself first
            input=data,
            env=PARSE_ENV,  # nothing of the worker's: no API auth string, no store credentials for a hostile file
            cwd=Path(__file__).resolve().parents[2],  # where ``-m tasks.data.batch_parser`` is found
            capture_output=True,
            timeout=PARSE_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise BatchRejected(f"parsing it took more than {PARSE_SECONDS} s: refused") from exc
    if done.returncode != 0 or len(done.stdout) < 4:
        raise BatchRejected(
            f"parsing it needed more than {PARSE_MEMORY >> 20} MiB of memory or failed (exit {done.returncode}): "
            "its pages hold far more than its footer declares (a decompression bomb?): refused"
        )
    (size,) = struct.unpack(">I", done.stdout[:4])
    header = json.loads(done.stdout[4 : 4 + size])
    if not header["ok"]:
        raise BatchRejected(header["reason"])
    batch = parse_share(done.stdout[4 + size :], header["rows"])
    return batch._replace(source=header["source"])


class DamagedShare(RuntimeError):
    """An accepted batch's share that is no longer what its record says: changed, cut or removed in the store after
    the night's ingest checked it (review 6, 2026-12-07, made the train and evaluate steps fail that way). The
    night ingests again, which drops the batch, and decides without it (``flows/night/pipeline.py``)."""


def share_problem(part: BatchPart, problem: Exception) -> DamagedShare:
    return DamagedShare(
        f"the batch share {part.key} is not what its record says ({type(problem).__name__}: {str(problem)[:300]}): "
        "it changed in the store after tonight's ingest checked it"
    )


def read_share(store: Store, part: BatchPart) -> Batch:
    """A share read through its recorded digest and size and parsed; ``DamagedShare`` if it is not that share."""
    try:
        return parse_share(store.verified_bytes(part.key, part.sha256, limit=part.size), part.rows)
    except (DamagedArtifact, StoreError, BatchRejected, OSError) as exc:
        raise share_problem(part, exc) from exc


def parse_share(data: bytes, rows: int) -> Batch:
    """A share written by ``share_bytes``: its size must be exactly ``rows`` × 785, its labels 0–9."""
    if rows < 0 or len(data) != rows * (PIXELS + 1):
        raise BatchRejected(f"a share of {rows} images must be {rows * (PIXELS + 1)} bytes, not {len(data)}")
    images = np.frombuffer(data, dtype=np.uint8, count=rows * PIXELS).reshape(rows, 28, 28)
    labels = np.frombuffer(data, dtype=np.uint8, offset=rows * PIXELS).astype(np.int64)
    if rows and labels.max() > 9:
        raise BatchRejected(f"a share holds label {labels.max()}: labels are 0–9")
    return Batch(images, labels)
