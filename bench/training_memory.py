"""Benchmark: peak resident memory of a 1-epoch training against the size of the training set.

Each size trains once, in its own process, on a temporary store holding the verified MNIST and synthetic
accepted batches (MNIST's base training images repeated, as raw training shares: what the intake keeps), so
that the training set is ``--sizes`` images in all (base MNIST included). The parent reads each child's peak
RSS from ``wait4``. Prints one JSON object on stdout (peak RSS per size, its ratio to the first size's, seconds
per image) and progress on stderr.

    .venv/bin/python bench/training_memory.py --sizes 60000 240000 [--record]

``--record`` also writes the object, with the date, commit, CPU model and load it ran under, to
``docs/measured/training-memory.json``, from which the docs build renders docs/scaling.md's memory table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from child_process import measured_child  # noqa: E402 (bench/, beside this script)
from measured_record import provenance, write_record  # noqa: E402

from storage import Store, sha256_bytes  # noqa: E402
from tasks.data.batch_format import AcceptedBatch, BatchPart, share_bytes  # noqa: E402
from tasks.data.fetch import DatasetRef, fetch_mnist, load_mnist  # noqa: E402
from tasks.data.slices import base_training  # noqa: E402

SHARE_ROWS = 100_000  # the most one incoming batch may hold


def _part(store: Store, digest: str, name: str, data: bytes, rows: int) -> BatchPart:
    key = store.batch_file(digest, name)
    store.write_bytes(key, data)
    return BatchPart(key=key, sha256=sha256_bytes(data), size=len(data), rows=rows)


def synthetic_dataset(store: Store, dataset: DatasetRef, total: int) -> DatasetRef:
    """``dataset`` with accepted batches of repeated base MNIST images, so that it trains on ``total`` images."""
    mnist = load_mnist(store, dataset)
    base = base_training(mnist, dataset)
    extra = max(total - len(base), 0)
    batches = []
    for number, start in enumerate(range(0, extra, SHARE_ROWS)):
        rows = base[np.arange(start, min(start + SHARE_ROWS, extra)) % len(base)]
        train = share_bytes(mnist.x_train[rows], mnist.y_train[rows])
        holdout = share_bytes(mnist.x_train[rows[:10]], mnist.y_train[rows[:10]])
        digest = sha256_bytes(f"synthetic-{total}-{number}".encode())
        batches.append(
            AcceptedBatch(
                digest=digest,
                train=_part(store, digest, "train.bin", train, len(rows)),
                holdout=_part(store, digest, "holdout.bin", holdout, 10),
            )
        )
    return dataset.model_copy(update={"batches": batches})


def child(store_url: str, dataset_json: str, epochs: int) -> None:
    from tasks.training.train import TrainConfig, train_model

    store = Store(store_url)
    dataset = DatasetRef.model_validate_json(Path(dataset_json).read_text())
    ref = train_model(store, dataset, TrainConfig(epochs=epochs, seed=0), log=lambda line: print(line, file=sys.stderr))
    print(json.dumps({"train_images": ref.train_images, "train_seconds": ref.train_seconds}))


def measure(store: Store, dataset: DatasetRef, epochs: int, work: Path) -> dict:
    spec = work / f"dataset-{len(dataset.batches)}.json"
    spec.write_text(dataset.model_dump_json())
    figures = measured_child(__file__, ["--child", store.url, str(spec), "--epochs", str(epochs)])
    return {
        **figures,
        "train_seconds_per_1000_images": round(1000 * figures["train_seconds"] / (figures["train_images"] * epochs), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[60_000, 240_000], help="training-set sizes, in images")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--data-store", default=os.environ.get("MNIST_STORE", str(REPO / "artifacts")))
    parser.add_argument("--record", action="store_true", help="also write docs/measured/training-memory.json")
    parser.add_argument("--child", nargs=2, metavar=("STORE", "DATASET_JSON"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.epochs)
        return

    measured = provenance()
    data_store = Store(args.data_store)
    dataset = fetch_mnist(data_store, log=lambda _: None)
    results = []
    with tempfile.TemporaryDirectory(prefix="mnist-memory-") as tmp:
        for size in args.sizes:
            store = Store(Path(tmp) / f"store-{size}")
            store.fs.put(data_store.path("objects") + "/", store.path("objects"), recursive=True)
            sized = synthetic_dataset(store, dataset, size)
            print(
                f"[memory] {size} images ({len(sized.batches)} synthetic batches): training {args.epochs} epoch(s)",
                file=sys.stderr,
            )
            figures = {"training_set": size, **measure(store, sized, args.epochs, Path(tmp))}
            print(f"[memory]    {figures}", file=sys.stderr)
            results.append(figures)
            shutil.rmtree(Path(tmp) / f"store-{size}")  # the next size starts with the disk as it was
    first = results[0]["peak_rss_mb"]
    for row in results:
        row["peak_rss_over_first"] = round(row["peak_rss_mb"] / first, 3)
    result = {"cpu_count": os.cpu_count(), "epochs": args.epochs, "sizes": results}
    print(json.dumps(result, indent=2))
    if args.record:
        out = write_record("training-memory.json", {**measured, **result})
        print(f"[memory] recorded in {out.relative_to(REPO)}", file=sys.stderr)


if __name__ == "__main__":
    main()
