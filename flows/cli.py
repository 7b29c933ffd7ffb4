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

if typing.TYPE_CHECKING:  # pydantic and the parameters are imported when `run` is parsed, not for --version or --help
    from pydantic import BaseModel
    from pydantic.fields import FieldInfo

    from flows.night.params import PipelineParameters

EXIT_FAILED = 1
EXIT_BAD_PARAMETERS = 2
EXIT_NOTHING = 3  # a read command: the store is there, but holds nothing of what was asked for yet


def _quiet_environment() -> None:
    # Telemetry cannot leave an offline machine, and TensorFlow's C++ banner is noise in a run log.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


GROUPS = {
    "gate": ("champion gate", "when this run's model replaces the champion (compared on the same images)"),
    "ingest": ("new-data checks", "when a new batch is quarantined instead of trained on"),
    "retention": ("store retention", "what the night removes from the store after publishing (docs/store.md)"),
}


def _flag_options(field: FieldInfo) -> dict:
    """argparse options for one pydantic field: its type (an enum's values as choices), default and help,
    so every flag says what the UI form says; bounds are checked by pydantic, with the field's name."""
    kinds = [t for t in (typing.get_args(field.annotation) or (field.annotation,)) if t is not type(None)]
    kind = kinds[0]
    default = field.get_default(call_default_factory=True)
    text = field.description or field.title or ""
    if kind is bool and default is True:  # on unless turned off: --name and --no-name
        return {"action": argparse.BooleanOptionalAction, "default": True, "help": text.replace("%", "%%") + " (default on)"}
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
        if name == "store":  # said as every other command says it
            options["help"] = options["help"].replace("(default empty)", f"({STORE_DEFAULT})")
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

exit status:
  0  done: a read command found what it lists or shows
  1  an error, said in one sentence on stderr: no store there, a file or a folder
     that is not a store, no such run or batch, a failed run
  2  a usage error or an invalid parameter
  3  the store is there but holds nothing of that yet (no run, no champion,
     no batch): a read command's list is empty (`[]`, or `null` for a champion)
"""
STORE_DEFAULT = "default: $MNIST_STORE, else ./artifacts in the current folder"

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
        "--store", default=argparse.SUPPRESS, help=f"the artifact store, a directory or fsspec URL ({STORE_DEFAULT})"
    )


def _count(text: str) -> int:
    """A count for ``--last``: a whole number, 0 or more (argparse names the type in its error: ``count``)."""
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


_count.__name__ = "count"


def _json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON, for scripts")


def _group(sub, name: str, help_text: str) -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    group = _command(sub, name, help_text)
    return group, group.add_subparsers(dest="verb", metavar="VERB")


def _command(sub, name: str, help_text: str, **options) -> argparse.ArgumentParser:
    """A command or verb whose help page opens with what it does (its line in the list above it) and ends with the
    environment and exit status. ``parser_class``: a parser of another kind for this one command."""
    kind, sub._parser_class = sub._parser_class, options.pop("parser_class", sub._parser_class)
    try:
        return sub.add_parser(
            name,
            help=help_text,
            description=help_text[:1].upper() + help_text[1:] + ".",
            epilog=ENVIRONMENT,
            formatter_class=_Format,
            **options,
        )
    finally:
        sub._parser_class = kind


class _Format(argparse.RawDescriptionHelpFormatter):
    """Help text as written (the environment list keeps its columns)."""


class _Parser(argparse.ArgumentParser):
    """argparse, with errors a person reads at once: the error and where help is, not the whole usage (``run`` has
    thirty options); an unknown command lists the commands there are, not the old names kept for one release."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(EXIT_BAD_PARAMETERS, f"{self.prog}: {message}\n(`{self.prog} --help` lists the options)\n")

    def _check_value(self, action: argparse.Action, value) -> None:
        if isinstance(action, argparse._SubParsersAction) and value not in action.choices:
            listed = ", ".join(choice.dest for choice in action._choices_actions)
            raise argparse.ArgumentError(
                action, f"there is no {action.metavar.lower()} {value!r}; the {action.metavar.lower()}s are: {listed}"
            )
        super()._check_value(action, value)


