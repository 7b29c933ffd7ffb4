"""``mnist-pipeline``: run the retrain flow once, and look at and steer what the nights decided (champion, batches,
runs), from a shell; ephemeral Prefect unless PREFECT_API_URL is set."""

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

from flows.night.params import PipelineParameters, describe_errors

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


CLI_DEFAULTS = {"seed": None}  # empty: derived from the dataset version, as prefect.yaml's nightly deployment has it


def _optional(kind: type):
    """An argparse type that reads an empty value (``--seed ''``) as empty, the way the UI's form leaves it."""

    def parse(text: str):
        return None if text.strip() == "" else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its error message
    return parse


def _add_model_flags(parser, model: type[BaseModel]) -> None:
    """One ``--flag-name`` per field of ``model``; a field that is itself a model becomes an argument group."""
    for name, field in model.model_fields.items():
        if name in GROUPS:
            group_model = typing.get_args(field.annotation) or (field.annotation,)
            _add_model_flags(parser.add_argument_group(*GROUPS[name]), group_model[0])
            continue
        options = _flag_options(field)
        if name in CLI_DEFAULTS:  # the command line behaves as the nightly deployment does
            options["default"], options["type"] = CLI_DEFAULTS[name], _optional(options["type"])
            options["help"] = options["help"].replace("(default 0)", "(default empty)")
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, **options)


ENVIRONMENT = """environment:
  MNIST_STORE              the artifact store (a directory or an fsspec URL)
                           when --store is not given
  MNIST_SOURCE             a directory with MNIST's four IDX files, tried before
                           the web mirrors (run)
  MNIST_INCOMING           where new labelled batches arrive (default <store>/incoming)
  KERAS_BACKEND            tensorflow, jax or torch, when --backend is not given (run)
  PREFECT_API_URL          a Prefect server to record runs in and take locks from
                           (else a temporary one)
  PREFECT_API_AUTH_STRING  that server's auth string
"""

# Old flat names: still accepted for one release, with a line on stderr naming the new command.
DEPRECATED = {
    "promote": ("champion", "promote"),
    "rollback": ("champion", "rollback"),
    "release": ("batches", "release"),
    "quarantine": ("batches", "quarantine"),
    "simulate-arrivals": ("demo", "simulate-arrivals"),
}


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("mnist-nightly-retrain")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _store_flag(parser: argparse.ArgumentParser) -> None:
    """``--store``, absent from the namespace unless given: a group's and its verb's flags do not overwrite each other."""
    parser.add_argument(
        "--store",
        default=argparse.SUPPRESS,
        help=PipelineParameters.model_fields["store"].description + " (default $MNIST_STORE)",
    )


def _json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON, for scripts")


def _group(sub, name: str, help_text: str) -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    group = sub.add_parser(name, help=help_text, description=help_text, epilog=ENVIRONMENT, formatter_class=_Format)
    return group, group.add_subparsers(dest="verb", metavar="VERB")


