"""The night's summary reads the report's figures from the store within a size limit and checks each against the
digest the report step recorded (issue 39, finding 4: a 400 MB sparse file swapped in for trend.png raised the
night's peak memory from 0.4 GB to 6 GB)."""

from __future__ import annotations

import os
import tracemalloc

from flows.night.artifacts import report_figure
from storage import Store, sha256_bytes
from tasks.publish.report import PNG_LIMIT, ReportRef

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 64  # the bytes stand for a figure: only their size and digest matter here


def report_with_trend(store: Store) -> ReportRef:
    key = store.report_file("run-1", "trend.png")
    store.write_bytes(key, PNG)
    return ReportRef(
        run_id="run-1",
        directory_key=store.report_dir("run-1"),
        file_keys={"trend.png": key},
        sha256={"trend.png": sha256_bytes(PNG)},
    )


def test_a_report_figure_is_embedded_when_it_is_the_one_written(store):
    report = report_with_trend(store)
    assert report_figure(store, report, "trend.png", "Night by night").startswith("![Night by night](data:image/png;base64,")


def test_a_figure_grown_after_the_report_step_is_not_read_whole(store):
    report = report_with_trend(store)
    with open(store.path(report.file_keys["trend.png"]), "r+b") as f:
        f.truncate(400 << 20)  # sparse: 400 MB to read, nothing on disk
    tracemalloc.start()
    try:
        shown = report_figure(store, report, "trend.png", "Night by night")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "not shown" in shown and "larger than" in shown and "data:image" not in shown
    assert peak < 2 * PNG_LIMIT + (8 << 20), f"peak {peak >> 20} MB"


def test_a_figure_swapped_after_the_report_step_is_not_embedded(store):
    report = report_with_trend(store)
    os.replace(store.path(report.file_keys["trend.png"]), store.path(report.file_keys["trend.png"]) + ".x")
    with open(store.path(report.file_keys["trend.png"]), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + b"another figure")
    shown = report_figure(store, report, "trend.png", "Night by night")
    assert "not shown" in shown and "SHA\\-256" in shown and "data:image" not in shown
