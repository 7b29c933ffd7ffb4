"""The docs cannot go stale: the site builds with ``--strict``, its generated pages hold what the code holds, the
first page's sample output is what a run prints, and every runnable example runs against a store a real run made.
Every page reads at 1 280 px in Chromium without sideways scrolling of its column, its tables or a command's output,
and is titled as the menu names it.

Blocks are marked in the Markdown with an HTML comment on the line before them:
``<!-- docs-test: run -->`` (python: executed; bash: each line run; the working directory holds the store as
``artifacts``), ``<!-- docs-test: make-run-output -->`` (compared with the run's output, figures and keys masked),
``<!-- docs-test: skip: why -->``. A python block with no mark fails the suite: each says whether it runs.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from storage import Store
from storage.tables import SCHEMAS, read_table
from tasks.data.fetch import fetch_mnist
from tests.conftest import alarming
from tests.test_flow_e2e import check_run

REPO = Path(__file__).resolve().parent.parent
PAGES = sorted((REPO / "docs").glob("*.md")) + [REPO / "README.md"]
MARK = re.compile(r"<!-- docs-test: (run|make-run-output|skip: .+?) -->\s*$")
FENCE = re.compile(r"^```(\w*)\s*$")


@dataclass
class Block:
    page: Path
    line: int
    language: str
    mark: str | None
    text: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    lines = page.read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        opened = FENCE.match(lines[i])
        if opened is None:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        before = next((lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()), "")
        mark = MARK.search(before)
        found.append(Block(page, i + 1, opened.group(1), mark.group(1) if mark else None, "\n".join(lines[i + 1 : end])))
        i = end + 1
    return found


ALL = [b for page in PAGES for b in blocks(page)]
RUNNABLE = [b for b in ALL if b.mark == "run"]


def test_every_python_example_runs_or_says_why_not():
    unmarked = [b.where for b in ALL if b.language == "python" and b.mark is None]
    assert unmarked == [], "mark each with <!-- docs-test: run --> or <!-- docs-test: skip: why -->"
    assert len(RUNNABLE) >= 5 and sum(b.mark == "make-run-output" for b in ALL) == 1


def menu() -> dict[str, str]:
    """mkdocs.yml's nav: page file → the name the menu shows."""
    import yaml

    config = yaml.load((REPO / "mkdocs.yml").read_text(), Loader=yaml.BaseLoader)  # no tags: only the nav is read
    return {page: name for entry in config["nav"] for name, page in entry.items()}


def test_every_page_is_titled_as_its_menu_names_it():
    titles = {}
    for page in sorted((REPO / "docs").glob("*.md")):
        first = next((line for line in page.read_text().splitlines() if line.startswith("# ")), "")
        titles[page.name] = first.removeprefix("# ").strip()
    assert titles == menu(), "a page's first heading and its nav entry in mkdocs.yml say the same"


WIDTH = 1280  # a laptop's screen: the main column is about 780 px there
OVERFLOW = r"""() => {
  const content = document.querySelector('.md-content');
  const right = content.getBoundingClientRect().right + 1;
  const wide = [content, ...content.querySelectorAll('.md-typeset__scrollwrap, .md-typeset__table, table, pre > code:not(.language-text pre > code)')]
    .filter(e => e.scrollWidth > e.clientWidth + 1 || e.getBoundingClientRect().right > right);
  return wide.map(e => `${e.tagName.toLowerCase()}.${e.className} ${e.scrollWidth} px in ${e.clientWidth} px: `
    + (e.innerText || '').slice(0, 80).replace(/\s+/g, ' '));
}"""


def overflowing(site: Path, shots: Path | None = None) -> dict[str, list[str]]:
    """Every built page opened in Chromium at 1 280 px: what is wider than the main column (or scrolls sideways
    inside it: a table or a code block a reader has to scroll to read), page by page. ``shots``: where to save a
    full-page screenshot of each, to look at."""
    import shutil

    from playwright.sync_api import sync_playwright

    from tests.test_deployment import CHROMIUM_ARGS

    chromium = shutil.which("chromium")
    assert chromium, "the rendering check needs Debian's chromium: `apt-get install chromium` (make test installs it as root)"
    found = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(viewport={"width": WIDTH, "height": 900}).new_page()
            for source in menu():
                html = site / ("index.html" if source == "index.md" else f"{source.removesuffix('.md')}/index.html")
                page.goto(html.as_uri())
                found[source] = page.evaluate(OVERFLOW)
                if shots is not None:
                    page.screenshot(path=shots / f"{source.removesuffix('.md')}.png", full_page=True)
        finally:
            browser.close()
    return {source: wide for source, wide in found.items() if wide}


