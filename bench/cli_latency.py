"""How long `mnist-pipeline` takes to answer: --version, --help and the read commands, on a store of 365 nights.

The store is written directly (no training): one ``runs``, ``promotions`` and ``batches`` partition per night, as a
night writes them, and a champion whose model file and reference are intact, so ``champion show`` checks its digest
as it does on a real store. Every command runs as a user runs it, in a fresh interpreter (``python -m flows.cli``),
``--repeat`` times; the baseline in the same sitting is an interpreter that does nothing (``python -c pass``), so
the figures can be read against the machine's load. Prints one line per command: median and fastest wall seconds,
and the median CPU seconds the command spent (user + system).

    PYTHONPATH=$PWD .venv/bin/python bench/cli_latency.py [--nights 365] [--repeat 5] [--record]

``--record`` writes the figures to ``docs/measured/cli-latency.json``, from which the docs build renders the table
of docs/benchmarks.md (``docs/hooks.py``): the page's figures are this script's, never pasted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import pandas as pd  # noqa: E402

from storage import Store, sha256_bytes  # noqa: E402
from storage.tables import SCHEMAS, write_table  # noqa: E402
from tasks.champion.pointer import Champion, write_pointer  # noqa: E402
from tasks.training.model import ModelRef  # noqa: E402

FIRST_NIGHT = datetime(2026, 1, 1, 2, 0, tzinfo=UTC)


def night_rows(night: int) -> dict[str, pd.DataFrame]:
    """Night ``night``'s rows of runs, promotions and batches: every third night rejected, the rest promoted."""
    at = FIRST_NIGHT + timedelta(days=night)
    key = f"{night:032x}"
    promoted = night % 3 != 2
    runs = {
        "finished_at": at + timedelta(minutes=9),
        "night": at.date(),
        "dataset_sha256": "d" * 64,
        "dataset_version": f"{night:064x}",
        "batches_accepted": night,
        "model_key": key,
        "model_sha256": f"{night:064x}",
        "evaluation_key": key,
        "reused_evaluation": False,
        "parameters": "{}",
        "model": "seed",
        "epochs": 15,
        "backend": "tensorflow",
        "device": "CPU:0",
        "test_accuracy": 0.99 + night * 1e-6,
        "test_balanced_accuracy": 0.99,
        "n_per_class": 800,
        "selection_balanced_accuracy": 0.985 + night * 1e-6,
        "new_data_balanced_accuracy": 0.97,
        "new_data_images": 600,
        "promoted": promoted,
        "champion_after_model_key": key,
        "attempt": 1,
        "resumed_from_epoch": 0,
        "scheduled_start": at,
        "started_at": at,
        "published": True,
        "publish_problem": None,
    }
    promotion = {
        "decided_at": at + timedelta(minutes=8),
        "decision": "promoted" if promoted else "rejected",
        "reason": "passes every rule" if promoted else "mnist-selection: significantly worse than the champion",
        "forced": False,
        "decided_by": "gate",
        "challenger_model_key": key,
        "champion_before_model_key": f"{night - 1:032x}" if night else None,
        "challenger_selection_balanced_accuracy": 0.985,
        "challenger_test_accuracy": 0.99,
        "slices": [],
    }
    batch = {
        "digest": f"{night:064x}",
        "file": f"night-{night}.parquet",
        "rows": 600,
        "decision": "accepted",
        "reason": "passed every check",
        "decided_by": "ingest",
        "decided_at": at + timedelta(minutes=1),
    }
    return {
        "runs": pd.DataFrame([runs]),
        "promotions": pd.DataFrame([promotion]).reindex(columns=SCHEMAS["promotions"].names),
        "batches": pd.DataFrame([batch]).reindex(columns=SCHEMAS["batches"].names),
    }


