"""The thresholds a challenger must pass: the flow's "gate" parameter group, declared apart from the gate's
arithmetic (``tasks/champion/gate.py``, which needs NumPy and pandas) so the command line and the UI's form read
them without importing a numerical library."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class GateRules(BaseModel):
    """The thresholds a challenger must pass; the flow's "gate" parameter group."""

    model_config = ConfigDict(extra="forbid", title="Champion gate")

    min_balanced_accuracy: float = Field(
        0.98,
        ge=0.0,
        le=1.0,
        title="Minimum balanced accuracy",
        description="Value floor: a model below this balanced accuracy is never promoted (0–1).",
    )
    max_regression: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        title="Largest allowed regression",
        description="The challenger's balanced accuracy may fall at most this far below the champion's, "
        "on the same images (0–1; 0: it must be at least as good).",
    )
    max_digit_drop: float = Field(
        0.01,
        ge=0.0,
        le=1.0,
        title="Largest allowed per-digit drop",
        description="No digit's recall may fall more than this below the champion's (0–1).",
    )
    min_digit_images: int = Field(
        200,
        ge=1,
        le=100_000,
        title="Images per digit for the per-digit rule",
        description="The per-digit drop is judged only on digits with at least this many images in a slice: "
        "with fewer, one image is more than the allowed drop (1/60 of a digit is 1.7 points), which is noise, not a drop.",
    )
    min_new_data_images: int = Field(
        500,
        ge=1,
        le=1_000_000,
        title="Images before new data decides",
        description="The new-data holdout joins the decision once it holds this many images; before, it is "
        "evaluated and reported, since on a few hundred images one image moves accuracy by a third of a point.",
    )
    force_promote: bool = Field(
        False,
        title="Force promotion",
        description="Operator's override: promote this run's model whatever the rules say; recorded as forced.",
    )
