"""Benchmark: our training step at this checkout against the same step at an earlier commit, in the same run.

``make bench`` gives our speed per image against plain Keras; when a change touches the input pipeline (streaming
the training set from the store, 2026-12-01) the question is whether that ratio dropped, and two ``make bench``
sittings on different days cannot answer it (machines differ by ±30 % from day to day). This script checks the
earlier commit out into a temporary worktree and trains our step from each tree in its own process, in the order
plain Keras, earlier, now, now, earlier, plain Keras (linear drift of the machine favours none), on the same data and
seeds, and prints one JSON object: each training's images per second, the ratio now/earlier per pair, and each
tree's ratio against plain Keras. Progress goes to stderr.

    python bench/against_commit.py --commit 57b1b4a^1 --epochs 5 --record

``--record`` also writes the object, with the date, commit, CPU model and load it ran under, to
``docs/measured/against-commit.json``, from which docs/scaling.md's table is generated at every build.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from measured_record import provenance, write_record  # noqa: E402 (bench/, beside this script)

# Run inside each tree (cwd and PYTHONPATH set to it): its own bench.bench.ours, on a store of its own layout.
TRAIN_ONE = """
import json, sys
sys.path.insert(0, "bench")  # bench/bench.py as ``bench``, and what it imports from beside it
from storage import Store
from tasks.data.fetch import fetch_mnist, load_mnist
import bench as b
store_dir, epochs, seed, who = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
store = Store(store_dir)
dataset = fetch_mnist(store, log=lambda _: None)
if who == "baseline":
    mnist = load_mnist(store, dataset)
    figures = b.plain_keras(mnist.x_train, mnist.y_train, mnist.x_test, mnist.y_test, epochs, seed)
else:
    figures, _ = b.ours(store, dataset, epochs, seed)
print(json.dumps(figures))
"""


def progress(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def train(tree: Path, store: Path, epochs: int, seed: int, who: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run(
        [sys.executable, "-c", TRAIN_ONE, str(store), str(epochs), str(seed), who],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"training in {tree} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--commit", required=True, help="the earlier commit (any git revision)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--record", action="store_true", help="also write docs/measured/against-commit.json for the docs")
    args = parser.parse_args()
    if not os.environ.get("MNIST_SOURCE"):
        parser.error("set MNIST_SOURCE to a directory holding MNIST's four IDX files (each tree fetches its own store)")
    measured = provenance()
    earlier = subprocess.run(["git", "rev-parse", "--short", args.commit], cwd=REPO, capture_output=True, text=True, check=True)
    with tempfile.TemporaryDirectory(prefix="mnist-against-") as tmp:
        tmp = Path(tmp)
        old_tree = tmp / "earlier"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(old_tree), args.commit], cwd=REPO, check=True)
        try:
            trees = {"earlier": old_tree, "now": REPO}
            runs: dict[str, list[dict]] = {"baseline": [], "earlier": [], "now": []}
            for turn, who in enumerate(("baseline", "earlier", "now", "now", "earlier", "baseline")):
                progress(f"{turn + 1}/6: {who}, {args.epochs} epochs")
                tree = REPO if who == "baseline" else trees[who]
                figures = train(tree, tmp / f"store-{who}", args.epochs, args.seed, "baseline" if who == "baseline" else "ours")
                runs[who].append(figures)
                progress(f"   {figures['images_per_second']:.0f} images/s")
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old_tree)], cwd=REPO, check=False)

    def speed(who: str) -> float:
        return sum(r["images_per_second"] for r in runs[who]) / len(runs[who])

    # pairs in time order: the inner pair (runs 3 and 4) and the outer pair (2 and 5)
    per_pair = [runs["now"][i]["images_per_second"] / runs["earlier"][1 - i]["images_per_second"] for i in range(2)]
    result = {
        **measured,
        "earlier_commit": earlier.stdout.strip(),
        "earlier_subject": subprocess.run(
            ["git", "log", "-1", "--format=%s", args.commit], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()[:200],
        "epochs": args.epochs,
        "order": "baseline, earlier, now, now, earlier, baseline",
        "runs": runs,
        "ratio_now_over_earlier": round(speed("now") / speed("earlier"), 3),
        "ratio_now_over_earlier_per_pair": [round(r, 3) for r in per_pair],
        "ratio_over_plain_keras": {
            "earlier": round(speed("earlier") / speed("baseline"), 2),
            "now": round(speed("now") / speed("baseline"), 2),
        },
    }
    print(json.dumps(result, indent=2))
    if args.record:
        progress(f"recorded in {write_record('against-commit.json', result)}")


if __name__ == "__main__":
    main()
