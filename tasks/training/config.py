"""What a training is configured by: everything that changes the trained weights (its digest is part of the
training key), with the titles, bounds and descriptions the flow's parameters and the UI form reuse."""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks.training.backends import Backend
from tasks.training.precision import Precision

TRAIN_IMAGES = 60_000
SEED_MAX = 2**31 - 1
MAX_TRAIN_EPOCHS = 500  # the most epochs a training is asked for; also what bounds a checkpoint's history


class ModelName(str, Enum):
    """The choices of the ``model`` parameter, as the Prefect UI offers them."""

    seed = "seed"
    strong = "strong"


DEFAULT_EPOCHS: dict[ModelName, int] = {
    ModelName.seed: 15,  # the seed notebook's
    ModelName.strong: 40,  # measured: docs/benchmarks.md (13-14 min on a 2-core CPU with bf16, about 40 min without)
}


class TrainConfig(BaseModel):
    """Everything that changes the trained weights; its digest is part of the training key.

    The flow's parameters reuse these fields (titles, bounds, descriptions), so the UI form and a
    direct call of ``train_model`` accept exactly the same values.
    """

    model_config = ConfigDict(extra="forbid")

    model: ModelName = Field(
        ModelName.seed,
        title="Model",
        description="Network to train: `seed`, the default small CNN (two 3x3 convolutions, 32 and 64 filters, each "
        "followed by 2x2 pooling, then dropout and a softmax layer), or `strong`, a deeper one (about 4x the compute).",
    )
    epochs: int | None = Field(
        None,
        ge=1,
        le=MAX_TRAIN_EPOCHS,
        title="Epochs",
        description=f"Training epochs (1–{MAX_TRAIN_EPOCHS}). Empty: the model's own default, "
        + ", ".join(f"{m.value} {n}" for m, n in DEFAULT_EPOCHS.items())
        + ".",
    )
    batch_size: int = Field(128, ge=1, le=8192, title="Batch size", description="Training batch size (1–8192).")
    seed: int = Field(
        0, ge=0, le=SEED_MAX, title="Seed", description=f"Seeds initialisation, shuffling and subsets (0–{SEED_MAX})."
    )
    train_limit: int | None = Field(
        None,
        ge=100,
        le=TRAIN_IMAGES,
        title="Training images",
        description=f"Train on a stratified subset of this many images (100–{TRAIN_IMAGES}); empty for all 60 000.",
    )
    precision: Precision = Field(
        Precision.auto,
        title="Precision",
        description="Keras dtype policy; `auto` uses mixed_float16 on a GPU, mixed_bfloat16 on a CPU with native bf16, else float32.",
    )
    learning_rate: float = Field(1e-3, gt=0, title="Learning rate")
    backend: Backend = Field(
        Backend.tensorflow,
        title="Keras backend",
        description="tensorflow (the CPU path), jax or torch: the same model code on each; "
        "another backend than the worker's own trains in a child process with that KERAS_BACKEND.",
    )

    @model_validator(mode="after")
    def _model_default_epochs(self) -> TrainConfig:
        """Empty epochs become the model's default here, so the key (and the model) are those of that number."""
        if self.epochs is None:
            self.epochs = DEFAULT_EPOCHS[self.model]
        return self
