"""The scripted week of docs/new-data.md, run as the page tells a reader to run it: the figures behind its two week
tables.

Night K: ``mnist-pipeline demo simulate-arrivals --night K`` then ``mnist-pipeline run`` with the page's flags, into a
fresh store. Writes one JSON record (``--out``, default docs/measured/week.json, which docs/hooks.py renders into the
page at every build; tests/test_week.py checks that its decisions and reasons are worded as the code words them now)
and prints where it wrote it. Rerun it whenever the checks, the gate or their wording change.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from storage import Store  # noqa: E402
from storage.tables import read_table  # noqa: E402

RUN_FLAGS = [
    "--held-back", "10000", "--epochs", "2", "--train-limit", "3000", "--min-balanced-accuracy", "0.5", "--accept-unjudged-labels",
]  # fmt: skip
NIGHTS = range(1, 8)


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def _figure(value) -> float | None:
    """A float as the record keeps it (JSON has no NaN): rounded, or None where the check did not measure it."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return round(float(value), 4)


def _printed(stdout: str, label: str) -> str:
    """One line of what ``mnist-pipeline run`` printed last (``Steps:``, ``Decision:``, ``Reason:``)."""
    found = re.findall(rf"^{label}:\s+(.*)$", stdout, flags=re.MULTILINE)
    if not found:
        raise SystemExit(f"`mnist-pipeline run` printed no {label!r} line:\n{stdout[-2000:]}")
    return found[-1].strip()


def run_week(folder: Path) -> dict:
    cli = [sys.executable, "-m", "flows.cli"]
    env = {**os.environ, "PREFECT_HOME": str(folder / "prefect-home"), "PYTHONPATH": str(REPO)}
    store_dir = folder / "week"
    seconds = []
    for k in NIGHTS:
        print(f"night {k}", file=sys.stderr, flush=True)
        subprocess.run([*cli, "demo", "simulate-arrivals", "--night", str(k), "--store", str(store_dir)], env=env, check=True)
        started = time.monotonic()
        done = subprocess.run([*cli, "run", "--store", str(store_dir), *RUN_FLAGS], env=env, capture_output=True, text=True)
        seconds.append(time.monotonic() - started)
        if done.returncode != 0:
            raise SystemExit(f"night {k} failed:\n{done.stderr[-3000:]}")
        (folder / f"night-{k}.out").write_text(done.stdout)
    (folder / "seconds.json").write_text(json.dumps(seconds))
    return extract(folder)


def extract(folder: Path) -> dict:
    """The record, from the store and what each night printed (``--extract`` reruns only this)."""
    store_dir = folder / "week"
    seconds = json.loads((folder / "seconds.json").read_text())
    nights = []
    for k in NIGHTS:
        printed = (folder / f"night-{k}.out").read_text()
        nights.append({"night": k, "steps": _printed(printed, "Steps")})
    store = Store(store_dir)
    runs = read_table(store, "runs").sort_values("finished_at").reset_index(drop=True)
    promotions = read_table(store, "promotions").set_index("run_id")
    batches = read_table(store, "batches")
    for night, run in zip(nights, runs.itertuples(), strict=True):
        decided = promotions.loc[run.run_id]
        decided = decided.iloc[-1] if getattr(decided, "ndim", 1) == 2 else decided  # one row per night's gate
        night["train"] = dict(s.split(" ", 1) for s in night.pop("steps").split(", "))["train"]
        night["decision"] = decided["decision"]
        night["reason"] = decided["reason"]
        night["test_accuracy"] = _figure(run.test_accuracy)
        night["new_data_images"] = int(run.new_data_images)
        night["new_data_balanced_accuracy"] = _figure(run.new_data_balanced_accuracy)
        night["slices"] = [
            {
                "slice": s["slice"],
                "images": int(s["images"]),
                "challenger": _figure(s["challenger_balanced_accuracy"]),
                "champion": _figure(s["champion_balanced_accuracy"]),
                "note": s.get("note"),
            }
            for s in decided["slices"]
        ]
    flow_batches = batches[batches["decided_by"] != "operator"].sort_values("file")
    rows = [
        {
            "night": int(re.search(r"\d+", b.file).group()),
            "file": b.file,
            "images": int(b.rows),
            "decision": b.decision,
            "label_shift": _figure(b.label_shift),
            "intensity_ks": _figure(b.mean_intensity_ks),
            "confident_disagreement": _figure(b.confident_disagreement),
            "champion_confident_disagreement": _figure(b.champion_confident_disagreement),
            "leaked": int(b.leaked_test + b.leaked_selection + b.leaked_holdout),
            "reason": b.reason,
        }
        for b in flow_batches.itertuples()
    ]
    return {"batches": rows, "nights": nights, "seconds_per_night": [round(s) for s in seconds]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "measured" / "week.json")
    parser.add_argument("--keep", type=Path, help="run in this (new) folder and keep its store, instead of a temporary one")
    parser.add_argument("--extract", type=Path, help="only write the record, from a folder a --keep run left")
    args = parser.parse_args()
    if args.extract:
        week = extract(args.extract)
    elif args.keep:
        args.keep.mkdir(parents=True)
        week = run_week(args.keep)
    else:
        with tempfile.TemporaryDirectory() as folder:
            week = run_week(Path(folder))
    record = {
        "measured": dt.date.today().isoformat(),
        "cpu": _cpu(),
        "commands": [
            "mnist-pipeline demo simulate-arrivals --night K --store /tmp/week",
            "mnist-pipeline run --store /tmp/week " + " ".join(RUN_FLAGS),
        ],
        **week,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
