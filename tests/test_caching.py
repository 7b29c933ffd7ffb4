"""Cross-run caching: keys follow content, a parameter change invalidates exactly its steps, damaged hits recompute."""

from __future__ import annotations

import pytest

from flows.night import caching
from flows.night.params import PipelineParameters
from storage import Store
from tasks.champion.gate import GateRules
from tasks.data.fetch import DatasetRef, StoredFile
from tasks.evaluation.evaluate import EvaluationRef, SliceEvaluation
from tasks.training.model import ModelRef
from tasks.training.train import TrainConfig
from tests.conftest import model_ref, with_mnist


def dataset(digest: str = "d" * 64) -> DatasetRef:
    return DatasetRef(sha256=digest, files={"x": StoredFile(name="x", path="x", sha256="0" * 64, size=1)}, sources=["store"])


def model(sha: str = "a" * 64, key: str = "k1") -> ModelRef:
    return model_ref(key=key, sha256=sha)


def evaluation(key: str = "e1") -> EvaluationRef:
    return EvaluationRef(
        key=key,
        path="p",
        model_sha256="a" * 64,
        dataset_sha256="d" * 64,
        predictions_sha256="p" * 64,
        test_path="t",
        test_predictions_sha256="t" * 64,
        n_per_class=5,
        seed=0,
        n_evaluated=50,
        test_images=100,
        test_accuracy=0.5,
        balanced_accuracy=0.5,
        slices=[
            SliceEvaluation(
                name="mnist-selection",
                predictions_key="s",
                predictions_sha256="s" * 64,
                images=10,
                accuracy=0.5,
                balanced_accuracy=0.5,
            )
        ],
    )


def keys(
    config: TrainConfig, n_per_class: int = 800, seed: int = 0, ds: DatasetRef | None = None, m: ModelRef | None = None
) -> dict[str, str]:
    ds = ds or dataset()
    m = m or model()
    return {
        "fetch": caching.FETCH.content_key({}),
        "train": caching.TRAIN.content_key({"dataset": ds, "config": config}),
        "evaluate": caching.EVALUATE.content_key({"dataset": ds, "model": m, "n_per_class": n_per_class, "seed": seed}),
    }


def changed(a: dict[str, str], b: dict[str, str]) -> set[str]:
    return {step for step in a if a[step] != b[step]}


def test_same_inputs_same_keys_across_runs():
    assert keys(TrainConfig()) == keys(TrainConfig())


@pytest.mark.parametrize(
    "field, value", [("epochs", 3), ("batch_size", 64), ("seed", 7), ("train_limit", 6000), ("precision", "float32")]
)
def test_a_training_parameter_invalidates_training_only(field, value):
    # evaluation follows through the model digest, which a retrain changes (next test)
    assert changed(keys(TrainConfig()), keys(TrainConfig(**{field: value}))) == {"train"}


def test_an_accepted_batch_changes_the_dataset_version_so_training_and_evaluation_rerun():
    from tasks.data.batch_format import AcceptedBatch, BatchPart

    part = BatchPart(key="batches/x/train.parquet", sha256="1" * 64, size=1, rows=1)
    grown = dataset().model_copy(update={"batches": [AcceptedBatch(digest="2" * 64, train=part, holdout=part)]})
    assert grown.version != dataset().version and dataset().version == dataset().sha256  # nothing new: MNIST's own
    assert changed(keys(TrainConfig()), keys(TrainConfig(), ds=grown)) == {"train", "evaluate"}


def test_a_new_model_digest_invalidates_evaluation_not_training():
    assert changed(keys(TrainConfig()), keys(TrainConfig(), m=model(sha="b" * 64))) == {"evaluate"}


def test_evaluation_parameters_invalidate_evaluation_only():
    base = keys(TrainConfig())
    assert changed(base, keys(TrainConfig(), n_per_class=100)) == {"evaluate"}


def test_other_data_invalidates_training_not_the_download():
    # other MNIST bytes are other selection and test images too, so the evaluation follows
    assert changed(keys(TrainConfig()), keys(TrainConfig(), ds=dataset("e" * 64))) == {"train", "evaluate"}


def test_plots_follow_the_evaluation_and_the_training_history():
    def plot_key(m: ModelRef, e: EvaluationRef) -> str:
        return caching.PLOT.content_key({"model": m, "evaluation": e})

    base = plot_key(model(), evaluation())
    assert plot_key(model(), evaluation("e2")) != base
    assert plot_key(model(key="k2"), evaluation()) != base
    assert plot_key(model(sha="c" * 64), evaluation()) == base


