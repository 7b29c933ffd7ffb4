"""Evaluation per slice: the test set as a balanced, stratified sample (reported), and the slices the gate
decides on (``mnist-selection``, ``new-data``: ``tasks.data.splits``), each predicted whole.

Accuracy on a balanced sample is the mean per-digit recall (balanced accuracy), so a model that
is weak on a rare digit cannot hide behind the common ones. Full test-set accuracy is computed
alongside, from the same forward pass. On every slice, balanced accuracy is the mean per-digit recall.
"""

from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
import pandas as pd
from pydantic import AliasChoices, BaseModel, Field, model_validator

from storage import DamagedArtifact, Digest, Store, StoreError, StoreKey, StoreName, code_digest, sha256_json
from storage.tables import PREDICTIONS_FILE, read_predictions, write_frame
from tasks.data.fetch import DatasetRef, load_mnist
from tasks.data.slices import slice_digest, slice_images
from tasks.data.splits import DECIDING_SLICES, SLICE_NEW, SLICE_SELECTION, SLICE_TEST
from tasks.evaluation.metrics import recall_per_digit
from tasks.training.model import ModelRef, scale
from tasks.training.rebuilt import DamagedModel, load_model

PREDICT_BATCH = 1024


MAX_IMAGES = 1_000_000  # more images than any slice or test set of ours holds (MNIST's test set: 10 000)
# What a reference of ours records, as pydantic checks it where the reference is loaded (``Store.load_ref``, a Prefect
# result record): a figure outside these bounds, a NaN or an infinity is a damaged reference (a miss: evaluated again),
# never a value a night copies into its own rows
Share = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
Images = Annotated[int, Field(ge=0, le=MAX_IMAGES)]
SliceName = Literal[SLICE_SELECTION, SLICE_NEW]  # DECIDING_SLICES: the slices ``_evaluate`` predicts


class SliceEvaluation(BaseModel):
    """One slice the gate decides on, predicted whole by the evaluated model."""

    name: SliceName
    predictions_key: StoreKey
    predictions_sha256: Digest
    images: Images
    accuracy: Share
    balanced_accuracy: Share  # mean per-digit recall on the slice


class EvaluationRef(BaseModel):
    key: StoreName
    predictions_key: StoreKey = Field(validation_alias=AliasChoices("predictions_key", "path"))  # the balanced sample's
    model_sha256: Digest
    dataset_sha256: Digest = Field(validation_alias=AliasChoices("dataset_sha256", "dataset_digest"))
    n_per_class: Images
    seed: int = Field(ge=-(2**63), lt=2**63)
    predictions_sha256: Digest
    test_predictions_key: StoreKey = Field(
        validation_alias=AliasChoices("test_predictions_key", "test_path")
    )  # every test image's prediction, for paired comparisons with another model
    test_predictions_sha256: Digest
    n_evaluated: Images
    test_images: Images
    test_accuracy: Share
    balanced_accuracy: Share  # on the test set's balanced sample: reported, never decided on
    # mnist-selection always, and new-data once a batch was accepted: each at most once, so the files a reader
    # hashes before trusting the reference are bounded by what ``_evaluate`` writes, not by the writer of the file
    slices: list[SliceEvaluation] = Field(default=[], max_length=len(DECIDING_SLICES))

    @model_validator(mode="after")
    def _our_slices(self) -> EvaluationRef:
        """The slices ``_evaluate`` predicts, each once, mnist-selection among them (it always has images): a
        reference without it would pass its digest check with nothing to check and fail the gate every night."""
        names = [s.name for s in self.slices]
        if len(set(names)) != len(names):
            raise ValueError(f"a slice is named twice ({names})")
        if SLICE_SELECTION not in names:
            raise ValueError(f"it has no {SLICE_SELECTION} slice, which every evaluation of ours predicts")
        return self

    def slice(self, name: str) -> SliceEvaluation | None:
        return next((s for s in self.slices if s.name == name), None)

    def files(self) -> dict[str, str]:
        """Every file this evaluation names, with its digest: what a reader checks before trusting it."""
        named = {self.predictions_key: self.predictions_sha256, self.test_predictions_key: self.test_predictions_sha256}
        return named | {s.predictions_key: s.predictions_sha256 for s in self.slices}