def test_the_site_builds_strictly_with_its_generated_pages(tmp_path):
    site = tmp_path / "site"
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert built.returncode == 0, built.stderr[-3000:]
    cli = (site / "cli" / "index.html").read_text()
    for flag in (
        "--new-seed",
        "--held-back",
        "--force-promote",
        "--last",
        "--no-auth",
        "--topology",
        "simulate-arrivals",
        "MNIST_INCOMING",
    ):
        assert flag in cli, flag
    tables = (site / "store" / "index.html").read_text()
    for table, schema in SCHEMAS.items():
        assert all(f"<code>{field.name}</code>" in tables for field in schema), table
    assert "generated:" not in tables and "generated:" not in cli  # every marker replaced
    assert "Schema version" in tables and "tables schema 3" in (site / "changelog" / "index.html").read_text()
    # and every page reads at 1 280 px without sideways scrolling: tables wrap, code blocks fit the column
    assert overflowing(site) == {}, "wrap or shorten what is listed (docs/stylesheets/extra.css wraps table cells)"


@pytest.fixture(scope="module")
def night(tmp_path_factory, mnist_store, prefect_api) -> tuple[Path, subprocess.CompletedProcess]:
    """``mnist-pipeline run`` as a user types it, into ``<cwd>/artifacts`` (a fresh store) with MNIST from a
    directory, as `make run` runs it but smaller, on the session's API (tests/test_secrets.py runs it on Prefect's
    temporary server, as `make run` does): its folder and what it printed."""
    cwd = tmp_path_factory.mktemp("docs")
    source = cwd / "idx"
    source.mkdir()
    for name, stored in fetch_mnist(mnist_store, sources=[], log=lambda _: None).files.items():
        (source / name).write_bytes(mnist_store.read_bytes(stored.key))
    env = {**os.environ, **prefect_api, "PREFECT_HOME": str(cwd / "prefect-home")}
    args = ["--epochs", "1", "--train-limit", "3000", "--n-per-class", "100", "--min-balanced-accuracy", "0.1"]
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", *args, "--store", "artifacts", "--mnist-source", "idx"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return cwd, done


def test_the_console_script_runs_a_night_from_a_directory_and_says_nothing_alarming(night):
    cwd, done = night
    assert "from directory" in done.stdout + done.stderr and f"{cwd}/artifacts/tables" in done.stdout
    store = Store(cwd / "artifacts")
    check_run(store, read_table(store, "runs")["run_id"].item(), n_per_class=100, epochs=1)
    # a healthy run says nothing a newcomer would read as a failure (TensorFlow's start-up banner included)
    assert alarming(done.stdout + done.stderr) == []


