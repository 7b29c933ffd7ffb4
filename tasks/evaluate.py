"""Balanced, stratified evaluation: the same number of test images of every digit, drawn without replacement.

Accuracy on a balanced sample is the mean per-digit recall (balanced accuracy), so a model that
is weak on a rare digit cannot hide behind the common ones. Full test-set accuracy is computed
alongside, from the same forward pass.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from pydantic import AliasChoices, BaseModel, Field

from storage import Store, StoreKey, StoreName, code_digest, sha256_json
from storage.tables import read_frame, write_frame
from tasks.fetch import DatasetRef, load_mnist
from tasks.model import ModelRef, load_model, scale

PREDICT_BATCH = 1024


class EvaluationRef(BaseModel):
    key: StoreName
    predictions_key: StoreKey = Field(validation_alias=AliasChoices("predictions_key", "path"))  # the balanced sample's
    model_sha256: str
    dataset_sha256: str = Field(validation_alias=AliasChoices("dataset_sha256", "dataset_digest"))
    n_per_class: int
    seed: int
    predictions_sha256: str
    test_predictions_key: StoreKey = Field(
        validation_alias=AliasChoices("test_predictions_key", "test_path")
    )  # every test image's prediction, for paired comparisons with another model
    test_predictions_sha256: str
    n_evaluated: int
    test_images: int
    test_accuracy: float
    balanced_accuracy: float


def evaluation_code() -> str:
    """The code that determines an evaluation's outputs: sampling, input scaling and prediction."""
    return code_digest(stratified_sample, scale, predict, predictions_frame, _evaluate, PREDICT_BATCH)


class ModelPredictionsRef(BaseModel):
    """Every test image's prediction by one model, made by the evaluation code ``key`` names."""

    key: StoreName
    model_sha256: str
    file_key: StoreKey
    sha256: str


def model_predictions_key(model: ModelRef) -> str:
    """The model's bytes and the evaluation code: the same key for every evaluation of that model."""
    return sha256_json({"model": model.sha256, "code": evaluation_code()})[:32]


def stored_model_predictions(store: Store, model: ModelRef) -> ModelPredictionsRef | None:
    ref = store.load_ref(
        store.model_predictions_info_file(model_predictions_key(model)), ModelPredictionsRef, lambda r: {r.file_key: r.sha256}
    )
    return ref if ref is not None and ref.model_sha256 == model.sha256 else None


def publish_model_predictions(store: Store, model: ModelRef, path: str, sha256: str) -> ModelPredictionsRef:
    ref = ModelPredictionsRef(key=model_predictions_key(model), model_sha256=model.sha256, file_key=path, sha256=sha256)
    store.write_text(store.model_predictions_info_file(ref.key), ref.model_dump_json(indent=2))
    return ref


def predicted_test_labels(store: Store, dataset: DatasetRef, model: ModelRef) -> np.ndarray:
    """The model's predicted label for every test image, in test-set order: from its stored evaluation when
    there is one (no TensorFlow), else predicted now and stored for the next night."""
    stored = stored_model_predictions(store, model)
    if stored is None:
        mnist = load_mnist(store, dataset)
        frame = predictions_frame(np.arange(len(mnist.y_test)), mnist.y_test, predict(load_model(store, model), mnist.x_test))
        path = write_frame(store, store.unique(store.test_predictions_file(model_predictions_key(model))), "predictions", frame)
        stored = publish_model_predictions(store, model, path, store.digest(path)[0])
    frame = read_frame(store, stored.file_key, stored.sha256).sort_values("test_index")
    return frame["predicted_label"].to_numpy()


def evaluation_key(model: ModelRef, n_per_class: int, seed: int) -> str:
    return sha256_json({"model": model.sha256, "n_per_class": n_per_class, "seed": seed, "code": evaluation_code()})[:32]


