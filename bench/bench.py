"""Benchmark: our training step and pipeline against a plain Keras script, measured in the same run.

Prints one JSON object on stdout and its progress, phase by phase, on stderr. ``make bench`` runs
15 epochs, ``make bench-quick`` 2. ``--record`` also writes the object, with the date, commit, CPU model and load
it ran under, to ``docs/measured/bench.json``, from which the docs build renders docs/benchmarks.md's first two
tables. The baseline is what a user would write themselves: the seed
network, float32, ``model.fit`` on in-memory NumPy arrays, batch 128, ``validation_split=0.1``.

The baseline and our step are each trained twice, in the order baseline, ours, ours, baseline, so a
machine that speeds up or slows down during the run (a shared machine does) favours neither; the
ratio is reported for each pair with its spread.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from measured_record import provenance, write_record  # noqa: E402 (bench/, beside this script)

from storage import Store  # noqa: E402
from tasks.champion.gate import GateRules  # noqa: E402
from tasks.champion.promotion import gate  # noqa: E402
from tasks.data.fetch import fetch_mnist, load_mnist  # noqa: E402
from tasks.evaluation.evaluate import evaluate_model  # noqa: E402
from tasks.evaluation.metrics import wilson_interval  # noqa: E402
from tasks.evaluation.plots import render_plots  # noqa: E402
from tasks.publish.report import publish_report  # noqa: E402
from tasks.publish.run_record import RunRecord  # noqa: E402
from tasks.publish.tabulate import tabulate  # noqa: E402
from tasks.training.keras_runtime import import_keras  # noqa: E402
from tasks.training.model import build_seed_model  # noqa: E402
from tasks.training.train import TrainConfig, train_model  # noqa: E402

T0 = time.perf_counter()


def progress(text: str) -> None:
    print(f"[bench {time.perf_counter() - T0:6.0f} s] {text}", file=sys.stderr, flush=True)


def interval(accuracy: float, n: int) -> list[float]:
    low, high = wilson_interval(np.array([round(accuracy * n)]), np.array([n]))
    return [round(float(low[0]), 4), round(float(high[0]), 4)]


def plain_keras(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, epochs: int, seed: int) -> dict:
    """The baseline, written as the Keras examples write it."""
    keras = import_keras()  # the same keras, without TensorFlow's start-up lines

    keras.utils.set_random_seed(seed)
    model = build_seed_model()  # the identical network: only the training step differs
    model.compile(loss="sparse_categorical_crossentropy", optimizer="adam", metrics=["accuracy"])
    x = x_train.astype("float32")[..., None] / 255.0
    times: list[float] = []

    class Clock(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.t0)

    model.fit(x, y_train, batch_size=128, epochs=epochs, validation_split=0.1, callbacks=[Clock()], verbose=0)
    _, accuracy = model.evaluate(x_test.astype("float32")[..., None] / 255.0, y_test, batch_size=1024, verbose=0)
    train_images = len(x) - int(len(x) * 0.1)
    return {
        "seed": seed,
        "train_images": train_images,
        "seconds_per_epoch": round(float(np.mean(times)), 2),
        "images_per_second": round(train_images * epochs / sum(times), 1),
        "test_accuracy": round(float(accuracy), 4),
        "test_images": len(y_test),
        "test_accuracy_ci95": interval(float(accuracy), len(y_test)),
    }


def ours(store: Store, dataset, epochs: int, seed: int) -> tuple[dict, object]:
    import pandas as pd

    ref = train_model(store, dataset, TrainConfig(epochs=epochs, seed=seed), log=lambda _: None, reuse=False)
    history = pd.read_parquet(store.path(ref.history_key))
    evaluation = evaluate_model(store, dataset, ref, n_per_class=800, seed=seed, reuse=False)
    return {
        "seed": seed,
        "train_images": ref.train_images,
        "seconds_per_epoch": round(float(history["seconds"].mean()), 2),
        "images_per_second": round(ref.train_images * epochs / float(history["seconds"].sum()), 1),
        "dtype_policy": ref.precision,
        "test_accuracy": round(evaluation.test_accuracy, 4),
        "test_images": evaluation.test_images,
        "test_accuracy_ci95": interval(evaluation.test_accuracy, evaluation.test_images),
    }, (ref, evaluation)


def timed_cli(args: list[str], home: Path) -> tuple[float, float]:
    """Wall seconds and peak RSS (GB) of one ``mnist-pipeline run`` in its own process."""
    env = {**os.environ, "PREFECT_HOME": str(home)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "flows.cli", "run", *args], cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"mnist-pipeline run failed:\n{done.stderr[-3000:]}")
    peak_kb = max(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, before)
    return round(wall, 1), round(peak_kb / 1024 / 1024, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--data-store",
        default=os.environ.get("MNIST_STORE", str(REPO / "artifacts")),
        help="store that holds (or will hold) the verified MNIST files",
    )
    parser.add_argument("--record", action="store_true", help="also write docs/measured/bench.json for the docs")
    args = parser.parse_args()
    measured = provenance()  # before the run: its load average is the machine's, not ours

    data_store = Store(args.data_store)
    dataset = fetch_mnist(data_store, log=lambda _: None)
    mnist = load_mnist(data_store, dataset)

    with tempfile.TemporaryDirectory(prefix="mnist-bench-") as tmp:
        tmp = Path(tmp)
        baselines, ours_runs = [], []
        model = None
        for turn, who in enumerate(("baseline", "ours", "ours", "baseline")):  # ABBA: linear drift cancels
            seed = args.seed + (len(baselines) if who == "baseline" else len(ours_runs))
            progress(f"{turn + 1}/4: {'plain Keras' if who == 'baseline' else 'our step'}, {args.epochs} epochs, seed {seed}")
            if who == "baseline":
                baselines.append(plain_keras(mnist.x_train, mnist.y_train, mnist.x_test, mnist.y_test, args.epochs, seed))
                figures = baselines[-1]
            else:
                store = Store(tmp / f"train-store-{seed}")
                store.fs.put(data_store.path("objects") + "/", store.path("objects"), recursive=True)
                figures, (model, _) = ours(store, dataset, args.epochs, seed)
                ours_runs.append(figures)
            progress(f"   {figures['seconds_per_epoch']:.2f} s/epoch, test accuracy {figures['test_accuracy']:.4f}")

        progress("evaluation, tables and plots of our model")
        started = time.perf_counter()
        evaluation = evaluate_model(store, dataset, model, n_per_class=800, seed=args.seed, reuse=False)
        plots = render_plots(store, dataset, model, evaluation)
        decided = gate(store, dataset, model, evaluation, GateRules(), "bench", log=lambda _: None)
        run = RunRecord(
            run_id="bench", parameters={"bench": True}, dataset=dataset, model=model, evaluation=evaluation, gate=decided
        )
        tables = tabulate(store, run)
        publish_report(store, run, plots, tables)
        eval_tables_plots = time.perf_counter() - started

        flow_store = Store(tmp / "flow-store")
        flow_store.fs.put(data_store.path("objects") + "/", flow_store.path("objects"), recursive=True)
        cli_args = ["--epochs", str(args.epochs), "--seed", str(args.seed), "--store", flow_store.url]
        progress("the whole flow, cold (mnist-pipeline run)")
        cold, cold_rss = timed_cli(cli_args, tmp / "prefect")
        progress(f"   {cold:.1f} s; again, warm (every heavy step cached)")
        warm, warm_rss = timed_cli(cli_args, tmp / "prefect")
        progress(f"   {warm:.1f} s")

    # pairs in time order: (baseline 1, ours 1) and (baseline 2, ours 2), i.e. the outer and the inner pair
    ratios = [o["images_per_second"] / b["images_per_second"] for b, o in zip(baselines, ours_runs)]
    result = {
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "epochs": args.epochs,
        "batch_size": 128,
        "order": "baseline, ours, ours, baseline",
        "baseline_plain_keras": baselines,
        "ours": ours_runs,
        "ratio_images_per_second_ours_over_baseline": round(
            sum(o["images_per_second"] for o in ours_runs) / sum(b["images_per_second"] for b in baselines), 2
        ),
        "ratio_per_pair": [round(r, 2) for r in ratios],
        "ratio_spread": round(max(ratios) - min(ratios), 2),
        "flow_cold_run_seconds": cold,
        "flow_warm_rerun_seconds": warm,
        "evaluation_tables_plots_seconds": round(eval_tables_plots, 1),
        "peak_rss_gb_full_run": max(cold_rss, warm_rss),
    }
    print(json.dumps(result, indent=2))
    if args.record:
        out = write_record("bench.json", {**measured, **result})
        progress(f"recorded in {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
