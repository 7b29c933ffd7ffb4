"""``mnist-pipeline``: run the retrain flow once from a shell (ephemeral Prefect unless PREFECT_API_URL is set)."""

from __future__ import annotations

import argparse
import atexit
import enum
import json
import logging
import os
import sys
import threading
import typing

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from flows.params import PipelineParameters, describe_errors

EXIT_FAILED = 1
EXIT_BAD_PARAMETERS = 2


def _quiet_environment() -> None:
    # Telemetry cannot leave an offline machine, and TensorFlow's C++ banner is noise in a run log.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


GROUPS = {
    "gate": ("champion gate", "when this run's model replaces the champion (compared on the same images)"),
    "ingest": ("new-data checks", "when a new batch is quarantined instead of trained on"),
}


def _flag_options(field: FieldInfo) -> dict:
    """argparse options for one pydantic field: its type (an enum's values as choices), default and help,
    so every flag says what the UI form says; bounds are checked by pydantic, with the field's name."""
    kinds = [t for t in (typing.get_args(field.annotation) or (field.annotation,)) if t is not type(None)]
    kind = kinds[0]
    default = field.get_default(call_default_factory=True)
    text = field.description or field.title or ""
    if kind is bool:
        return {"action": "store_true", "help": text.replace("%", "%%")}
    options: dict = {"default": default.value if isinstance(default, enum.Enum) else default}
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        options["choices"] = [member.value for member in kind]
    else:
        options["type"] = kind
    shown = "empty" if options["default"] is None else "%(default)s"
    options["help"] = f"{text.replace('%', '%%')} (default {shown})"
    return options


def _add_model_flags(parser, model: type[BaseModel]) -> None:
    """One ``--flag-name`` per field of ``model``; a field that is itself a model becomes an argument group."""
    for name, field in model.model_fields.items():
        if name in GROUPS:
            group_model = typing.get_args(field.annotation) or (field.annotation,)
            _add_model_flags(parser.add_argument_group(*GROUPS[name]), group_model[0])
            continue
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, **_flag_options(field))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mnist-pipeline", description="Nightly MNIST retrain pipeline (Prefect + Keras).")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the flow once and print where its tables and plots are")
    _add_model_flags(run, PipelineParameters)  # the flags are the parameters: declared once, in flows/params.py

    store_help = PipelineParameters.model_fields["store"].description
    champion = sub.add_parser("champion", help="print the current champion (run, model, metrics)")
    champion.add_argument("--store", default=None, help=store_help)
    champion.add_argument("--json", action="store_true", help="print JSON, for scripts")
    promote = sub.add_parser("promote", help="make a run's model the champion (recorded as manual)")
    promote.add_argument("run_id", help="the run whose model becomes the champion (see the runs table)")
    promote.add_argument("--store", default=None, help=store_help)
    rollback = sub.add_parser("rollback", help="make the previous champion the champion again (recorded as manual)")
    rollback.add_argument("--store", default=None, help=store_help)
    for name, verb in (
        ("release", "accept a quarantined batch: the next night trains on it"),
        ("quarantine", "set an accepted batch aside: the next night trains without it"),
    ):
        batch = sub.add_parser(name, help=f"{verb} (recorded in the batches table as the operator's)")
        batch.add_argument("batch", help="the batch's digest, or its first 8+ characters (see the batches table)")
        batch.add_argument("--store", default=None, help=store_help)
    simulate = sub.add_parser("simulate-arrivals", help="write night K's batch of the scripted week into the incoming location")
    simulate.add_argument("--night", type=int, required=True, choices=range(1, 8), metavar="K", help="night of the week, 1–7")
    simulate.add_argument("--store", default=None, help=store_help)
    simulate.add_argument("--held-back", type=int, default=None, help="held-back images the nights run with (default 10000)")
    simulate.add_argument("--images", type=int, default=None, help="images per batch (default 1500)")
    return parser


def parameters_from(args: argparse.Namespace) -> PipelineParameters:
    values = vars(args)

    def fields_of(model: type[BaseModel]) -> dict:
        found = {}
        for name, field in model.model_fields.items():
            if name in GROUPS:
                found[name] = fields_of((typing.get_args(field.annotation) or (field.annotation,))[0])
            elif name in values:
                found[name] = values[name]
        return found

    found = fields_of(PipelineParameters)
    if found.get("store"):  # a person at their own terminal: a password in the URL goes to fsspec's config, not
        from storage import strip_credentials  # into the flow run's parameters, the log or the runs table

        found["store"] = strip_credentials(found["store"])
    return PipelineParameters(**found)


