"""The soak's producer and a soak of two nights (bench/soak.py; the year itself is a benchmark, `make soak`).

The producer must make digits the intake accepts on their merits: not copies of anything trained on, of the test
set or of the selection split, with MNIST's label and intensity statistics, and new ones every night."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from storage import Store
from tasks.data.deformed import deformed_batch
from tasks.data.fetch import load_mnist, stored_dataset
from tasks.data.near_copies import ImageIndex, differing_pixels, near_copies
from tasks.data.splits import base_training_indices, selection_indices
from tasks.intake.checks import drift, drift_problems
from tasks.intake.rules import IngestRules
from tests.conftest import with_mnist


def soak_module():
    spec = importlib.util.spec_from_file_location("soak", Path(__file__).resolve().parent.parent / "bench" / "soak.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_deformed_digits_are_new_images_the_intake_accepts_on_their_merits(mnist_store: Store):
    mnist = load_mnist(mnist_store, stored_dataset(mnist_store))
    base = base_training_indices(mnist.y_train)
    x, y = deformed_batch(mnist.x_train, mnist.y_train, base, 600, np.random.default_rng(0))
    assert x.shape == (600, 28, 28) and x.dtype == np.uint8 and set(np.unique(y)) == set(range(10))
    assert differing_pixels(x, ImageIndex(mnist.x_train[base])).min() > 8  # no copy of what was trained on
    protected = ImageIndex(mnist.x_test, mnist.x_train[selection_indices(mnist.y_train)], ranked=True)
    assert not near_copies(x, protected).any()
    reference = np.random.default_rng(0).choice(base, 10_000, replace=False)
    assert drift_problems(drift(y, x, mnist.y_train[base], mnist.x_train[np.sort(reference)]), IngestRules()) == []
    again, _ = deformed_batch(mnist.x_train, mnist.y_train, base, 600, np.random.default_rng(1))
    assert differing_pixels(again, ImageIndex(x)).min() > 8  # another night's are other images


@pytest.mark.slow
def test_a_soak_of_two_nights_records_what_a_year_would(mnist_store: Store, tmp_path, prefect_api):
    soak = soak_module()
    out = tmp_path / "soak.jsonl"
    # a model this small is confident about no image, so no label could be judged: the rule that accepts unjudged
    # batches keeps the soak's mechanics in view (the label check has tests of its own)
    params = {"epochs": 1, "train_limit": 1000, "n_per_class": 10, "ingest": {"accept_unjudged_labels": True}}
    prepare = lambda s: with_mnist(s, mnist_store)  # noqa: E731
    records = soak.soak(
        2, 2, 150, 2, 1.0, params, out, log=lambda line: None, prepare=prepare, api_url=prefect_api["PREFECT_API_URL"]
    )
    assert [json.loads(line)["night"] for line in out.read_text().splitlines()] == [1, 2]
    first, second = records
    for record in records:
        assert record["accepted_tonight"] == 2  # the producer's digits pass every check
        if record["bad_batch"] != "mislabelled":  # with no label check, only the drifted and copied are caught
            assert record["quarantined_tonight"] == 1
        assert {"ingest", "train", "evaluate", "gate", "tabulate", "report", "prune"} <= set(record["steps_s"])
        assert record["peak_rss_mb"] > 100 and record["store_mb"] > record["derived_mb"] > 0
    assert second["holdout_images"] > first["holdout_images"] > 0
    growth = soak.slopes(records)
    assert growth["available_training_images"][0] > 0
    soak.plot(records, tmp_path / "soak.png")
    assert (tmp_path / "soak.png").stat().st_size > 10_000