def evaluation_code() -> str:
    """The code that determines an evaluation's outputs: sampling, input scaling and prediction."""
    from tasks.data import batch_format, slices, splits  # which images each slice holds

    return code_digest(
        stratified_sample,
        scale,
        predict,
        predictions_frame,
        _evaluate,
        _predict_slice,
        balanced_accuracy,
        PREDICT_BATCH,
        splits,
        slices,
        batch_format,
    )


class ModelPredictionsRef(BaseModel):
    """Every image's prediction by one model on one slice, made by the evaluation code ``key`` names."""

    key: StoreName
    model_sha256: str
    file_key: StoreKey
    sha256: str


def model_predictions_key(model: ModelRef, dataset: DatasetRef, name: str = SLICE_TEST) -> str:
    """The model's bytes, the slice's images and the evaluation code: the same key for every evaluation of
    that model on that slice."""
    return sha256_json({"model": model.sha256, "slice": slice_digest(dataset, name), "code": evaluation_code()})[:32]


def stored_model_predictions(store: Store, model: ModelRef, key: str) -> ModelPredictionsRef | None:
    ref = store.load_ref(store.model_predictions_info_file(key), ModelPredictionsRef, lambda r: {r.file_key: r.sha256})
    return ref if ref is not None and ref.model_sha256 == model.sha256 else None


def publish_model_predictions(store: Store, model: ModelRef, key: str, path: str, sha256: str) -> ModelPredictionsRef:
    ref = ModelPredictionsRef(key=key, model_sha256=model.sha256, file_key=path, sha256=sha256)
    store.write_text(store.model_predictions_info_file(ref.key), ref.model_dump_json(indent=2))
    return ref


def predicted_labels(
    store: Store, dataset: DatasetRef, model: ModelRef, name: str = SLICE_TEST, labels: np.ndarray | None = None
) -> pd.DataFrame:
    """The model's predictions on every image of slice ``name``, in slice order: from a stored evaluation
    when there is one (no TensorFlow), else predicted now and stored for the next night. Stored predictions must be
    one row an image, in order (and, given the slice's ``labels``, of exactly those images), each value one our
    evaluation writes (``storage.tables.read_predictions``: digits 0–9, probabilities in [0, 1]): a frame a writer
    shortened, reordered or filled with a label of 120, its digest set to match, is a miss, predicted again."""
    key = model_predictions_key(model, dataset, name)
    stored = stored_model_predictions(store, model, key)
    if stored is not None:
        try:  # a file whose digest matches but that is not our frame is a miss, as a missing one is
            frame = read_predictions(store, stored.file_key, stored.sha256)
            frame = frame.sort_values("test_index").reset_index(drop=True)
            whole = np.array_equal(frame["test_index"].to_numpy(), np.arange(len(frame)))
            if labels is not None:
                whole = whole and np.array_equal(frame["true_label"].to_numpy(), np.asarray(labels))
            if not whole:
                raise DamagedArtifact("they are not one prediction for each of the slice's images, in order")
            return frame
        except (DamagedArtifact, KeyError, TypeError, ValueError) as exc:
            store.warn(f"The stored predictions of model {model.key} on {name} are damaged ({exc}): predicting again")
    images = slice_images(store, dataset, name)
    frame = predictions_frame(np.arange(len(images.y)), images.y, predict(load_model(store, model), images.x))
    path = write_frame(store, store.unique(store.slice_predictions_file(key, name)), PREDICTIONS_FILE, frame)
    publish_model_predictions(store, model, key, path, store.digest(path)[0])
    return frame.sort_values("test_index").reset_index(drop=True)


def balanced_accuracy(labels: np.ndarray, predicted: np.ndarray) -> float:
    """Mean per-digit recall over the digits present."""
    return float(np.nanmean(recall_per_digit(np.asarray(labels, np.int64), np.asarray(predicted, np.int64))))


