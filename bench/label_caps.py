"""How many confident label disagreements the night's and a source's caps let through, for an honest sender and for
targeted flips: the figures behind docs/new-data.md's "label caps" paragraph.

A 1-epoch seed network trained on MNIST's base training set is the champion; it predicts the selection split and
``--images`` clean deformed digits (``tasks/data/deformed.py``, as the soak sends). Batches are then drawn from those
predictions and judged by the night's own code (``label_quality``, ``NightRoom``), without a store: the images are
predicted once, so a year of batches costs seconds. Scenarios:

- honest: ``--nights`` nights of ``--files`` files of ``--per-file`` clean deformed digits, one declared source (the
  soak's producer, all nights inside the source window, as the soak's compressed nights are);
- night attack (issue 39, finding 6): 20 files of 500 images, 24 sevens relabelled 1 in each, in one night;
- slow attack: one such file a night from one source, alone or among the honest sender's files under its name.

Prints one JSON record (and writes it to ``--out`` if given).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from measured_record import cpu_model  # noqa: E402 (bench/, beside this script)

from storage import Store  # noqa: E402
from tasks.data.deformed import deformed_batch  # noqa: E402
from tasks.data.fetch import fetch_mnist, load_mnist  # noqa: E402
from tasks.data.splits import base_training_indices, selection_indices  # noqa: E402
from tasks.intake.checks import IngestRules, label_quality  # noqa: E402
from tasks.intake.ingest import NightRoom  # noqa: E402

FLIPS = 24  # sevens relabelled 1 in each attacking file of 500 images (issue 39, finding 6)


def champion_predictions(images: int, seed: int) -> dict[str, np.ndarray]:
    from tasks.evaluation.evaluate import predict
    from tasks.training.model import build_model, scale

    store = Store(tempfile.mkdtemp(prefix="label-caps-"))
    mnist = load_mnist(store, fetch_mnist(store, log=lambda line: None))
    base, selection = base_training_indices(mnist.y_train), selection_indices(mnist.y_train)
    model = build_model("seed")
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(scale(mnist.x_train[base]), mnist.y_train[base], epochs=1, batch_size=128, verbose=0)
    x, y = deformed_batch(mnist.x_train, mnist.y_train, base, images, np.random.default_rng(seed))
    return {
        "selection_p": predict(model, mnist.x_train[selection]),
        "selection_y": mnist.y_train[selection].astype(np.int64),
        "deformed_p": predict(model, x),
        "deformed_y": y.astype(np.int64),
    }


class Judge:
    def __init__(self, predictions: dict[str, np.ndarray], rules: IngestRules, seed: int) -> None:
        self.p, self.rules, self.rng = predictions, rules, np.random.default_rng(seed)
        sel = predictions["selection_p"]
        self.selection = (predictions["selection_y"], sel.argmax(axis=1), sel.max(axis=1))

    def batch(self, n: int, flips: int = 0, source: str | None = None) -> tuple[dict, list[str], int]:
        """A batch of ``n`` deformed digits drawn from the predicted ones, ``flips`` of its sevens labelled 1: its row
        and problems as ``label_quality`` judges them, and how many labels it flipped."""
        rows = self.rng.choice(len(self.p["deformed_y"]), n, replace=False)
        labels, probabilities = self.p["deformed_y"][rows].copy(), self.p["deformed_p"][rows]
        sevens = np.flatnonzero(labels == 7)[:flips]
        labels[sevens] = 1
        figures, problems = label_quality(
            labels, probabilities.argmax(axis=1), probabilities.max(axis=1), *self.selection, self.rules
        )
        return figures.model_dump() | {"source": source}, problems, len(sevens)


def decide(room: NightRoom, judged: tuple[dict, list[str], int], rules: IngestRules) -> tuple[bool, int]:
    """As ``_ingest_one`` decides: accepted (and counted) unless the batch or the night/source caps say otherwise."""
    row, problems, flipped = judged
    problems = problems + room.label_problems(row, rules)
    if problems:
        return False, 0
    room.count_accepted(row)
    return True, flipped


def fresh_room(rules: IngestRules, keep: NightRoom | None = None) -> NightRoom:
    room = NightRoom.of(rules)
    if keep is not None:
        room.by_source = keep.by_source  # the source window spans the nights; the night's count starts again
    return room


def scenarios(judge: Judge, rules: IngestRules, nights: int, files: int, per_file: int) -> dict:
    out: dict = {}
    room, accepted, total = None, 0, 0
    for _ in range(nights):
        room = fresh_room(rules, room)
        for _ in range(files):
            ok, _ = decide(room, judge.batch(per_file, source="soak producer"), rules)
            accepted += ok
            total += 1
    out["honest"] = {"batches": total, "accepted": accepted, "images": total * per_file}

    room, accepted, flipped = fresh_room(rules), 0, 0
    for _ in range(20):
        ok, f = decide(room, judge.batch(500, FLIPS), rules)
        accepted += ok
        flipped += f
    out["night_attack"] = {"files": 20, "flips_sent": 20 * FLIPS, "files_accepted": accepted, "flips_accepted": flipped}

    for cover in (0, files):
        room, accepted, flipped = None, 0, 0
        for _ in range(nights):
            room = fresh_room(rules, room)
            for _ in range(cover):
                decide(room, judge.batch(per_file, source="s"), rules)
            ok, f = decide(room, judge.batch(500, FLIPS, source="s"), rules)
            accepted += ok
            flipped += f
        out[f"slow_attack_cover_{cover}_files"] = {
            "nights": nights,
            "flips_sent": nights * FLIPS,
            "files_accepted": accepted,
            "flips_accepted": flipped,
            "cover_images": nights * cover * per_file,
        }
    return out


def rates(predictions: dict[str, np.ndarray], threshold: float) -> dict:
    def rate(p, y):
        confident = p.max(axis=1) >= threshold
        return round(float((p.argmax(axis=1) != y)[confident].mean()), 5)

    return {
        "selection": rate(predictions["selection_p"], predictions["selection_y"]),
        "deformed": rate(predictions["deformed_p"], predictions["deformed_y"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=30_000, help="deformed digits predicted (batches draw from them)")
    parser.add_argument("--nights", type=int, default=20)
    parser.add_argument("--files", type=int, default=10)
    parser.add_argument("--per-file", type=int, default=1_500)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--predictions", type=Path, help="an .npz of the champion's predictions: read if it exists, else written")
    args = parser.parse_args()
    started = time.perf_counter()
    if args.predictions and args.predictions.exists():
        predictions = dict(np.load(args.predictions))
    else:
        predictions = champion_predictions(args.images, args.seed)
        if args.predictions:
            np.savez(args.predictions, **predictions)
    rules = IngestRules()
    record = {
        "date": dt.date.today().isoformat(),
        "cpu": cpu_model(),
        "rules": {
            "max_excess_disagreements": rules.max_excess_disagreements,
            "disagreement_tolerance": rules.disagreement_tolerance,
        },
        "champion_confident_disagreement": rates(predictions, rules.confident_probability),
        **scenarios(Judge(predictions, rules, args.seed), rules, args.nights, args.files, args.per_file),
        "seconds": round(time.perf_counter() - started, 1),
    }
    text = json.dumps(record, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
