"""The run's own report folder ``reports/<run_id>/``: the evaluation's cached figures, the two figures
only this run can draw (the night-by-night trend and challenger versus champion), and an ``index.md``
that shows them beside the headline numbers and the champion decision."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from pydantic import BaseModel, Field

from storage import SIDECAR_LIMIT, Digest, RunId, Store, StoreError, StoreKey, StoreName, sha256_bytes
from storage.tables import NUM_CLASSES, read_partition, read_table
from tasks.champion.gate import mcnemar_text
from tasks.champion.promotion import MANUAL, GateRef
from tasks.data.fetch import DatasetRef
from tasks.data.splits import SELECTION_PER_DIGIT, SLICE_SELECTION, SLICE_TEST
from tasks.evaluation.evaluate import EvaluationRef
from tasks.evaluation.metrics import wilson_interval
from tasks.evaluation.plots import DIGITS, FIGURES, PlotsRef, plot_text, png_bytes
from tasks.intake.ingest import BatchRecord
from tasks.intake.rules import MAX_FILES_PER_NIGHT
from tasks.publish.markdown import md_text
from tasks.publish.run_record import RunRecord
from tasks.publish.tabulate import TablesRef

PROMOTED = "#1e8449"
REJECTED = "#c0392b"
CHAMPION = "#b7950b"


PNG_LIMIT = 16 << 20  # a figure is a few hundred KB
MANIFEST = "report.json"


# the evaluation's figures, the report's own, index.md, and one drift figure for each batch a night may take
MAX_REPORT_FILES = len(FIGURES) + 10 + MAX_FILES_PER_NIGHT


class ReportRef(BaseModel):
    run_id: RunId
    directory_key: StoreKey
    # file name → key: in this run's folder, or in an earlier report's with the same bytes
    file_keys: dict[StoreName, StoreKey] = Field(max_length=MAX_REPORT_FILES)
    # file name → SHA-256 of its bytes: what a later reader checks them against
    sha256: dict[StoreName, Digest] = Field(default={}, max_length=MAX_REPORT_FILES)


class ReportFile(BaseModel):
    key: StoreKey
    sha256: Digest


class ReportManifest(BaseModel):
    """``reports/<run_id>/report.json``: each figure of the report and where its bytes are. A figure identical to
    the last report's is not written again: the manifest (and ``index.md``'s link) names the earlier file, so an
    unchanged night adds its ``index.md``, this manifest and the figures that gained the night, not a copy of the
    rest. ``mnist-pipeline store prune`` keeps every report a kept report's manifest points into."""

    run_id: StoreName
    files: dict[StoreName, ReportFile] = Field(max_length=MAX_REPORT_FILES)

    def folders(self) -> set[str]:
        """The report folders (run ids) this report's files are in, its own included."""
        return {f.key.split("/")[1] for f in self.files.values() if f.key.startswith("reports/") and f.key.count("/") == 2}


def read_manifest(store: Store, run_id: str) -> ReportManifest | None:
    """Run ``run_id``'s report manifest, if it has one we wrote (reports made before it, or a damaged one: None)."""
    try:
        key = store.report_file(run_id, MANIFEST)
        if store.kind(key) != "file":
            return None
        return ReportManifest.model_validate_json(store.read_bytes(key, limit=SIDECAR_LIMIT))
    except (ValueError, OSError, StoreError):
        return None


def _last_manifest(store: Store, run_id: str) -> ReportManifest | None:
    """The manifest of the latest other run's report: what this report's figures are compared with."""
    runs = read_table(store, "runs")
    earlier = runs[runs["run_id"] != run_id].sort_values("finished_at", kind="stable")["run_id"].astype(str).tolist()
    return read_manifest(store, earlier[-1]) if earlier else None


def _place(store: Store, run_id: str, name: str, data: bytes, last: ReportManifest | None) -> ReportFile:
    """Where figure ``name`` of this report is: the last report's file if it holds these very bytes, else a new file."""
    digest = sha256_bytes(data)
    previous = last.files.get(name) if last is not None else None
    if previous is not None and previous.sha256 == digest and store.matches(previous.key, digest, size=len(data)):
        return previous
    key = store.report_file(run_id, name)
    store.write_bytes(key, data)
    return ReportFile(key=key, sha256=digest)


def _link(run_id: str, key: str) -> str:
    """How ``index.md`` of ``run_id`` links to ``key``: by name in its own folder, else ``../<run>/<name>``."""
    own = f"reports/{run_id}/"
    return key[len(own) :] if key.startswith(own) else "../" + key.split("/", 1)[1]