class _Format(argparse.RawDescriptionHelpFormatter):
    """Help text as written (the environment list keeps its columns)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mnist-pipeline",
        description="Nightly MNIST retrain pipeline (Prefect + Keras): run it once, look at and steer what the nights decided.",
        epilog=ENVIRONMENT,
        formatter_class=_Format,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser(
        "run", help="run the flow once and print where its tables and plots are", epilog=ENVIRONMENT, formatter_class=_Format
    )
    _add_model_flags(run, PipelineParameters)  # the flags are the parameters: declared once, in flows/night/params.py

    champion_group, champion = _group(
        sub, "champion", "the model in use: show it, list its history, promote a run's model, roll back"
    )
    _store_flag(champion_group)  # `mnist-pipeline champion --json` is `champion show --json`
    _json_flag(champion_group)
    show = champion.add_parser("show", help="print the current champion (run, model, metrics)")
    history = champion.add_parser("history", help="every model that was made champion, oldest first")
    promote = champion.add_parser("promote", help="make a run's model the champion (recorded as manual)")
    promote.add_argument("run_id", help="the run whose model becomes the champion (see `mnist-pipeline runs list`)")
    rollback = champion.add_parser("rollback", help="make the previous champion the champion again (recorded as manual)")
    for verb in (show, history, promote, rollback):
        _store_flag(verb)
    for verb in (show, history):
        _json_flag(verb)

    _, batches = _group(sub, "batches", "new labelled batches: list them, show one, release or quarantine one")
    listed = batches.add_parser("list", help="every batch ingested, newest first, with its decision")
    one = batches.add_parser("show", help="one batch's record: its figures, decision and files")
    one.add_argument("batch", help="the batch's digest, or its first 8+ characters")
    verbs = [listed, one]
    for name, verb in (
        ("release", "accept a quarantined batch: the next night trains on it"),
        ("quarantine", "set an accepted batch aside: the next night trains without it"),
    ):
        changed = batches.add_parser(name, help=f"{verb} (recorded in the batches table as the operator's)")
        changed.add_argument("batch", help="the batch's digest, or its first 8+ characters (see `mnist-pipeline batches list`)")
        verbs.append(changed)
    for verb in verbs:
        _store_flag(verb)
    for verb in (listed, one):
        _json_flag(verb)

    _, runs = _group(sub, "runs", "the nights that ran: list them")
    runs_list = runs.add_parser("list", help="every run, newest first: its model, accuracy and decision")
    runs_list.add_argument("--last", type=int, default=20, help="show this many runs (default 20; 0 for all)")
    _store_flag(runs_list)
    _json_flag(runs_list)

    _, serve = _group(sub, "serve", "the local Prefect stack of `make serve`: start, stop, status")
    for verb, text in (
        ("start", "start the server, the gpu pool, the deployments, automations and a worker (`make serve`)"),
        ("stop", "stop everything `serve start` started, by pid (`make stop`)"),
        ("status", "which processes of the stack are running"),
    ):
        serve.add_parser(verb, help=f"{text}; options: `mnist-pipeline serve {verb} --help`", add_help=False)

    _, demo = _group(sub, "demo", "demonstrations on real MNIST")
    simulate = demo.add_parser("simulate-arrivals", help="write night K's batch of the scripted week into the incoming location")
    _simulate_flags(simulate)

    for old, (_, verb) in DEPRECATED.items():  # hidden: kept for one release
        legacy = sub.add_parser(old)
        if verb in ("promote",):
            legacy.add_argument("run_id")
        elif verb in ("release", "quarantine"):
            legacy.add_argument("batch")
        if verb == "simulate-arrivals":
            _simulate_flags(legacy)
        else:
            _store_flag(legacy)
    sub._choices_actions = [a for a in sub._choices_actions if a.dest not in DEPRECATED]  # not in the help
    return parser


def _simulate_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--night", type=int, required=True, choices=range(1, 8), metavar="K", help="night of the week, 1–7")
    _store_flag(parser)
    parser.add_argument("--held-back", type=int, default=None, help="held-back images the nights run with (default 10000)")
    parser.add_argument("--images", type=int, default=None, help="images per batch (default 1500)")


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


def _store(args: argparse.Namespace):
    from flows.night.locks import open_store

    return open_store(getattr(args, "store", None))


def _print_frame(frame, as_json: bool, empty: str) -> int:
    """A list command's rows: a readable table, or JSON records for scripts (an empty list prints ``[]``)."""
    if as_json:
        print(frame.to_json(orient="records", date_format="iso"))
    elif frame.empty:
        print(empty)
    else:
        print(frame.to_string(index=False, max_colwidth=60))
    return 0


