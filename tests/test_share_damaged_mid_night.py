"""A share changed in the store while a night runs: review 6 (2026-12-07) damaged an accepted batch's share after
that night's ingest had checked it, and the train step failed on it (``DamagedArtifact``), and with it the night.

A whole night on real MNIST (1 epoch, a small subset) under the session's Prefect API, on a real store; the damage
is real (a byte appended to the share on disk, as a writer of the store could), timed by wrapping the ingest so
that it lands after ingest checked the batch and before training reads it.
"""

from __future__ import annotations

import pytest

from flows.night.params import PipelineParameters
from storage import Store
from storage.tables import read_table
from tasks.data.fetch import load_mnist, stored_dataset
from tasks.data.simulate import HELD_BACK, write_night
from tasks.intake import ingest as intake
from tests.conftest import with_mnist

pytestmark = pytest.mark.slow


def small_night(store: Store, **extra) -> PipelineParameters:
    """A night of one epoch on 500 images with the scripted week's held-back images, a batch accepted unjudged."""
    return PipelineParameters(
        epochs=1,
        train_limit=500,
        n_per_class=10,
        seed=3,
        held_back=HELD_BACK,
        store=store.url,
        ingest={"accept_unjudged_labels": True},
        gate={"min_balanced_accuracy": 0.1},
        **extra,
    )


def test_a_share_damaged_after_ingest_is_dropped_and_the_night_decides_without_it(
    mnist_store, prefect_harness, tmp_path, monkeypatch
):
    from flows.night.pipeline import mnist_retrain

    store = with_mnist(Store(tmp_path / "store"), mnist_store)
    write_night(intake.incoming_store(store), load_mnist(store, stored_dataset(store)), 1, images=200)
    checked = intake.ingest_batches
    damaged: list[str] = []

    def ingest_then_damage(*args, **kwargs):
        ref = checked(*args, **kwargs)
        if not damaged:  # the first ingest of the night: its accepted batch's training share gains a byte
            for batch in ref.dataset.batches:
                with open(store.path(batch.train.key), "ab") as share:
                    share.write(b"\0")
                damaged.append(batch.digest)
        return ref

    monkeypatch.setattr(intake, "ingest_batches", ingest_then_damage)
    night = mnist_retrain(small_night(store))
    assert len(damaged) == 1  # the batch was accepted tonight, then damaged
    assert night.decision == "promoted" and night.step_states["train"] == "Completed"  # decided, without it
    assert list(night.batches_tonight.values()) == ["accepted"]  # what ingest decided tonight stays on record
    (run,) = read_table(store, "runs", run_id=night.run_id).itertuples()
    assert run.published and night.dataset_version == run.dataset_version
    assert night.batches_accepted == 0 and night.new_data_images == 0


def test_a_stored_mnist_file_changed_during_the_night_is_fetched_again_and_the_night_decides(
    mnist_store, prefect_harness, tmp_path, monkeypatch
):
    """Review 11 #3 (2026-12-08): a writer of the store changed MNIST's training images after the fetch step checked
    them, and the ingest step's ``load_mnist`` failed the night at once (``IDXFormatError``), where a changed share
    gets ``DATA_TRIES``. A changed MNIST file is ``DamagedMnist``: the night fetches it again and decides."""
    import shutil

    from flows.night.pipeline import mnist_retrain

    store = with_mnist(Store(tmp_path / "store"), mnist_store)
    dataset = stored_dataset(store)
    source = tmp_path / "source"  # where the night fetches MNIST again from: the four files by name
    source.mkdir()
    for name, stored in dataset.files.items():
        shutil.copyfile(store.path(stored.key), source / name)
    write_night(intake.incoming_store(store), load_mnist(store, dataset), 1, images=200)
    images = store.path(dataset.files["train-images-idx3-ubyte"].key)
    checked = intake.ingest_batches
    damaged: list[bool] = []

    def damage_then_ingest(*args, **kwargs):
        if not damaged:  # the first ingest of the night: MNIST's training images changed under it (a new file)
            data = bytearray(open(images, "rb").read())
            data[-4:] = b"\xff\xff\xff\xff"
            with open(images + ".new", "wb") as f:
                f.write(data)
            shutil.move(images + ".new", images)
            damaged.append(True)
        return checked(*args, **kwargs)

    monkeypatch.setattr(intake, "ingest_batches", damage_then_ingest)
    night = mnist_retrain(small_night(store, mnist_source=str(source)))
    assert damaged == [True] and night.decision == "promoted"
    assert list(night.batches_tonight.values()) == ["accepted"]
    assert load_mnist(store, stored_dataset(store)).x_train.shape == (60_000, 28, 28)  # fetched again, intact
