"""Prefect artifacts a run publishes under stable keys, so the UI shows each key's history across runs."""

from __future__ import annotations

import pandas as pd
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from storage import Store
from storage.tables import read_table

PER_DIGIT_KEY = "mnist-per-digit-accuracy"
CONFUSION_KEY = "mnist-confusion-matrix"
SUMMARY_KEY = "mnist-run-summary"


def per_digit_rows(per_class: pd.DataFrame) -> list[dict]:
    return [
        {
            "digit": int(r.label),
            "support": int(r.support),
            "accuracy": round(float(r.accuracy), 4),
            "ci_95": f"{r.accuracy_ci_low:.4f}–{r.accuracy_ci_high:.4f}",
            "precision": None if pd.isna(r.precision) else round(float(r.precision), 4),
            "f1": None if pd.isna(r.f1) else round(float(r.f1), 4),
        }
        for r in per_class.sort_values("label").itertuples()
    ]


def confusion_rows(confusion: pd.DataFrame) -> list[dict]:
    wide = confusion.pivot(index="true_label", columns="predicted_label", values="count").sort_index()
    return [{"true \\ predicted": int(t), **{str(int(p)): int(wide.loc[t, p]) for p in wide.columns}} for t in wide.index]


def publish(store: Store, run_id: str, summary_markdown: str) -> None:
    per_class = read_table(store, "per_class", run_id=run_id)
    confusion = read_table(store, "confusion", run_id=run_id)
    create_table_artifact(per_digit_rows(per_class), key=PER_DIGIT_KEY, description="Per-digit accuracy with 95 % Wilson interval")
    create_table_artifact(confusion_rows(confusion), key=CONFUSION_KEY, description="Confusion matrix on the balanced sample (rows: true digit)")
    create_markdown_artifact(summary_markdown, key=SUMMARY_KEY, description="Run summary")


def summary_markdown(
    run_id: str, test_accuracy: float, balanced_accuracy: float, n_evaluated: int, model: str, device: str,
    precision: str, seed: int, cache: dict[str, str], tables_dir: str, report_dir: str,
) -> str:
    steps = "\n".join(f"| {step} | {state} |" for step, state in cache.items())
    return f"""# MNIST retrain {run_id}

| | |
|---|---|
| test accuracy (10 000 images) | **{test_accuracy:.4f}** |
| balanced accuracy ({n_evaluated} images) | **{balanced_accuracy:.4f}** |
| model | `{model}` on {device} ({precision}) |
| seed | {seed} |
| Parquet tables | `{tables_dir}` |
| plots and report | `{report_dir}` |

| step | state |
|---|---|
{steps}
"""
