"""The whole flow on real MNIST (1 epoch, a stratified subset) under a temporary Prefect API, and the console script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest

from flows.night.params import PipelineParameters
from storage import Store
from storage.tables import TABLES, read_table
from tasks.training.train import stored_model
from tests.conftest import with_mnist

pytestmark = pytest.mark.slow

PLOTS = (
    "confusion.png",
    "confusion_mistakes.png",
    "per_class_accuracy.png",
    "samples.png",
    "most_confused.png",
    "training_curves.png",
    "trend.png",
    "champion_vs_challenger.png",
    "slice_trend.png",
)


def check_run(store: Store, run_id: str, n_per_class: int, epochs: int) -> None:
    tables = {t: read_table(store, t, run_id=run_id) for t in TABLES if t not in ("promotions", "batches")}
    assert {frozenset(tables[t]["slice"]) for t in ("confusion", "per_class", "predictions")} == {
        frozenset({"mnist-test", "mnist-selection"})  # no batch arrived: no new-data slice
    }
    selection = tables["per_class"][tables["per_class"]["slice"] == "mnist-selection"]
    assert (selection["support"] == 500).all()  # every selection image, 500 per digit
    tables = {t: frame[frame["slice"] == "mnist-test"] if "slice" in frame else frame for t, frame in tables.items()}
    confusion, per_class, predictions, runs = (tables[t] for t in ("confusion", "per_class", "predictions", "runs"))
    n = 10 * n_per_class
    assert len(confusion) == 100 and confusion["images"].sum() == n
    assert sorted(zip(confusion.true_label, confusion.predicted_label)) == [(t, p) for t in range(10) for p in range(10)]
    np.testing.assert_allclose(confusion.groupby("true_label")["share_of_true"].sum(), 1.0)
    assert len(per_class) == 10 and (per_class["support"] == n_per_class).all()
    assert ((per_class.recall_ci_low <= per_class.recall) & (per_class.recall <= per_class.recall_ci_high)).all()
    assert len(predictions) == 10_000 and predictions["image_index"].is_unique  # every test image
    assert runs["test_accuracy"].item() == pytest.approx((predictions.true_label == predictions.predicted_label).mean())
    predictions = predictions[predictions["sampled"]]  # the balanced sample: what confusion and per_class count
    assert len(predictions) == n and (predictions.groupby("true_label").size() == n_per_class).all()
    np.testing.assert_allclose(np.stack(predictions["probabilities"]).sum(axis=1), 1.0, atol=1e-3)
    (run,) = runs.itertuples()
    assert run.n_per_class == n_per_class and run.epochs == epochs and len(run.model_sha256) == 64
    assert run.test_balanced_accuracy == pytest.approx((predictions.true_label == predictions.predicted_label).mean())
    assert 0.5 < run.test_accuracy <= 1.0
    report = Path(store.path(store.report_dir(run_id)))
    for name in PLOTS:
        pixels = mpimg.imread(report / name)
        assert pixels.shape[0] > 100 and pixels[..., :3].std() > 0.05, name
    index = (report / "index.md").read_text()
    assert all(f"]({name})" in index for name in PLOTS) and f"{run.test_accuracy:.4f}" in index


def test_flow_end_to_end(mnist_store: Store, prefect_harness) -> None:
    from flows.night.pipeline import mnist_retrain

    params = PipelineParameters(epochs=1, train_limit=3000, n_per_class=30, seed=1, store=mnist_store.url)
    summary = mnist_retrain(params)
    check_run(mnist_store, summary.run_id, n_per_class=30, epochs=1)
    model = stored_model(mnist_store, Path(summary.model_path).parent.name)  # model.json names the files it published
    assert mnist_store.path(model.file_key) == summary.model_path
    history = pd.read_parquet(mnist_store.path(model.history_key))
    assert list(history.columns) == ["epoch", "loss", "accuracy", "val_loss", "val_accuracy", "seconds"] and len(history) == 1


def test_three_nights_promote_reject_promote(mnist_store: Store, prefect_harness, tmp_path: Path) -> None:
    """The issue's acceptance runs: a first champion, a weak night rejected, a better night promoted."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from flows.night.pipeline import mnist_retrain

    store = Store(tmp_path / "store")
    with_mnist(store, mnist_store)
    # whoever can write the store planted links and pipes where the nights read and write: they change nothing
    # outside it and stop no night (storage/door.py)
    outside = tmp_path / "someone-elses"
    outside.mkdir()
    (outside / ".bashrc").write_text("# theirs\n")
    root = Path(store.root)
    for name in ("reports", "prefect-results", "checkpoints", "incoming"):
        os.symlink(outside, root / name)
    (root / "locks").mkdir()
    for name in ("champion.json", "locks/champion.lock", "locks/ingest.lock"):
        os.mkfifo(root / name)
    nights = [(1, 6000, 1), (1, 2000, 2), (2, 12000, 3)]
    summaries = [
        mnist_retrain(
            PipelineParameters(
                epochs=e, train_limit=n, seed=s, n_per_class=100, store=store.url, gate={"min_balanced_accuracy": 0.5}
            )
        )
        for e, n, s in nights
    ]
    assert [s.decision for s in summaries] == ["promoted", "rejected", "promoted"], [s.decision_reason for s in summaries]
    assert [p.name for p in outside.iterdir()] == [".bashrc"] and (outside / ".bashrc").read_text() == "# theirs\n"
    decisions = read_table(store, "promotions").sort_values("decided_at")
    assert decisions["decision"].tolist() == ["promoted", "rejected", "promoted"]
    assert decisions["run_id"].tolist() == [s.run_id for s in summaries]
    assert decisions["mcnemar_p"].iloc[1] < 0.05 and "significantly worse" in decisions["reason"].iloc[1]
    runs = read_table(store, "runs").set_index("run_id")
    first, second, third = (s.run_id for s in summaries)
    assert not runs.loc[second, "promoted"]
    assert runs.loc[second, "champion_after_model_key"] == summaries[0].champion_model_key
    assert runs.loc[third, "champion_after_model_key"] == summaries[2].champion_model_key != summaries[0].champion_model_key

    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "champion", "--store", store.url, "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and json.loads(done.stdout)["run_id"] == third

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[second])))
    (summary,) = [a for a in artifacts if a.key == "mnist-run-summary"]
    assert "**REJECTED**" in summary.data and "McNemar b=" in summary.data
    assert summary.data.count("](data:image/png;base64,") == 9 and "| mnist\\-selection | decides | 5000 |" in summary.data
    index = (Path(store.path(store.report_dir(second))) / "index.md").read_text()
    assert "**REJECTED**" in index and "](trend.png)" in index and "](champion_vs_challenger.png)" in index


