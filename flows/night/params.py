"""The flow's parameters: one pydantic model, so the Prefect UI shows a titled, bounded form.

Bounds are checked before any work starts; a wrong value is refused with the field's name and
its allowed range.
"""

from __future__ import annotations

import hashlib
from copy import copy

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tasks.champion.rules import GateRules
from tasks.data.training_set import DEFAULT_MAX_TRAINING_IMAGES, MAX_MAX_TRAINING_IMAGES, MIN_MAX_TRAINING_IMAGES
from tasks.intake.rules import IngestRules
from tasks.publish.retention_rules import RetentionRules
from tasks.training.backends import Backend, process_backend
from tasks.training.config import SEED_MAX, ModelName, TrainConfig
from tasks.training.precision import Precision

RAREST_TEST_DIGIT = 892  # digit 5 in the MNIST test set: the most a balanced sample can take per digit
TRAINING = TrainConfig.model_fields  # training fields are declared once, in TrainConfig


class PipelineParameters(BaseModel):
    """One nightly retrain: what to train, how to evaluate and gate it, and where artifacts go."""

    model_config = ConfigDict(extra="forbid", use_enum_values=False, title="MNIST retrain parameters")

    model: ModelName = copy(TRAINING["model"])
    epochs: int | None = copy(TRAINING["epochs"])
    batch_size: int = copy(TRAINING["batch_size"])
    n_per_class: int = Field(
        800,
        ge=1,
        le=RAREST_TEST_DIGIT,
        title="Images per digit (evaluation)",
        description=f"Balanced evaluation draws this many test images of every digit, without replacement (1–{RAREST_TEST_DIGIT}).",
    )
    seed: int | None = Field(
        0,
        ge=0,
        le=SEED_MAX,
        title="Seed",
        description=f"Seeds initialisation, shuffling, subsets and the evaluation sample (0–{SEED_MAX}). "
        "Empty, as the nightly deployment leaves it: derived from the dataset version, so a night with new data "
        "trains a new model and a night without reuses the last one (see new_seed); logged and recorded in the runs table.",
    )
    new_seed: bool = Field(
        False,
        title="New seed on unchanged data",
        description="With seed empty: draw the seed from the run's id instead (a crashed run restarted keeps it), "
        "so even a night without new data trains a new model.",
    )
    train_limit: int | None = copy(TRAINING["train_limit"])
    precision: Precision = copy(TRAINING["precision"])
    backend: Backend | None = Field(
        None,
        title="Keras backend",
        description="tensorflow, jax or torch: the same network and training code on each. "
        "Empty: the worker's KERAS_BACKEND, else tensorflow (the CPU path).",
    )
    gate: GateRules = Field(
        default_factory=GateRules,
        title="Champion gate",
        description="When this run's model replaces the champion: compared on the same images, with a paired McNemar test.",
    )
    held_back: int = Field(
        0,
        ge=0,
        le=25_000,
        title="Held-back MNIST images",
        description="MNIST training images kept out of the base training set, which `simulate-arrivals` releases "
        "night by night as new batches (0 in production; 10000 for the scripted week).",
    )
    max_training_images: int = Field(
        DEFAULT_MAX_TRAINING_IMAGES,
        ge=MIN_MAX_TRAINING_IMAGES,
        le=MAX_MAX_TRAINING_IMAGES,
        title="Training-set budget (images)",
        description="The most images a night trains on: all of MNIST's base training set, then the newest accepted "
        "batches, whole, while they fit; older batches stay in the store, accepted, but leave the night's dataset "
        f"version ({MIN_MAX_TRAINING_IMAGES}–{MAX_MAX_TRAINING_IMAGES}; smaller than the base set is refused).",
    )
    ingest: IngestRules = Field(
        default_factory=IngestRules,
        title="New-data checks",
        description="When a new batch is quarantined instead of trained on: leakage, drift, and labels the champion contradicts.",
    )
    retention: RetentionRules = Field(
        default_factory=RetentionRules,
        title="Store retention",
        description="After publishing, the night removes what no night needs any more, as `mnist-pipeline store prune "
        "--apply` does, keeping every model that was ever champion, what its decisions rest on, tonight's work and "
        "the last reports (docs/store.md).",
    )
    refresh: bool = Field(
        False,
        title="Refresh",
        description="Recompute everything after the download (training, evaluation, plots) even if cached.",
    )
    store: str | None = Field(
        None,
        title="Artifact store",
        description="Directory or fsspec URL for all artifacts; empty for $MNIST_STORE or ./artifacts.",
    )
    mnist_source: str | None = Field(
        None,
        title="MNIST source directory",
        description="A directory holding the four IDX files, tried before the network; empty for $MNIST_SOURCE.",
    )

    def train_config(self, seed: int) -> TrainConfig:
        """The training part of these parameters, with the seed this run uses."""
        own = ("seed", "backend")
        shared = {name: getattr(self, name) for name in TRAINING if name in type(self).model_fields and name not in own}
        return TrainConfig(**shared, seed=seed, backend=self.backend or process_backend())


def run_seed(run_id: str) -> int:
    """The seed of an empty ``seed`` with ``new_seed``: drawn from the run's id, which is random, so the night
    trains a new model, and kept by the run's id, so a run restarted after a crash trains (and resumes) the same one."""
    return int(hashlib.sha256(run_id.encode()).hexdigest(), 16) % (SEED_MAX + 1)


def data_seed(dataset_version: str) -> int:
    """The seed of an empty ``seed``: drawn from the dataset version, so the same data gives the same training
    key (the model is reused, a crashed run resumes it) and new data a new model."""
    return int(hashlib.sha256(f"seed:{dataset_version}".encode()).hexdigest(), 16) % (SEED_MAX + 1)


def describe_errors(error: ValidationError) -> str:
    """Turn pydantic's error list into sentences naming each parameter and its allowed range."""
    lines = []
    for item in error.errors():
        loc = item["loc"]
        field = ".".join(str(p) for p in loc) or "parameters"
        groups = {"gate": GateRules.model_fields, "ingest": IngestRules.model_fields, "retention": RetentionRules.model_fields}
        fields = groups.get(str(loc[0]), PipelineParameters.model_fields) if len(loc) > 1 else PipelineParameters.model_fields
        info = fields.get(str(loc[-1])) if loc else None
        allowed = f" ({info.description})" if info is not None and info.description else ""
        lines.append(f"{field}={item.get('input')!r}: {item['msg']}{allowed}")
    return "Invalid parameters:\n  " + "\n  ".join(lines)
