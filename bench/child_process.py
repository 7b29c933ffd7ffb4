"""One measured child process for the benchmarks that train in a process of their own: its peak RSS is then the
training's alone (``wait4`` reaps the child and reports its ``ru_maxrss``), not the parent's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def measured_child(script: str, arguments: list[str]) -> dict:
    """``python script arguments…``: the JSON object it prints last, with its wall seconds and peak RSS in MB."""
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, script, *arguments], stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    out = process.stdout.read() if process.stdout else b""
    _, status, usage = os.wait4(process.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"the training child failed (exit {code})")
    return {
        **json.loads(out.decode().strip().splitlines()[-1]),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),  # Linux: kilobytes
    }
