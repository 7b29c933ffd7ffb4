"""The networks the pipeline can train. ``seed`` is the seed notebook's network, layer for layer."""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # Keras loads TensorFlow (seconds): only the builders need it
    import keras

INPUT_SHAPE = (28, 28, 1)
NUM_CLASSES = 10


class ModelName(str, Enum):
    """The choices of the ``model`` parameter, as the Prefect UI offers them."""

    seed = "seed"


def build_seed_model() -> "keras.Model":
    """Input 28x28x1 → Conv 32 3x3 → Pool 2 → Conv 64 3x3 → Pool 2 → Flatten → Dropout 0.3 → Dense 10 softmax.

    The softmax layer computes in float32 even under a mixed-precision policy, as Keras recommends,
    so probabilities and the loss keep full precision on a GPU.
    """
    import keras
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


BUILDERS: dict[ModelName, Callable[[], "keras.Model"]] = {ModelName.seed: build_seed_model}


def build_model(name: ModelName | str) -> "keras.Model":
    try:
        return BUILDERS[ModelName(name)]()
    except ValueError as exc:
        choices = ", ".join(m.value for m in ModelName)
        raise ValueError(f"model {name!r} is unknown; choose one of: {choices}") from exc
