"""How long each step of a night may take before Prefect ends it: a budget derived from the step's work.

A step that runs past its budget fails with Prefect's ``TaskRunTimeoutError``, and what that means for the night
is the step's failure rule (``flows/night/pipeline.py``): a deciding step's failure fails the night, a publication
step's is recorded and alerted. The budgets are deliberately generous, so only a night that is stuck, or that
is fed work it should never do, reaches one: each rate below is 25–30 times slower than this project measured on
a 2-core CPU without a GPU (``docs/benchmarks.md``, 2026-11-26 and 2026-12-06: the seed network trains at about
14 700 images a second, the strong one at 1 600–3 700 on a busy day), so a slow or shared 2-core machine stays
far inside them. Each budget also has a floor (``FLOOR``) for start-up, compiling and reading the store.
"""

from __future__ import annotations

from tasks.data.fetch import DatasetRef
from tasks.data.splits import SELECTION_PER_DIGIT
from tasks.intake.checks import IngestRules
from tasks.training.config import TRAIN_IMAGES, TrainConfig
from tasks.training.model import ModelName

FLOOR = 600.0  # seconds any step may take: Keras' first compile, a cold store, a slow download
TRAINED_PER_SECOND = {ModelName.seed: 500.0, ModelName.strong: 60.0}  # images × epochs a second, at the least
PREDICTED_PER_SECOND = {ModelName.seed: 500.0, ModelName.strong: 60.0}  # images a second (strong: with its views)
# A training step's own cost, whatever its size: batch_size 1 trained the seed network at 292 images a second on the
# 2-core machine (3.4 ms a step, review of 2026-12-07), which images alone do not cover; 30 times that, per step.
STEP_SECONDS = 0.1
PARSE_SECONDS = 120.0  # the child that parses one incoming file is stopped after this (tasks/data/batch_format.py)
TEST_IMAGES = 10_000
SELECTION_IMAGES = 10 * SELECTION_PER_DIGIT
# The night's prune (flows/night/steps.py): run every night, it removes about one night's folders (a model, its
# evaluation and plots, the report that left the window), seconds even on S3; the first prune of a store never
# pruned may have years to remove. A prune stopped by its budget loses nothing (tasks/publish/retention.py) and
# the next night's goes on from there, so a fixed budget bounds the step without bounding what it can catch up on.
PRUNE_SECONDS = FLOOR
# A night is due once a day and its deployment runs one at a time: a night still running when the next one is due
# would hold the slot. The flow's own limit ends it before that, whatever the step budgets add up to.
FLOW_SECONDS = 23 * 3600


def training_images(dataset: DatasetRef, config: TrainConfig) -> int:
    """Images one epoch trains on, at most: MNIST's (or ``train_limit`` of them) and every accepted batch's share."""
    mnist = min(config.train_limit or TRAIN_IMAGES, TRAIN_IMAGES)
    return mnist + sum(batch.train.rows for batch in dataset.batches)


def evaluated_images(dataset: DatasetRef) -> int:
    """Images an evaluation predicts: the whole test set, the selection split and the new-data holdout."""
    return TEST_IMAGES + SELECTION_IMAGES + sum(batch.holdout.rows for batch in dataset.batches)


def train_seconds(dataset: DatasetRef, config: TrainConfig) -> float:
    """Epochs × (images at the slowest rate this network is expected to train, its validation included, and steps
    at ``STEP_SECONDS`` each)."""
    images = training_images(dataset, config)
    steps = -(-images // max(config.batch_size, 1))  # a small batch size is many steps, each with its own cost
    return FLOOR + (config.epochs or 1) * (images / TRAINED_PER_SECOND[ModelName(config.model)] + steps * STEP_SECONDS)


def predict_seconds(dataset: DatasetRef, model: ModelName | str) -> float:
    """One model's predictions on every slice (the evaluation; the gate, which may predict the champion's too)."""
    return FLOOR + evaluated_images(dataset) / PREDICTED_PER_SECOND[ModelName(model)]


def gate_seconds(dataset: DatasetRef, model: ModelName | str) -> float:
    """The champion's predictions on the deciding slices (when none is stored), with either network."""
    return FLOOR + evaluated_images(dataset) / min(PREDICTED_PER_SECOND.values())


def ingest_seconds(rules: IngestRules) -> float:
    """Every file a night takes parsed in its child, and every image it takes judged by a champion of either network."""
    images = rules.max_images_per_night / min(PREDICTED_PER_SECOND.values())
    return FLOOR + rules.max_files_per_night * PARSE_SECONDS + images