def test_a_night_with_a_damaged_champion_decides_and_alerts(mnist_store: Store, prefect_harness, tmp_path: Path) -> None:
    """Issue 39, finding 1, through the whole flow: the champion's .keras file replaced by one whose config.json is
    not JSON, every digest set to match. The next night ends Completed with a decision (a first champion: no
    intact one is left), and the alert automation hears ``mnist.champion.damaged`` once."""
    import time
    import zipfile

    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventRelatedFilter

    from flows.night.pipeline import mnist_retrain
    from storage import sha256_bytes
    from tasks.champion.pointer import read_pointer

    store = with_mnist(Store(tmp_path / "store"), mnist_store)
    params = dict(epochs=1, train_limit=2000, n_per_class=20, store=store.url, gate={"min_balanced_accuracy": 0.5})
    first = mnist_retrain(PipelineParameters(seed=1, **params))
    assert first.decision == "promoted"
    pointer = read_pointer(store)
    model = stored_model(store, pointer.model_key)
    damaged = tmp_path / "damaged.keras"
    with zipfile.ZipFile(store.path(model.file_key)) as old, zipfile.ZipFile(damaged, "w") as new:
        for info in old.infolist():
            new.writestr(info, b"{not json" if info.filename == "config.json" else old.read(info))
    data = damaged.read_bytes()
    Path(store.path(model.file_key)).write_bytes(data)
    store.write_text(store.model_info_file(model.key), model.model_copy(update={"sha256": sha256_bytes(data)}).model_dump_json())
    store.write_text(store.champion_file(), pointer.model_copy(update={"sha256": sha256_bytes(data)}).model_dump_json())

    second = mnist_retrain(PipelineParameters(seed=2, **params))  # returns: the night completed
    assert second.decision == "promoted" and second.decision_reason.startswith("first champion")
    assert read_pointer(store).run_id == second.run_id
    query = EventFilter(
        event=EventNameFilter(name=["mnist.champion.damaged"]),
        related=EventRelatedFilter(id=[f"prefect.flow-run.{second.run_id}"]),
    )
    for _ in range(30):  # events reach the API shortly after the run
        with get_client(sync_client=True) as client:
            events = client.read_events(query, limit=10).events
        if events:
            break
        time.sleep(1)
    (event,) = events
    assert "config.json that is not JSON" in event.payload["reason"] and "judged as a first champion" in event.payload["reason"]
