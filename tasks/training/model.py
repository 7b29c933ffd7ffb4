"""The networks the pipeline can train (``seed`` is the seed notebook's network, layer for layer) and their input
scaling. A stored one is loaded by rebuilding it here and reading only its weights (``tasks.training.rebuilt``)."""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from pydantic import AliasChoices, BaseModel, Field

from storage import Digest, StoreKey, StoreName
from storage.tables import NUM_CLASSES
from tasks.training.config import DEFAULT_EPOCHS, ModelName  # noqa: F401 (their home before; imported from here)
from tasks.training.keras_runtime import import_keras

if TYPE_CHECKING:  # Keras loads TensorFlow (seconds): only the builders need it
    import keras

INPUT_SHAPE = (28, 28, 1)
MAX_EPOCHS = 10_000  # more epochs than any training of ours runs
MAX_TRAIN_IMAGES = 100_000_000  # more images than any training set of ours holds
# each network's count_params() as built here (tests/test_model.py checks it): what bounds a weight file read from the
# store before a value is read (tasks/training/checkpoints.py)
PARAMETERS: dict[ModelName, int] = {ModelName.seed: 34_826, ModelName.strong: 198_442}


class ModelRef(BaseModel):
    """A trained model in the store: a reference and a digest, never the weights themselves."""

    # Bounded where the reference is loaded (a sidecar, a Prefect result record): names are short words, counts and
    # figures in range and finite, so no value a writer chose reaches a night's rows or reasons unchecked (review 8)
    key: StoreName  # the training key
    file_key: StoreKey = Field(validation_alias=AliasChoices("file_key", "path"))  # the .keras file ("path" before)
    sha256: Digest
    history_key: StoreKey = Field(validation_alias=AliasChoices("history_key", "history_path"))
    network: str = Field(
        validation_alias=AliasChoices("network", "model"), max_length=64
    )  # the ModelName it was built from ("model" before)
    backend: str = Field("tensorflow", max_length=64)  # the Keras backend it was trained on (before the choice: TensorFlow)
    device: str = Field(max_length=64)
    precision: str = Field(max_length=64)
    epochs: int = Field(ge=0, le=MAX_EPOCHS)
    resumed_from_epoch: int = Field(ge=0, le=MAX_EPOCHS)
    train_images: int = Field(ge=0, le=MAX_TRAIN_IMAGES)
    train_seconds: float = Field(ge=0.0, le=1e7, allow_inf_nan=False)
    val_accuracy: float = Field(ge=0.0, le=1.0, allow_inf_nan=False)
    # trained without the mnist-selection split (``tasks.data.splits``); False for models made before the split existed,
    # which trained on all 60 000 images: the gate does not compare them on images they learned
    selection_held_out: bool = False


def build_seed_model() -> keras.Model:
    """Input 28x28x1 → Conv 32 3x3 → Pool 2 → Conv 64 3x3 → Pool 2 → Flatten → Dropout 0.3 → Dense 10 softmax.

    The softmax layer computes in float32 even under a mixed-precision policy, as Keras recommends,
    so probabilities and the loss keep full precision on a GPU.
    """
    keras = import_keras()
    from keras import layers

    return keras.Sequential(
        [
            keras.Input(shape=INPUT_SHAPE),
            layers.Conv2D(32, kernel_size=(3, 3), activation="relu"),
            layers.MaxPooling2D(pool_size=(2, 2)),
            layers.Conv2D(64, kernel_size=(3, 3), activation="relu"),
            layers.MaxPooling2D(pool_size=(2, 2)),
            layers.Flatten(),
            layers.Dropout(0.3),
            layers.Dense(NUM_CLASSES, activation="softmax", dtype="float32"),
        ],
        name="seed_cnn",
    )


