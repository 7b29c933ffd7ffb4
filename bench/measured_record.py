"""Where a measurement was taken, written beside its figures in ``docs/measured/``: the docs render their measured
tables from those records at every build (``docs/hooks.py``), so a figure on a page always names the date, the
commit and the CPU of the run that produced it, and no measured table is typed by hand."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MEASURED = REPO / "docs" / "measured"


def cpu_model() -> str:
    """The CPU's model name as ``lscpu`` says it: figures are only comparable on the same kind."""
    try:
        cpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        cpu = ""
    return next((x.split(":", 1)[1].strip() for x in cpu.splitlines() if x.startswith("Model name")), platform.processor())


def commit() -> str:
    """The short commit the code ran at, with ``+changes`` when the checkout had uncommitted changes to tracked
    files (then the figures belong to no commit exactly, and the page says so)."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False)
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True, check=False
    )
    name = head.stdout.strip() or "unknown"
    return f"{name}+changes" if dirty.stdout.strip() else name


def provenance() -> dict:
    """Date (UTC), commit, CPU model, core count, the 1-minute load average and this process's nice level, taken
    when the measurement starts (a shared machine's load is part of what the figures mean)."""
    return {
        "date": datetime.now(UTC).date().isoformat(),
        "commit": commit(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_average": round(os.getloadavg()[0], 1),
        "nice": os.nice(0),
    }


def write_record(name: str, record: dict) -> Path:
    """``docs/measured/NAME``, indented so that a rerun's diff reads figure by figure."""
    out = MEASURED / name
    out.write_text(json.dumps(record, indent=1) + "\n")
    return out
