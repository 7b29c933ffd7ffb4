"""The GPU check: the seed network trained by ``tasks.training.train`` on Keras' JAX and PyTorch backends, in float32
and in mixed precision, on whatever device each backend finds; one JSON object on stdout, progress on stderr.

Run it through ``bench/gpu_check.sh`` on a GPU machine (it installs the wheels brought along in ``.whl/``
where the machine lacks them; see ``make gpu-check-bundle``). Each (backend, precision) trains in its own
process, since Keras fixes its backend per process. The same path runs on a CPU (``--epochs 1
--train-limit 3000``), which is how it is checked on a machine without a GPU.

Also: ``--wheel-list`` prints the pinned wheels a GPU machine needs, ``--export-mnist DIR`` writes the
four verified IDX files (gzipped) from the store for the trip.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# What the GPU machines lack of our training path's imports (they have numpy, pandas, pyarrow, fsspec, h5py,
# ml-dtypes, rich, absl-py, packaging, typing-extensions, jax and torch): pinned to this project's versions.
GPU_MACHINE_LACKS = ("keras", "namex", "optree", "pydantic", "pydantic-core", "annotated-types", "typing-inspection")
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")


def progress(text: str) -> None:
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def wheel_list() -> list[str]:
    return [f"{name}=={metadata.version(name)}" for name in GPU_MACHINE_LACKS]


def export_mnist(directory: Path) -> None:
    from storage import Store
    from tasks.data.fetch import default_sources, fetch_mnist

    store = Store.resolve(None)
    dataset = fetch_mnist(store, sources=default_sources(), log=progress)
    directory.mkdir(parents=True, exist_ok=True)
    for name, stored in dataset.files.items():
        (directory / f"{name}.gz").write_bytes(gzip.compress(store.read_bytes(stored.key), mtime=0))
    progress(f"wrote the four IDX files (gzipped) to {directory}")


def device_name(backend: str) -> str:
    if backend == "jax":
        import jax

        device = jax.devices()[0]
        return f"{device.device_kind} ({device.platform})"
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (cuda)"
    return f"{platform.processor() or platform.machine()} (cpu)"


def train_one(args: argparse.Namespace) -> dict:
    """In a process whose KERAS_BACKEND is ``args.backend``: train, then predict the whole test set."""
    import io

    import numpy as np
    import pandas as pd

    from storage import Store
    from tasks.data.fetch import DirectorySource, fetch_mnist, load_mnist
    from tasks.evaluation.evaluate import predict
    from tasks.evaluation.metrics import wilson_interval
    from tasks.training.backends import process_backend
    from tasks.training.rebuilt import load_model
    from tasks.training.train import TrainConfig, train_model

    assert process_backend().value == args.backend, (process_backend(), args.backend)
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(tmp)
        dataset = fetch_mnist(store, sources=[DirectorySource(args.mnist)], log=lambda _: None)
        config = TrainConfig(
            epochs=args.epochs, train_limit=args.train_limit, seed=args.seed, precision=args.precision, backend=args.backend
        )
        started = time.perf_counter()
        ref = train_model(store, dataset, config, log=lambda text: progress(f"{args.backend}/{args.precision}: {text}"))
        wall = time.perf_counter() - started
        mnist = load_mnist(store, dataset)
        correct = int((predict(load_model(store, ref), mnist.x_test).argmax(axis=1) == mnist.y_test).sum())
        history = store.read_bytes(ref.history_key)
    seconds = pd.read_parquet(io.BytesIO(history))["seconds"].tolist()
    steady = statistics.median(seconds[1:]) if len(seconds) > 1 else seconds[0]  # epoch 1 includes compilation
    low, high = wilson_interval(np.array(correct), np.array(len(mnist.y_test)))
    return {
        "backend": args.backend,
        "precision": ref.precision,
        "device": ref.device,
        "device_name": device_name(args.backend),
        "epochs": ref.epochs,
        "train_images": ref.train_images,
        "seconds_per_epoch": round(steady, 3),
        "first_epoch_seconds": round(seconds[0], 3),
        "images_per_second": round(ref.train_images / steady, 1),
        "fit_seconds": round(ref.train_seconds, 2),
        "train_wall_seconds": round(wall, 2),
        "test_accuracy": correct / len(mnist.y_test),
        "test_accuracy_ci95": [round(float(low), 4), round(float(high), 4)],
    }


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in ("keras", "jax", "jaxlib", "torch", "numpy"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "absent"
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mnist", type=Path, default=REPO / ".mnist", help="directory with the four IDX files (.gz or raw)")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--train-limit", type=int, default=None, help="train on a stratified subset (CPU check)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backends", default="jax,torch")
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # the child's side
    parser.add_argument("--backend", help=argparse.SUPPRESS)
    parser.add_argument("--precision", help=argparse.SUPPRESS)
    parser.add_argument("--wheel-list", action="store_true", help="print the wheels a GPU machine lacks, pinned")
    parser.add_argument("--export-mnist", type=Path, help="write the four IDX files from the store to this directory")
    args = parser.parse_args()
    if args.wheel_list:
        print(" ".join(wheel_list()))
        return 0
    if args.export_mnist:
        export_mnist(args.export_mnist)
        return 0
    if args.one:
        print(json.dumps(train_one(args)), flush=True)
        return 0

    started = time.perf_counter()
    runs, failures = [], []
    for backend in args.backends.split(","):
        for precision in args.precisions.split(","):
            progress(f"{backend} / {precision}: {args.epochs} epochs")
            child = [
                sys.executable,
                __file__,
                "--one",
                f"--backend={backend}",
                f"--precision={precision}",
                f"--mnist={args.mnist}",
                f"--epochs={args.epochs}",
                f"--seed={args.seed}",
            ]
            if args.train_limit:
                child.append(f"--train-limit={args.train_limit}")
            t0 = time.perf_counter()
            done = subprocess.run(child, env={**os.environ, "KERAS_BACKEND": backend}, stdout=subprocess.PIPE, text=True)
            if done.returncode != 0:
                failures.append({"backend": backend, "precision": precision, "exit_status": done.returncode})
                progress(f"{backend} / {precision} FAILED (exit {done.returncode}); its error is above")
                continue
            run = json.loads(done.stdout.strip().splitlines()[-1])
            run["process_wall_seconds"] = round(time.perf_counter() - t0, 2)
            runs.append(run)
            progress(
                f"{backend} / {run['precision']}: {run['seconds_per_epoch']:.2f} s/epoch, {run['train_wall_seconds']:.1f} s "
                f"for {run['epochs']} epochs, test accuracy {run['test_accuracy']:.4f}"
            )
    fastest = min(runs, key=lambda r: r["train_wall_seconds"]) if runs else None
    print(
        json.dumps(
            {
                "device_name": runs[0]["device_name"] if runs else None,
                "versions": versions(),
                "epochs": args.epochs,
                "train_limit": args.train_limit,
                "runs": runs,
                "failures": failures,
                "fastest": {k: fastest[k] for k in ("backend", "precision", "train_wall_seconds", "test_accuracy")}
                if fastest
                else None,
                "total_seconds": round(time.perf_counter() - started, 1),
            },
            indent=2,
        )
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
