"""The intake rules on both sides of each threshold: a rule that fires too often (an "or" for an "and") or never
(a check left out) fails here, not only on extreme batches."""

from __future__ import annotations

import os

import pytest

from tasks.data import batch_format
from tasks.data.batch_format import BatchRejected, batch_bytes, parse_untrusted
from tasks.intake.checks import DriftFigures, IngestRules, drift_problems
from tests.test_new_data import arrive, fresh_images, ingest

# These stores have no champion: their batches would wait for one (test_label_caps.py tests that); here every
# batch is judged by the other checks, as a run that accepts unjudged labels judges it.
RULES = IngestRules(accept_unjudged_labels=True)


SIGNIFICANT, INSIGNIFICANT = RULES.drift_p / 10, min(RULES.drift_p * 10, 0.5)


def figures(**changed) -> DriftFigures:
    """A batch indistinguishable from MNIST, but for ``changed``."""
    calm = dict(
        label_chi2_p=0.9,
        label_shift=0.0,
        mean_intensity=0.13,
        mean_intensity_ks=0.0,
        mean_intensity_p=0.9,
        ink_fraction=0.1,
        ink_fraction_ks=0.0,
        ink_fraction_p=0.9,
    )
    return DriftFigures(**(calm | changed))


LARGE_SHIFT, SMALL_SHIFT = RULES.max_label_shift * 2, RULES.max_label_shift / 2
LARGE_KS, SMALL_KS = min(RULES.max_image_drift * 2, 1.0), RULES.max_image_drift / 2


@pytest.mark.parametrize(
    ("changed", "fires"),
    [
        ({"label_chi2_p": SIGNIFICANT, "label_shift": LARGE_SHIFT}, True),
        ({"label_chi2_p": SIGNIFICANT, "label_shift": SMALL_SHIFT}, False),  # significant, but small: a big batch
        ({"label_chi2_p": INSIGNIFICANT, "label_shift": LARGE_SHIFT}, False),  # large, but could be chance: a tiny batch
        ({"mean_intensity_p": SIGNIFICANT, "mean_intensity_ks": LARGE_KS}, True),
        ({"mean_intensity_p": SIGNIFICANT, "mean_intensity_ks": SMALL_KS}, False),
        ({"mean_intensity_p": INSIGNIFICANT, "mean_intensity_ks": LARGE_KS}, False),
        ({"ink_fraction_p": SIGNIFICANT, "ink_fraction_ks": LARGE_KS}, True),
        ({"ink_fraction_p": SIGNIFICANT, "ink_fraction_ks": SMALL_KS}, False),
        ({"ink_fraction_p": INSIGNIFICANT, "ink_fraction_ks": LARGE_KS}, False),
    ],
)
def test_drift_quarantines_only_what_is_both_significant_and_large(changed, fires):
    assert bool(drift_problems(figures(**changed), RULES)) is fires


def test_the_parsing_childs_memory_limit_tells_a_big_batch_from_a_small_one(monkeypatch):
    """The same limit that refuses 20 000 honest images (more than it lets the child hold) parses 20 of them."""
    monkeypatch.setattr(batch_format, "PARSE_MEMORY", 300 << 20)
    x, y = fresh_images(20)
    assert len(parse_untrusted(batch_bytes(x, y)).labels) == 20
    x, y = fresh_images(20_000)
    with pytest.raises(BatchRejected):
        parse_untrusted(batch_bytes(x, y))


def test_a_small_file_with_a_glob_name_is_refused_for_its_name(small):
    from tasks.intake.ingest import incoming_store, ingest_batches

    store, dataset, _ = small
    x, y = fresh_images(60)
    incoming = incoming_store(store)
    os.makedirs(incoming.root, exist_ok=True)
    with open(os.path.join(incoming.root, "glob[1].parquet"), "wb") as f:  # small: only its name can refuse it
        f.write(batch_bytes(x, y))
    warnings: list[str] = []
    store.warn = warnings.append
    incoming.warn = warnings.append
    ref = ingest_batches(store, incoming, dataset, RULES, "run-1", log=warnings.append)
    assert not ref.night and any("glob[1].parquet" in w and "glob" in w for w in warnings), warnings


def test_a_file_already_ingested_is_removed_from_the_incoming_location_when_it_arrives_again(small):
    from tasks.intake.ingest import incoming_store

    store, dataset, _ = small
    x, y = fresh_images(60)
    arrive(store, "monday.parquet", batch_bytes(x, y))
    (first,) = ingest(store, dataset)[0].night
    arrive(store, "tuesday.parquet", batch_bytes(x, y))  # the same bytes under another name
    ref, lines = ingest(store, dataset, run_id="run-2")
    assert ref.night == [] and not incoming_store(store).exists("tuesday.parquet")
    assert any("tuesday.parquet" in line and first.digest[:12] in line and "removed" in line for line in lines), lines


def test_a_link_planted_at_the_incoming_folder_is_not_a_way_out_of_the_store(small, tmp_path):
    """Whoever writes the store replaces ``incoming`` by a link to another folder: nothing there is read, copied
    into the store or deleted."""
    from tasks.intake.ingest import incoming_store

    store, dataset, _ = small
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    x, y = fresh_images(60)
    (outside / "data.parquet").write_bytes(batch_bytes(x, y))
    (outside / "authorized_keys").write_text("theirs")
    old = os.path.getmtime(outside) - 3 * 24 * 3600
    for f in outside.iterdir():
        os.utime(f, (old, old))
    os.makedirs(store.root, exist_ok=True)
    os.symlink(outside, os.path.join(store.root, "incoming"))
    warnings: list[str] = []
    store.warn = warnings.append
    ref, _ = ingest(store, dataset)
    assert ref.night == [] and not store.exists(store.batch_dir())
    assert sorted(p.name for p in outside.iterdir()) == ["authorized_keys", "data.parquet"]
    assert incoming_store(store).exists("data.parquet") is False