def batch_command(args: argparse.Namespace) -> int:
    """``release`` and ``quarantine``: an operator overrules the ingest step's decision on one batch."""
    from flows.locks import open_store
    from tasks.intake.ingest import BatchNotFound, set_status

    store = open_store(args.store)
    try:
        record = set_status(store, args.batch, "accepted" if args.command == "release" else "quarantined")
    except BatchNotFound as exc:
        print(f"mnist-pipeline {args.command}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"Batch {record.digest[:12]} ({record.file}) is now {record.status}; the next night's dataset version follows.")
    return 0


def simulate_command(args: argparse.Namespace) -> int:
    """``simulate-arrivals``: night K of the scripted week, from MNIST (fetched into the store if missing)."""
    from flows.locks import open_store
    from tasks.data import simulate
    from tasks.data.fetch import MnistUnavailable, default_sources, fetch_mnist, load_mnist
    from tasks.intake.ingest import INCOMING_ENV, incoming_store

    store = open_store(args.store)
    try:
        mnist = load_mnist(store, fetch_mnist(store, default_sources(), log=lambda line: None))
    except MnistUnavailable as exc:
        print(f"mnist-pipeline simulate-arrivals: {exc}", file=sys.stderr)
        return EXIT_FAILED
    held_back = args.held_back if args.held_back is not None else simulate.HELD_BACK
    images = args.images if args.images is not None else simulate.BATCH_IMAGES
    try:
        where = simulate.write_night(
            incoming_store(store, os.environ.get(INCOMING_ENV) or None), mnist, args.night, held_back, images
        )
    except ValueError as exc:
        print(f"mnist-pipeline simulate-arrivals: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(
        f"Night {args.night} ({simulate.NIGHTS[args.night]}): {images} images → {where}; run the night with --held-back {held_back}"
    )
    return 0


def champion_command(args: argparse.Namespace) -> int:
    """``champion``, ``promote`` and ``rollback``: read and set the pointer in the store, no Prefect run needed."""
    from flows.locks import open_store
    from tasks.champion.promotion import ChampionError, find_champion, promote_run, rollback

    store = open_store(args.store)
    try:
        if args.command == "promote":
            row = promote_run(store, args.run_id)
        elif args.command == "rollback":
            row = rollback(store)
        else:
            return print_champion(store, find_champion(store), as_json=args.json)
    except ChampionError as exc:
        print(f"mnist-pipeline {args.command}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    before = row["champion_model_key"] or "none"
    print(
        f"Champion is now model {row['challenger_model_key']} of run {row['run_id']} (was {before}); recorded in promotions as manual."
    )
    return 0


def print_champion(store, lookup, as_json: bool) -> int:
    if lookup.problem:
        print(lookup.problem, file=sys.stderr)
    champion = lookup.champion
    if as_json:
        print(
            json.dumps(
                None
                if champion is None
                else {**champion.model_dump(mode="json"), "model_path": store.location(lookup.model.file_key)}
            )
        )
        return 0
    if champion is None:
        print(f"No champion in {store.url} yet: the first run whose model meets the floor becomes champion.")
        return 0
    print(
        f"Champion run:       {champion.run_id}\n"
        f"Model:              {champion.model_key} → {store.location(lookup.model.file_key)}\n"
        f"SHA-256:            {champion.sha256}\n"
        f"Balanced accuracy:  {champion.balanced_accuracy:.4f}\n"
        f"Test accuracy:      {champion.test_accuracy:.4f}\n"
        f"Promoted at:        {champion.promoted_at.isoformat()}{' (forced)' if champion.forced else ''}\n"
        f"Reason:             {champion.reason}"
    )
    return 0


TEMPORARY_API_START_SECONDS = 120


def _start_temporary_api() -> threading.Thread | None:
    """Without ``PREFECT_API_URL`` Prefect starts a temporary API server in a subprocess when the flow begins,
    about 3 s here. Started now, it boots on the other core while this process imports the flow."""
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_SERVER_EPHEMERAL_ENABLED,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
    )

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return None
    from prefect.server.api.server import SubprocessASGIServer  # the instance Prefect's client uses, started once

    # Prefect waits 20 s by default; on a loaded machine the server can take longer, and a start that times out
    # leaves its process running (and, in Prefect 3.9, blocks reading that process's output). A generous wait.
    timeout = max(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value(), TEMPORARY_API_START_SECONDS)
    server = SubprocessASGIServer()
    thread = threading.Thread(target=server.start, kwargs={"timeout": timeout}, name="prefect-temporary-api", daemon=True)
    thread.start()  # a failure here is raised again, with its message, when the flow starts the server itself
    return thread


def entry() -> None:
    """The console script. A run's work is done when ``main`` returns; the interpreter's teardown of Prefect's
    server modules, pandas and pyarrow then takes over a second here and does nothing a run needs. Exit
    handlers still run (Prefect stops its temporary server, logging flushes); the last one ends the process."""
    code = [EXIT_FAILED]

    def leave() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code[0])

    atexit.register(leave)  # registered first, so it runs after every other exit handler
    try:
        code[0] = main()
    except SystemExit as exc:  # argparse's usage errors (2), --help (0)
        code[0] = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_FAILED)
        raise
    except KeyboardInterrupt:
        code[0] = 130
        raise
    sys.exit(code[0])