def test_compute_key_names_the_step_and_has_no_side_effect(tmp_path):
    store = Store(tmp_path / "store")
    store.write_text(store.result_record("evaluate-x"), "{}")
    inputs = {"store_url": store.url, "dataset": dataset(), "model": model(), "n_per_class": 5, "seed": 0}
    key = caching.EVALUATE.compute_key(None, inputs, {})
    assert key.startswith(f"evaluate-{caching.EVALUATE.content_key(inputs)}-") and store.exists(store.result_record("evaluate-x"))
    store.write_text(store.result_record(key), "{}")  # a record whose predictions are not in the store
    assert caching.EVALUATE.forget_stale_record(inputs) and not store.exists(store.result_record(key))


@pytest.mark.slow
def test_runs_reuse_every_heavy_step_recompute_a_damaged_one_and_hit_in_a_copied_store(
    mnist_store: Store, prefect_harness, tmp_path, monkeypatch
):
    from flows.night.pipeline import mnist_retrain

    store = Store(tmp_path / "store")
    store.fs.makedirs(store.path("objects"), exist_ok=True)
    with_mnist(store, mnist_store)
    params = PipelineParameters(epochs=1, train_limit=1000, n_per_class=10, seed=3, store=store.url)

    def cacheable(summary) -> dict[str, str]:  # ingest, gate, tabulate and report run every night
        return {
            step: state for step, state in summary.step_states.items() if step in ("fetch-mnist", "train", "evaluate", "plot")
        }

    first = mnist_retrain(params)
    assert list(first.step_states) == ["fetch-mnist", "ingest", "train", "evaluate", "plot", "gate", "tabulate", "report"]
    assert first.step_states["train"] == "Completed" and first.step_states["evaluate"] == "Completed"

    second = mnist_retrain(params)
    assert cacheable(second) == {"fetch-mnist": "Cached", "train": "Cached", "evaluate": "Cached", "plot": "Cached"}
    assert second.model_path == first.model_path and second.test_accuracy == first.test_accuracy
    assert second.run_id != first.run_id  # tables and report are the record of each run

    # the code a key names: a new sampler recomputes the evaluation (and so its plots), not the training
    import tasks.evaluation.evaluate
    import tasks.evaluation.plots

    sampler = tasks.evaluation.evaluate.stratified_sample
    monkeypatch.setattr(tasks.evaluation.evaluate, "stratified_sample", lambda labels, n, seed: sampler(labels, n, seed + 0))
    edited = mnist_retrain(params)
    assert cacheable(edited) == {"fetch-mnist": "Cached", "train": "Cached", "evaluate": "Completed", "plot": "Completed"}
    monkeypatch.setattr(tasks.evaluation.evaluate, "stratified_sample", sampler)
    # a metric the plots draw: plots recompute, evaluation is served from the cache
    per_class = tasks.evaluation.plots.per_class_frame
    monkeypatch.setattr(tasks.evaluation.plots, "per_class_frame", lambda cm: per_class(cm).copy())
    replotted = mnist_retrain(params)
    assert cacheable(replotted) == {"fetch-mnist": "Cached", "train": "Cached", "evaluate": "Cached", "plot": "Completed"}
    monkeypatch.setattr(tasks.evaluation.plots, "per_class_frame", per_class)

    store.remove(first.model_path)  # a cache hit whose file is gone must be recomputed, not crash
    third = mnist_retrain(params)
    assert third.step_states["fetch-mnist"] == "Cached" and third.step_states["train"] == "Completed"
    assert store.exists(third.model_path)

    refreshed = mnist_retrain(params.model_copy(update={"refresh": True}))
    assert refreshed.step_states["fetch-mnist"] == "Cached"
    assert {refreshed.step_states[s] for s in ("train", "evaluate", "plot")} == {"Completed"}

    # references and sidecars name files relative to the store: a copied (or synced, or renamed) store still hits
    import shutil

    shutil.copytree(store.root, tmp_path / "copy")
    shutil.rmtree(store.root)  # nothing may still point at the old place
    copied = mnist_retrain(params.model_copy(update={"store": str(tmp_path / "copy")}))
    assert cacheable(copied) == {"fetch-mnist": "Cached", "train": "Cached", "evaluate": "Cached", "plot": "Cached"}
    assert copied.model_path.startswith(str(tmp_path / "copy")) and copied.test_accuracy == refreshed.test_accuracy


@pytest.mark.slow
def test_an_empty_seed_follows_the_data_and_new_seed_draws_one(mnist_store: Store, prefect_harness, tmp_path):
    import json

    from flows.night.pipeline import mnist_retrain
    from storage.tables import read_table

    store = Store(tmp_path / "store")
    with_mnist(store, mnist_store)
    params = PipelineParameters(epochs=1, train_limit=500, n_per_class=5, seed=None, store=store.url)
    a, b = mnist_retrain(params), mnist_retrain(params)  # nothing new arrived: the same seed, the same model
    assert a.seed == b.seed and b.step_states["train"] == "Cached" and b.dataset_version == a.dataset_version
    c = mnist_retrain(params.model_copy(update={"new_seed": True}))  # asked to: a seed from the run id, a new model
    assert c.seed != a.seed and c.step_states["fetch-mnist"] == "Cached" and c.step_states["train"] == "Completed"
    runs = read_table(store, "runs").set_index("run_id")
    assert (
        json.loads(runs.loc[a.run_id, "parameters"])["seed"] == a.seed
        and json.loads(runs.loc[c.run_id, "parameters"])["seed"] == c.seed
    )