def build_strong_model() -> keras.Model:
    """An option for when accuracy matters more than time: about 4x the seed's compute.

    Two 3x3 convolutions per stage with batch normalisation, light augmentation that is active
    only while training (small rotations, shifts and zooms: digits stay digits), and more
    dropout; trained with a cosine learning-rate schedule and weight averaging (``make_optimizer``).
    """
    keras = import_keras()
    from keras import layers

    def conv_bn(filters: int) -> list:
        return [layers.Conv2D(filters, 3, use_bias=False), layers.BatchNormalization(), layers.Activation("relu")]

    return keras.Sequential(
        [
            keras.Input(shape=INPUT_SHAPE),
            layers.RandomRotation(0.04, fill_mode="constant"),
            layers.RandomTranslation(0.08, 0.08, fill_mode="constant"),
            layers.RandomZoom(0.08, fill_mode="constant"),
            *conv_bn(32),
            *conv_bn(32),
            layers.MaxPooling2D(2),
            layers.Dropout(0.1),
            *conv_bn(64),
            *conv_bn(64),
            layers.MaxPooling2D(2),
            layers.Dropout(0.1),
            layers.Flatten(),
            layers.Dense(128, use_bias=False),
            layers.BatchNormalization(),
            layers.Activation("relu"),
            layers.Dropout(0.4),
            layers.Dense(NUM_CLASSES, activation="softmax", dtype="float32"),
        ],
        name="strong_cnn",
    )


LABEL_SMOOTHING: dict[ModelName, float] = {ModelName.seed: 0.0, ModelName.strong: 0.1}


def loss_and_targets(name: ModelName | str, labels: np.ndarray):
    """The loss and the labels it is given. The seed network trains on sparse labels, as the notebook did;
    ``strong`` on one-hot labels smoothed to 0.91 / 0.01, which keeps its long schedule from growing
    over-confident on the few ambiguous digits."""
    smoothing = LABEL_SMOOTHING[ModelName(name)]
    if not smoothing:
        return "sparse_categorical_crossentropy", labels
    keras = import_keras()
    return keras.losses.CategoricalCrossentropy(label_smoothing=smoothing), np.eye(NUM_CLASSES, dtype=np.float32)[labels]


def ema_momentum(total_steps: int) -> float:
    """0.999 (an average over ~1 000 steps) for full runs; shorter runs average over their last ~5th.

    Keras' moving average has no bias correction, so a fixed 0.999 over a 20-step smoke run would
    hand back weights barely moved from their initialisation.
    """
    return min(0.999, max(0.0, 1.0 - 5.0 / max(total_steps, 1)))


def make_optimizer(name: ModelName | str, base: float, total_steps: int) -> keras.optimizers.Optimizer:
    """Adam with an exponential moving average of the weights, which Keras swaps in when ``fit`` ends.

    The average costs nothing measurable per step and steadies the final weights (measured on the
    seed network here: 0.9926 / 0.9920 test accuracy for seeds 0 / 1, against 0.9918 without).
    The seed trains at Adam's constant rate, as the notebook did; ``strong`` warms up, then decays
    on a cosine.
    """
    keras = import_keras()

    ema = ema_momentum(total_steps)
    if ModelName(name) is ModelName.seed:
        return keras.optimizers.Adam(learning_rate=base, use_ema=True, ema_momentum=ema)
    warmup = max(total_steps // 20, 1)
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=base / 10,
        decay_steps=max(total_steps - warmup, 1),
        alpha=0.01,
        warmup_target=base * 2,
        warmup_steps=warmup,
    )
    return keras.optimizers.Adam(learning_rate=schedule, use_ema=True, ema_momentum=ema)


Shift = tuple[int, int]  # (down, right) in pixels; negative: up, left

# The views of each image a saved model averages its probabilities over (test-time augmentation inside the
# .keras file, so the gate, the tables and every downstream loader see one model and the same predictions).
# The seed network is saved as trained: it is the user's model, layer for layer.
SERVING_SHIFTS: dict[ModelName, tuple[Shift, ...]] = {
    ModelName.seed: (),
    # one and two pixels down, up, right, left: chosen on mnist-selection among four view sets (docs/benchmarks.md)
    ModelName.strong: ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1), (2, 0), (-2, 0), (0, 2), (0, -2)),
}