def stratified_sample(labels: np.ndarray, n_per_class: int, seed: int) -> np.ndarray:
    """Test indices: exactly ``n_per_class`` of each digit, no index twice, the same for the same seed."""
    if n_per_class < 1:
        raise ValueError(f"n_per_class={n_per_class} must be at least 1")
    classes, counts = np.unique(labels, return_counts=True)
    rarest = int(np.argmin(counts))
    if n_per_class > counts[rarest]:
        raise ValueError(
            f"n_per_class={n_per_class} is more than the rarest digit has: digit {classes[rarest]} has only "
            f"{counts[rarest]} test images. Choose n_per_class between 1 and {counts[rarest]}."
        )
    rng = np.random.default_rng(seed)
    picks = [np.sort(rng.choice(np.flatnonzero(labels == c), size=n_per_class, replace=False)) for c in classes]
    return np.concatenate(picks)


def predict(model, images: np.ndarray, batch_size: int = PREDICT_BATCH) -> np.ndarray:
    """Class probabilities (float32) for uint8 images, in batches."""
    return np.asarray(model.predict(scale(images), batch_size=batch_size, verbose=0), dtype=np.float32)


def predictions_frame(indices: np.ndarray, labels: np.ndarray, probabilities: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "test_index": indices.astype(np.int32),
            "true_label": labels.astype(np.int8),
            "predicted_label": probabilities.argmax(axis=1).astype(np.int8),
            "confidence": probabilities.max(axis=1).astype(np.float32),
            "probabilities": list(probabilities.astype(np.float32)),
        }
    )


def stored_evaluation(store: Store, key: str) -> EvaluationRef | None:
    """The evaluation already made under ``key``, if its predictions are there and match their digest."""
    return store.load_ref(
        store.evaluation_info_file(key),
        EvaluationRef,
        lambda ref: {ref.predictions_key: ref.predictions_sha256, ref.test_predictions_key: ref.test_predictions_sha256},
    )


def evaluate_model(
    store: Store, dataset: DatasetRef, model_ref: ModelRef, n_per_class: int, seed: int, reuse: bool = True
) -> EvaluationRef:
    """Predict the whole test set once; keep the balanced sample's predictions in the store."""
    key = evaluation_key(model_ref, n_per_class, seed)
    with store.lock(f"evaluate-{key}"):
        if reuse and (existing := stored_evaluation(store, key)) is not None:
            return existing
        return _evaluate(store, dataset, model_ref, n_per_class, seed, key)


def _evaluate(store: Store, dataset: DatasetRef, model_ref: ModelRef, n_per_class: int, seed: int, key: str) -> EvaluationRef:
    mnist = load_mnist(store, dataset)
    sample = stratified_sample(mnist.y_test, n_per_class, seed)
    model = load_model(store, model_ref)
    probabilities = predict(model, mnist.x_test)
    predicted = probabilities.argmax(axis=1)
    frame = predictions_frame(sample, mnist.y_test[sample], probabilities[sample])
    path = write_frame(store, store.unique(store.evaluation_file(key)), "predictions", frame)
    everything = predictions_frame(np.arange(len(mnist.y_test)), mnist.y_test, probabilities)
    test_path = write_frame(store, store.unique(store.test_predictions_file(key)), "predictions", everything)
    ref = EvaluationRef(
        key=key,
        predictions_key=path,
        model_sha256=model_ref.sha256,
        predictions_sha256=store.digest(path)[0],
        test_predictions_key=test_path,
        test_predictions_sha256=store.digest(test_path)[0],
        dataset_sha256=dataset.sha256,
        n_per_class=n_per_class,
        seed=seed,
        n_evaluated=len(sample),
        test_images=len(mnist.y_test),
        test_accuracy=float((predicted == mnist.y_test).mean()),
        balanced_accuracy=float((frame["predicted_label"] == frame["true_label"]).mean()),
    )
    store.write_text(store.evaluation_info_file(key), ref.model_dump_json(indent=2))
    publish_model_predictions(store, model_ref, test_path, ref.test_predictions_sha256)
    return ref
