"""Prefect artifacts a run publishes under stable keys, so the UI shows each key's history across runs."""

from __future__ import annotations

import base64

import pandas as pd
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.night.summary import RunSummary
from storage import DamagedArtifact, Store, StoreError
from storage.tables import read_partition
from tasks.data.splits import SLICE_TEST
from tasks.publish.markdown import md_text
from tasks.publish.report import PNG_LIMIT, ReportRef, batches_markdown, decision_markdown, slices_markdown
from tasks.publish.run_record import RunRecord
from tasks.publish.tabulate import TablesRef

PER_DIGIT_KEY = "mnist-per-digit-accuracy"
CONFUSION_KEY = "mnist-confusion-matrix"
SUMMARY_KEY = "mnist-run-summary"


def per_digit_rows(per_class: pd.DataFrame) -> list[dict]:
    return [
        {
            "digit": int(r.true_label),
            "support": int(r.support),
            "recall": round(float(r.recall), 4),
            "ci_95": f"{r.recall_ci_low:.4f}–{r.recall_ci_high:.4f}",
            "precision": None if pd.isna(r.precision) else round(float(r.precision), 4),
            "f1": None if pd.isna(r.f1) else round(float(r.f1), 4),
        }
        for r in per_class.sort_values("true_label").itertuples()
    ]


def confusion_rows(confusion: pd.DataFrame) -> list[dict]:
    wide = confusion.pivot(index="true_label", columns="predicted_label", values="images").sort_index()
    return [{"true \\ predicted": int(t), **{str(int(p)): int(wide.loc[t, p]) for p in wide.columns}} for t in wide.index]


def publish(store: Store, tables: TablesRef, summary_markdown: str) -> None:
    per_class = read_partition(store, "per_class", tables.partition_keys["per_class"])
    confusion = read_partition(store, "confusion", tables.partition_keys["confusion"])
    per_class, confusion = (frame[frame["slice"] == SLICE_TEST] for frame in (per_class, confusion))
    create_table_artifact(
        per_digit_rows(per_class), key=PER_DIGIT_KEY, description="Per-digit recall (accuracy) with 95 % Wilson interval"
    )
    create_table_artifact(
        confusion_rows(confusion), key=CONFUSION_KEY, description="Confusion matrix on the balanced sample (rows: true digit)"
    )
    create_markdown_artifact(summary_markdown, key=SUMMARY_KEY, description="Run summary")


# the figures the summary shows, in order; each is embedded in the markdown, so the UI needs no file access
SUMMARY_FIGURES = (
    ("Challenger versus champion", "champion_vs_challenger.png"),
    ("Slices night by night", "slice_trend.png"),
    ("Night by night", "trend.png"),
    ("Per-digit accuracy", "per_class_accuracy.png"),
    ("Confusion matrix", "confusion.png"),
    ("Mistakes only", "confusion_mistakes.png"),
    ("Most confused pair", "most_confused.png"),
    ("Random evaluated images", "samples.png"),
    ("Training", "training_curves.png"),
)


def embedded_png(png: bytes, alt: str) -> str:
    """A markdown image whose bytes travel inside the artifact (Prefect's UI renders data: URLs)."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})"


def attempt_rows(summary: RunSummary) -> str:
    """Rows saying when the run was due and began, and whether it restarted a crashed attempt."""
    attempt = summary.attempt
    started = f"{attempt.started_at:%Y-%m-%d %H:%M:%S} UTC"
    rows = []
    if attempt.scheduled_start is not None:
        late = (attempt.started_at - attempt.scheduled_start).total_seconds()
        rows.append(
            f"| scheduled / started | {attempt.scheduled_start:%Y-%m-%d %H:%M:%S} UTC / {started}"
            + (f" (**{late / 60:.1f} min late**)" if late >= 60 else "")
            + " |"
        )
    else:
        rows.append(f"| started | {started} |")
    if attempt.restarted:
        resumed = (
            f"; training resumed from the checkpoint after epoch {summary.resumed_from_epoch}"
            if summary.resumed_from_epoch
            else ""
        )
        rows.append(
            f"| attempt | **{attempt.number}**: a retry of this run's crashed attempt "
            f"({len(attempt.crashed)} crash{'es' if len(attempt.crashed) > 1 else ''}: {md_text(attempt.crashed[-1])}){resumed} |"
        )
    elif summary.resumed_from_epoch:
        rows.append(f"| attempt | 1; training resumed from the checkpoint after epoch {summary.resumed_from_epoch} |")
    return "\n".join(rows)


def report_figure(store: Store, report: ReportRef, name: str, alt: str) -> str:
    """The report's figure ``name`` embedded, read within ``PNG_LIMIT`` and checked against the digest the report
    step recorded for it; a figure swapped or grown since is one sentence instead, and the summary goes on."""
    key = report.file_keys[name]
    try:
        sha256 = report.sha256[name]
        return embedded_png(store.verified_bytes(key, sha256, limit=PNG_LIMIT), alt)
    except KeyError:
        return md_text(f"{name}: not shown (the report recorded no digest for it).")
    except (DamagedArtifact, StoreError, OSError) as exc:  # OSError: a folder, link or pipe planted at it
        return md_text(f"{name}: not shown ({exc}).")


def summary_markdown(store: Store, summary: RunSummary, run: RunRecord, report: ReportRef) -> str:
    decided = run.gate
    steps = "\n".join(f"| {md_text(step)} | {md_text(state)} |" for step, state in summary.step_states.items())
    figures = "\n\n".join(
        f"### {title}\n{report_figure(store, report, name, title)}" for title, name in SUMMARY_FIGURES if name in report.file_keys
    )
    drift = "\n\n".join(report_figure(store, report, name, name) for name in report.file_keys if name.startswith("batch-"))
    return f"""# MNIST retrain {md_text(summary.run_id)}

## Champion decision
{decision_markdown(decided)}

## Slices
{slices_markdown(run.evaluation, decided)}

## New data tonight
{batches_markdown(run.batches, run.dataset)}

{drift}

## This run
| | |
|---|---|
| test accuracy (10 000 images) | **{summary.test_accuracy:.4f}** |
| balanced accuracy ({summary.n_evaluated} images) | **{summary.test_balanced_accuracy:.4f}** |
| model | {md_text(summary.network)} on {md_text(summary.device)} ({md_text(summary.backend)}, {md_text(summary.precision)}) |
| seed | {summary.seed} |
{attempt_rows(summary)}
| Parquet tables | {md_text(summary.tables_dir)} |
| plots and report | {md_text(summary.report_dir)} |

| step | state |
|---|---|
{steps}

## Figures
{figures}
"""