def batch_command(args: argparse.Namespace) -> int:
    """``batches release|quarantine``: an operator overrules the ingest step's decision on one batch."""
    from tasks.intake.ingest import BatchNotFound, set_status

    try:
        record = set_status(_store(args), args.batch, "accepted" if args.verb == "release" else "quarantined")
    except BatchNotFound as exc:
        print(f"mnist-pipeline batches {args.verb}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"Batch {record.digest[:12]} ({record.file}) is now {record.status}; the next night's dataset version follows.")
    return 0


def batches_list_command(args: argparse.Namespace) -> int:
    """``batches list``: each batch once, with its latest decision (an operator's overrules the ingest step's)."""
    from storage.tables import read_table

    store = _store(args)
    rows = read_table(store, "batches").sort_values("decided_at", kind="stable")
    latest = rows.drop_duplicates("digest", keep="last").sort_values("decided_at", ascending=False, kind="stable")
    shown = latest[["digest", "file", "rows", "decision", "decided_by", "decided_at", "reason"]].assign(
        digest=lambda f: f["digest"].str[:12]
    )
    return _print_frame(shown, getattr(args, "json", False), f"No batch has arrived in {store.url} yet.")


def batches_show_command(args: argparse.Namespace) -> int:
    from tasks.intake.ingest import BatchNotFound, find_batch

    store = _store(args)
    try:
        record = find_batch(store, args.batch)
    except BatchNotFound as exc:
        print(f"mnist-pipeline batches show: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if getattr(args, "json", False):
        print(record.model_dump_json())
        return 0
    print(
        f"Batch:     {record.digest}\nFile:      {record.file}\nDecision:  {record.status} ({record.decided_by})\n"
        f"Reason:    {record.reason}\nRun:       {record.run_id}"
    )
    return 0


def runs_list_command(args: argparse.Namespace) -> int:
    from storage.tables import read_table

    store = _store(args)
    runs = read_table(store, "runs").sort_values("finished_at", ascending=False, kind="stable")
    if args.last:
        runs = runs.head(args.last)
    columns = [
        "run_id",
        "finished_at",
        "model",
        "epochs",
        "model_key",
        "selection_balanced_accuracy",
        "test_accuracy",
        "promoted",
        "reused_evaluation",
    ]
    shown = runs[columns].assign(model_key=runs["model_key"].str[:12])
    return _print_frame(shown, getattr(args, "json", False), f"No run has finished in {store.url} yet.")


def simulate_command(args: argparse.Namespace) -> int:
    """``demo simulate-arrivals``: night K of the scripted week, from MNIST (fetched into the store if missing)."""
    from tasks.data import simulate
    from tasks.data.fetch import MnistUnavailable, default_sources, fetch_mnist, load_mnist
    from tasks.intake.ingest import INCOMING_ENV, incoming_store

    store = _store(args)
    try:
        mnist = load_mnist(store, fetch_mnist(store, default_sources(), log=lambda line: None))
    except MnistUnavailable as exc:
        print(f"mnist-pipeline demo simulate-arrivals: {exc}", file=sys.stderr)
        return EXIT_FAILED
    held_back = args.held_back if args.held_back is not None else simulate.HELD_BACK
    images = args.images if args.images is not None else simulate.BATCH_IMAGES
    try:
        where = simulate.write_night(
            incoming_store(store, os.environ.get(INCOMING_ENV) or None), mnist, args.night, held_back, images
        )
    except ValueError as exc:
        print(f"mnist-pipeline demo simulate-arrivals: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(
        f"Night {args.night} ({simulate.NIGHTS[args.night]}): {images} images → {where}; run the night with --held-back {held_back}"
    )
    return 0


def champion_command(args: argparse.Namespace) -> int:
    """``champion show|promote|rollback``: read and set the pointer in the store, no flow run (and no TensorFlow) needed."""
    from tasks.champion.promotion import ChampionError, find_champion, promote_run, rollback

    store = _store(args)
    try:
        if args.verb == "promote":
            row = promote_run(store, args.run_id)
        elif args.verb == "rollback":
            row = rollback(store)
        else:
            return print_champion(store, find_champion(store), as_json=getattr(args, "json", False))
    except ChampionError as exc:
        print(f"mnist-pipeline champion {args.verb}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    before = row["champion_before_model_key"] or "none"
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
        f"Selection bal. acc: {_figure(champion.selection_balanced_accuracy)} (balanced accuracy on mnist-selection)\n"
        f"Test accuracy:      {champion.test_accuracy:.4f}\n"
        f"Promoted at:        {champion.promoted_at.isoformat()}{' (forced)' if champion.forced else ''}\n"
        f"Reason:             {champion.reason}"
    )
    return 0


def _figure(value: float | None) -> str:
    return "n/a (promoted before the selection split existed)" if value is None else f"{value:.4f}"


def champion_history_command(args: argparse.Namespace) -> int:
    """``champion history``: every pointer change, oldest first (the nightly gate's promotions and the operators')."""
    from tasks.champion.pointer import promotions

    store = _store(args)
    rows = promotions(store)
    promoted = rows[rows["decision"] == "promoted"]
    columns = ["decided_at", "run_id", "challenger_model_key", "challenger_selection_balanced_accuracy", "reason", "forced"]
    shown = promoted[columns].rename(
        columns={"challenger_model_key": "model_key", "challenger_selection_balanced_accuracy": "selection_balanced_accuracy"}
    )
    return _print_frame(shown, getattr(args, "json", False), f"No model has been champion in {store.url} yet.")


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


COMMANDS = {
    ("champion", "show"): champion_command,
    ("champion", "promote"): champion_command,
    ("champion", "rollback"): champion_command,
    ("champion", "history"): champion_history_command,
    ("batches", "list"): batches_list_command,
    ("batches", "show"): batches_show_command,
    ("batches", "release"): batch_command,
    ("batches", "quarantine"): batch_command,
    ("runs", "list"): runs_list_command,
    ("demo", "simulate-arrivals"): simulate_command,
}


def main(argv: list[str] | None = None) -> int:
    _quiet_environment()
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"] and argv[1:2] and argv[1] in ("start", "stop", "status"):  # its options are flows/stack/serve.py's
        from flows.stack import topology  # flows/stack/serve.py's options, with the HA topology (make serve TOPOLOGY=ha)

        return topology.serve(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # no arguments: what there is to do
        parser.print_help()
        return 0
    if args.command in DEPRECATED:
        group, verb = DEPRECATED[args.command]
        print(
            f"mnist-pipeline {args.command} is deprecated and goes in the next release: use `mnist-pipeline {group} {verb}`",
            file=sys.stderr,
        )
        args.command, args.verb = group, verb
    if args.command != "run":
        verb = getattr(args, "verb", None) or ("show" if args.command == "champion" else None)
        if verb is None:
            parser.parse_args([args.command, "--help"])  # a group without a verb: its help (exits)
        args.verb = verb
        return COMMANDS[(args.command, verb)](args)
    return run_command(args)


def run_command(args: argparse.Namespace) -> int:
    try:
        params = parameters_from(args)
    except ValidationError as exc:
        print(describe_errors(exc), file=sys.stderr)
        return EXIT_BAD_PARAMETERS

    from flows.night.locks import open_store
    from storage import StoreError

    try:  # seconds, not the ephemeral server's start-up (or fifteen epochs), before saying the store is unusable
        open_store(params.store).check_writable()
    except StoreError as exc:
        print(f"mnist-pipeline: {exc}", file=sys.stderr)
        return EXIT_FAILED

    api = _start_temporary_api()
    from flows.night.pipeline import mnist_retrain  # imports Prefect: only once the input is valid

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
        f"Test balanced acc:  {summary.test_balanced_accuracy:.4f} ({summary.n_evaluated} test images, {params.n_per_class} per digit)\n"
        f"Dataset version:    {summary.dataset_version[:16]} (MNIST and {summary.batches_accepted} accepted batches; tonight "
        f"{tonight.count('accepted')} accepted, {tonight.count('quarantined')} quarantined)\n"
        f"Model:              {summary.network} on {summary.device} ({summary.backend}, {summary.precision}) → {summary.model_path}\n"
        f"Parquet tables:     {summary.tables_dir}\n"
        + (
            f"Plots and report:   {summary.report_dir} (open {summary.report_index})\n"
            if summary.report_dir
            else "Plots and report:   not written (see Published)\n"
        )
        + f"Steps:              {', '.join(f'{step} {state}' for step, state in summary.step_states.items())}\n"
        f"Champion:           {summary.champion_model_key or 'none'}"
        + (f" (run {summary.champion_run_id})" if summary.champion_run_id else "")
        + "\n"
        f"Decision:           {summary.decision.upper()}{' (forced)' if summary.forced else ''}\n"
        f"Reason:             {summary.decision_reason}"
        + (f"\nPublished:          NO, the decision stands: {summary.publish_problem}" if not summary.published else "")
    )
    return 0


if __name__ == "__main__":
    entry()
