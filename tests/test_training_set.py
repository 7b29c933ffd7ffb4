"""What a night trains and judges on once accepted data outgrows a budget: the training-set policy (newest whole
batches within ``max_training_images``), the bounded new-data slice (a cap per digit, newest first) and the staged
training images the input pipeline reads by row. Small synthetic MNIST and batches through the real intake, without
training; two nights through the flow on real MNIST (``slow``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from flows.night.params import PipelineParameters, describe_errors
from storage import Store
from storage.tables import read_table
from tasks.data import slices
from tasks.data.batch_format import AcceptedBatch, BatchPart, DamagedShare, batch_bytes
from tasks.data.fetch import DatasetRef, load_mnist
from tasks.data.near_copies import image_hashes
from tasks.data.slices import new_data_slice, new_training_images, slice_digest, slice_images
from tasks.data.splits import held_back_indices
from tasks.data.training_images import staged_training_images
from tasks.data.training_set import TrainingBudgetError, base_images, choose_batches
from tasks.intake.checks import IngestRules
from tasks.intake.ingest import accepted_batches, batch_records, incoming_store, ingest_batches, set_status
from tests.conftest import with_mnist

RULES = IngestRules(accept_unjudged_labels=True)  # no champion judges these nights: the budget is the point


def night(store, dataset, number: int, images: int = 60) -> DatasetRef:
    """One night on which one batch of new images (noise, labels 0–9 in turn) arrives and is accepted."""
    x = np.random.default_rng(number).integers(0, 256, (images, 28, 28), dtype=np.uint8)
    incoming_store(store).write_bytes(f"night-{number}.parquet", batch_bytes(x, np.arange(images) % 10))
    ref = ingest_batches(store, incoming_store(store), dataset, RULES, f"run-{number}", log=lambda _: None)
    assert [r.status for r in ref.night] == ["accepted"], [r.reason for r in ref.night]
    return ref.dataset


@pytest.fixture
def three_nights(small):
    store, dataset, mnist = small
    for number in (1, 2, 3):
        accepted = night(store, dataset, number)
    return store, accepted, mnist


def fake_batch(number: int, rows: int) -> AcceptedBatch:
    part = BatchPart(key=f"batches/{number}", sha256=f"{number:064x}", size=rows * 785, rows=rows)
    return AcceptedBatch(digest=f"{number:064x}", train=part, holdout=part)


# ---- the training-set policy ---------------------------------------------------------------------------------
def test_the_newest_whole_batches_fill_the_budget_and_the_older_ones_are_retired_but_kept(three_nights):
    store, dataset, mnist = three_nights
    oldest, middle, newest = dataset.batches  # the intake lists them oldest first
    assert [b.digest for b in dataset.batches] == [r.digest for r in sorted(batch_records(store), key=lambda r: r.decided_at)]
    base = base_images(mnist.y_train, dataset.held_back, None)
    assert base == 100  # 120 synthetic training images less the 20 of the selection split

    chosen = choose_batches(dataset.batches, base, base + 2 * 50 + 49)  # room for two 50-image training shares
    assert (chosen.chosen, chosen.retired) == ([middle, newest], [oldest])
    assert chosen.images(base) == 200
    tonight = dataset.model_copy(update={"batches": chosen.chosen})
    assert tonight.version == DatasetRef(**{**dataset.model_dump(), "batches": [middle, newest]}).version
    assert tonight.version not in {dataset.version, dataset.model_copy(update={"batches": []}).version}
    assert len(new_training_images(store, tonight).y) == 100  # what trains is what the version says

    # the retired batch stays in the store and in the batches table, accepted
    assert {r.digest: r.status for r in batch_records(store)}[oldest.digest] == "accepted"
    assert oldest.digest in set(read_table(store, "batches")["digest"])
    assert choose_batches(dataset.batches, base, base + 150).chosen == dataset.batches  # a larger budget brings it back
    assert choose_batches(dataset.batches, base, base).chosen == []  # the base set alone


def test_the_policy_keeps_the_newest_stretch_and_never_splits_a_batch():
    old_small, big, new = fake_batch(1, 10), fake_batch(2, 100), fake_batch(3, 10)
    chosen = choose_batches([old_small, big, new], base_images=1000, max_training_images=1030)
    assert chosen.chosen == [new] and chosen.retired == [old_small, big]  # not the old small one past the big one


def test_batches_of_holdout_images_only_are_bounded_by_the_budget_too():
    """Planted batches that train on nothing but hold out 100 000 images each were all chosen at any budget, and
    every night read and searched their holdouts: the chosen holdouts are bounded by the same figure."""

    def holdout_only(number: int, rows: int) -> AcceptedBatch:
        empty = BatchPart(key=f"batches/{number}/train", sha256=f"{number:064x}", size=0, rows=0)
        held = BatchPart(key=f"batches/{number}/holdout", sha256=f"{number:064x}", size=rows * 785, rows=rows)
        return AcceptedBatch(digest=f"{number:064x}", train=empty, holdout=held)

    planted = [holdout_only(n, 100_000) for n in range(50)]
    chosen = choose_batches([fake_batch(99, 10), *planted], base_images=1_000, max_training_images=240_000)
    assert chosen.chosen == planted[-2:] and sum(b.holdout.rows for b in chosen.chosen) <= 240_000
    honest = [fake_batch(n, 1_000) for n in range(300)]  # an honest batch holds out less than it trains on
    assert choose_batches(honest, 1_000, 240_000).images(1_000) == 240_000


def test_a_budget_below_the_base_set_is_refused_naming_both_figures(small):
    _, dataset, mnist = small
    base = base_images(mnist.y_train, dataset.held_back, None)
    with pytest.raises(TrainingBudgetError, match=r"max_training_images=99 is smaller than the 100 MNIST base training images"):
        choose_batches([], base, 99)
    assert base_images(mnist.y_train, dataset.held_back, train_limit=40) == 40  # train_limit's subset is the base set
    assert choose_batches([], 40, 99).chosen == []


@pytest.mark.parametrize("value", [99, 5_000_001])
def test_the_budget_parameter_is_bounded(value):
    with pytest.raises(ValidationError) as caught:
        PipelineParameters(max_training_images=value)
    assert "max_training_images" in describe_errors(caught.value) and "100–5000000" in describe_errors(caught.value)
    assert PipelineParameters().max_training_images == 240_000


# ---- the bounded new-data slice ------------------------------------------------------------------------------
def test_the_new_data_slice_takes_each_digit_from_the_newest_batches_up_to_its_cap(three_nights, monkeypatch):
    store, dataset, _ = three_nights
    holdouts = [slices._parts(store, [b.holdout]) for b in dataset.batches]
    assert all(len(h.y) == 10 for h in holdouts)  # one image of each digit in each batch's holdout

    capped = new_data_slice(store, dataset, per_digit=2)
    newest, middle = holdouts[2], holdouts[1]
    assert len(capped.y) == 20 and np.bincount(capped.y, minlength=10).tolist() == [2] * 10
    assert (capped.x == np.concatenate([newest.x, middle.x])).all()  # the newest batch first, then the one before

    # shares past the cap are not read: the oldest one, damaged, is not noticed with a cap of 2 ...
    store.write_bytes(dataset.batches[0].holdout.key, b"\0" * dataset.batches[0].holdout.size)
    assert len(new_data_slice(store, dataset, per_digit=2).y) == 20
    with pytest.raises(DamagedShare):  # ... and refused once the cap reaches it
        new_data_slice(store, dataset, per_digit=3)

    # the slice the evaluation and the gate read is capped at NEW_DATA_PER_DIGIT, and its digest says so
    before = slice_digest(dataset, "new-data")
    monkeypatch.setattr(slices, "NEW_DATA_PER_DIGIT", 1)
    assert len(slice_images(store, dataset, "new-data").y) == 10
    assert slice_digest(dataset, "new-data") != before


def _arrives(store, dataset, name: str, x: np.ndarray, y: np.ndarray, rules=RULES, budget: int = 10**6) -> DatasetRef:
    incoming_store(store).write_bytes(name, batch_bytes(x, y))
    base = base_images(np.asarray(load_mnist(store, dataset).y_train), dataset.held_back, None)
    return ingest_batches(store, incoming_store(store), dataset, rules, f"run-{name}", lambda _: None, budget, base).dataset


@pytest.mark.parametrize("route", ["retired by the budget", "held back no more", "released from quarantine"])
def test_no_new_data_image_is_one_the_night_trains_on_whatever_history_put_it_there(small, route):
    """The second review's three ways to get a holdout image trained on (each a path the intake could not see when the
    batch arrived) end in one night whose new-data slice must hold none of the images that night trains on."""
    store, dataset, mnist = small
    noise = np.random.default_rng(7).integers(0, 256, (150, 28, 28), dtype=np.uint8)
    labels = np.arange(150) % 10
    if route == "held back no more":
        # X: MNIST images held back tonight (new to every model), accepted; a later night holds nothing back
        dataset = dataset.model_copy(update={"held_back": 30})
        reserve = held_back_indices(mnist.y_train, 30)
        _arrives(store, dataset, "x.parquet", mnist.x_train[reserve], mnist.y_train[reserve])
        tonight = dataset.model_copy(update={"held_back": 0})
    else:
        # X, then Y: X's holdout images (unprotected when Y arrives: X retired, or still quarantined) and new ones
        held = route == "released from quarantine"
        _arrives(
            store,
            dataset,
            "x.parquet",
            noise[:60],
            labels[:60],
        )
        [x] = batch_records(store)
        if held:  # an operator sets it aside (or the intake did): while quarantined, nothing protects its holdout
            x = set_status(store, x.digest[:12], "quarantined")[0]
        x_holdout = slices._parts(store, [x.holdout])
        base = base_images(mnist.y_train, dataset.held_back, None)
        y = (np.concatenate([x_holdout.x, noise[60:110]]), np.concatenate([x_holdout.y, labels[60:110]]))
        _arrives(store, dataset, "y.parquet", *y, budget=base if not held else 10**6)
        assert {r.file: r.status for r in batch_records(store)}["y.parquet"] == "accepted"
        if held:
            set_status(store, x.digest[:12], "accepted")
    _arrives(store, dataset, "z.parquet", noise[110:], labels[110:])  # and a clean batch, whose holdout stays
    tonight = tonight if route == "held back no more" else dataset
    tonight = tonight.model_copy(update={"batches": accepted_batches(store)})
    trained = np.concatenate([mnist.x_train[slices.base_training(mnist, tonight)], new_training_images(store, tonight).x])
    trained_hashes = set(image_hashes(trained))
    every_holdout = slices.new_holdout_images(store, tonight)
    assert any(h in trained_hashes for h in image_hashes(every_holdout.x)), "the route no longer leaks: test it anew"

    judged = new_data_slice(store, tonight)
    assert len(judged.y) and not any(h in trained_hashes for h in image_hashes(judged.x))
    assert len(judged.y) == sum(h not in trained_hashes for h in image_hashes(every_holdout.x))  # only those are left out


def test_a_gamma_copy_of_an_image_trained_on_is_not_judged_on(small):
    """An image and its copy under a gamma curve, in one batch or in two, or a gamma copy of a base training image:
    the one held out is never judged beside the other trained on (the review's p1/p1b)."""
    store, dataset, mnist = small
    gamma = (255 * (np.arange(256) / 255) ** 0.5).round().astype(np.uint8)
    images = np.random.default_rng(11).integers(0, 256, (120, 28, 28), dtype=np.uint8)
    labels = np.arange(120) % 10
    base = mnist.x_train[slices.base_training(mnist, dataset)][:30]
    brighter = RULES.model_copy(update={"max_image_drift": 1.0})  # a gamma curve brightens noise: not the point here
    _arrives(
        store, dataset, "pairs.parquet", np.concatenate([images[:60], gamma[images[:60]]]), np.tile(labels[:60], 2), brighter
    )
    _arrives(store, dataset, "first.parquet", images[60:], labels[60:])
    _arrives(
        store, dataset, "copies.parquet", np.concatenate([gamma[images[60:]], gamma[base]]), np.tile(labels[:30], 3), brighter
    )
    assert all(r.status == "accepted" for r in batch_records(store)), [r.reason for r in batch_records(store)]
    [pairs_batch] = [r for r in batch_records(store) if r.file == "pairs.parquet"]
    one = dataset.model_copy(update={"batches": [b for b in accepted_batches(store) if b.digest == pairs_batch.digest]})
    index = {h: i % 60 for i, h in enumerate(image_hashes(np.concatenate([images[:60], gamma[images[:60]]])))}
    held_out = {index[h] for h in image_hashes(slices.new_holdout_images(store, one).x)}
    assert not held_out & {index[h] for h in image_hashes(new_training_images(store, one).x)}  # the intake's own check
    assert pairs_batch.row.duplicates >= 10  # each held-out image's twin trains: dropped, counted with the repeats
    tonight = dataset.model_copy(update={"batches": accepted_batches(store)})
    trained = np.concatenate([mnist.x_train[slices.base_training(mnist, tonight)], new_training_images(store, tonight).x])
    judged = new_data_slice(store, tonight)
    originals = {h: i for i, h in enumerate(image_hashes(np.concatenate([images, base])))}
    copies = {h: i for i, h in enumerate(image_hashes(gamma[np.concatenate([images, base])]))}
    pairs = {
        *(originals[h] for h in image_hashes(judged.x) if h in originals),
        *(copies[h] for h in image_hashes(judged.x) if h in copies),
    }
    trained_pairs = {
        *(originals[h] for h in image_hashes(trained) if h in originals),
        *(copies[h] for h in image_hashes(trained) if h in copies),
    }
    every = slices.new_holdout_images(store, tonight).x
    held = {
        *(originals[h] for h in image_hashes(every) if h in originals),
        *(copies[h] for h in image_hashes(every) if h in copies),
    }
    assert held & trained_pairs, "no gamma copy of a trained image was held out: the test tests nothing"
    assert len(judged.y) and not pairs & trained_pairs


# ---- the staged training images ------------------------------------------------------------------------------
def test_the_staged_images_are_the_base_images_then_each_share_read_by_row(three_nights):
    store, dataset, mnist = three_nights
    rows = np.array([5, 17, 3, 42, 99])
    new = new_training_images(store, dataset)
    expected_x = np.concatenate([mnist.x_train[rows], new.x])
    expected_y = np.concatenate([mnist.y_train[rows], new.y])
    with staged_training_images(store, mnist.x_train, mnist.y_train, rows, [b.train for b in dataset.batches]) as staged:
        assert len(staged) == 5 + 150 and (staged.labels == expected_y).all()
        order = np.random.default_rng(0).permutation(len(staged))
        assert (staged.images(order) == expected_x[order]).all()  # in the order asked, not sorted
        with pytest.raises(IndexError, match="outside the 155 training images"):
            staged.images(np.array([155]))


def test_a_share_whose_record_says_other_rows_than_it_holds_is_refused(three_nights):
    store, dataset, mnist = three_nights
    part = dataset.batches[0].train
    lying = part.model_copy(update={"rows": part.rows - 1})  # the digest still matches: only the row count lies
    with pytest.raises(DamagedShare, match=r"a share of 49 images must be 38465 bytes, not 39250"):
        with staged_training_images(store, mnist.x_train, mnist.y_train, np.arange(3), [lying]):
            pass
    store.write_bytes(part.key, b"\0" * part.size)  # changed in the store: its digest no longer matches
    with pytest.raises(DamagedShare, match="does not match its SHA-256"):
        with staged_training_images(store, mnist.x_train, mnist.y_train, np.arange(3), [part]):
            pass


# ---- the night ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_night_whose_budget_cannot_hold_the_base_set_is_refused_before_any_batch_is_read(
    mnist_store, prefect_harness, tmp_path
):
    from flows.night.pipeline import mnist_retrain

    store = with_mnist(Store(tmp_path / "store"), mnist_store)
    x = np.random.default_rng(0).integers(0, 256, (60, 28, 28), dtype=np.uint8)
    incoming_store(store).write_bytes("waiting.parquet", batch_bytes(x, np.arange(60) % 10))
    params = PipelineParameters(epochs=1, seed=1, max_training_images=50_000, store=store.url)
    with pytest.raises(TrainingBudgetError, match=r"max_training_images=50000 is smaller than the 55000 MNIST base"):
        mnist_retrain(params)
    assert incoming_store(store).exists("waiting.parquet") and not batch_records(store)  # nothing was read
    assert not store.exists(store.table_dir("runs"))  # nor trained