def test_references_written_by_the_previous_version_still_load(tmp_path):
    """Stores made before the renames: `model` → `network`, `digest` → `sha256`; a sidecar of another shape is a miss."""
    old_model = model().model_dump() | {"model": "seed"}
    del old_model["network"]
    assert ModelRef.model_validate(old_model).network == "seed"
    old_dataset = dataset().model_dump() | {"digest": "e" * 64}
    del old_dataset["sha256"]
    assert DatasetRef.model_validate(old_dataset).sha256 == "e" * 64
    store = Store(tmp_path / "store")
    store.write_text("evaluations/k/evaluation.json", '{"key": "k", "path": "/p"}')  # an evaluation of an older layout
    assert store.load_ref("evaluations/k/evaluation.json", EvaluationRef, lambda ref: {}) is None


@pytest.mark.slow
def test_a_cached_night_whose_champion_is_another_runs_model_imports_no_tensorflow(mnist_store: Store, prefect_api, tmp_path):
    """The gate pairs the champion's stored predictions (its own evaluation's), so a fully cached night loads no model."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from flows.night.pipeline import mnist_retrain

    store = with_mnist(Store(tmp_path / "store"), mnist_store)
    base = PipelineParameters(epochs=1, train_limit=1000, n_per_class=10, store=store.url, gate={"min_balanced_accuracy": 0.1})
    champion = mnist_retrain(base.model_copy(update={"seed": 1}))
    assert champion.decision == "promoted"
    night = base.model_copy(update={"seed": 2, "gate": GateRules(min_balanced_accuracy=0.999)})  # rejected: champion stays
    first = mnist_retrain(night)
    assert first.decision == "rejected" and first.champion_run_id == champion.run_id
    script = (
        "import json, sys\n"
        "from flows.night.params import PipelineParameters\n"
        "from flows.night.pipeline import mnist_retrain\n"
        f"summary = mnist_retrain(PipelineParameters.model_validate_json({night.model_dump_json()!r}))\n"
        "print(json.dumps({'states': summary.step_states, 'decision': summary.decision,"
        " 'champion': summary.champion_run_id, 'tensorflow': 'tensorflow' in sys.modules}))\n"
    )
    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "fresh-home"), "PYTHONPATH": str(repo), **prefect_api}
    done = subprocess.run([sys.executable, "-c", script], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    again = json.loads(done.stdout.strip().splitlines()[-1])
    cacheable = {k: again["states"][k] for k in ("fetch-mnist", "train", "evaluate", "plot")}  # the rest run every night
    assert set(cacheable.values()) == {"Cached"} and again["decision"] == "rejected"
    assert again["champion"] == champion.run_id and again["tensorflow"] is False


@pytest.mark.slow
def test_a_night_whose_cached_model_is_damaged_trains_it_again_and_decides(mnist_store: Store, prefect_harness, tmp_path):
    """Review 8 f1/f3: the night's own model, a cache hit on its training key, whose weights a writer set to NaN with
    its digest set to match (nothing the lookup reads without TensorFlow shows it): the evaluation's load finds it
    damaged, and the night's next try trains the model again instead of handing back the same cached model three
    times and failing, as every later night with that data did."""
    from pathlib import Path

    from flows.night.pipeline import mnist_retrain
    from storage import sha256_bytes
    from tasks.training.rebuilt import load_model
    from tasks.training.train import stored_model
    from tests.conftest import with_nan_weights

    store = with_mnist(Store(tmp_path / "store"), mnist_store)
    params = PipelineParameters(
        epochs=1, train_limit=500, n_per_class=5, seed=3, store=store.url, gate={"min_balanced_accuracy": 0.999}
    )
    first = mnist_retrain(params)
    assert first.decision == "rejected"  # no champion: only the night's own model is planted
    key = Path(first.model_path).parent.name
    ref = stored_model(store, key)
    planted = with_nan_weights(Path(store.path(ref.file_key)), tmp_path / "nan.keras")
    Path(store.path(ref.file_key)).write_bytes(planted)
    store.write_text(store.model_info_file(key), ref.model_copy(update={"sha256": sha256_bytes(planted)}).model_dump_json())
    second = mnist_retrain(params)
    assert second.decision == "rejected" and second.step_states["train"] == "Completed"  # trained again, and decided
    again = stored_model(store, key)
    assert again.sha256 != sha256_bytes(planted)
    load_model(store, again)  # finite weights
