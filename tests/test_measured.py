"""The docs' measured tables are rendered at every build from the records real runs wrote (``docs/measured/``), never
typed: each page carries its generator's marker and no pasted copy of the table, and each generator shows where the
figures come from (date, commit, CPU, or the runs a transcription was copied from) and every figure of its record
in the row and column it belongs to. Fast: the records are read, nothing is trained."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from docs import hooks

REPO = Path(__file__).resolve().parent.parent
MEASURED = REPO / "docs" / "measured"
PAGES = {
    "bench": "benchmarks.md",
    "profile": "benchmarks.md",
    "strong": "benchmarks.md",
    "training-memory": "scaling.md",
    "stores": "deploying.md",
    "cli-latency": "benchmarks.md",
    "against-commit": "scaling.md",
}
RECORDS = {
    "bench": "bench.json",
    "profile": "profile.json",
    "training-memory": "training-memory.json",
    "stores": "stores.json",
    "against-commit": "against-commit.json",
}


def record(name: str) -> dict:
    return json.loads((MEASURED / name).read_text())


def thousands(value: float) -> str:
    return f"{value:,.0f}".replace(",", " ")


def line(text: str, starting: str) -> str:
    """The one table row of ``text`` whose first cell starts with ``starting``."""
    found = [row for row in text.splitlines() if row.startswith(f"| {starting}")]
    assert len(found) == 1, f"one row starting {starting!r}, found {found}"
    return found[0]


def cells(row: str) -> list[str]:
    return [cell.strip() for cell in row.strip().strip("|").split("|")]


@pytest.mark.parametrize("marker", PAGES)
def test_each_measured_table_is_generated_on_its_page_not_pasted(marker):
    page = (REPO / "docs" / PAGES[marker]).read_text()
    assert f"<!-- generated: {marker} -->" in page, f"docs/{PAGES[marker]} renders the table from its record"
    rendered = hooks.GENERATED[marker]()
    headers = [row for row, below in zip(rendered.splitlines(), rendered.splitlines()[1:]) if below.startswith("|--")]
    assert headers, f"{marker} renders a table"
    pasted = [header for header in headers if header in page]
    assert pasted == [], f"docs/{PAGES[marker]} holds a hand-typed copy of the generated table: remove it"


@pytest.mark.parametrize("marker", RECORDS)
def test_each_generated_table_says_which_run_measured_it(marker):
    measured = record(RECORDS[marker])
    rendered = hooks.GENERATED[marker]()
    assert f"Measured {measured['date']} at commit `{measured['commit']}` on {measured['cpu']}" in rendered
    assert f"({measured['cpu_count']} cores, load average {measured['load_average']} when it started" in rendered
    assert "+changes" not in measured["commit"], "a record is measured at a commit: commit the code, then measure"


def test_the_bench_table_shows_every_training_and_the_whole_pipeline():
    measured = record("bench.json")
    rendered = hooks.bench()
    base, ours = measured["baseline_plain_keras"], measured["ours"]
    assert f"bench/bench.py --epochs {measured['epochs']} --record" in rendered
    assert f"{measured['epochs']} epochs each, batch {measured['batch_size']}" in rendered
    assert cells(line(rendered, "training images per epoch"))[1:] == [
        " / ".join(thousands(run["train_images"]) for run in base),
        " / ".join(thousands(run["train_images"]) for run in ours),
    ]
    assert f"all {thousands(ours[0]['test_images'])} test images" in rendered
    seconds = cells(line(rendered, "seconds per epoch"))
    assert seconds[0] == "seconds per epoch (" + " / ".join(f"seed {run['seed']}" for run in ours) + ")"
    assert seconds[1] == " / ".join(f"{run['seconds_per_epoch']:.2f}" for run in base)
    assert seconds[2] == "**" + " / ".join(f"{run['seconds_per_epoch']:.2f}" for run in ours) + "**"
    rates = cells(line(rendered, "training images per second"))
    assert rates[1:] == [
        " / ".join(thousands(run["images_per_second"]) for run in base),
        "**" + " / ".join(thousands(run["images_per_second"]) for run in ours) + "**",
    ]
    ratio = cells(line(rendered, "ratio, ours over baseline"))[2]
    assert f"**{measured['ratio_images_per_second_ours_over_baseline']:.2f}×** overall" in ratio
    assert all(f"{pair:.2f}×" in ratio for pair in measured["ratio_per_pair"])
    assert f"spread {measured['ratio_spread']:.2f}" in ratio
    accuracy = cells(line(rendered, "test accuracy"))
    for runs, cell in ((base, accuracy[1]), (ours, accuracy[2])):
        low, high = runs[0]["test_accuracy_ci95"]
        assert cell.startswith(f"{runs[0]['test_accuracy']:.4f} ({low:.4f}–{high:.4f})")
        assert all(f"{run['test_accuracy']:.4f}" in cell for run in runs)
    for row, field, unit in (
        ("cold flow run", "flow_cold_run_seconds", "{:.1f} s"),
        ("warm re-run", "flow_warm_rerun_seconds", "{:.1f} s"),
        ("evaluation + tables + plots", "evaluation_tables_plots_seconds", "{:.1f} s"),
        ("peak resident memory", "peak_rss_gb_full_run", "{:.2f} GB"),
    ):
        assert cells(line(rendered, row))[1] == unit.format(measured[field]), row
    assert f"`mnist-pipeline run`, {measured['epochs']} epochs" in line(rendered, "cold flow run")


def test_the_against_commit_table_shows_every_training_and_both_ratios():
    measured = record("against-commit.json")
    rendered = hooks.against_commit()
    runs, earlier, now = measured["runs"], measured["earlier_commit"], measured["commit"]
    assert f"--commit {earlier} --epochs {measured['epochs']} --record" in rendered
    assert f"in the order {measured['order']}" in rendered and measured["earlier_subject"] in rendered
    speeds = {who: " / ".join(thousands(run["images_per_second"]) for run in runs[who]) for who in runs}
    assert cells(line(rendered, "plain Keras"))[1] == speeds["baseline"]
    for who, commit in (("earlier", earlier), ("now", now)):
        row = cells(line(rendered, f"our step at `{commit}`"))
        assert row[1:] == [speeds[who], f"{measured['ratio_over_plain_keras'][who]:.2f}×"], who
    ratio = cells(line(rendered, "ratio,"))[1]
    assert ratio.startswith(f"**{measured['ratio_now_over_earlier']:.2f}**")
    assert all(f"{pair:.2f}" in ratio for pair in measured["ratio_now_over_earlier_per_pair"])


def test_the_profile_table_shows_every_part():
    measured = record("profile.json")
    rendered = hooks.profile()
    epoch = measured["epoch_seconds"]
    assert f"**{epoch:.2f} s**" in rendered
    assert f"{measured['steps_per_epoch']} steps" in rendered and f"{measured['dispatch_us']} µs" in rendered
    assert f"`{measured['dtype_policy']}`" in rendered and f"batch {measured['batch_size']}" in rendered
    for part in measured["parts"]:
        row = cells(line(rendered, part["part"]))
        assert row[1] == f"{part['seconds_per_epoch']:.2f}", part["part"]
        assert row[2].strip("()") == f"{100 * part['seconds_per_epoch'] / epoch:.0f} %", part["part"]
    rest = cells(line(rendered, "what the parts do not explain"))
    assert rest[1] == f"{measured['unexplained_seconds_per_epoch']:.2f}"


def test_the_memory_table_shows_every_size():
    measured = record("training-memory.json")
    rendered = hooks.training_memory()
    assert f"{measured['epochs']} epoch" in rendered
    assert f"--sizes {' '.join(str(row['training_set']) for row in measured['sizes'])} --record" in rendered
    for size in measured["sizes"]:
        assert cells(line(rendered, thousands(size["training_set"]) + " "))[1:] == [
            thousands(size["train_images"]),
            f"{thousands(size['peak_rss_mb'])} MB",
            f"{size['peak_rss_over_first']:.2f}",
            f"{size['train_seconds_per_1000_images']:.2f}",
        ]


def test_the_store_table_shows_every_run_in_its_column():
    measured = record("stores.json")
    rendered = hooks.stores()
    runs = {name: f"{run['seconds']:.1f} s" for name, run in measured["runs"].items()}
    assert f"`mnist-pipeline run {measured['arguments']}`" in rendered
    assert cells(line(rendered, "cold"))[1:] == [runs["local_cold"], runs["s3_cold"]]
    assert cells(line(rendered, "warm, same machine"))[1:] == [runs["local_warm"], runs["s3_warm_same_machine"]]
    assert cells(line(rendered, "warm, a second machine"))[1:] == ["", runs["s3_warm_second_machine"]]


def strong_rows(rendered: list[str], sitting: dict) -> None:
    """Every row and view set of ``sitting`` in the rendered tables, figure by figure."""
    text = "\n".join(rendered)
    for row in sitting["rows"]:
        recipe = row.get("recipe") or f"strong, {row['epochs']} epochs"
        shown = [cells(r) for r in text.splitlines() if r.startswith(f"| {recipe} | {row['seed']} |") and "mean" not in r]
        assert len(shown) == 1, (recipe, row["seed"])
        minutes = f"{row['train_minutes']:.1f}" + (f" ({row['note']})" if row.get("note") else "")
        figures = [row["test_accuracy"], row["test_balanced_accuracy"], row["selection_balanced_accuracy"]]
        assert shown[0][2:] == [str(row["serving_shifts"]), minutes, *("–" if f is None else f"{f:.4f}" for f in figures)]
    scored = [row for row in sitting["rows"] if row.get("views")]
    for name in scored[0]["views"] if scored else []:
        view = cells(line(text, f"{name} |"))
        for column, field in ((1, "selection_balanced_accuracy"), (2, "test_accuracy"), (3, "test_balanced_accuracy")):
            assert view[column].startswith(
                " / ".join("–" if r["views"][name][field] is None else f"{r['views'][name][field]:.4f}" for r in scored)
            ), (name, field)


def test_the_strong_sittings_are_rendered_with_their_provenance():
    """The transcribed sittings say so, with the runs' date and commit; a measured one says where it was measured."""
    measured = record("strong.json")
    assert measured["sittings"], "docs/measured/strong.json holds the strong model's sittings"
    rendered = hooks.strong()
    for sitting in measured["sittings"]:
        assert sitting["source"] in ("transcribed", "measured")
        if sitting["source"] == "transcribed":
            assert sitting["provenance"].startswith("transcribed") and "not re-measured" in sitting["provenance"]
            headline = f"**{sitting['date']}, commit `{sitting['commit']}`, {sitting['cpu']} (transcribed).**"
            assert f"{headline} These figures were {sitting['provenance']}:" in rendered
        else:
            assert f"Measured {sitting['date']} at commit `{sitting['commit']}` on {sitting['cpu']}" in rendered
            assert "+changes" not in sitting["commit"], "a sitting is measured at a commit: commit, then measure"
        strong_rows(hooks._strong_sitting(sitting), sitting)


