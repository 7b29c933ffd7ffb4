"""The flow's parameters: one pydantic model, so the Prefect UI shows a titled, bounded form.

Bounds are checked before any work starts; a wrong value is refused with the field's name and
its allowed range.
"""

from __future__ import annotations

import hashlib
from copy import copy

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tasks.backends import Backend, process_backend
from tasks.gate import GateRules
from tasks.model import ModelName
from tasks.train import SEED_MAX, Precision, TrainConfig

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
        "Empty: draw a new seed at run time, as the nightly deployment does, so each night trains a new model; "
        "the seed is drawn from the run's id (a crashed run restarted keeps it), logged, and recorded in the runs table.",
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
    """The seed a run with an empty ``seed`` uses: drawn from its id, which is random, so each night trains a
    new model, and kept by the run's id, so a run restarted after a crash trains (and resumes) the same one."""
    return int(hashlib.sha256(run_id.encode()).hexdigest(), 16) % (SEED_MAX + 1)


def describe_errors(error: ValidationError) -> str:
    """Turn pydantic's error list into sentences naming each parameter and its allowed range."""
    lines = []
    for item in error.errors():
        loc = item["loc"]
        field = ".".join(str(p) for p in loc) or "parameters"
        fields = GateRules.model_fields if len(loc) > 1 and loc[0] == "gate" else PipelineParameters.model_fields
        info = fields.get(str(loc[-1])) if loc else None
        allowed = f" ({info.description})" if info is not None and info.description else ""
        lines.append(f"{field}={item.get('input')!r}: {item['msg']}{allowed}")
    return "Invalid parameters:\n  " + "\n  ".join(lines)