def evaluation_key(dataset: DatasetRef, model: ModelRef, n_per_class: int, seed: int) -> str:
    slices = {name: slice_digest(dataset, name) for name in DECIDING_SLICES}
    return sha256_json(
        {"model": model.sha256, "n_per_class": n_per_class, "seed": seed, "slices": slices, "code": evaluation_code()}
    )[:32]


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
    """Class probabilities (float32) for uint8 images, in batches. A model that predicts NaN or infinite values is
    damaged (``DamagedModel``: set aside, or trained again), never written as predictions."""
    probabilities = np.asarray(model.predict(scale(images), batch_size=batch_size, verbose=0), dtype=np.float32)
    bad = int(probabilities.size - np.count_nonzero(np.isfinite(probabilities)))
    if bad:
        raise DamagedModel(f"the model predicted {bad} values that are not finite numbers (NaN or infinite): it is not used")
    return probabilities


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
    """The evaluation already made under ``key``, if its predictions are there, match their digest and hold values
    our evaluation writes (``read_predictions``). Plotting, the gate and the tables read these files: a frame whose
    digest a writer set to match but whose labels are 120 is a miss here, and the model is evaluated again, instead
    of failing the plot step or the gate."""
    ref = store.load_ref(store.evaluation_info_file(key), EvaluationRef, EvaluationRef.files)
    if ref is None:
        return None
    bounds = {ref.predictions_key: ref.test_images, ref.test_predictions_key: ref.test_images}
    bounds |= {part.predictions_key: part.images for part in ref.slices}
    try:
        for path, sha256 in ref.files().items():
            read_predictions(store, path, sha256, images=bounds[path])
    except (DamagedArtifact, StoreError, OSError) as exc:  # OSError: a folder or pipe put there since load_ref
        store.warn(f"The stored evaluation {key} is damaged ({exc}): the model is evaluated again")
        return None
    return ref


def evaluate_model(
    store: Store, dataset: DatasetRef, model_ref: ModelRef, n_per_class: int, seed: int, reuse: bool = True
) -> EvaluationRef:
    """Predict the whole test set once; keep the balanced sample's predictions in the store."""
    key = evaluation_key(dataset, model_ref, n_per_class, seed)
    with store.lock(f"evaluate-{key}"):
        if reuse and (existing := stored_evaluation(store, key)) is not None:
            return existing
        return _evaluate(store, dataset, model_ref, n_per_class, seed, key)


def _predict_slice(
    store: Store, dataset: DatasetRef, model_ref: ModelRef, model, name: str, key: str, mnist
) -> SliceEvaluation | None:
    images = slice_images(store, dataset, name, mnist)
    if not len(images.y):
        return None
    frame = predictions_frame(np.arange(len(images.y)), images.y, predict(model, images.x))
    path = write_frame(store, store.unique(store.slice_predictions_file(key, name)), PREDICTIONS_FILE, frame)
    sha256 = store.digest(path)[0]
    publish_model_predictions(store, model_ref, model_predictions_key(model_ref, dataset, name), path, sha256)
    predicted = frame["predicted_label"].to_numpy()
    return SliceEvaluation(
        name=name,
        predictions_key=path,
        predictions_sha256=sha256,
        images=len(images.y),
        accuracy=float((predicted == images.y).mean()),
        balanced_accuracy=balanced_accuracy(images.y, predicted),
    )


def _evaluate(store: Store, dataset: DatasetRef, model_ref: ModelRef, n_per_class: int, seed: int, key: str) -> EvaluationRef:
    mnist = load_mnist(store, dataset)
    sample = stratified_sample(mnist.y_test, n_per_class, seed)
    model = load_model(store, model_ref)
    probabilities = predict(model, mnist.x_test)
    predicted = probabilities.argmax(axis=1)
    frame = predictions_frame(sample, mnist.y_test[sample], probabilities[sample])
    path = write_frame(store, store.unique(store.evaluation_file(key)), PREDICTIONS_FILE, frame)
    everything = predictions_frame(np.arange(len(mnist.y_test)), mnist.y_test, probabilities)
    test_path = write_frame(store, store.unique(store.test_predictions_file(key)), PREDICTIONS_FILE, everything)
    slices = [_predict_slice(store, dataset, model_ref, model, name, key, mnist) for name in DECIDING_SLICES]
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
        slices=[s for s in slices if s is not None],
    )
    store.write_text(store.evaluation_info_file(key), ref.model_dump_json(indent=2))
    test_key = model_predictions_key(model_ref, dataset, SLICE_TEST)
    publish_model_predictions(store, model_ref, test_key, test_path, ref.test_predictions_sha256)
    return ref