@pytest.mark.slow
def test_a_night_over_its_budget_trains_on_the_newest_batch_and_keeps_the_older_one(mnist_store, prefect_harness, tmp_path):
    from flows.night.pipeline import mnist_retrain
    from tasks.data.fetch import load_mnist, stored_dataset
    from tasks.data.simulate import write_night
    from tasks.training.train import stored_model

    store = with_mnist(Store(tmp_path / "store"), mnist_store)
    mnist = load_mnist(store, stored_dataset(store))
    for arrival in (1, 4):  # two clean batches of 600 held-back images (480 to train on), night 1's first
        write_night(incoming_store(store), mnist, arrival, images=600)
    params = PipelineParameters(
        epochs=1,
        train_limit=1000,
        max_training_images=1000 + 480,
        n_per_class=20,
        seed=1,
        held_back=10_000,
        store=store.url,
        ingest={"accept_unjudged_labels": True},  # no champion yet to judge them: the budget is the point here
    )
    summary = mnist_retrain(params)
    records = sorted(batch_records(store), key=lambda r: r.decided_at)
    assert [r.status for r in records] == ["accepted", "accepted"]  # both kept, the older one retired from tonight
    assert summary.batches_accepted == 1 and summary.new_data_images == 120  # the newest batch's holdout alone
    newest = AcceptedBatch(digest=records[1].digest, train=records[1].train, holdout=records[1].holdout)
    tonight = stored_dataset(store).model_copy(update={"held_back": 10_000, "batches": [newest]})
    assert summary.dataset_version == tonight.version
    model = stored_model(store, Path(summary.model_path).parent.name)
    assert model.train_images == 1480 - 148  # base and the newest share, less the validation split


def test_the_staged_images_are_read_from_a_store_in_a_bucket_too(s3_server):
    from storage import sha256_bytes
    from tasks.data.batch_format import share_bytes

    store = Store(s3_server.bucket("shares") + "/store")
    x = np.random.default_rng(2).integers(0, 256, (30, 28, 28), dtype=np.uint8)
    data = share_bytes(x, np.arange(30) % 10)
    key = store.batch_file("ab" * 32, "train.bin")
    store.write_bytes(key, data)
    part = BatchPart(key=key, sha256=sha256_bytes(data), size=len(data), rows=30)
    base_x = np.zeros((4, 28, 28), np.uint8)
    with staged_training_images(store, base_x, np.arange(4) % 10, np.array([1, 3]), [part]) as staged:
        assert len(staged) == 32 and (staged.labels[2:] == np.arange(30) % 10).all()
        assert (staged.images(np.array([31, 2, 0])) == np.stack([x[29], x[0], base_x[1]])).all()