class _RunParser(_Parser):
    """``run``'s parser: its flags are the flow's parameters (declared once, in flows/night/params.py), added the first
    time it parses or prints help, so ``--version``, ``--help`` and the read commands never import pydantic's models."""

    _filled = False

    def _fill(self) -> None:
        if not self._filled:
            from flows.night.params import PipelineParameters

            self._filled = True
            _add_model_flags(self, PipelineParameters)

    def parse_known_args(self, args=None, namespace=None):
        self._fill()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._fill()
        return super().format_help()

    def format_usage(self) -> str:
        self._fill()
        return super().format_usage()


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mnist-pipeline",
        description="Nightly MNIST retrain pipeline (Prefect + Keras): run it once, look at and steer what the nights decided.",
        epilog=ENVIRONMENT,
        formatter_class=_Format,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _command(sub, "run", "run the flow once and print where its tables and plots are", parser_class=_RunParser)

    champion_group, champion = _group(
        sub, "champion", "the model in use: show it, list its history, promote a run's model, roll back"
    )
    _store_flag(champion_group)  # `mnist-pipeline champion --json` is `champion show --json`
    _json_flag(champion_group)
    show = _command(champion, "show", "print the current champion (run, model, figures, when and why it was promoted)")
    history = _command(champion, "history", "every model that was made champion, oldest first")
    promote = _command(champion, "promote", "make a run's model the champion (an operator's decision, recorded as forced)")
    promote.add_argument("run_id", help="the run whose model becomes the champion (`mnist-pipeline runs list` lists them)")
    rollback = _command(champion, "rollback", "make the previous champion the champion again (an operator's decision)")
    for verb in (promote, rollback):
        verb.add_argument(
            "--reason",
            default=None,
            help="why, in words: recorded in the promotions table as `manual: REASON` (default `manual`)",
        )
    for verb in (show, history, promote, rollback):
        _store_flag(verb)
    for verb in (show, history):
        _json_flag(verb)

    _, batches = _group(sub, "batches", "new labelled batches: list them, show one, release or quarantine one")
    listed = _command(batches, "list", "every batch ingested, newest first, with its latest decision")
    one = _command(batches, "show", "one batch: its latest decision, its figures, and every decision about it")
    one.add_argument("batch", help="the batch's digest, or its first 8+ characters (`mnist-pipeline batches list` lists them)")
    verbs = [listed, one]
    for name, verb in (
        ("release", "accept a quarantined batch: the next night trains on it"),
        ("quarantine", "set an accepted batch aside: the next night trains without it"),
    ):
        changed = _command(batches, name, f"{verb} (recorded in the batches table as the operator's)")
        changed.add_argument(
            "batch", help="the batch's digest, or its first 8+ characters (`mnist-pipeline batches list` lists them)"
        )
        verbs.append(changed)
    for verb in verbs:
        _store_flag(verb)
    for verb in (listed, one):
        _json_flag(verb)

    _, runs = _group(sub, "runs", "the nights that ran: list them, show one")
    runs_list = _command(runs, "list", "every run, newest first: its model, figures, the gate's decision and why")
    runs_list.add_argument("--last", type=_count, default=20, help="show this many runs (default 20; 0 for all)")
    runs_show = _command(runs, "show", "one run: its figures on each slice, the gate's decision, its batches and its report")
    runs_show.add_argument("run_id", help="the run's id (`mnist-pipeline runs list` lists them)")
    for verb in (runs_list, runs_show):
        _store_flag(verb)
        _json_flag(verb)

    _, store = _group(sub, "store", "the artifact store: prune what no night needs any more")
    prune = _command(
        store, "prune", "list what retention removes (models never champion, old reports, ...) and its bytes; --apply removes it"
    )
    prune.add_argument("--apply", action="store_true", help="remove what is listed (default: a dry run that changes nothing)")
    prune.add_argument("--keep-reports", type=_count, default=None, help="keep the reports of this many last runs (default 30)")
    _store_flag(prune)
    _json_flag(prune)

    _, serve = _group(sub, "serve", "the local Prefect stack of `make serve`: start, stop, status")
    for verb, text in (
        ("start", "start the server, the gpu pool, the deployments, automations and a worker (`make serve`)"),
        ("stop", "stop everything `serve start` started, through its supervisord (`make stop`)"),
        ("status", "which processes of the stack are running"),
    ):
        serve.add_parser(verb, help=f"{text}; options: `mnist-pipeline serve {verb} --help`", add_help=False, description=text)

    _, demo = _group(sub, "demo", "demonstrations on real MNIST")
    simulate = _command(demo, "simulate-arrivals", "write night K's batch of the scripted week into the incoming location")
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
    from flows.night.params import PipelineParameters

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


