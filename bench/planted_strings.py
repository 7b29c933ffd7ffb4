"""Benchmark: peak memory of the store's reader on partitions a store writer planted with long, dictionary-encoded
strings (review 7's f1 and f1b), at this checkout or another code tree.

A footer declares a dictionary-encoded column's size as its dictionary's, so a 11 KB `promotions` partition whose
`reason` is one 60 KB string on 1 000 rows declares 61 KB and decodes to 57 MiB. Each case plants its files in a
process of its own, then reads them in another (its own ``ru_maxrss``), both started from this small parent, so no
figure includes the memory that planting took (a child forked from a parent that built the strings reports the
parent's peak too). The `promotions` cases read as ingest and the gate do (``find_champion``), the `predictions`
cases as tabulate does in the flow's own process (``read_partition``), the `frame` cases as the gate reads a
champion's stored predictions (``read_frame`` with a digest). Prints one line per case.

    python bench/planted_strings.py                 # this checkout
    python bench/planted_strings.py --tree /tmp/old # e.g. `git archive <commit> | tar -x -C /tmp/old`
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PLANT = r"""
import sys
from datetime import UTC, datetime
from pathlib import Path
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from storage import Store
from storage.tables import schema

root, kind, count, rows, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
store = Store(root)
text = "r" * size
predicted = {  # the columns a predictions partition and a stored predictions frame share
    "true_label": pa.array(np.arange(rows, dtype=np.int8) % 10),
    "predicted_label": pa.array(np.arange(rows, dtype=np.int8) % 10),
    "confidence": pa.array(np.ones(rows, np.float32)),
    "probabilities": pa.FixedSizeListArray.from_arrays(pa.array(np.full(rows * 10, 0.1, np.float32)), 10),
}
if kind == "promotions":
    for p in range(count):
        cols = {
            "decided_at": pa.array([datetime(2026, 12, 1, tzinfo=UTC)] * rows, pa.timestamp("us", tz="UTC")),
            "decision": pa.array(["rejected"] * rows), "reason": pa.array([text] * rows),
            "forced": pa.array([False] * rows), "decided_by": pa.array(["gate"] * rows),
            "challenger_model_key": pa.array([f"m{p}"] * rows), "challenger_test_accuracy": pa.array([0.9] * rows),
        }
        sch = schema("promotions")
        table = pa.table({f.name: cols.get(f.name, pa.nulls(rows, f.type)) for f in sch}, schema=sch)
        path = Path(store.path(store.table_file("promotions", f"planted-{p}")))
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path, compression="zstd")
elif kind == "predictions":  # a night's partition of the predictions table whose evaluation_key is the long string
    sch = schema("predictions")
    table = pa.table({
        "image_index": pa.array(np.arange(rows, dtype=np.int32)),
        **predicted,
        "sampled": pa.array(np.ones(rows, bool)),
        "slice": pa.array(["mnist-test"] * rows),
        "evaluation_key": pa.array([text or "e" * 32] * rows),
    }, schema=sch)
    path = Path(store.path(store.table_file("predictions", "planted")))
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, compression="zstd")
else:  # a stored predictions frame whose slice is the long string
    table = pa.table({
        "test_index": pa.array(np.arange(rows, dtype=np.int32)),
        **predicted,
        "slice": pa.array([text or "mnist-selection"] * rows),
    })
    pq.write_table(table, root + "/p.parquet", compression="zstd")
"""

READ = r"""
import resource, sys, time
from storage import Store, sha256_bytes
root, kind = sys.argv[1], sys.argv[2]
store = Store(root)
started = time.perf_counter()
if kind == "promotions":
    from tasks.champion.pointer import find_champion
    what = f"find_champion: champion {find_champion(store).champion}"
elif kind == "predictions":  # what tabulate reads in the flow's own process
    from storage.tables import read_partition
    what = f"read_partition: {len(read_partition(store, kind, store.table_file(kind, 'planted')))} rows"
else:
    from storage.tables import read_frame
    try:
        frame = read_frame(store, "p.parquet", sha256_bytes(open(root + "/p.parquet", "rb").read()))
        what = f"read_frame: {len(frame)} rows"
    except Exception as exc:
        what = f"read_frame: {type(exc).__name__}"
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(f"{what}, {time.perf_counter() - started:.1f} s, peak RSS {peak:.0f} MiB")
"""

CASES = [  # kind, partitions, rows, string bytes
    ("promotions", 0, 1000, 0),
    ("promotions", 1, 1000, 60_000),
    ("promotions", 4, 1000, 60_000),
    ("promotions", 1, 1000, 300_000),
    ("predictions", 1, 500_000, 0),
    ("predictions", 1, 500_000, 1000),
    ("frame", 1, 5000, 0),
    ("frame", 1, 5000, 100_000),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, default=REPO, help="the code tree to read with (default: this checkout)")
    tree = parser.parse_args().tree.resolve()
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    for kind, count, rows, size in CASES:
        with tempfile.TemporaryDirectory() as folder:
            root = Path(folder) / "store"
            root.mkdir()
            args = [str(root), kind, str(count), str(rows), str(size)]
            subprocess.run([sys.executable, "-c", PLANT, *args], env=env, check=True, cwd=tree)
            out = subprocess.run([sys.executable, "-c", READ, *args[:2]], env=env, capture_output=True, text=True, cwd=tree)
            result = out.stdout.strip() or out.stderr.strip().splitlines()[-1]
            print(f"{kind}: {count} x {rows} rows of a {size}-byte string: {result}", flush=True)


if __name__ == "__main__":
    main()