def masked(text: str) -> list[str]:
    """A run's output with what changes from run to run masked: ids, keys, figures, the store's folder, and the
    dtype policy (mixed_bfloat16 on a CPU with native bf16, float32 on one without: docs/index.md says so)."""
    text = re.sub(r"[~/]\S*/artifacts\b", "artifacts", text)  # wherever the checkout is
    text = re.sub(r"\b(mixed_bfloat16|mixed_float16|float32)\b", "<dtype policy>", text)
    text = re.sub(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", "<id>", text)
    text = re.sub(r"\b[0-9a-f]{8,64}\b", "<hex>", text)
    text = re.sub(r"\d+(\.\d+)?", "<n>", text)
    return [re.sub(r"\s+", " ", line).strip() for line in text.strip().splitlines()]


def test_the_first_pages_sample_output_is_what_a_run_prints(night):
    stdout = night[1].stdout
    (sample,) = [b for b in ALL if b.mark == "make-run-output"]
    assert masked(sample.text) == masked(stdout), f"{sample.where}: update the sample from a real `make run`"


@pytest.mark.parametrize("block", RUNNABLE, ids=[b.where for b in RUNNABLE])
def test_the_example_runs(night, block, monkeypatch):
    """A python example runs in this process (its imports are loaded already), in the folder that holds the
    store as ``artifacts``; a bash example runs in bash with the venv's commands on PATH."""
    cwd, _ = night
    if block.language == "python":
        monkeypatch.chdir(cwd)
        exec(compile(block.text, block.where, "exec"), {"__name__": "__docs__"})  # noqa: S102 (our own docs)
        return
    assert block.language == "bash", f"{block.where}: a runnable block is python or bash, not {block.language!r}"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONPATH": str(REPO)}
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", block.text], cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{block.where}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"


# Every headline figure of `runs`, recomputed from the other tables by SQL alone: what an analyst with DuckDB and no
# line of this project's code can check. Each column holds the recomputed value under the name `runs` gives it.
RECOMPUTED = """
WITH p AS (SELECT * FROM read_parquet('{tables}/predictions/*/*.parquet', hive_partitioning = true)),
recall AS (
    SELECT evaluation_key, slice, true_label, avg((predicted_label = true_label)::INT) AS recall
    FROM p WHERE sampled GROUP BY ALL
),
figures AS (
    SELECT evaluation_key,
        (SELECT avg((predicted_label = true_label)::INT) FROM p AS t
            WHERE t.evaluation_key = r.evaluation_key AND t.slice = 'mnist-test') AS test_accuracy,
        avg(recall) FILTER (WHERE slice = 'mnist-test') AS test_balanced_accuracy,
        avg(recall) FILTER (WHERE slice = 'mnist-selection') AS selection_balanced_accuracy,
        avg(recall) FILTER (WHERE slice = 'new-data') AS new_data_balanced_accuracy
    FROM recall AS r GROUP BY evaluation_key
),
counts AS (
    SELECT evaluation_key,
        (count(*) FILTER (WHERE slice = 'mnist-test' AND sampled)) // 10 AS n_per_class,
        count(*) FILTER (WHERE slice = 'new-data') AS new_data_images
    FROM p GROUP BY evaluation_key
),
per_class AS (
    SELECT evaluation_key, avg(recall) AS per_class_test_balanced_accuracy
    FROM read_parquet('{tables}/per_class/*/*.parquet', hive_partitioning = true)
    WHERE slice = 'mnist-test' GROUP BY evaluation_key
),
accepted AS (
    SELECT count(DISTINCT digest) AS batches_accepted
    FROM read_parquet('{tables}/batches/*/*.parquet', hive_partitioning = true) WHERE decision = 'accepted'
)
SELECT runs.run_id, runs.night, f.*, c.n_per_class, c.new_data_images, pc.per_class_test_balanced_accuracy,
    a.batches_accepted, decided.decision, decided.decided_by
FROM read_parquet('{tables}/runs/*/*.parquet', hive_partitioning = true) AS runs
JOIN figures AS f USING (evaluation_key) JOIN counts AS c USING (evaluation_key) JOIN per_class AS pc USING (evaluation_key)
JOIN read_parquet('{tables}/promotions/*/*.parquet', hive_partitioning = true) AS decided USING (run_id)
CROSS JOIN accepted AS a
"""


def test_every_figure_of_runs_is_recomputed_from_the_tables_by_duckdb_alone(night):
    """A real night's store: `runs`' accuracies, sample size and new-data count come back from `predictions` (and
    `per_class`, `batches`) by DuckDB's SQL, and its gate's decision joins on `run_id` once. The store never got a
    batch, and `batches` still reads (empty)."""
    import duckdb  # in the lock (dev extras): never skipped

    tables = night[0] / "artifacts" / "tables"
    (sql,) = duckdb.sql(RECOMPUTED.format(tables=tables)).df().to_dict(orient="records")
    (run,) = read_table(Store(night[0] / "artifacts"), "runs").to_dict(orient="records")
    assert sql["run_id"] == run["run_id"] and sql["decided_by"] == "gate" and sql["decision"] == "promoted"
    for figure in ("test_accuracy", "test_balanced_accuracy", "selection_balanced_accuracy"):
        assert sql[figure] == pytest.approx(run[figure], abs=1e-12), figure
    assert sql["per_class_test_balanced_accuracy"] == pytest.approx(run["test_balanced_accuracy"], abs=1e-12)
    assert pd.isna(sql["new_data_balanced_accuracy"]) and pd.isna(run["new_data_balanced_accuracy"])
    assert sql["n_per_class"] == run["n_per_class"] == 100
    assert sql["new_data_images"] == run["new_data_images"] == 0 and sql["batches_accepted"] == run["batches_accepted"] == 0
    assert str(sql["night"])[:10] == str(run["night"]) == str(run["started_at"].date())  # no schedule outside a deployment
