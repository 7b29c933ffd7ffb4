"""A year of nights through the real flow: does a night's cost stay set by policy, or grow with history?

Each night, new digits arrive in the store's incoming location (``tasks/data/deformed.py``: elastic and affine
deformations of MNIST's base training images, as infiMNIST made them, so the intake accepts them on their merits),
and on a share of the nights one bad batch too (mislabelled, copies of test images, or inverted: what the intake
must catch). Then the night runs as the deployment runs it, in a process of its own against one temporary Prefect
API, and this records per night: wall time, each step's time (from the API's task runs), peak RSS of the night's
process (``wait4``), the training-set size the accepted batches give, the new-data holdout, the store's size (and
of it, the folders the night's retention prunes: models, evaluations, plots, reports, checkpoints), and the
intake's decisions. A year is compressed into fewer, bigger nights (``--days-per-night`` days of arrivals each)
so that it finishes within an hour on 2 cores; docs/scaling.md says how.

Writes JSON lines (``--out``) and a plot (``--plot``), and prints each quantity's growth per night (a least-squares
slope over the nights) with the last night's figure against the first night's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # the temporary server sends nothing out

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from storage import Store  # noqa: E402
from storage.retention import FOLDERS  # noqa: E402
from storage.tables import read_table  # noqa: E402
from tasks.data.batch_format import batch_bytes  # noqa: E402
from tasks.data.deformed import deformed_batch  # noqa: E402
from tasks.data.fetch import fetch_mnist, load_mnist  # noqa: E402
from tasks.data.splits import base_training_indices  # noqa: E402
from tasks.data.training_set import DEFAULT_MAX_TRAINING_IMAGES  # noqa: E402
from tasks.intake.ingest import incoming_store  # noqa: E402

BAD_KINDS = ("mislabelled", "test copies", "inverted")
NIGHT_SCRIPT = (
    "import sys\n"
    "from flows.night.params import PipelineParameters\n"
    "from flows.night.pipeline import mnist_retrain\n"
    "summary = mnist_retrain(PipelineParameters.model_validate_json(sys.argv[1]))\n"
    "print('SUMMARY ' + summary.model_dump_json())\n"
)


def arrivals(mnist, sources: np.ndarray, night: int, files: int, images: int, bad: str | None) -> dict[str, bytes]:
    """Night ``night``'s batch files: ``files`` of new deformed digits, ``images`` in all, and one bad batch."""
    rng = np.random.default_rng(1_000 + night)
    out = {}
    for k in range(files):
        x, y = deformed_batch(mnist.x_train, mnist.y_train, sources, images // files, rng)
        out[f"night-{night:03d}-{k:02d}.parquet"] = batch_bytes(x, y, source="soak producer")
    if bad is not None:
        n = max(images // files, 100)
        if bad == "test copies":
            rows = rng.choice(len(mnist.y_test), n, replace=False)
            x, y = mnist.x_test[rows], mnist.y_test[rows].astype(np.int64)
        else:
            x, y = deformed_batch(mnist.x_train, mnist.y_train, sources, n, rng)
            if bad == "mislabelled":
                rows = rng.choice(n, int(0.4 * n), replace=False)
                y[rows] = rng.permutation(y[rows])
            else:
                x = 255 - x
        out[f"night-{night:03d}-bad.parquet"] = batch_bytes(x, y, source=f"soak producer ({bad})")
    return out


def store_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


# The folders the night's retention prunes (storage/retention.py): models, evaluations, plots, reports, checkpoints.
# Their size is what the policy bounds; the rest of the store (batches, tables) is the data, kept by design.
PRUNED_FOLDERS = sorted({folder.split("/")[0] for folder in FOLDERS.values()})


def derived_bytes(root: Path) -> int:
    return sum(store_bytes(root / folder) for folder in PRUNED_FOLDERS if (root / folder).is_dir())


def step_seconds(run_id: str) -> dict[str, float]:
    """Each step's run time, as the Prefect API recorded its task run."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(run_id)])))
    return {run.task_key.rsplit("-", 1)[0]: round(run.total_run_time.total_seconds(), 2) for run in runs}


def run_night(params: dict, env: dict[str, str], timeout: float) -> tuple[dict, float, float]:
    """One night in a process of its own: its summary, wall seconds and peak RSS in MB (``wait4`` reaps the child
    itself, so its own resource usage is read, not the largest of all children so far)."""
    started = time.perf_counter()
    with tempfile.TemporaryFile(mode="w+") as output:
        child = subprocess.Popen(
            [sys.executable, "-c", NIGHT_SCRIPT, json.dumps(params)], cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT
        )
        timer = threading.Timer(timeout, child.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(child.pid, 0)
        finally:
            timer.cancel()
        child.returncode = os.waitstatus_to_exitcode(status)
        output.seek(0)
        text = output.read()
    wall = time.perf_counter() - started
    summary = next((line[len("SUMMARY ") :] for line in text.splitlines() if line.startswith("SUMMARY ")), None)
    if summary is None:
        raise RuntimeError(f"the night failed (exit {child.returncode}):\n{text[-3000:]}")
    return json.loads(summary), wall, usage.ru_maxrss / 1024


def soak(
    nights: int,
    days_per_night: int,
    images_per_day: int,
    files_per_night: int,
    bad_share: float,
    params: dict,
    out: Path,
    timeout: float = 1800,
    log=print,
    prepare=None,
    api_url: str | None = None,
) -> list[dict]:
    """Run ``nights`` nights on a temporary store; return (and append to ``out``) one record per night. ``prepare``:
    called with the new store first (a test puts its verified MNIST there, so nothing is fetched again);
    ``api_url``: a Prefect API that is already up (a test's), instead of a temporary one started here."""
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    out.parent.mkdir(parents=True, exist_ok=True)
    records = []
    api = temporary_settings({PREFECT_API_URL: api_url}) if api_url else prefect_test_harness(server_startup_timeout=120)
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp, api:
        root = Path(tmp) / "store"
        store = Store(root)
        if prepare is not None:
            prepare(store)
        mnist = load_mnist(store, fetch_mnist(store, log=lambda line: None))
        sources = base_training_indices(mnist.y_train)
        incoming = incoming_store(store)
        env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(REPO)}
        rng = np.random.default_rng(7)
        for night in range(1, nights + 1):
            bad = str(rng.choice(BAD_KINDS)) if rng.random() < bad_share else None
            made = time.perf_counter()
            for name, data in arrivals(mnist, sources, night, files_per_night, days_per_night * images_per_day, bad).items():
                incoming.write_bytes(name, data)
            produce_s = time.perf_counter() - made
            summary, wall, rss = run_night({**params, "store": store.url}, env, timeout)
            batches = read_table(store, "batches")
            latest = batches.sort_values("decided_at").drop_duplicates("digest", keep="last")
            accepted = latest[latest["decision"] == "accepted"]
            tonight = batches[batches["run_id"] == summary["run_id"]]
            trained = trained_images(store, summary["run_id"])
            record = {
                "night": night,
                "day": night * days_per_night,
                "wall_s": round(wall, 1),
                "produce_s": round(produce_s, 1),
                "steps_s": step_seconds(summary["run_id"]),
                "peak_rss_mb": round(rss, 1),
                "available_training_images": int(len(sources) + accepted["train_rows"].fillna(0).sum()),
                "trained_images": trained,  # what the training-set policy let the night's model train on
                "holdout_images": summary["new_data_images"],
                "store_mb": round(store_bytes(root) / 1e6, 2),
                "derived_mb": round(derived_bytes(root) / 1e6, 2),  # what retention prunes: bounded by its policy
                "accepted_tonight": int((tonight["decision"] == "accepted").sum()),
                "quarantined_tonight": int((tonight["decision"] == "quarantined").sum()),
                "bad_batch": bad,
                "quarantine_reasons": sorted(
                    {str(r).split(":")[0][:60] for r in tonight.loc[tonight["decision"] == "quarantined", "reason"]}
                ),
                "decision": summary["decision"],
                "selection_balanced_accuracy": summary["selection_balanced_accuracy"],
            }
            records.append(record)
            with out.open("a") as f:
                f.write(json.dumps(record) + "\n")
            log(json.dumps(record))
    return records


def trained_images(store: Store, run_id: str) -> int | None:
    """The images the night's model trained on (its record's ``train_images``), None if the night made none."""
    from tasks.training.model import ModelRef

    runs = read_table(store, "runs", run_id=run_id)
    if runs.empty:
        return None
    info = store.model_info_file(str(runs["model_key"].iloc[0]))
    return ModelRef.model_validate_json(store.read_bytes(info)).train_images if store.exists(info) else None


def slopes(records: list[dict]) -> dict[str, tuple[float, float, float]]:
    """Per quantity: (growth per night, first night's value, last night's value)."""
    nights = np.array([r["night"] for r in records], dtype=float)
    series = {
        k: [r.get(k) for r in records]
        for k in (
            "wall_s",
            "peak_rss_mb",
            "available_training_images",
            "trained_images",
            "holdout_images",
            "store_mb",
            "derived_mb",
        )
    }
    steps = sorted({s for r in records for s in r["steps_s"]})
    series |= {f"step {s} (s)": [r["steps_s"].get(s, np.nan) for r in records] for s in steps}
    out = {}
    for name, values in series.items():
        y = np.array([np.nan if v is None else v for v in values], dtype=float)
        ok = ~np.isnan(y)
        if ok.sum() >= 2:
            out[name] = (float(np.polyfit(nights[ok], y[ok], 1)[0]), float(y[ok][0]), float(y[ok][-1]))
    return out


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    day = [r["day"] for r in records]
    panels = (
        ("wall_s", "night's wall time (s)"),
        ("peak_rss_mb", "peak RSS of the night (MB)"),
        ("available_training_images", "training images available\n(base + accepted)"),
        ("trained_images", "images the night's\nmodel trained on"),
        ("holdout_images", "new-data holdout images"),
        ("store_mb", "store size (MB)"),
        ("derived_mb", "models, evaluations, plots,\nreports, checkpoints (MB)"),
    )
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.2 * len(panels)), sharex=True)
    for ax, (key, label) in zip(axes, panels):
        ax.plot(day, [np.nan if r.get(key) is None else r[key] for r in records], marker="o", markersize=3)
        ax.set_ylabel(label, fontsize=8)
        ax.set_ylim(bottom=0)  # growth is read against the whole figure, not against a zoomed-in axis
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("day of arrivals")
    fig.suptitle(f"{len(records)} nights of arrivals (bench/soak.py)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def budget_figures(records: list[dict], budget: int) -> dict:
    """The nights from the first whose available images reach the training-set budget: the last night's wall time
    against that night's, and the spread of peak RSS over them (what "a night's cost is bounded" means here)."""
    at = [r for r in records if r["available_training_images"] >= budget]
    if not at:
        return {"max_training_images": budget, "reached_on_night": None}
    walls, rss = [r["wall_s"] for r in at], [r["peak_rss_mb"] for r in at]
    return {
        "max_training_images": budget,
        "reached_on_night": at[0]["night"],
        "nights_at_budget": len(at),
        "last_wall_over_first_at_budget": round(walls[-1] / walls[0], 2),
        "peak_rss_max_over_min_at_budget": round(max(rss) / min(rss), 2),
        # what still grows once the budget holds: the slopes over those nights only (the ramp before it grows by design)
        "growth_per_night_at_budget": {k: round(v[0], 4) for k, v in slopes(at).items()} if len(at) >= 2 else {},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nights", type=int, default=36, help="nights run (default 36: 365 days at 10 days a night)")
    parser.add_argument("--days-per-night", type=int, default=10, help="days of arrivals each night takes in")
    parser.add_argument("--images-per-day", type=int, default=1500, help="new images a day (the scripted week's batch)")
    parser.add_argument("--files-per-night", type=int, default=10)
    parser.add_argument("--bad-share", type=float, default=0.25, help="share of nights that also get one bad batch")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--params", default="{}", help="more flow parameters, as JSON (a training-set policy, say)")
    parser.add_argument("--out", type=Path, default=REPO / "bench-results" / "soak.jsonl")
    parser.add_argument("--plot", type=Path, default=REPO / "bench-results" / "soak.png")
    parser.add_argument("--record", type=Path, help="also write the run as one JSON record (docs/measured/soak.json renders)")
    args = parser.parse_args()
    params = {"epochs": args.epochs, "n_per_class": 100, **json.loads(args.params)}
    records = soak(args.nights, args.days_per_night, args.images_per_day, args.files_per_night, args.bad_share, params, args.out)
    plot(records, args.plot)
    growth = slopes(records)
    bounded = budget_figures(records, params.get("max_training_images", DEFAULT_MAX_TRAINING_IMAGES))
    print(f"\nthe training-set budget: {json.dumps(bounded)}")
    if args.record:
        import datetime as dt

        from measured_record import cpu_model  # bench/, beside this script

        model = cpu_model()
        settings = {k: v for k, v in vars(args).items() if k not in ("out", "plot", "record")}
        record = {"date": dt.date.today().isoformat(), "cpu": model, "settings": settings, "nights": records}
        record["growth_per_night"] = {k: round(v[0], 4) for k, v in growth.items()}
        record["budget"] = bounded
        args.record.parent.mkdir(parents=True, exist_ok=True)
        args.record.write_text(json.dumps(record, indent=1) + "\n")
    print(f"\n{'quantity':<32} {'per night':>12} {'first':>12} {'last':>12}")
    for name, (slope, first, last) in growth.items():
        print(f"{name:<32} {slope:>12.3f} {first:>12.2f} {last:>12.2f}")
    print(f"\nplot: {args.plot}\nrecords: {args.out}")


if __name__ == "__main__":
    main()
