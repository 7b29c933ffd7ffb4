"""Untrusted strings in the markdown the night publishes (the summary artifact, the report's index.md) render as
the text they hold: rendered by a CommonMark renderer with raw HTML on (as the Prefect UIs render a raw ``<img>``),
no element, image or link comes out of them."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from markdown_it import MarkdownIt

from tasks.data.batch_format import BatchPart
from tasks.data.fetch import DatasetRef
from tasks.intake.ingest import BatchFigures, BatchRecord
from tasks.publish.markdown import md_text
from tasks.publish.report import batches_markdown

HOSTILE = [
    '<img src="https://evil.example/x.png">',
    "<script>alert(1)</script>",
    "![x](https://evil.example/y.png)",
    "[click](javascript:alert(1))",
    "<https://evil.example/auto>",
    "a | b\n## heading\n<img src=x onerror=alert(1)>",
    "**bold** _em_ `code` ~~gone~~ &lt;img&gt;",
]


def rendered(markdown: str) -> str:
    return MarkdownIt("commonmark", {"html": True}).enable("table").enable("strikethrough").render(markdown)


@pytest.mark.parametrize("text", HOSTILE)
def test_md_text_renders_as_the_characters_it_holds(text):
    html = rendered(f"| cell |\n|---|\n| {md_text(text)} |\n\n> {md_text(text)}\n\n{md_text(text)}")
    assert "<img" not in html and "<script" not in html and "<a " not in html and "<strong" not in html
    assert "<em" not in html and "<code" not in html and "<s>" not in html and "<h2" not in html
    assert html.count("<td>") == 1  # one cell: a "|" inside it did not split the table
    # the reader sees the original characters (line breaks as spaces)
    expected = text.replace("\n", " ").replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
    assert expected in html


def test_a_batch_named_and_reasoned_with_html_lists_as_text():
    part = BatchPart(key="batches/x/incoming.npz", sha256="a" * 64, size=1, rows=1)
    batch = BatchRecord(
        digest="b" * 64,
        file='<img src="https://evil.example/f.png">.npz',
        status="quarantined",
        reason='labels disagree ("<img src=https://evil.example/r.png>")',
        run_id="run",
        decided_at=datetime.now(UTC),
        incoming=part,
        row=BatchFigures(rows=1, source="![s](https://evil.example/s.png)"),
    )
    dataset = DatasetRef.model_construct(sha256="c" * 64, batches=[])
    html = rendered(batches_markdown([batch], dataset))
    assert "<img" not in html and "evil.example" in html  # shown, not loaded
    assert html.count("<td>") == 5  # the row's five cells, none split


def test_a_run_id_planted_in_the_runs_table_is_drawn_as_text(store):
    """The same for figures: a ``runs`` row whose run id holds mathtext matplotlib cannot parse (``$^^$``) would
    make every later night's trend figure, and so its report, fail. Such a partition is not read at all now (its
    folder does not name a run id: review 10), and a run id that reached a figure would still be drawn as text."""
    from storage.tables import write_table
    from tasks.evaluation.plots import png_bytes
    from tasks.publish.report import nightly_trend, slice_trend, trend_frame
    from tests.conftest import sample_frames

    runs = sample_frames(0)["runs"]
    runs["run_id"] = "$^^$ run"
    write_table(store, "runs", "$^^$ run", runs)
    said: list[str] = []
    store.warn = said.append
    assert trend_frame(store).empty and any("does not name a run id" in line for line in said), said
    runs["run_id"] = "run-1"
    write_table(store, "runs", "run-1", runs)
    frame = trend_frame(store).assign(run_id="$^^$ run")  # drawn as text wherever a run id comes from
    assert png_bytes(nightly_trend(frame, "$^^$ run")).startswith(b"\x89PNG")
    assert png_bytes(slice_trend(frame, "$^^$ run")).startswith(b"\x89PNG")
    assert png_bytes(slice_trend(frame, "$^^$ run")).startswith(b"\x89PNG")
