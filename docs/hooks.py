"""MkDocs hooks: the pages that must never be written by hand are generated here, at every build.

``<!-- generated: NAME -->`` in a page is replaced by ``GENERATED[NAME]()``: the data dictionary from
``storage/tables.py``'s schemas, the CLI reference from ``flows/cli.py``'s parser, the changelog from
``CHANGELOG.md``, and measured tables from the records real runs wrote (``docs/measured/``: the scripted week's,
the near-copy check's, the soak's, the training budgets', the CLI's latency, and ``bench/``'s ``--record`` runs:
plain Keras against ours, the step's profile, training memory, the store backends, the strong model's sittings, our step against an earlier commit's).
A page naming a generator that does not exist fails the build; ``tests/test_measured.py`` checks that each table
shows its record's provenance and figures.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MARKER = re.compile(r"<!-- generated: ([a-z-]+) -->")
HELP_WIDTH = "80"  # what a code block of the Material theme shows without scrolling


def _help(parser: argparse.ArgumentParser) -> str:
    return parser.format_help().rstrip()


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The listed verbs of a parser (hidden, deprecated names are not listed in its help, nor here)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            listed = {choice.dest for choice in action._choices_actions}
            return {name: sub for name, sub in action.choices.items() if name in listed}
    return {}


def cli_reference() -> str:
    """Every command's ``--help``, as the installed CLI prints it."""
    from flows.cli import build_parser
    from flows.stack import topology

    os.environ["COLUMNS"] = HELP_WIDTH  # argparse wraps to the terminal: the same width on every machine
    root = build_parser()
    out = ["## mnist-pipeline", "", "```text", _help(root), "```", ""]
    for name, command in _subcommands(root).items():
        if name == "serve":  # its verbs' options are flows/stack/serve.py's own parser, with both topologies
            text = io.StringIO()
            with contextlib.redirect_stdout(text), contextlib.suppress(SystemExit):
                topology.serve(["--help"])
            out += [f"## mnist-pipeline {name}", "", "```text", _help(command), "", text.getvalue().rstrip(), "```", ""]
            continue
        out += [f"## mnist-pipeline {name}", "", "```text", _help(command), "```", ""]
        for verb, sub in _subcommands(command).items():
            out += [f"### mnist-pipeline {name} {verb}", "", "```text", _help(sub), "```", ""]
    return "\n".join(out)


def data_dictionary() -> str:
    from storage.dictionary import data_dictionary as generate

    return generate()


def changelog() -> str:
    text = (REPO / "CHANGELOG.md").read_text()
    return text.split("\n", 1)[1] if text.startswith("# ") else text  # the page has its own title


WEEK = REPO / "docs" / "measured" / "week.json"  # written by bench/docs_week.py from a real run of the scripted week


def _share(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f} %"