def build_store(root: Path, nights: int) -> Store:
    store = Store(root)
    for night in range(nights):
        for table, frame in night_rows(night).items():
            write_table(store, table, f"night-{night:04d}", frame)
    last = nights - 1 if (nights - 1) % 3 != 2 else nights - 2
    key, blob = f"{last:032x}", b"weights" * 1000
    store.write_bytes(store.model_file(key), blob)
    ref = ModelRef(
        key=key,
        file_key=store.model_file(key),
        sha256=sha256_bytes(blob),
        history_key=store.history_file(key),
        network="seed",
        device="CPU:0",
        precision="float32",
        epochs=15,
        resumed_from_epoch=0,
        train_images=50_000,
        train_seconds=100.0,
        val_accuracy=0.99,
    )
    store.write_text(store.model_info_file(key), ref.model_dump_json())
    champion = Champion(
        model_key=key,
        sha256=ref.sha256,
        run_id=f"night-{last:04d}",
        selection_balanced_accuracy=0.985,
        test_accuracy=0.99,
        promoted_at=FIRST_NIGHT + timedelta(days=last, minutes=8),
        reason="passes every rule",
    )
    write_pointer(store, champion, None)
    return store


def cpu_seconds() -> float:
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


def timed(command: list[str], repeat: int, env: dict[str, str]) -> tuple[float, float, float]:
    """Median and fastest wall seconds, and median CPU seconds (user + system: what the command itself spent, which
    a machine shared with other work inflates far less than the wall time)."""
    seconds, cpu = [], []
    for _ in range(repeat):
        started, used = time.perf_counter(), cpu_seconds()
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
        seconds.append(time.perf_counter() - started)
        cpu.append(cpu_seconds() - used)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(command)} exited {done.returncode}:\n{done.stderr[-2000:]}")
    return statistics.median(seconds), min(seconds), statistics.median(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nights", type=int, default=365)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--record", action="store_true", help="write docs/measured/cli-latency.json for the docs")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryDirectory(prefix="mnist-bench-cli-") as tmp:
        started = time.perf_counter()
        store = build_store(Path(tmp) / "store", args.nights)
        print(f"store of {args.nights} nights written in {time.perf_counter() - started:.1f} s: {store.url}")
        cli = [sys.executable, "-m", "flows.cli"]
        commands = {
            "python -c pass (baseline)": [sys.executable, "-c", "pass"],
            "--version": [*cli, "--version"],
            "--help": [*cli, "--help"],
            "runs list": [*cli, "runs", "list", "--store", store.url],
            "runs list --last 0 --json": [*cli, "runs", "list", "--last", "0", "--json", "--store", store.url],
            "runs show": [*cli, "runs", "show", f"night-{args.nights - 1:04d}", "--store", store.url],
            "champion show": [*cli, "champion", "show", "--store", store.url],
            "champion history": [*cli, "champion", "history", "--store", store.url],
            "batches list": [*cli, "batches", "list", "--store", store.url],
            "batches show": [*cli, "batches", "show", f"{args.nights - 1:064x}", "--store", store.url],
        }
        load = os.getloadavg()[0]
        print(f"load average before: {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
        print(f"{'command':<28} {'median s':>9} {'fastest s':>9} {'CPU s':>7}   ({args.repeat} runs each)")
        rows = []
        for name, command in commands.items():
            median, fastest, cpu = timed(command, args.repeat, env)
            print(f"{name:<28} {median:>9.2f} {fastest:>9.2f} {cpu:>7.2f}")
            rows.append({"command": name, "median_s": round(median, 2), "fastest_s": round(fastest, 2), "cpu_s": round(cpu, 2)})
    if args.record:
        record = {
            "date": datetime.now(UTC).date().isoformat(),
            "cpu": cpu_name(),
            "cpu_count": os.cpu_count(),
            "load_average": round(load, 1),
            "nights": args.nights,
            "repeat": args.repeat,
            "commands": rows,
        }
        out = REPO / "docs" / "measured" / "cli-latency.json"
        out.write_text(json.dumps(record, indent=1) + "\n")
        print(f"recorded in {out.relative_to(REPO)}")


def cpu_name() -> str:
    """The CPU's model name, as `lscpu` says it (the figures are only comparable on the same kind)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    main()