# ---- the store a command reads or changes ------------------------------------------------------------------------
def _as_json(args: argparse.Namespace) -> bool:
    return getattr(args, "json", False)


def _origin(args: argparse.Namespace) -> str:
    """Where the store's name came from, so a store picked silently by the current folder is seen."""
    from storage import DEFAULT_STORE, STORE_ENV

    if getattr(args, "store", None):
        return "--store"
    if os.environ.get(STORE_ENV):
        return f"${STORE_ENV}"
    return f"the default, ./{DEFAULT_STORE} in the current folder; --store or ${STORE_ENV} to change"


def _checked(store, args: argparse.Namespace):
    """``store``, once it is seen to be a store (``StoreError`` otherwise: a wrong name is an error, never an empty
    store); its name and where that came from on stderr, for a person (never in JSON)."""
    store.check_store()
    if not _as_json(args):
        print(f"Store: {store.url} ({_origin(args)})", file=sys.stderr)
    return store


def _reading(args: argparse.Namespace):
    """The store a read command looks at: it takes no lock, so Prefect (seconds of imports) is never loaded."""
    from storage import Store

    return _checked(Store.resolve(getattr(args, "store", None)), args)


def _writing(args: argparse.Namespace):
    """The store a command changes: locked as a flow run locks it (through the Prefect server when there is one)."""
    from flows.night.locks import open_store

    return _checked(open_store(getattr(args, "store", None)), args)


# ---- one JSON vocabulary -------------------------------------------------------------------------------------------
# Every command's JSON uses the tables' column names (storage/tables.py) for what a table holds, full keys and
# digests, timestamps as ISO 8601 UTC to the microsecond the tables store, and figures without floating-point noise.
# Beyond the columns, only where a file is: these names (tests/test_cli.py holds every command to this).
LOCATIONS = {"model_path": "the champion's model file", "report_path": "the run's report page (null if not written)"}
FIGURE_DIGITS = 12  # significant digits: 0.8034000000000001 is 0.8034; a p-value of 1e-30 stays one


def plain(value: object) -> object:
    """One value as JSON has it, whatever pandas, pyarrow or NumPy made of it."""
    import math
    from datetime import UTC, date, datetime

    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, datetime):
        if str(value) == "NaT":
            return None
        return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    if isinstance(value, date):  # runs.night: a calendar date (UTC), as ISO 8601 has it
        return value.isoformat()
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ndarray":
        return [plain(v) for v in value]
    if hasattr(value, "item"):  # a NumPy scalar
        return plain(value.item())
    if isinstance(value, float):
        return float(f"{value:.{FIGURE_DIGITS}g}") if math.isfinite(value) else None  # JSON has no NaN
    return value


def records(frame) -> list[dict]:
    """A frame's rows as JSON-able dicts (missing values as null)."""
    return [{str(k): plain(v) for k, v in row.items()} for row in frame.astype(object).to_dict(orient="records")]


def _emit(args: argparse.Namespace, data: object, human, nothing: str | None) -> int:
    """Print ``data`` as JSON, or ``human()`` for a person; exit 3 with ``nothing`` said when there is nothing."""
    empty = data is None or data == []
    if _as_json(args):
        print(json.dumps(plain(data)))
    elif empty:
        print(nothing)
    else:
        human()
    return EXIT_NOTHING if empty else 0


