"""``mnist-pipeline``: run the retrain flow once from a shell (ephemeral Prefect unless PREFECT_API_URL is set)."""

from __future__ import annotations

import argparse
import os
import sys

from pydantic import ValidationError

from flows.params import PipelineParameters, describe_errors

EXIT_FAILED = 1
EXIT_BAD_PARAMETERS = 2


def _quiet_environment() -> None:
    # Telemetry cannot leave an offline machine, and TensorFlow's C++ banner is noise in a run log.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mnist-pipeline", description="Nightly MNIST retrain pipeline (Prefect + Keras).")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the flow once and print where its tables and plots are")
    defaults = PipelineParameters()
    run.add_argument("--model", default=defaults.model.value, help="network: seed (default) or strong")
    run.add_argument("--epochs", type=int, default=defaults.epochs, help="training epochs (default %(default)s)")
    run.add_argument("--batch-size", type=int, default=defaults.batch_size, help="batch size (default %(default)s)")
    run.add_argument("--n-per-class", type=int, default=defaults.n_per_class, help="evaluation images per digit (default %(default)s)")
    run.add_argument("--seed", type=int, default=defaults.seed, help="random seed (default %(default)s)")
    run.add_argument("--train-limit", type=int, default=None, help="train on a stratified subset of this many images (default: all 60000)")
    run.add_argument("--precision", default=defaults.precision.value, help="auto (default), float32, mixed_bfloat16, mixed_float16")
    run.add_argument("--store", default=None, help="artifact store directory or fsspec URL (default: $MNIST_STORE, else ./artifacts)")
    run.add_argument("--mnist-source", default=None, help="directory with the four MNIST IDX files, tried first (default: $MNIST_SOURCE)")
    return parser


def parameters_from(args: argparse.Namespace) -> PipelineParameters:
    return PipelineParameters(
        model=args.model,
        epochs=args.epochs,
        batch_size=args.batch_size,
        n_per_class=args.n_per_class,
        seed=args.seed,
        train_limit=args.train_limit,
        precision=args.precision,
        store=args.store,
        mnist_source=args.mnist_source,
    )


def main(argv: list[str] | None = None) -> int:
    _quiet_environment()
    args = build_parser().parse_args(argv)
    try:
        params = parameters_from(args)
    except ValidationError as exc:
        print(describe_errors(exc), file=sys.stderr)
        return EXIT_BAD_PARAMETERS

    from storage import Store, StoreError

    try:  # seconds, not the ephemeral server's start-up (or fifteen epochs), before saying the store is unusable
        Store.resolve(params.store).check_writable()
    except StoreError as exc:
        print(f"mnist-pipeline: {exc}", file=sys.stderr)
        return EXIT_FAILED

    from flows.pipeline import mnist_retrain  # imports Prefect: only once the input is valid

    try:
        summary = mnist_retrain(params)
    except Exception as exc:  # the flow run is already marked Failed in Prefect, with its traceback
        print(f"\nmnist-pipeline: the run failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(
        f"\nTest accuracy:      {summary.test_accuracy:.4f} (all 10000 test images)\n"
        f"Balanced accuracy:  {summary.balanced_accuracy:.4f} ({summary.n_evaluated} images, {params.n_per_class} per digit)\n"
        f"Model:              {summary.model} on {summary.device} ({summary.precision}) → {summary.model_path}\n"
        f"Parquet tables:     {summary.tables_dir}\n"
        f"Plots and report:   {summary.report_dir} (open {summary.report_index})\n"
        f"Steps:              {', '.join(f'{step} {state}' for step, state in summary.cache.items())}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