def test_a_sitting_bench_strong_records_is_rendered_as_measured():
    """The shape ``bench/strong.py --record`` appends (its rows as it prints them) renders with the run's date,
    commit and CPU, each seed's figures and each view set's."""
    views = {
        name: {
            "selection_balanced_accuracy": 0.99 + i / 1e4,
            "test_accuracy": 0.995 + i / 1e4,
            "test_balanced_accuracy": 0.994 + i / 1e4,
            "test_predict_seconds": 3.0 + i,
        }
        for i, name in enumerate(("none", "cross-1px-2px (9)"))
    }
    rows = [
        {
            "seed": seed,
            "epochs": 40,
            "test_accuracy": 0.9966 + 2 * seed / 1e4,
            "test_balanced_accuracy": 0.9965,
            "selection_balanced_accuracy": 0.9955,
            "serving_shifts": 9,
            "train_minutes": 41.5,
            "views": views,
        }
        for seed in (0, 1)
    ]
    sitting = {
        "source": "measured",
        "date": "2026-12-08",
        "commit": "abc1234",
        "cpu": "Some CPU",
        "cpu_count": 2,
        "load_average": 1.5,
        "nice": 19,
        "rows": rows,
    }
    rendered = hooks._strong_sitting(sitting)
    assert rendered[0].startswith(
        "Measured 2026-12-08 at commit `abc1234` on Some CPU (2 cores, load average 1.5 when it started, niced to 19 "
        "on a machine shared with other work) by `bench/strong.py --seeds 0 1 --views --record` (40 epochs)"
    )
    strong_rows(rendered, sitting)
    assert "| strong, 40 epochs: mean / minimum | | | | 0.9967 / 0.9966 | | |" in rendered


def test_a_record_names_the_commit_and_cpu_it_was_measured_on():
    sys.path.insert(0, str(REPO / "bench"))
    from measured_record import provenance

    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    found = provenance()
    assert found["commit"] in (head, f"{head}+changes") and found["cpu"] and found["cpu_count"] >= 1