def _table(frame, short: tuple[str, ...] = ()) -> None:
    """A list for a person: digests in ``short`` cut to 12 characters (enough to name one; JSON has them whole)."""
    frame = frame.assign(**{c: frame[c].str[:12] for c in short})
    print(frame.to_string(index=False, max_colwidth=60))


# ---- batches ------------------------------------------------------------------------------------------------------
def batch_command(args: argparse.Namespace) -> int:
    """``batches release|quarantine``: an operator overrules the ingest step's decision on one batch."""
    from tasks.intake.ingest import BatchNotFound, set_status

    try:
        record, changed = set_status(_writing(args), args.batch, "accepted" if args.verb == "release" else "quarantined")
    except BatchNotFound as exc:
        print(f"mnist-pipeline batches {args.verb}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if not changed:
        print(f"Batch {record.digest[:12]} ({record.file}) is already {record.status}: nothing changed, nothing recorded.")
        return 0
    print(f"Batch {record.digest[:12]} ({record.file}) is now {record.status}; the next night's dataset version follows.")
    return 0


BATCH_COLUMNS = ["digest", "file", "rows", "decision", "decided_by", "decided_at", "reason", "run_id"]


def _batch_decisions(store, run_id: str | list[str | None] | None = None, columns: list[str] | None = None):
    """Every decision about every batch (or those filed by one run), oldest first (an operator's later row
    overrules the ingest step's); with ``columns``, only those are read (a list reads what it shows). A run id of
    None names the operators' decisions, which no night filed."""
    from storage.tables import read_table

    return read_table(store, "batches", run_id=run_id, columns=columns).sort_values("decided_at", kind="stable")


def batches_list_command(args: argparse.Namespace) -> int:
    """``batches list``: each batch once, with its latest decision."""
    store = _reading(args)
    rows = _batch_decisions(store, columns=BATCH_COLUMNS)
    latest = rows.drop_duplicates("digest", keep="last").sort_values("decided_at", ascending=False, kind="stable")
    shown = latest[BATCH_COLUMNS]
    return _emit(args, records(shown), lambda: _table(shown, short=("digest",)), f"No batch has arrived in {store.url} yet.")


def batches_show_command(args: argparse.Namespace) -> int:
    """``batches show``: one batch's latest row of the batches table (every column), and each decision before it."""
    store = _reading(args)
    # The digests first (two columns of every partition), then every column of the partitions holding the one named.
    rows = _batch_decisions(store, columns=["digest", "decided_at"])
    prefix = args.batch.strip().lower()
    digests = rows["digest"].drop_duplicates()
    matches = digests[digests.str.startswith(prefix)] if len(prefix) >= 8 else digests.iloc[:0]
    if len(matches) != 1:
        why = "matches several batches" if len(matches) else "matches no batch"
        held = ", ".join(d[:12] for d in digests) or "none"
        print(
            f"mnist-pipeline batches show: {args.batch!r} {why} in {store.url} (give at least 8 characters of a digest; "
            f"batches: {held}; `mnist-pipeline batches list` lists them).",
            file=sys.stderr,
        )
        return EXIT_FAILED
    holding = rows.loc[rows["digest"] == matches.iloc[0], "run_id"].astype(object)
    whole = _batch_decisions(store, run_id=[None if r is None or r != r else r for r in holding.drop_duplicates()])
    history = whole[whole["digest"] == matches.iloc[0]]
    if history.empty:  # its rows hold, beside the digest, a value no run writes: dropped (and said) as by any reader
        print(
            f"mnist-pipeline batches show: batch {matches.iloc[0][:12]} has no row that reads whole in {store.url}.",
            file=sys.stderr,
        )
        return EXIT_FAILED
    latest = records(history.tail(1))[0]
    data = {**latest, "decisions": records(history[["decision", "decided_by", "decided_at", "reason", "run_id"]])}

    def human() -> None:
        print(
            f"Batch:     {latest['digest']}\nFile:      {latest['file']} ({latest['rows']} images, source "
            f"{latest['source'] or 'not given'})\nDecision:  {latest['decision']} ({latest['decided_by']}, "
            f"{latest['decided_at']})\nReason:    {latest['reason']}\nRun:       {latest['run_id']}\n"
            f"Trained:   {latest['train_rows']} images; {latest['holdout_rows']} held out for new-data"
        )
        if len(history) > 1:
            print("\nDecisions, oldest first:")
            _table(history[["decided_at", "decision", "decided_by", "reason"]])

    return _emit(args, data, human, None)


# ---- runs -----------------------------------------------------------------------------------------------------------
RUN_COLUMNS = [
    "run_id",
    "finished_at",
    "model",
    "epochs",
    "model_key",
    "selection_balanced_accuracy",
    "test_accuracy",
    "decision",
    "forced",
    "reason",
    "promoted",
    "reused_evaluation",
]


GATE_COLUMNS = ["decided_at", "decision", "reason", "forced"]  # and "slices" for one run: a nested column, costly to decode


def _nights(store, run_id: str | None = None, last: int = 0, columns: list[str] | None = None):
    """The runs (or the one ``run_id``), newest first (the ``last`` ones, 0 for all), each with its own gate's
    decision: the first ``promotions`` row of its partition (an operator's later promote or rollback filed there is
    not the night's decision). Only the shown runs' ``promotions`` partitions are read. With ``columns``, only
    those columns of ``runs`` and the gate's decision without its slices (a list of a year of nights decodes what it
    shows, not every column); without, every column and each slice's comparison."""
    from storage.tables import read_table

    runs = read_table(store, "runs", run_id=run_id, columns=columns)
    runs = runs.sort_values("finished_at", ascending=False, kind="stable")
    if last:
        runs = runs.head(last)
    gate_columns = GATE_COLUMNS if columns is not None else [*GATE_COLUMNS, "slices"]
    rows = read_table(store, "promotions", run_id=runs["run_id"].tolist(), columns=gate_columns)
    decided = rows.sort_values("decided_at", kind="stable").drop_duplicates("run_id")
    gate = decided[["run_id", *gate_columns[1:]]]
    return runs.merge(gate, on="run_id", how="left")


def runs_list_command(args: argparse.Namespace) -> int:
    store = _reading(args)
    from storage.tables import SCHEMAS

    shown = _nights(store, last=args.last, columns=[c for c in RUN_COLUMNS if c in SCHEMAS["runs"].names])[RUN_COLUMNS]

    def human() -> None:
        forced = shown["forced"].astype(object).eq(True)
        _table(
            shown.drop(columns=["forced", "promoted"]).assign(
                decision=shown["decision"].where(~forced, shown["decision"] + ", forced")
            ),
            short=("model_key",),
        )

    return _emit(args, records(shown), human, f"No run has finished in {store.url} yet.")


def runs_show_command(args: argparse.Namespace) -> int:
    """``runs show RUN``: one night's row of ``runs``, its gate's decision with every slice's comparison, the
    batches it ingested and where its report is."""
    store = _reading(args)
    found = _nights(store, run_id=args.run_id)
    if found.empty:
        print(
            f"mnist-pipeline runs show: run {args.run_id!r} is not in the runs table of {store.url}; "
            "`mnist-pipeline runs list` lists the run ids.",
            file=sys.stderr,
        )
        return EXIT_FAILED
    run = records(found)[0]
    ingested = _batch_decisions(store, run_id=args.run_id)
    report = store.report_index(args.run_id)
    data = {
        **run,
        "batches": records(ingested),
        "report_path": store.location(report) if store.exists(report) else None,
    }

    def human() -> None:
        forced = " (forced)" if run["forced"] else ""
        print(
            f"Run:        {run['run_id']} (attempt {run['attempt']}, finished {run['finished_at']})\n"
            f"Model:      {run['model']}, {run['epochs']} epochs on {run['device']} → {run['model_key']}\n"
            f"Data:       version {(run['dataset_version'] or '')[:16]} (MNIST and {run['batches_accepted']} accepted batches)\n"
            f"Decision:   {(run['decision'] or 'none recorded').upper()}{forced}: {run['reason']}\n"
        )
        compared = {c["slice"]: c for c in run["slices"] or []}
        print("Figures (balanced accuracy: mean per-digit recall):")
        for name, images, balanced, note in (
            (
                "mnist-test",
                (run["n_per_class"] or 0) * 10,
                run["test_balanced_accuracy"],
                f"accuracy {_figure(run['test_accuracy'])} on all 10 000 test images; reports only",
            ),
            ("mnist-selection", None, run["selection_balanced_accuracy"], "decides"),
            ("new-data", run["new_data_images"], run["new_data_balanced_accuracy"], "decides from enough images"),
        ):
            gate = compared.get(name)
            if gate is not None:
                images = gate["images"]
                versus = gate.get("champion_balanced_accuracy")
                note = ("decided: " if versus is None else f"champion {_figure(versus)}; decided: ") + (
                    "passed" if gate.get("passed") else f"failed {len(gate.get('failed_rules') or [])} rule(s)"
                )
            shown = "-" if balanced is None else _figure(balanced)
            print(f"  {name:<16} {'' if images is None else images:>6} images  {shown:<7} {note}")
        print("\nBatches ingested:")
        if ingested.empty:
            print("  none")
        else:
            _table(ingested[["digest", "file", "rows", "decision", "decided_by", "reason"]], short=("digest",))
        print(f"\nReport:     {data['report_path'] or 'not written (' + store.location(report) + ')'}")

    return _emit(args, data, human, None)


def simulate_command(args: argparse.Namespace) -> int:
    """``demo simulate-arrivals``: night K of the scripted week, from MNIST (fetched into the store if missing)."""
    from flows.night.locks import open_store
    from tasks.data import simulate
    from tasks.data.fetch import MnistUnavailable, default_sources, fetch_mnist, load_mnist
    from tasks.intake.ingest import INCOMING_ENV, incoming_store

    store = open_store(getattr(args, "store", None))  # made if missing: MNIST is fetched into it
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


# ---- champion -----------------------------------------------------------------------------------------------------
def champion_command(args: argparse.Namespace) -> int:
    """``champion promote|rollback``: set the pointer in the store, no flow run (and no TensorFlow) needed."""
    from tasks.champion.promotion import ChampionError, manual_reason, promote_run, read_pointer, rollback

    store = _writing(args)
    reason = getattr(args, "reason", None)  # the old flat names take none
    try:
        if args.verb == "promote":
            row = promote_run(store, args.run_id, reason=reason)
        else:
            row = rollback(store, reason=reason)
    except ChampionError as exc:
        print(f"mnist-pipeline champion {args.verb}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if row is None:
        print(f"Run {getattr(args, 'run_id', '?')}'s model already is the champion: nothing changed, nothing recorded.")
        return 0
    before = row["champion_before_model_key"] or "none"
    # the row is an operator's (no night: run_id null); the run that trained the model is the pointer's
    trained_by = getattr(args, "run_id", None) or getattr(read_pointer(store), "run_id", "unknown")
    print(
        f"Champion is now model {row['challenger_model_key']} of run {trained_by} (was {before}); "
        f"recorded in promotions as forced, reason `{manual_reason(reason)}`."
    )
    return 0


def champion_show_command(args: argparse.Namespace) -> int:
    """``champion show``: the pointer, in the tables' words (``runs``' model columns, ``promotions``' decision)."""
    from tasks.champion.pointer import find_champion

    store = _reading(args)
    lookup = find_champion(store)
    if lookup.problem:
        print(lookup.problem, file=sys.stderr)
    champion = lookup.champion
    data = None
    if champion is not None:
        data = {
            "run_id": champion.run_id,
            "model_key": champion.model_key,
            "model_sha256": champion.sha256,
            "selection_balanced_accuracy": champion.selection_balanced_accuracy,
            "test_accuracy": champion.test_accuracy,
            "decided_at": champion.promoted_at,
            "forced": champion.forced,
            "reason": champion.reason,
            "model_path": store.location(lookup.model.file_key),
        }

    def human() -> None:
        print(
            f"Champion run:       {champion.run_id}\n"
            f"Model:              {champion.model_key} → {data['model_path']}\n"
            f"SHA-256:            {champion.sha256}\n"
            f"Selection bal. acc: {_figure(champion.selection_balanced_accuracy)} (balanced accuracy on mnist-selection)\n"
            f"Test accuracy:      {champion.test_accuracy:.4f}\n"
            f"Promoted at:        {plain(champion.promoted_at)}{' (forced)' if champion.forced else ''}\n"
            f"Reason:             {champion.reason}"
        )

    if champion is None and lookup.problem:  # a pointer, but broken, and no earlier champion intact: an error
        if _as_json(args):
            print("null")
        return EXIT_FAILED
    nothing = f"No champion in {store.url} yet: the first run whose model meets the floor becomes champion."
    return _emit(args, data, human, nothing)


def _figure(value: float | None) -> str:
    return "n/a (promoted before the selection split existed)" if value is None else f"{value:.4f}"


HISTORY_COLUMNS = [
    "decided_at",
    "run_id",
    "challenger_model_key",
    "champion_before_model_key",
    "challenger_selection_balanced_accuracy",
    "forced",
    "reason",
]


def champion_history_command(args: argparse.Namespace) -> int:
    """``champion history``: every pointer change, oldest first (the nightly gate's promotions and the operators')."""
    from tasks.champion.pointer import promotions

    store = _reading(args)
    rows = promotions(store, columns=["decision", *HISTORY_COLUMNS])
    shown = rows[rows["decision"] == "promoted"][HISTORY_COLUMNS]
    human = lambda: _table(shown, short=("challenger_model_key", "champion_before_model_key"))  # noqa: E731
    return _emit(args, records(shown), human, f"No model has been champion in {store.url} yet.")


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


def prune_command(args: argparse.Namespace) -> int:
    """``store prune``: what the store no longer needs (docs/store.md), listed or removed."""
    import json

    from storage import StoreError
    from tasks.publish.retention import KEEP_REPORTS, prune

    keep = KEEP_REPORTS if args.keep_reports is None else args.keep_reports
    try:
        result = prune(_writing(args), apply=args.apply, keep_reports=keep)
    except (StoreError, OSError) as exc:
        print(f"mnist-pipeline store prune: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if getattr(args, "json", False):
        print(json.dumps(result.as_json(), indent=2))
        return 0
    for marker in result.left_behind:
        print(
            f"Note: night {marker.run_id} started {marker.started_at:%Y-%m-%d %H:%M} UTC and never ended: its marker is ignored"
        )
    for folder in result.plan.doomed:
        print(
            f"{'removed' if result.applied else 'would remove'}  {folder.key}  ({len(folder.files)} files, {folder.bytes} bytes)"
        )
    kept = ", ".join(f"{n} {kind}" for kind, n in result.plan.kept.items())
    verb = "Removed" if result.applied else "Would remove"
    print(f"{verb} {len(result.plan.doomed)} folders, {len(result.plan.files)} files, {result.plan.bytes} bytes; kept {kept}.")
    if not result.applied and result.plan.doomed:
        print("Dry run: nothing was removed. Run again with --apply to remove it.")
    return 0


COMMANDS = {
    ("champion", "show"): champion_show_command,
    ("champion", "promote"): champion_command,
    ("champion", "rollback"): champion_command,
    ("champion", "history"): champion_history_command,
    ("batches", "list"): batches_list_command,
    ("batches", "show"): batches_show_command,
    ("batches", "release"): batch_command,
    ("batches", "quarantine"): batch_command,
    ("runs", "list"): runs_list_command,
    ("runs", "show"): runs_show_command,
    ("store", "prune"): prune_command,
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
        from storage import StoreError

        try:
            return COMMANDS[(args.command, verb)](args)
        except StoreError as exc:  # no store there, a file, a folder that is not a store, one that cannot be written
            print(f"mnist-pipeline {args.command} {verb}: {exc}", file=sys.stderr)
            return EXIT_FAILED
    return run_command(args)


def run_command(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    try:
        params = parameters_from(args)
    except ValidationError as exc:
        from flows.night.params import describe_errors

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