def _shift_layers(down: int, right: int) -> list:
    """Zero-pad one side and crop the other: the image moved by whole pixels, built-in layers only
    (a ``Lambda`` would make the file unloadable with ``safe_mode``). float32, so the unshifted view is
    bit for bit the network's own input."""
    from keras import layers

    words = {"down": max(down, 0), "up": max(-down, 0), "right": max(right, 0), "left": max(-right, 0)}
    name = "shift_" + "_".join(f"{word}{n}" for word, n in words.items() if n)
    pad = ((words["down"], words["up"]), (words["right"], words["left"]))
    crop = ((words["up"], words["down"]), (words["left"], words["right"]))
    return [
        layers.ZeroPadding2D(pad, dtype="float32", name=f"{name}_pad"),
        layers.Cropping2D(crop, dtype="float32", name=f"{name}_crop"),
    ]


def averaged_over_shifts(model: keras.Model, shifts: tuple[Shift, ...]) -> keras.Model:
    """``model`` wrapped to predict the mean of its probabilities over the shifted views of its input;
    ``model`` itself unchanged when there is at most the identity view. The wrapper shares the weights."""
    if not shifts or shifts == ((0, 0),):
        return model
    keras = import_keras()
    from keras import layers

    images = keras.Input(shape=INPUT_SHAPE, name="images")
    views = []
    for down, right in shifts:
        view = images
        for layer in _shift_layers(down, right) if (down, right) != (0, 0) else []:
            view = layer(view)
        views.append(model(view))
    mean = layers.Average(dtype="float32", name="mean_over_views")(views)
    return keras.Model(images, mean, name=f"{model.name}_over_{len(shifts)}_views")


def for_serving(name: ModelName | str, model: keras.Model) -> keras.Model:
    """The model as it is saved and served: the trained network with its ``SERVING_SHIFTS``."""
    return averaged_over_shifts(model, SERVING_SHIFTS[ModelName(name)])


BUILDERS: dict[ModelName, Callable[[], keras.Model]] = {ModelName.seed: build_seed_model, ModelName.strong: build_strong_model}


def build_model(name: ModelName | str) -> keras.Model:
    try:
        return BUILDERS[ModelName(name)]()
    except ValueError as exc:
        choices = ", ".join(m.value for m in ModelName)
        raise ValueError(f"model {name!r} is unknown; choose one of: {choices}") from exc


def scale(images: np.ndarray) -> np.ndarray:
    """uint8 28x28 → float32 28x28x1 in [0, 1], the network's input."""
    return (images.astype(np.float32) / 255.0)[..., np.newaxis]


# The network code a trained model depends on: part of the training key (``tasks.training.train.training_code``).
NETWORK_CODE = (
    build_seed_model,
    build_strong_model,
    build_model,
    make_optimizer,
    ema_momentum,
    loss_and_targets,
    LABEL_SMOOTHING,
    SERVING_SHIFTS,
    _shift_layers,
    averaged_over_shifts,
    for_serving,
    scale,
    INPUT_SHAPE,
)


def stamp_keras_file(path: str, **facts: str) -> None:
    """Add ``facts`` (the backend it was trained on, say) to the ``metadata.json`` inside a ``.keras`` file.

    Keras writes its version and date there and ignores other keys when loading, so the file itself
    says how it was made, wherever it is copied.
    """
    with zipfile.ZipFile(path) as source:
        entries = [(info, source.read(info)) for info in source.infolist()]
    with zipfile.ZipFile(path, "w") as target:
        for info, data in entries:
            if info.filename == "metadata.json":
                data = json.dumps({**json.loads(data), **facts}).encode()
            target.writestr(info, data)


def keras_file_metadata(path: str) -> dict:
    with zipfile.ZipFile(path) as archive:
        return json.loads(archive.read("metadata.json"))
