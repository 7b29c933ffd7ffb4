"""Label caps count per night and per source, and a batch no champion could judge is not "passed every check".

Through the real ``ingest_batches`` on a real store, with a real champion: the seed network saved as a ``.keras``
file, its pointer and sidecar written as a promotion writes them, loaded and run by the ingest step itself. Its
last layer is set so that the judge is known: it predicts digit 0 for every image, confidently (``sure``) or with
no confidence at all (``unsure``). Against such a champion a batch labelled 1–9 carries a known excess of confident
disagreements (its rate on the batch, 100 %, less its own on the selection split, about 90 %).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from storage import Store, sha256_bytes
from tasks.champion.pointer import Champion, write_pointer
from tasks.data.batch_format import batch_bytes
from tasks.intake.checks import IngestRules
from tasks.intake.ingest import batch_records, incoming_store, ingest_batches
from tests.conftest import model_ref

CAP = 10  # max_excess_disagreements in these tests: each 40-image file below carries about 4
# The rate rule (a share over the champion's own) is left out: against a judge that is wrong on 90 % of the
# selection split, every batch labelled 1–9 would cross it; the count rule is what these tests are about.
RULES = IngestRules(max_excess_disagreements=CAP, max_disagreement_excess=1.0)


def install_champion(store: Store, tmp_path: Path, sure: bool) -> str:
    """The seed network, predicting 0 for every image (with probability ~1 if ``sure``, else 0.1 for each digit),
    saved and pointed at as the champion."""
    from tasks.training.model import build_model

    model = build_model("seed")
    dense = model.layers[-1]
    kernel, bias = dense.get_weights()
    bias[:] = 0.0
    if sure:
        bias[0] = 30.0
    dense.set_weights([np.zeros_like(kernel), bias])
    local = tmp_path / "judge.keras"
    model.save(local)
    data = local.read_bytes()
    key = "judge" + ("sure" if sure else "unsure")
    file_key = store.model_file(key)
    store.write_bytes(file_key, data)
    ref = model_ref(key=key, file_key=file_key, sha256=sha256_bytes(data), history_key=store.history_file(key))
    store.write_text(store.model_info_file(key), ref.model_dump_json())
    pointer = Champion(
        model_key=key,
        sha256=ref.sha256,
        run_id="run-0",
        selection_balanced_accuracy=0.1,
        test_accuracy=0.1,
        promoted_at=datetime.now(UTC),
        reason="a judge for the test",
    )
    write_pointer(store, pointer, None)
    return key


def nonzero_batch(seed: int, n: int = 40, source: str | None = None) -> bytes:
    """``n`` noise images (as the synthetic set's own), labelled 1–9 in turn: the judge disagrees with every label."""
    images = np.random.default_rng(1000 + seed).integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = 1 + np.arange(n) % 9
    return batch_bytes(images, labels, **({"source": source} if source else {}))


def night(store: Store, dataset, run_id: str, rules: IngestRules = RULES):
    lines: list[str] = []
    return ingest_batches(store, incoming_store(store), dataset, rules, run_id, log=lines.append), lines


@pytest.fixture
def judged(small, tmp_path):
    store, dataset, _ = small
    install_champion(store, tmp_path, sure=True)
    return store, dataset


def test_twenty_files_each_under_the_cap_are_not_all_accepted_in_one_night(judged):
    """Finding 6: 20 files, each carrying fewer confident disagreements than the cap, all were accepted. The cap
    now counts across the night: the accepted ones together stay under it, the rest are quarantined saying why."""
    store, dataset = judged
    incoming = incoming_store(store)
    for i in range(20):
        incoming.write_bytes(f"flip-{i:02d}.parquet", nonzero_batch(i))
    ref, _ = night(store, dataset, "run-1")
    assert len(ref.night) == 20
    excess = [r.row.excess_disagreements for r in ref.night]
    assert all(0 < e <= CAP for e in excess), excess  # each file alone is within the cap
    accepted = [r for r in ref.night if r.status == "accepted"]
    assert 0 < len(accepted) < 20
    assert sum(r.row.excess_disagreements for r in accepted) <= CAP
    refused = [r for r in ref.night if r.status == "quarantined"]
    assert all("counted over the night" in r.reason for r in refused), refused[0].reason


def test_a_source_is_capped_across_nights_and_another_source_is_not(judged):
    store, dataset = judged
    incoming = incoming_store(store)
    for i in range(2):
        incoming.write_bytes(f"a-{i}.parquet", nonzero_batch(i, source="scanner-7"))
    first, _ = night(store, dataset, "run-1")
    assert [r.status for r in first.night] == ["accepted", "accepted"]
    carried = sum(r.row.excess_disagreements for r in first.night)
    assert carried + first.night[0].row.excess_disagreements > CAP  # one more such batch would pass the cap
    incoming.write_bytes("b-0.parquet", nonzero_batch(10, source="scanner-7"))
    incoming.write_bytes("b-1.parquet", nonzero_batch(11, source="scanner-8"))
    second, _ = night(store, dataset, "run-2")
    by_source = {r.row.source: r for r in second.night}
    assert by_source["scanner-7"].status == "quarantined" and "counted over its source" in by_source["scanner-7"].reason
    assert by_source["scanner-8"].status == "accepted"


def test_without_a_champion_a_batch_waits_untouched(small):
    store, dataset, _ = small
    incoming = incoming_store(store)
    data = nonzero_batch(0)
    incoming.write_bytes("early.parquet", data)
    ref, lines = night(store, dataset, "run-1")
    assert ref.night == [] and batch_records(store) == [] and incoming.read_bytes("early.parquet") == data
    assert any("no intact champion to judge its labels" in line for line in lines)
    allowed = IngestRules(accept_unjudged_labels=True)
    ref, _ = night(store, dataset, "run-2", allowed)
    (record,) = ref.night
    assert record.status == "accepted" and record.reason.startswith("accepted without a label check")


def test_a_batch_the_champion_is_confident_about_none_of_is_quarantined_not_passed(small, tmp_path):
    store, dataset, _ = small
    install_champion(store, tmp_path, sure=False)
    incoming_store(store).write_bytes("vague.parquet", nonzero_batch(0))
    ref, _ = night(store, dataset, "run-1")
    (record,) = ref.night
    assert record.status == "quarantined" and "labels not judged" in record.reason
    assert "passed every check" not in record.reason