def _figure(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def _slice(night: dict, name: str) -> str:
    found = next((s for s in night["slices"] if s["slice"] == name), None)
    if found is None and name == "new-data" and night["new_data_images"]:  # evaluated, too few images to decide
        return f"{night['new_data_images']}: {_figure(night['new_data_balanced_accuracy'])} (reports only)"
    if found is None:
        return ""
    shown = f"{_figure(found['challenger'])} / {_figure(found['champion'])}"
    return f"{found['images']}: {shown}" if name != "mnist-selection" else shown


def week_tables() -> str:
    """The scripted week's two tables, from the record of a real run of it: the batches' checks, then the nights'
    decisions; each reason in full below its table, so the tables fit the column and the reasons read as sentences."""
    import json

    week = json.loads(WEEK.read_text())
    out = [
        f"Measured on {week['measured']} ({week['cpu']}; each night {min(week['seconds_per_night'])}–"
        f"{max(week['seconds_per_night'])} s) by `bench/docs_week.py`, which runs the loop above. The `batches` rows:",
        "",
        "| night | decision | label shift | intensity KS | confident disagreement (champion's own) | leaked |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for b in week["batches"]:
        disagreement = _share(b["confident_disagreement"])
        if disagreement and b["champion_confident_disagreement"] is not None:
            disagreement += f" ({_share(b['champion_confident_disagreement'])})"
        shift = "" if b["label_shift"] is None else f"{b['label_shift']:.3f}"
        ks = "" if b["intensity_ks"] is None else f"{b['intensity_ks']:.3f}"
        out.append(f"| {b['night']} | {b['decision']} | {shift} | {ks} | {disagreement} | {b['leaked']} of {b['images']} |")
    out += ["", "Their reasons, as the `reason` column has them:", ""]
    out += [f"- **Night {b['night']}** ({b['file']}, {b['decision']}): {b['reason']}" for b in week["batches"]]
    out += [
        "",
        "Then what each night decided (balanced accuracy, challenger / champion; the new-data holdout decides from 500 images):",
        "",
        "| night | train step | decision | mnist-selection | new-data (images) | test accuracy (reports only) |",
        "|---:|---|---|---|---|---:|",
    ]
    for n in week["nights"]:
        out.append(
            f"| {n['night']} | {n['train']} | {n['decision']} | {_slice(n, 'mnist-selection')} | "
            f"{_slice(n, 'new-data')} | {_figure(n['test_accuracy'])} |"
        )
    out += ["", "Their reasons, as the `promotions` table has them:", ""]
    out += [f"- **Night {n['night']}** ({n['decision']}): {n['reason']}" for n in week["nights"]]
    return "\n".join(out)


def near_copies() -> str:
    """The leakage check's catch rates per transform, from the record ``bench/near_copies.py`` wrote."""
    import json

    record = json.loads((REPO / "docs" / "measured" / "near-copies.json").read_text())
    rows = [f"| {name} | {share:.1%} |" for name, share in record["caught"].items()]
    flagged, clean = record["clean_flagged"], record["clean_images"]
    return "\n".join(
        [
            f"Measured {record['date']} on {record['cpu']} by `make bench-near-copies` ({record['copies']} test and "
            "selection images changed by each transform, searched as a night searches them):",
            "",
            "| copy changed by | caught |",
            "|---|---|",
            *rows,
            "",
            f"Clean MNIST training images taken for copies of a test or selection image: **{flagged} of {clean:,}**. ".replace(
                ",", " "
            )
            + f"Searching costs {record['seconds_per_1000_images']} s per 1 000 images, against "
            f"{record['seconds_per_1000_images_as_given_only']} s for the comparison as given alone, in the same run.",
        ]
    )


def cli_latency() -> str:
    """How fast each command answers on a store of a year of nights, from the record ``bench/cli_latency.py
    --record`` wrote."""
    import json

    record = json.loads((REPO / "docs" / "measured" / "cli-latency.json").read_text())
    out = [
        f"Measured {record['date']} on {record['cpu']} ({record['cpu_count']} cores; load average "
        f"{record['load_average']} when it started) on a store of {record['nights']} nights, each command "
        f"{record['repeat']} times in a fresh interpreter; CPU seconds are what the command itself spent:",
        "",
        "| command | median wall s | fastest wall s | CPU s |",
        "|---|---:|---:|---:|",
    ]
    for row in record["commands"]:
        name = row["command"] if row["command"].startswith("python") else f"`{row['command']}`"
        out.append(f"| {name} | {row['median_s']:.2f} | {row['fastest_s']:.2f} | {row['cpu_s']:.2f} |")
    return "\n".join(out)


def _soak_figure(nights: list[dict]) -> str:
    """The soak's figure drawn from its record by ``bench/soak.py``'s own ``plot``, as base64 PNG: the page shows
    the run it describes, and no generated image is committed."""
    import base64
    import importlib.util
    import tempfile

    spec = importlib.util.spec_from_file_location("soak_bench", REPO / "bench" / "soak.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "soak.png"
        bench.plot(nights, path)
        return base64.b64encode(path.read_bytes()).decode()


def soak() -> str:
    """The soak's nights and each quantity's growth per night, from the record ``bench/soak.py --record`` wrote."""
    import json

    record = json.loads((REPO / "docs" / "measured" / "soak.json").read_text())
    nights, settings = record["nights"], record["settings"]
    figure = _soak_figure(nights)
    days = nights[-1]["day"] if nights else 0
    out = [
        f"Measured {record['date']} on {record['cpu']} by `bench/soak.py` ({len(nights)} nights of "
        f"{settings['days_per_night']} days' arrivals each, {settings['images_per_day']} new images a day in "
        f"{settings['files_per_night']} files, a bad batch on {settings['bad_share']:.0%} of the nights, "
        f"{settings['epochs']}-epoch models; {days} days in all):",
        "",
        f"![The soak, night by night: wall time, peak RSS, training images available and trained on, the new-data "
        f"holdout, the store's size and the part retention prunes](data:image/png;base64,{figure})",
        "",
        "| night | wall s | train s | ingest s | peak RSS MB |",
        "|---:|---:|---:|---:|---:|",
    ]
    for n in nights:
        steps = n["steps_s"]
        out.append(
            f"| {n['night']} | {n['wall_s']:.0f} | {steps.get('train', 0):.0f} | {steps.get('ingest', 0):.0f} | "
            f"{n['peak_rss_mb']:.0f} |"
        )
    out += [
        "",
        "| night | available | trained | holdout | store MB | of it pruned by retention, MB | batches |",
        "|---:|---:|---:|---:|---:|---:|---|",
    ]
    for n in nights:
        derived = f"{n['derived_mb']:.0f}" if n.get("derived_mb") is not None else "(not recorded)"
        trained = n.get("trained_images")
        out.append(
            f"| {n['night']} | {n['available_training_images']} | {'–' if trained is None else trained} | "
            f"{n['holdout_images']} | {n['store_mb']:.0f} | {derived} | {n['accepted_tonight']}✓ {n['quarantined_tonight']}✗ |"
        )
    out += [
        "",
        "*available*: images the accepted batches and MNIST's base set make available (the budget chooses from "
        "them); *trained*: the images of the night's training epoch (the policy's choice, less Keras' validation "
        "split; – on a night that recorded none); "
        "*of it pruned by retention*: the models, evaluations, plots, reports and checkpoints folders, which the "
        "night's retention bounds (the batches and tables are the data, kept); "
        "*batches*: accepted ✓ and quarantined ✗ that night. The gate's decisions, night by night: "
        + ", ".join(n["decision"] for n in nights)
        + ". Growth per night (least-squares slope over the nights):",
    ]
    bounded = record.get("budget") or {}
    if bounded.get("reached_on_night"):
        out[-1] += (
            f" The training-set budget (`max_training_images` = {bounded['max_training_images']}) was reached on night "
            f"{bounded['reached_on_night']}; over the {bounded['nights_at_budget']} nights from then on, the last night "
            f"took {bounded['last_wall_over_first_at_budget']:g} times the wall time of the first, and peak RSS varied "
            f"by a factor of {bounded['peak_rss_max_over_min_at_budget']:g} (largest over smallest)."
        )
    elif bounded:
        out[-1] += f" The training-set budget ({bounded['max_training_images']}) was not reached in this run."
    at_budget = bounded.get("growth_per_night_at_budget") or {}
    if at_budget:
        out += ["", f"| quantity | per night, all nights | per night, from night {bounded['reached_on_night']} on |"]
        out += ["|---|---:|---:|"]
        out += [
            f"| {name} | {value:g} | {at_budget[name]:g} |" if name in at_budget else f"| {name} | {value:g} | – |"
            for name, value in record["growth_per_night"].items()
        ]
    else:
        out += ["", "| quantity | per night |", "|---|---:|"]
        out += [f"| {name} | {value:g} |" for name, value in record["growth_per_night"].items()]
    return "\n".join(out)


def _accuracy(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def training_budgets() -> str:
    """Accuracy on every slice under the training-set budget against training on everything, from the record
    ``bench/training_budgets.py --record`` wrote."""
    import json

    record = json.loads((REPO / "docs" / "measured" / "training-budgets.json").read_text())
    settings, base = record["settings"], record["base_images"]
    rss = [t["peak_rss_mb"] for t in record["trainings"]]
    out = [
        f"Measured {record['date']} on {record['cpu']} ({record['cpu_count']} cores, shared with other work) by "
        f"`bench/training_budgets.py`: the seed network trained by the project's own code, {settings['epochs']} "
        f"epoch each (a night's default is 15; cut to fit the bench in ~20 minutes), seed 0, on MNIST's base set "
        f"({base} images) plus accepted batches of {settings['batch_images']} deformed digits "
        f"(`tasks/data/deformed.py`), oldest first; the policy is `max_training_images` = {settings['budget']}. "
        f"Balanced accuracy on each slice the gate judges (*sel.*: the selection split, *new*: the new-data "
        f"slice); *size* is the data available as a multiple of the base set, *on*: trained on everything "
        f"(*all*), under the policy, or *both* where the policy keeps everything; *images* counts the images of "
        f"the epoch (the rest of the set is Keras' validation split), "
        f"*s* the training seconds. Peak RSS of the training process: {min(rss):.0f}–{max(rss):.0f} MB in every "
        f"training. The whole run took {record['total_seconds'] / 60:.0f} minutes, "
        f"{record['deform_seconds'] / 60:.0f} of them deforming digits.",
        "",
        "| size | on | images | test | sel. | new | s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for t in record["trainings"]:
        who = "both" if t["same_as_everything"] else "all" if t["policy"] == "everything" else t["policy"]
        acc = t["balanced_accuracy"]
        out.append(
            f"| {t['multiple']}× | {who} | {t['train_images']} | {_accuracy(acc['mnist-test'])} | "
            f"{_accuracy(acc['mnist-selection'])} | {_accuracy(acc['new-data'])} | {t['train_seconds']:.0f} |"
        )
    out += [
        "",
        "The policy against training on everything, at the same total size (the same run's figures; accuracy in "
        "points of balanced accuracy):",
        "",
        "| total size | test | selection | new data | training time | peak RSS |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for c in record["comparisons"]:
        change = c["accuracy_change"]
        out.append(
            f"| {c['multiple']}× | {100 * change['mnist-test']:+.2f} | {100 * change['mnist-selection']:+.2f} | "
            f"{100 * change['new-data']:+.2f} | ×{c['train_seconds_ratio']:.2f} | ×{c['peak_rss_ratio']:.2f} |"
        )
    return "\n".join(out)


MEASURED = REPO / "docs" / "measured"


def _record(name: str) -> dict:
    import json

    return json.loads((MEASURED / name).read_text())


def _thousands(value: float) -> str:
    return f"{value:,.0f}".replace(",", " ")


def _measured_by(record: dict, command: str) -> str:
    """Where a record's figures come from, as bench/measured_record.py's provenance has it: date, commit, CPU, cores
    and the load the machine was under when it started (a shared machine's load is part of what they mean)."""
    niced = f", niced to {record['nice']} on a machine shared with other work" if record.get("nice") else ""
    return (
        f"Measured {record['date']} at commit `{record['commit']}` on {record['cpu']} ({record['cpu_count']} cores, load "
        f"average {record['load_average']} when it started{niced}) by `{command}`"
    )


def bench() -> str:
    """Plain Keras against this pipeline, and the whole pipeline's times, from the record ``bench/bench.py --record``
    wrote (``docs/measured/bench.json``)."""
    record = _record("bench.json")
    base, ours, epochs = record["baseline_plain_keras"], record["ours"], record["epochs"]

    def both(runs: list[dict], field: str, shown: Callable[[float], str]) -> str:
        return " / ".join(shown(run[field]) for run in runs)

    def accuracy(runs: list[dict]) -> str:
        low, high = runs[0]["test_accuracy_ci95"]
        rest = [f"{run['test_accuracy']:.4f}" for run in runs[1:]]
        return " / ".join([f"{runs[0]['test_accuracy']:.4f} ({low:.4f}–{high:.4f})", *rest])

    pairs = " and ".join(f"{ratio:.2f}×" for ratio in record["ratio_per_pair"])
    seeds = " / ".join(f"seed {run['seed']}" for run in ours)
    return "\n".join(
        [
            f"{_measured_by(record, f'bench/bench.py --epochs {epochs} --record')}: {epochs} epochs each, batch "
            f"{record['batch_size']}, in the order {record['order']}; test accuracy on all "
            f"{_thousands(ours[0]['test_images'])} test images. This pipeline trains on fewer images than the baseline: "
            "it holds the `mnist-selection` split out of training for the gate, then both leave Keras' validation "
            "split out.",
            "",
            "| | plain Keras (baseline) | this pipeline |",
            "|---|---|---|",
            f"| training images per epoch | {both(base, 'train_images', _thousands)} | "
            f"{both(ours, 'train_images', _thousands)} |",
            f"| seconds per epoch ({seeds}) | {both(base, 'seconds_per_epoch', '{:.2f}'.format)} | "
            f"**{both(ours, 'seconds_per_epoch', '{:.2f}'.format)}** |",
            f"| training images per second | {both(base, 'images_per_second', _thousands)} | "
            f"**{both(ours, 'images_per_second', _thousands)}** |",
            f"| ratio, ours over baseline | | **{record['ratio_images_per_second_ours_over_baseline']:.2f}×** overall; "
            f"{pairs} per pair (spread {record['ratio_spread']:.2f}) |",
            f"| test accuracy, {epochs} epochs (95 % Wilson interval) | {accuracy(base)} | {accuracy(ours)} |",
            "",
            "| whole pipeline, the same run | |",
            "|---|---|",
            f"| cold flow run (`mnist-pipeline run`, {epochs} epochs, MNIST already in the store) | "
            f"{record['flow_cold_run_seconds']:.1f} s |",
            f"| warm re-run, everything cached (Prefect's ephemeral start-up, see below) | "
            f"{record['flow_warm_rerun_seconds']:.1f} s |",
            f"| evaluation + tables + plots | {record['evaluation_tables_plots_seconds']:.1f} s |",
            f"| peak resident memory of a full run | {record['peak_rss_gb_full_run']:.2f} GB |",
        ]
    )


def training_memory() -> str:
    """Peak RSS of a training against the size of its training set, from the record ``bench/training_memory.py
    --record`` wrote (``docs/measured/training-memory.json``)."""
    record = _record("training-memory.json")
    sizes, epochs = record["sizes"], record["epochs"]
    command = f"bench/training_memory.py --sizes {' '.join(str(row['training_set']) for row in sizes)} --record"
    out = [
        f"{_measured_by(record, command)}; {epochs} epoch{'s' if epochs != 1 else ''} each, every size trained in a "
        f"process of its own (*epoch images*: the training set less Keras' validation split):",
        "",
        "| training set (images) | epoch images | peak RSS | relative to the first | training seconds per 1 000 images |",
        "|---:|---:|---:|---:|---:|",
    ]
    for row in sizes:
        out.append(
            f"| {_thousands(row['training_set'])} | {_thousands(row['train_images'])} | "
            f"{_thousands(row['peak_rss_mb'])} MB | {row['peak_rss_over_first']:.2f} | "
            f"{row['train_seconds_per_1000_images']:.2f} |"
        )
    return "\n".join(out)


def stores() -> str:
    """A small run's cold and warm wall times on a local store and on an S3 bucket, from the record
    ``bench/stores.py --record`` wrote (``docs/measured/stores.json``)."""
    record = _record("stores.json")
    runs = {name: f"{run['seconds']:.1f} s" for name, run in record["runs"].items()}
    return "\n".join(
        [
            f"{_measured_by(record, 'bench/stores.py --record')}, every run `mnist-pipeline run {record['arguments']}`:",
            "",
            "| | local store | S3 bucket (moto on loopback) |",
            "|---|---|---|",
            f"| cold (MNIST from a directory, train, evaluate, plot) | {runs['local_cold']} | {runs['s3_cold']} |",
            f"| warm, same machine (every heavy step `Cached`) | {runs['local_warm']} | {runs['s3_warm_same_machine']} |",
            "| warm, a second machine (fresh `PREFECT_HOME`: its ephemeral Prefect database is created on that run) | | "
            f"{runs['s3_warm_second_machine']} |",
        ]
    )


def profile() -> str:
    """Where one epoch of our step goes, part by part, from the record ``bench/profile_step.py --record`` wrote
    (``docs/measured/profile.json``)."""
    record = _record("profile.json")
    epoch = record["epoch_seconds"]

    def share(seconds: float) -> str:
        return f"{100 * seconds / epoch:.0f} %"

    out = [
        f"{_measured_by(record, 'bench/profile_step.py --record')}: one epoch of the seed network on "
        f"{record['device']} in `{record['dtype_policy']}`, batch {record['batch_size']}, {record['steps_per_epoch']} "
        f"steps. Each part is timed alone in a compiled function, less the {record['dispatch_us']} µs any call costs, "
        f"times the steps; the whole is one epoch of `model.fit` without validation (median of epochs 2–3): "
        f"**{epoch:.2f} s**.",
        "",
        "| part | seconds per epoch | share |",
        "|---|---:|---:|",
    ]
    for part in record["parts"]:
        seconds = part["seconds_per_epoch"]
        shown = f"({share(seconds)})" if part["part"].startswith("input") else share(seconds)
        out.append(f"| {part['part']} | {seconds:.2f} | {shown} |")
    rest = record["unexplained_seconds_per_epoch"]
    out.append(f"| what the parts do not explain: Keras' loop, Python, dispatch | {rest:.2f} | {share(rest)} |")
    out += [
        "",
        "The input pipeline is prefetched: it overlaps the step, so its share is in brackets and left out of the rest. "
        "Parts timed alone miss the fusion TensorFlow does across layers, so they can add up to more than the whole "
        "(then the last row is negative).",
    ]
    return "\n".join(out)


def _per_seed(values: list[float | None]) -> str:
    """``a / b / c (mean)`` of a figure per seed; ``–`` for a seed without it, and no mean unless every seed has it."""
    shown = " / ".join("–" if v is None else f"{v:.4f}" for v in values)
    known = [v for v in values if v is not None]
    return f"{shown} ({sum(known) / len(known):.4f})" if len(known) == len(values) > 1 else shown


def _strong_sitting(sitting: dict) -> list[str]:
    rows = sitting["rows"]
    if sitting["source"] == "measured":
        epochs = sorted({row["epochs"] for row in rows})
        command = f"bench/strong.py --seeds {' '.join(str(r['seed']) for r in rows)}{' --views' if rows[0]['views'] else ''}"
        out = [f"{_measured_by(sitting, command + ' --record')} ({' and '.join(map(str, epochs))} epochs):"]
    else:
        out = [
            f"**{sitting['date']}, commit `{sitting['commit']}`, {sitting['cpu']} (transcribed).** These figures "
            f"were {sitting['provenance']}:"
        ]
    out += [
        "",
        "| recipe | seed | views saved | training min | test acc. | test bal. acc. | selection bal. acc. |",
        "|---|---:|---:|---|---:|---:|---:|",
    ]
    by_recipe: dict[str, list[dict]] = {}
    for row in rows:
        recipe = row.get("recipe") or f"strong, {row['epochs']} epochs"
        by_recipe.setdefault(recipe, []).append(row)
        minutes = f"{row['train_minutes']:.1f}" + (f" ({row['note']})" if row.get("note") else "")
        out.append(
            f"| {recipe} | {row['seed']} | {row['serving_shifts']} | {minutes} | {_accuracy(row['test_accuracy'])} | "
            f"{_accuracy(row['test_balanced_accuracy'])} | {_accuracy(row['selection_balanced_accuracy'])} |"
        )
    for recipe, group in by_recipe.items():
        if len(group) > 1:
            test = [row["test_accuracy"] for row in group]
            out.append(f"| {recipe}: mean / minimum | | | | {sum(test) / len(test):.4f} / {min(test):.4f} | | |")
    scored = [row for row in rows if row.get("views")]
    if scored:
        seeds = " / ".join(str(row["seed"]) for row in scored)
        out += [
            "",
            f"The same trained networks scored with each view set (per seed {seeds}"
            f"{'; the mean in brackets' if len(scored) > 1 else ''}):",
            "",
            "| views | selection bal. acc. | test acc. | test bal. acc. | test predictions, s |",
            "|---|---|---|---|---|",
        ]
        for name in scored[0]["views"]:
            figures = [row["views"][name] for row in scored]
            seconds = " / ".join(
                "–" if f["test_predict_seconds"] is None else f"{f['test_predict_seconds']:.1f}" for f in figures
            )
            out.append(
                f"| {name} | {_per_seed([f['selection_balanced_accuracy'] for f in figures])} | "
                f"{_per_seed([f['test_accuracy'] for f in figures])} | "
                f"{_per_seed([f['test_balanced_accuracy'] for f in figures])} | {seconds} |"
            )
    return out


def against_commit() -> str:
    """Our step at the recorded commit against the same step at an earlier one, in one run, from the record
    ``bench/against_commit.py --record`` wrote (``docs/measured/against-commit.json``)."""
    record = _record("against-commit.json")
    runs, epochs = record["runs"], record["epochs"]

    def speeds(who: str) -> str:
        return " / ".join(_thousands(run["images_per_second"]) for run in runs[who])

    pairs = " and ".join(f"{ratio:.2f}" for ratio in record["ratio_now_over_earlier_per_pair"])
    over = record["ratio_over_plain_keras"]
    command = f"bench/against_commit.py --commit {record['earlier_commit']} --epochs {epochs} --record"
    return "\n".join(
        [
            f"{_measured_by(record, command)}: {epochs} epochs each, in the order {record['order']}, each training in "
            f"a process of its own (the earlier commit `{record['earlier_commit']}`: {record['earlier_subject']}).",
            "",
            "| training | images per second (first / second) | over plain Keras |",
            "|---|---:|---:|",
            f"| plain Keras (baseline) | {speeds('baseline')} | |",
            f"| our step at `{record['earlier_commit']}` | {speeds('earlier')} | {over['earlier']:.2f}× |",
            f"| our step at `{record['commit']}` | {speeds('now')} | {over['now']:.2f}× |",
            f"| ratio, `{record['commit']}` over `{record['earlier_commit']}` | **{record['ratio_now_over_earlier']:.2f}** "
            f"({pairs} per pair) | |",
        ]
    )


def strong() -> str:
    """The strong model's sittings, oldest first, from ``docs/measured/strong.json``: what ``bench/strong.py
    --record`` appended, and the figures transcribed from the page before it had a record, saying so."""
    record = _record("strong.json")
    out: list[str] = []
    for sitting in record["sittings"]:
        out += [*_strong_sitting(sitting), ""]
    return "\n".join(out).rstrip()


GENERATED: dict[str, Callable[[], str]] = {
    "bench": bench,
    "training-memory": training_memory,
    "stores": stores,
    "profile": profile,
    "strong": strong,
    "against-commit": against_commit,
    "cli-latency": cli_latency,
    "soak": soak,
    "training-budgets": training_budgets,
    "near-copies": near_copies,
    "week-tables": week_tables,
    "cli-reference": cli_reference,
    "data-dictionary": data_dictionary,
    "changelog": changelog,
}


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ARG001 (MkDocs' hook signature)
    def generate(match: re.Match) -> str:
        name = match.group(1)
        if name not in GENERATED:
            raise ValueError(f"{page.file.src_path}: no generator named {name!r} (known: {', '.join(GENERATED)})")
        return GENERATED[name]()

    return MARKER.sub(generate, markdown)
