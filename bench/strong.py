"""Benchmark: the ``strong`` model on its defaults, seed by seed, through the pipeline's own training step.

For each seed: ``train_model`` with ``TrainConfig(model="strong", seed=…)`` (the night's step, nothing
bench-specific), timed on the wall clock, then the stored ``.keras`` file loaded as the gate loads it and
scored on the whole test set (10 000 images) and on the held-out ``mnist-selection`` split (5 000, balanced).
One JSON line per seed on stdout (appended to ``--out`` as well, so a long sitting keeps what it measured),
progress on stderr. ``make bench-strong`` runs seeds 0, 1 and 2: about 45 minutes alone on 2 cores.

``--record`` appends the sitting (its rows, with the date, commit, CPU model and load it ran under) to
``docs/measured/strong.json``, from which the docs build renders docs/benchmarks.md's strong-model tables.

Run it for two commits in one sitting (``git worktree add``, then this script from each) to compare recipes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from measured_record import MEASURED, provenance, write_record  # noqa: E402 (bench/, beside this script)

from storage import Store  # noqa: E402
from tasks.data.fetch import fetch_mnist, load_mnist  # noqa: E402
from tasks.data.slices import slice_images  # noqa: E402
from tasks.data.splits import SLICE_SELECTION, SLICE_TEST  # noqa: E402
from tasks.evaluation.evaluate import balanced_accuracy, predict  # noqa: E402
from tasks.training.model import SERVING_SHIFTS, ModelName, averaged_over_shifts  # noqa: E402
from tasks.training.rebuilt import load_model  # noqa: E402
from tasks.training.train import TrainConfig, stored_model, train_model  # noqa: E402

CROSS = ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1))
# Test-time view sets scored beside the model as saved; the default is chosen on mnist-selection, never on the test.
VIEW_SETS = {
    "none": ((0, 0),),
    "cross-1px (5)": CROSS,
    "square-1px (9)": tuple((down, right) for down in (-1, 0, 1) for right in (-1, 0, 1)),
    "cross-1px-2px (9)": CROSS + ((2, 0), (-2, 0), (0, 2), (0, -2)),
}

T0 = time.perf_counter()


def progress(text: str) -> None:
    print(f"[strong {time.perf_counter() - T0:6.0f} s] {text}", file=sys.stderr, flush=True)


def commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True)
    return done.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=None, help="empty: the strong model's default")
    parser.add_argument("--store", default=None, help="where the trained models go (default: a folder under bench-results/)")
    parser.add_argument("--data-store", default=os.environ.get("MNIST_STORE", str(REPO / "artifacts")))
    parser.add_argument("--out", default=str(REPO / "bench-results" / "strong.jsonl"))
    parser.add_argument("--views", action="store_true", help="also score the trained network with each of VIEW_SETS")
    parser.add_argument("--record", action="store_true", help="append this sitting to docs/measured/strong.json")
    parser.add_argument("--score-keys", nargs="+", default=None, help="score these stored models' view sets; train nothing")
    args = parser.parse_args()

    label = commit()
    measured = provenance()
    data_store = Store(args.data_store)
    dataset = fetch_mnist(data_store, log=progress)
    mnist = load_mnist(data_store, dataset)
    store = Store(args.store or str(REPO / "bench-results" / f"store-{label}"))
    if not store.exists("objects"):
        store.fs.put(data_store.path("objects") + "/", store.path("objects"), recursive=True)
    slices = {name: slice_images(data_store, dataset, name, mnist) for name in (SLICE_TEST, SLICE_SELECTION)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)

    def score(model) -> dict[str, tuple[float, float, float]]:
        """(accuracy, balanced accuracy, seconds to predict) on each slice."""
        scores = {}
        for name, images in slices.items():
            started = time.perf_counter()
            predicted = predict(model, images.x).argmax(axis=1)  # as the evaluation step predicts
            seconds = time.perf_counter() - started
            scores[name] = (float(np.mean(predicted == images.y)), balanced_accuracy(images.y, predicted), seconds)
        return scores

    def views(model) -> dict:
        """The trained network (inside the saved wrapper, if any) scored with each view set."""
        inner = next((layer for layer in model.layers if layer.name == "strong_cnn"), model)
        figures = {}
        for name, shifts in VIEW_SETS.items():
            scored = score(averaged_over_shifts(inner, shifts))
            figures[name] = {
                "selection_balanced_accuracy": round(scored[SLICE_SELECTION][1], 4),
                "test_accuracy": round(scored[SLICE_TEST][0], 4),
                "test_balanced_accuracy": round(scored[SLICE_TEST][1], 4),
                "test_predict_seconds": round(scored[SLICE_TEST][2], 1),
            }
            progress(f"   views {name}: {figures[name]}")
        return figures

    if args.score_keys:
        for key in args.score_keys:
            ref = stored_model(store, key)
            if ref is None:
                raise SystemExit(f"no model under key {key} in {store.url}")
            row = {"model_key": key, "commit": label, "views": views(load_model(store, ref))}
            print(json.dumps(row), flush=True)
        return

    rows = []
    for seed in args.seeds:
        config = TrainConfig(model="strong", seed=seed, epochs=args.epochs)
        progress(f"seed {seed}: training strong, {config.epochs} epochs ({label})")
        started = time.perf_counter()
        ref = train_model(store, dataset, config, log=progress, reuse=False)
        wall = time.perf_counter() - started
        model = load_model(store, ref)
        scores = score(model)
        row = {
            "commit": label,
            "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
            "seed": seed,
            "epochs": config.epochs,
            "test_accuracy": round(scores[SLICE_TEST][0], 4),
            "test_balanced_accuracy": round(scores[SLICE_TEST][1], 4),
            "selection_balanced_accuracy": round(scores[SLICE_SELECTION][1], 4),
            "serving_shifts": len(SERVING_SHIFTS[ModelName.strong]),
            "test_predict_seconds": round(scores[SLICE_TEST][2], 1),
            "train_minutes": round(ref.train_seconds / 60, 1),
            "wall_minutes": round(wall / 60, 1),
            "model_key": ref.key,
            "sha256": ref.sha256,
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "views": views(model) if args.views else None,
        }
        progress(json.dumps(row))
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as out:
            out.write(json.dumps(row) + "\n")
        rows.append(row)
    if args.record:
        kept = MEASURED / "strong.json"
        record = json.loads(kept.read_text()) if kept.exists() else {"sittings": []}
        record["sittings"].append({"source": "measured", **measured, "test_images": len(slices[SLICE_TEST].y), "rows": rows})
        progress(f"recorded in {write_record('strong.json', record).relative_to(REPO)}")


if __name__ == "__main__":
    main()