def main(argv: list[str] | None = None) -> int:
    _quiet_environment()
    args = build_parser().parse_args(argv)
    if args.command in ("release", "quarantine"):
        return batch_command(args)
    if args.command == "simulate-arrivals":
        return simulate_command(args)
    if args.command != "run":
        return champion_command(args)
    try:
        params = parameters_from(args)
    except ValidationError as exc:
        print(describe_errors(exc), file=sys.stderr)
        return EXIT_BAD_PARAMETERS

    from flows.locks import open_store
    from storage import StoreError

    try:  # seconds, not the ephemeral server's start-up (or fifteen epochs), before saying the store is unusable
        open_store(params.store).check_writable()
    except StoreError as exc:
        print(f"mnist-pipeline: {exc}", file=sys.stderr)
        return EXIT_FAILED

    api = _start_temporary_api()
    from flows.pipeline import mnist_retrain  # imports Prefect: only once the input is valid

    if api is not None:
        api.join()

    try:
        summary = mnist_retrain(params)
    except Exception as exc:  # the flow run is already marked Failed in Prefect, with its traceback
        print(f"\nmnist-pipeline: the run failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    logging.getLogger("prefect").setLevel(logging.WARNING)  # the decision, not the ephemeral server's goodbye, ends the output
    new_data = (
        f"{summary.new_data_balanced_accuracy:.4f} ({summary.new_data_images} images)"
        if summary.new_data_balanced_accuracy is not None
        else "none yet"
    )
    role = (
        "decides"
        if summary.new_data_images >= params.gate.min_new_data_images
        else f"decides from {params.gate.min_new_data_images} images"
    )
    tonight = list(summary.batches_tonight.values())
    print(
        f"\nSelection:          {summary.selection_balanced_accuracy:.4f} balanced accuracy on mnist-selection (decides)\n"
        f"New data:           {new_data} ({role})\n"
        f"Test accuracy:      {summary.test_accuracy:.4f} (all 10000 test images; reports only)\n"
        f"Balanced accuracy:  {summary.balanced_accuracy:.4f} ({summary.n_evaluated} test images, {params.n_per_class} per digit)\n"
        f"Dataset version:    {summary.dataset_version[:16]} (MNIST and {summary.batches_accepted} accepted batches; tonight "
        f"{tonight.count('accepted')} accepted, {tonight.count('quarantined')} quarantined)\n"
        f"Model:              {summary.network} on {summary.device} ({summary.backend}, {summary.precision}) → {summary.model_path}\n"
        f"Parquet tables:     {summary.tables_dir}\n"
        f"Plots and report:   {summary.report_dir} (open {summary.report_index})\n"
        f"Steps:              {', '.join(f'{step} {state}' for step, state in summary.step_states.items())}\n"
        f"Champion:           {summary.champion_model_key or 'none'}"
        + (f" (run {summary.champion_run_id})" if summary.champion_run_id else "")
        + "\n"
        f"Decision:           {summary.decision.upper()}{' (forced)' if summary.forced else ''}\n"
        f"Reason:             {summary.decision_reason}"
    )
    return 0


if __name__ == "__main__":
    entry()