def nightly_trend(runs: pd.DataFrame, current_run: str | None = None) -> Figure:
    """Balanced accuracy on ``mnist-selection``, the slice the gate always decides on, of every night with its 95 %
    interval, promoted and rejected nights apart, and the champion in use after each night as a step line at its
    own figure on the same images (the selection split never changes, so the two compare). The balanced test sample
    is drawn beside it, faint: it reports, no rule reads it, so a night can be rejected although it looks better
    there. A night rejected above the champion's line lost on a rule the line does not show (a digit's recall, the
    new-data holdout): its reason says which."""
    runs = runs.sort_values("finished_at").reset_index(drop=True)
    x = np.arange(len(runs))
    if "selection_balanced_accuracy" in runs:
        acc = runs["selection_balanced_accuracy"].to_numpy(dtype=float)
    else:  # a store from before the selection split: nothing decided on it
        acc = np.full(len(runs), np.nan)
    evaluated = np.full(len(runs), SELECTION_PER_DIGIT * NUM_CLASSES)
    low, high = wilson_interval(np.round(np.nan_to_num(acc) * evaluated), evaluated)
    low, high = np.where(np.isnan(acc), np.nan, low), np.where(np.isnan(acc), np.nan, high)
    fig = Figure(figsize=(9, 4.2))
    ax = fig.subplots()
    reported = runs["test_balanced_accuracy"].to_numpy(dtype=float)
    ax.plot(x, reported, color="#aaa", lw=1, ls="--", marker=".", label=f"{SLICE_TEST} balanced sample (reports only)")
    ax.fill_between(x, low, high, color="#5d6d7e", alpha=0.18, lw=0, label="95 % interval")
    ax.plot(x, acc, color="#5d6d7e", lw=1, alpha=0.7)
    promoted = runs["promoted"].astype("boolean")
    unchanged = ((~promoted).fillna(False) & (runs["model_key"] == runs["champion_after_model_key"]).fillna(False)).to_numpy(bool)
    for mask, style in (
        (promoted.fillna(False).to_numpy(dtype=bool), dict(marker="o", color=PROMOTED, label="promoted")),
        ((~promoted).fillna(False).to_numpy(dtype=bool) & ~unchanged, dict(marker="X", color=REJECTED, label="rejected")),
        (unchanged, dict(marker="o", color=CHAMPION, label="unchanged (already the champion)")),
        (promoted.isna().to_numpy(dtype=bool), dict(marker=".", color="#999", label="before the gate")),
    ):
        if mask.any():
            ax.scatter(x[mask], acc[mask], s=60, zorder=3, **style)
    # the champion after each night, at the balanced accuracy it had on the night it was promoted
    models = runs["model_key"].where(runs["model_key"].notna(), None).tolist()
    level: dict[str, float] = {}
    for key, was_promoted, a in zip(models, promoted.fillna(False), acc):
        if was_promoted and key is not None:
            level.setdefault(key, a)
    champions = runs["champion_after_model_key"].where(runs["champion_after_model_key"].notna(), None).tolist()
    champion_level = np.array([level.get(k, np.nan) if k is not None else np.nan for k in champions])
    if np.isfinite(champion_level).any():
        ax.step(x, champion_level, where="post", color=CHAMPION, lw=2, label="champion in use")
        is_champion = np.array([k is not None and k == m for k, m in zip(champions, models)], dtype=bool)
        ax.scatter(
            x[is_champion],
            acc[is_champion],
            s=220,
            facecolors="none",
            edgecolors=CHAMPION,
            lw=2,
            zorder=4,
            label="the champion after that night",
        )
    if current_run is not None and (runs["run_id"] == current_run).any():
        ax.axvline(int(np.flatnonzero(runs["run_id"] == current_run)[0]), color="#888", ls=":", lw=1)
    step = max(1, len(runs) // 12)
    ax.set_xticks(x[::step])
    labels = [
        f"{t:%m-%d %H:%M}\n{plot_text(r[:8])}" for t, r in zip(runs["finished_at"].iloc[::step], runs["run_id"].iloc[::step])
    ]
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_xlim(-0.5, len(runs) - 0.5)
    ax.set_ylabel(f"balanced accuracy on {SLICE_SELECTION}")
    ax.set_title(f"Night by night on {SLICE_SELECTION}, where the gate decides ({len(runs)} runs; dotted: this run)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return fig


SLICE_COLUMNS = (
    ("selection_balanced_accuracy", "mnist-selection (decides)", "#1e8449"),
    ("new_data_balanced_accuracy", "new-data (decides)", "#2e86c1"),
    ("test_balanced_accuracy", "mnist-test balanced sample (reports)", "#999"),
)


def slice_trend(runs: pd.DataFrame, current_run: str | None = None) -> Figure:
    """Balanced accuracy per slice, night by night: the slices the gate decides on, and the test set beside them."""
    runs = runs.sort_values("finished_at").reset_index(drop=True)
    x = np.arange(len(runs))
    fig = Figure(figsize=(9, 3.6))
    ax = fig.subplots()
    for column, label, colour in SLICE_COLUMNS:
        if column in runs and runs[column].notna().any():
            values = runs[column].to_numpy(dtype=float)
            ax.plot(x, values, marker="o", ms=4, color=colour, label=label)
    if current_run is not None and (runs["run_id"] == current_run).any():
        ax.axvline(int(np.flatnonzero(runs["run_id"] == current_run)[0]), color="#888", ls=":", lw=1)
    ticks = x[:: max(1, len(runs) // 12)]
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(t + 1) for t in ticks])
    ax.set_xlabel("night (run) in this store")
    ax.set_ylabel("balanced accuracy")
    ax.set_title("Balanced accuracy per slice, night by night")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return fig


def slices_markdown(evaluation: EvaluationRef, gate: GateRef) -> str:
    """The slices side by side: images, balanced accuracy, the champion's on the same images, the verdict."""
    verdicts = {v.slice: v for v in gate.slices}
    lines = ["| slice | role | images | balanced accuracy | champion's | McNemar p | rules |", "|---|---|---|---|---|---|---|"]
    for part in evaluation.slices:
        v = verdicts.get(part.name)
        cmp = v.comparison if v else None
        if v is None:
            role, rules = "reports (too few images to decide yet)", "not applied"
        else:
            role, rules = "decides", ("passed" if not v.failed else "**failed**: " + md_text("; ".join(v.failed)))
            rules += f" ({md_text(v.note)})" if v.note else ""
        champion = f"{cmp.champion_balanced_accuracy:.4f}" if cmp else "none"
        p = f"{cmp.mcnemar_p:.3g}" if cmp else ""
        lines.append(
            f"| {md_text(part.name)} | {role} | {part.images} | **{part.balanced_accuracy:.4f}** | {champion} | {p} | {rules} |"
        )
    lines.append(
        f"| mnist-test | reports only | {evaluation.n_evaluated} of {evaluation.test_images} | "
        f"**{evaluation.balanced_accuracy:.4f}** (test accuracy {evaluation.test_accuracy:.4f}) | | | read by no rule |"
    )
    return "\n".join(lines)


def batches_markdown(batches: list[BatchRecord], dataset: DatasetRef) -> str:
    """Tonight's batches with their decisions, and the dataset version they lead to."""
    head = f"Dataset version `{dataset.version[:16]}`: MNIST and {len(dataset.batches)} accepted batches."
    if not batches:
        return head + " No new batch arrived tonight."
    lines = [head, "", "| batch | file | images | decision | reason |", "|---|---|---|---|---|"]
    for b in batches:
        decision = f"**{b.status.upper()}**" if b.status == "quarantined" else b.status
        # a file name, a reason quoting it, a source: whatever the sender chose, shown as text, never as markup
        source = f" (source {md_text(b.row.source)})" if b.row.source else ""
        lines.append(f"| `{b.digest[:12]}` | {md_text(b.file[:60])}{source} | {b.row.rows} | {decision} | {md_text(b.reason)} |")
    return "\n".join(lines)


def champion_vs_challenger(gate: GateRef) -> Figure:
    """Per-digit recall of both models on the mnist-selection slice, side by side."""
    fig = Figure(figsize=(9, 4.2))
    ax = fig.subplots()
    new = np.asarray(gate.challenger_recall, dtype=float)
    x = np.arange(len(DIGITS))
    if gate.comparison is not None and gate.champion_before is not None:
        old = np.asarray(gate.comparison.champion_recall, dtype=float)
        ax.bar(x - 0.2, old, width=0.4, color=CHAMPION, label=f"champion (run {plot_text(gate.champion_before.run_id[:8])})")
        ax.bar(x + 0.2, new, width=0.4, color="#2e86c1", label="challenger (this run)")
        worst = gate.comparison.worst_digit
        drop = gate.comparison.worst_digit_drop
        if worst is None:
            subtitle = "per-digit rule not applied (too few images per digit)"
        elif drop > 0:
            subtitle = f"largest drop: digit {worst}, {drop:.4f}"
        else:
            subtitle = f"better on every digit (least gain: digit {worst}, {-drop:.4f})"
        low = np.nanmin(np.concatenate([old, new]))
    else:
        ax.bar(x, new, width=0.6, color="#2e86c1", label="challenger (this run); no champion to compare with")
        low = np.nanmin(new)
        worst, subtitle = None, "no champion to compare with"
    ax.set_ylim(max(0.0, low - 0.03), 1.005)
    ax.set_xticks(x)
    ax.set_xlabel("digit")
    ax.set_ylabel("recall on mnist-selection")
    colour = PROMOTED if gate.promoted else REJECTED
    ax.set_title(
        f"Challenger versus champion: {gate.decision}" + (" (forced)" if gate.forced else "") + f"\n{subtitle}", color=colour
    )
    if worst is not None:
        tick = ax.get_xticklabels()[worst]
        tick.set_color(REJECTED if drop > 0 else "#333")
        tick.set_fontweight("bold")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)
    return fig


def trend_frame(store: Store) -> pd.DataFrame:
    """Every night of the store with the model it trained; a night from before ``runs`` had ``model_key`` takes it
    from its gate's row in ``promotions``."""
    runs = read_table(store, "runs")
    if runs["model_key"].notna().all():
        return runs
    decisions = read_table(store, "promotions")
    by_night = decisions[~decisions["reason"].astype(str).str.startswith(MANUAL)]  # `manual` or `manual: <why>`
    nightly = by_night.drop_duplicates("run_id").set_index("run_id")["challenger_model_key"]
    return runs.assign(model_key=runs["model_key"].fillna(runs["run_id"].map(nightly)))


def decision_markdown(gate: GateRef) -> str:
    cmp, before, after = gate.comparison, gate.champion_before, gate.champion_after
    lines = [f"**{md_text(gate.decision.upper())}**{' (forced)' if gate.forced else ''}: {md_text(gate.reason)}", ""]
    if gate.pointer_problem:
        lines += [f"> {md_text(gate.pointer_problem)}", ""]
    if cmp is not None and before is not None:
        lines += [
            "| | challenger (this run) | champion |",
            "|---|---|---|",
            f"| model | {md_text(gate.challenger_model_key)} | {md_text(before.model_key)} (run {md_text(before.run_id[:8])}) |",
            f"| balanced accuracy on mnist-selection ({cmp.n_sample} images) | "
            f"{_with_ci(cmp.challenger_balanced_accuracy, cmp.n_sample)} | {_with_ci(cmp.champion_balanced_accuracy, cmp.n_sample)} |",
            f"| accuracy on mnist-selection | {_with_ci(cmp.challenger_test_accuracy, cmp.n_test)} | "
            f"{_with_ci(cmp.champion_test_accuracy, cmp.n_test)} |",
            (
                f"| worst digit | {cmp.worst_digit}: {cmp.challenger_recall[cmp.worst_digit]:.4f} | "
                f"{cmp.champion_recall[cmp.worst_digit]:.4f} (drop {cmp.worst_digit_drop:+.4f}) |"
                if cmp.worst_digit is not None
                else "| worst digit | per-digit rule not applied | |"
            ),
            "",
            f"Paired test on the {cmp.n_test} mnist-selection images: {mcnemar_text(cmp)} "
            "(b: only the champion right, c: only the challenger right).",
            "",
        ]
    else:
        lines += ["No champion to compare with.", ""]
    lines.append(
        f"Champion after this run: {md_text(after.model_key)} (run {md_text(after.run_id)})"
        if after
        else "No champion after this run."
    )
    return "\n".join(lines)


def _with_ci(p: float, n: int) -> str:
    low, high = wilson_interval(np.array([round(p * n)]), np.array([n]))
    return f"**{p:.4f}** ({float(low[0]):.4f}–{float(high[0]):.4f})"


def weakest_digit(per_class: pd.DataFrame) -> str:
    """The digit with the lowest recall, in words; the per-digit rows may be missing (a damaged partition is skipped
    on read, with a warning), and the report is still written."""
    if per_class.empty:
        return "unknown: the per-digit rows could not be read (see the run's warnings)"
    worst = per_class.loc[per_class["recall"].idxmin()]
    return f"{int(worst['true_label'])}: {worst['recall']:.4f} ({worst['recall_ci_low']:.4f}–{worst['recall_ci_high']:.4f})"


def publish_report(store: Store, run: RunRecord, plots: PlotsRef, tables: TablesRef) -> ReportRef:
    """Copy the evaluation's figures, draw this run's own, and write ``index.md``; figures come from
    this run's tables and the store's whole history, so the report is the run's record."""
    run_id, dataset, model, evaluation, gate = run.run_id, run.dataset, run.model, run.evaluation, run.gate
    last = _last_manifest(store, run_id)
    figures: dict[str, bytes] = {}
    for name, path in plots.file_keys.items():  # the bytes checked are the bytes copied
        figures[name] = store.verified_bytes(path, plots.sha256[name], limit=PNG_LIMIT)
    for name, fig in (
        ("trend.png", nightly_trend(trend_frame(store), run_id)),
        ("champion_vs_challenger.png", champion_vs_challenger(gate)),
        ("slice_trend.png", slice_trend(trend_frame(store), run_id)),
    ):
        figures[name] = png_bytes(fig)
    for batch in run.batches:  # each batch's drift figure, checked as it is copied
        if batch.drift_plot is not None:
            name = f"batch-{batch.digest[:12]}-drift.png"
            figures[name] = store.verified_bytes(batch.drift_plot.key, batch.drift_plot.sha256, limit=PNG_LIMIT)
    placed = {name: _place(store, run_id, name, data, last) for name, data in figures.items()}
    files = {name: f.key for name, f in placed.items()}
    link = {name: _link(run_id, f.key) for name, f in placed.items()}
    per_class = read_partition(store, "per_class", tables.partition_keys["per_class"])
    per_class = per_class[per_class["slice"] == SLICE_TEST]
    drift_figures = "\n".join(f"![{n}]({link[n]})" for n in files if n.startswith("batch-"))
    pair = plots.most_confused
    pair_text = f"true {pair[0]} predicted as {pair[1]}" if pair else "none"
    weakest = weakest_digit(per_class)
    index = f"""# MNIST run {md_text(run_id)}

## Champion decision
{decision_markdown(gate)}

![challenger versus champion]({link.get("champion_vs_challenger.png", "champion_vs_challenger.png")})

## Slices
{slices_markdown(evaluation, gate)}

![slices night by night]({link.get("slice_trend.png", "slice_trend.png")})

## New data tonight
{batches_markdown(run.batches, dataset)}

{drift_figures}

## Night by night
![trend]({link.get("trend.png", "trend.png")})

## This run
| | |
|---|---|
| test accuracy (all {evaluation.test_images} test images) | **{evaluation.test_accuracy:.4f}** |
| balanced accuracy ({evaluation.n_per_class} per digit, {evaluation.n_evaluated} images) | **{evaluation.balanced_accuracy:.4f}** |
| weakest digit | {weakest} |
| most confused pair | {pair_text} |
| model | {md_text(model.network)}, {model.epochs} epochs on {md_text(model.device)} ({md_text(model.precision)}), {model.train_seconds:.0f} s |
| model sha256 | `{model.sha256}` |
| MNIST sha256 | `{dataset.sha256}` |
| dataset version | `{dataset.version}` ({len(dataset.batches)} accepted batches) |
| tables | {md_text(store.location("tables"))} |

## Confusion matrix
![confusion]({link.get("confusion.png", "confusion.png")})

## Mistakes only
![mistakes]({link.get("confusion_mistakes.png", "confusion_mistakes.png")})

## Per-digit accuracy
![per-digit accuracy]({link.get("per_class_accuracy.png", "per_class_accuracy.png")})

## Random evaluated images
![samples]({link.get("samples.png", "samples.png")})

## Most confused pair
![most confused]({link.get("most_confused.png", "most_confused.png")})

## Training
![training curves]({link.get("training_curves.png", "training_curves.png")})
"""
    manifest = ReportManifest(run_id=run_id, files=placed)
    store.write_text(
        store.report_file(run_id, MANIFEST), manifest.model_dump_json(indent=2)
    )  # before index.md: see storage/retention.py
    files["index.md"] = store.report_index(run_id)
    store.write_text(files["index.md"], index)
    digests = {name: f.sha256 for name, f in placed.items()} | {"index.md": sha256_bytes(index.encode())}
    return ReportRef(run_id=run_id, directory_key=store.report_dir(run_id), file_keys=files, sha256=digests)
