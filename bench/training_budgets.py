"""Benchmark: what the training-set budget costs in accuracy, against training on everything accepted.

A store gets MNIST and accepted batches of new digits: deformed base training images (``tasks/data/deformed.py``,
elastic and affine, as infiMNIST made them), in batches of ``--batch-images`` training images (and a holdout share
of ``--holdout-images`` each, what the new-data slice is drawn from), oldest first, 7 times MNIST's base training
set in all. At each total size (``--multiples`` of the base set: base plus the oldest accepted batches that make
it), the seed network is trained by the project's own training code (``train_model``) in a process of its own,
twice: on everything (base plus every batch) and under the training-set policy (``choose_batches`` at
``--budget`` images, the default ``max_training_images``: base plus the newest batches that fit). Where the policy
keeps every batch, the two are the same dataset and train once. Each model is then scored on every slice the gate
judges, with its balanced accuracy: MNIST's test set (reported), the selection split and the new-data slice (the
newest holdout shares, 1 000 per digit at most: the same images under both, since both train on the newest
batches). Wall time and peak RSS (``wait4``) are the training child's.

Printed: one row per training, and per size the policy's accuracy minus everything's on each slice and its time
and memory over everything's (the baseline, measured in the same run). ``--record`` writes
docs/measured/training-budgets.json, which docs/scaling.md renders (docs/hooks.py).

    .venv/bin/python bench/training_budgets.py --record docs/measured/training-budgets.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from child_process import measured_child  # noqa: E402 (bench/, beside this script)
from measured_record import cpu_model  # noqa: E402 (bench/, beside this script)

from storage import Store, sha256_bytes  # noqa: E402
from tasks.data.batch_format import AcceptedBatch, BatchPart, share_bytes  # noqa: E402
from tasks.data.deformed import deformed_batch  # noqa: E402
from tasks.data.fetch import DatasetRef, fetch_mnist, load_mnist  # noqa: E402
from tasks.data.slices import base_training  # noqa: E402
from tasks.data.training_set import DEFAULT_MAX_TRAINING_IMAGES, choose_batches  # noqa: E402

SLICES = ("mnist-test", "mnist-selection", "new-data")


def deformed_data(mnist, sources: np.ndarray, images: int, holdout: int, batch: int, cache: Path | None, log) -> list:
    """``images`` training images in batches of ``batch`` (each with ``holdout`` more), as (x, y, hx, hy) per batch;
    read from ``cache`` when it holds these figures (deforming costs about half a millisecond an image)."""
    name = f"deformed-{images}-{batch}-{holdout}.npz"
    if cache is not None and (cache / name).exists():
        saved = np.load(cache / name)
        return [tuple(saved[f"{k}{n}"] for k in ("x", "y", "hx", "hy")) for n in range(len(saved.files) // 4)]
    rng = np.random.default_rng(2026)
    out = []
    for n in range(-(-images // batch)):
        rows = min(batch, images - n * batch)
        x, y = deformed_batch(mnist.x_train, mnist.y_train, sources, rows + holdout, rng)
        out.append((x[:rows], y[:rows], x[rows:], y[rows:]))
        log(f"[budgets] deformed batch {n + 1}: {rows} + {holdout} images")
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        np.savez(cache / name, **{f"{k}{n}": a for n, part in enumerate(out) for k, a in zip(("x", "y", "hx", "hy"), part)})
    return out


def _part(store: Store, digest: str, name: str, x: np.ndarray, y: np.ndarray) -> BatchPart:
    data = share_bytes(x, y)
    key = store.batch_file(digest, name)
    store.write_bytes(key, data)
    return BatchPart(key=key, sha256=sha256_bytes(data), size=len(data), rows=len(y))


def accepted_batches(store: Store, data: list) -> list[AcceptedBatch]:
    batches = []
    for n, (x, y, hx, hy) in enumerate(data):
        digest = sha256_bytes(f"budgets-{n}".encode())
        batches.append(
            AcceptedBatch(
                digest=digest, train=_part(store, digest, "train.bin", x, y), holdout=_part(store, digest, "holdout.bin", hx, hy)
            )
        )
    return batches


def child(store_url: str, dataset_json: str, epochs: int) -> None:
    """Train and score one model; print its figures as one JSON line."""
    from tasks.data.slices import slice_images
    from tasks.evaluation.evaluate import balanced_accuracy, predict
    from tasks.training.rebuilt import load_model
    from tasks.training.train import TrainConfig, train_model

    store = Store(store_url)
    dataset = DatasetRef.model_validate_json(Path(dataset_json).read_text())
    ref = train_model(store, dataset, TrainConfig(epochs=epochs, seed=0), log=lambda line: print(line, file=sys.stderr))
    model = load_model(store, ref)
    scores = {}
    for name in SLICES:
        images = slice_images(store, dataset, name)
        scores[name] = balanced_accuracy(images.y, predict(model, images.x).argmax(axis=1)) if len(images.y) else None
    print(json.dumps({"train_images": ref.train_images, "train_seconds": ref.train_seconds, "balanced_accuracy": scores}))


def train(store: Store, dataset: DatasetRef, epochs: int, work: Path) -> dict:
    spec = work / f"dataset-{len(list(work.glob('dataset-*.json')))}.json"
    spec.write_text(dataset.model_dump_json())
    return measured_child(__file__, ["--child", store.url, str(spec), "--epochs", str(epochs)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--multiples", type=int, nargs="+", default=[1, 2, 4, 8], help="total sizes, in base sets")
    parser.add_argument("--budget", type=int, default=DEFAULT_MAX_TRAINING_IMAGES, help="max_training_images of the policy")
    parser.add_argument("--epochs", type=int, default=1, help="epochs each training (the nightly default is 15)")
    parser.add_argument("--batch-images", type=int, default=27_500, help="training images per accepted batch (half the base set)")
    parser.add_argument("--holdout-images", type=int, default=2_000, help="holdout images per accepted batch")
    parser.add_argument("--data-store", default=os.environ.get("MNIST_STORE", str(REPO / "artifacts")))
    parser.add_argument("--cache", type=Path, default=REPO / "bench-results" / "budgets", help="deformed digits kept here")
    parser.add_argument("--record", type=Path, help="write the run as one JSON record (docs/measured/training-budgets.json)")
    parser.add_argument("--child", nargs=2, metavar=("STORE", "DATASET_JSON"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.epochs)
        return

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    started = time.perf_counter()
    data_store = Store(args.data_store)
    mnist_ref = fetch_mnist(data_store, log=lambda _: None)
    mnist = load_mnist(data_store, mnist_ref)
    sources = base_training(mnist, mnist_ref)
    base = len(sources)
    largest = max(args.multiples)
    made = time.perf_counter()
    data = deformed_data(mnist, sources, (largest - 1) * base, args.holdout_images, args.batch_images, args.cache, log)
    deform_seconds = time.perf_counter() - made
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="mnist-budgets-") as tmp:
        store = Store(Path(tmp) / "store")
        store.fs.put(data_store.path("objects") + "/", store.path("objects"), recursive=True)
        batches = accepted_batches(store, data)
        for multiple in sorted(args.multiples):
            room, arrived = (multiple - 1) * base, []
            for batch in batches:  # the oldest batches that make this total size
                if sum(b.train.rows for b in arrived) + batch.train.rows > room:
                    break
                arrived.append(batch)
            chosen = choose_batches(arrived, base, args.budget).chosen
            runs = {"everything": arrived} | ({"policy": chosen} if len(chosen) < len(arrived) else {})
            for policy, used in runs.items():
                dataset = mnist_ref.model_copy(update={"batches": used})
                log(f"[budgets] {multiple}x: {policy}, {base + sum(b.train.rows for b in used)} images, {args.epochs} epoch(s)")
                figures = train(store, dataset, args.epochs, Path(tmp))
                row = {"multiple": multiple, "available": base + sum(b.train.rows for b in arrived), "policy": policy}
                row |= {"same_as_everything": policy == "everything" and len(runs) == 1, **figures}
                log(f"[budgets]    {row}")
                rows.append(row)
    comparisons = []
    for multiple in sorted(args.multiples):
        pair = {r["policy"]: r for r in rows if r["multiple"] == multiple}
        if "policy" not in pair:
            continue
        everything, policy = pair["everything"], pair["policy"]
        comparisons.append(
            {
                "multiple": multiple,
                "accuracy_change": {
                    s: round(policy["balanced_accuracy"][s] - everything["balanced_accuracy"][s], 4) for s in SLICES
                },
                "train_seconds_ratio": round(policy["train_seconds"] / everything["train_seconds"], 3),
                "peak_rss_ratio": round(policy["peak_rss_mb"] / everything["peak_rss_mb"], 3),
            }
        )
    print(f"\n{'size':>5} {'policy':>10} {'images':>8} {'train s':>8} {'RSS MB':>7}  " + "  ".join(f"{s:>15}" for s in SLICES))
    for r in rows:
        label = "both" if r["same_as_everything"] else r["policy"]
        accuracy = "  ".join(f"{r['balanced_accuracy'][s] or float('nan'):>15.4f}" for s in SLICES)
        print(
            f"{r['multiple']:>4}x {label:>10} {r['train_images']:>8} {r['train_seconds']:>8.1f} {r['peak_rss_mb']:>7.0f}  {accuracy}"
        )
    for c in comparisons:
        change = ", ".join(f"{s} {v:+.4f}" for s, v in c["accuracy_change"].items())
        print(
            f"{c['multiple']}x, policy against everything: {change}; time x{c['train_seconds_ratio']}, RSS x{c['peak_rss_ratio']}"
        )
    if args.record:
        import datetime as dt

        settings = {
            k: v for k, v in vars(args).items() if k in ("multiples", "budget", "epochs", "batch_images", "holdout_images")
        }
        record = {
            "date": dt.date.today().isoformat(),
            "cpu": cpu_model(),
            "cpu_count": os.cpu_count(),
            "base_images": base,
            "settings": settings,
            "deform_seconds": round(deform_seconds, 1),
            "total_seconds": round(time.perf_counter() - started, 1),
            "trainings": rows,
            "comparisons": comparisons,
        }
        args.record.parent.mkdir(parents=True, exist_ok=True)
        args.record.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
