"""The champion pointer against every writer: a gate on one machine and a rollback on another, racing on a real
S3 endpoint (moto's) with no lock in common, many rounds in both orders. Each decision is kept, and the
pointer always names the champion of the last decision in ``promotions``. The models are stand-ins (their
files are bytes with digests; their stored predictions are what the gate pairs), so no network is trained."""

from __future__ import annotations

import contextlib
import random
import threading

import numpy as np
import pytest

from storage import Store
from tasks.champion.gate import GateRules
from tasks.champion.promotion import ChampionError, gate, promotions, read_pointer, rollback
from tasks.data.fetch import DatasetRef
from tasks.data.splits import SLICE_SELECTION, SLICE_TEST
from tasks.evaluation.evaluate import EvaluationRef
from tasks.training.model import ModelRef
from tests.conftest import stand_in as stand_in_model

N = 1000
LABELS = np.arange(N) % 10
SAMPLE = np.arange(0, N, 2)
PROMOTE = GateRules(min_balanced_accuracy=0.0, max_regression=1.0, max_digit_drop=1.0)
REJECT = GateRules(min_balanced_accuracy=1.0)
DATASET = DatasetRef(sha256="d" * 64, files={}, sources=["store"])  # not read: every model's predictions are stored


def stand_in(store: Store, key: str, correct: float) -> tuple[ModelRef, EvaluationRef]:
    """A model whose stored predictions are right on the first ``correct`` share of the images, on every slice."""
    predicted = np.where(np.arange(N) < correct * N, LABELS, (LABELS + 1) % 10)
    slices = (SLICE_SELECTION, SLICE_TEST)
    return stand_in_model(store, key, dict.fromkeys(slices, LABELS), dict.fromkeys(slices, predicted), DATASET, SAMPLE)


def champion_of_last_decision(store: Store) -> str:
    last = promotions(store).iloc[-1]
    return last["challenger_model_key"] if last["decision"] == "promoted" else last["champion_before_model_key"]


def racer(barrier: threading.Barrier, failures: list, what, args: tuple, delay: float) -> None:
    barrier.wait()
    threading.Event().wait(delay)
    try:
        what(*args)
    except ChampionError as exc:  # e.g. nothing to roll back to: a refusal, not expected here
        failures.append(exc)


@pytest.mark.slow
def test_a_rollback_racing_a_gate_loses_no_decision_and_leaves_the_pointer_consistent(s3_server):
    url = s3_server.bucket("race") + "/store"
    no_lock = lambda name: contextlib.nullcontext()  # noqa: E731 (two machines, no server: nothing in common)
    worker, laptop = Store(url, distributed_lock=no_lock), Store(url, distributed_lock=no_lock)
    models = {name: stand_in(worker, name, share) for name, share in (("a", 0.90), ("b", 0.95), ("c", 0.95))}
    gate(worker, DATASET, *models["a"], PROMOTE, "run-a")
    gate(worker, DATASET, *models["b"], PROMOTE, "run-b")
    rng = random.Random(7)
    rounds = 8  # each rule set, the two random delays swapped between the racers, twice
    for i in range(rounds):
        challenger = "c" if i % 2 else "a"
        rules = PROMOTE if i % 4 < 2 else REJECT
        barrier, failures = threading.Barrier(2), []
        first, second = rng.uniform(0, 0.05), rng.uniform(0, 0.05)
        order = (first, second) if i % 2 else (second, first)
        night = (gate, (worker, DATASET, *models[challenger], rules, f"run-{i}"))
        threads = [
            threading.Thread(target=racer, args=(barrier, failures, *night, order[0])),
            threading.Thread(target=racer, args=(barrier, failures, rollback, (laptop,), order[1])),
        ]
        before = len(promotions(worker))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not failures, failures
        assert len(promotions(worker)) == before + 2, f"round {i}: a decision was lost"
        assert read_pointer(worker).model_key == champion_of_last_decision(worker), f"round {i}: {promotions(worker).tail(3)}"
