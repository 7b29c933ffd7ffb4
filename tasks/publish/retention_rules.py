"""How much of the store a night keeps when it prunes after publishing: the flow's "retention" parameter group.
Declared apart from the prune (``tasks/publish/retention.py``, which reads tables with pandas) so the command line
and the UI's form read it without importing any numerical library."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

KEEP_REPORTS = 30  # the reports of the last 30 runs: a month of nights
MAX_KEEP_REPORTS = 100_000


class RetentionRules(BaseModel):
    """What a night removes from the store after it has published: the same policy as ``store prune``."""

    model_config = ConfigDict(extra="forbid", title="Store retention")

    prune: bool = Field(
        True,
        title="Prune the store after each night",
        description="After publishing, remove what no night needs any more: models that were never champion (except "
        "tonight's), their evaluations and plots, finished trainings' checkpoints, reports older than keep_reports "
        "(docs/store.md). Off: nothing is removed and the store grows every night.",
    )
    keep_reports: int = Field(
        KEEP_REPORTS,
        ge=0,
        le=MAX_KEEP_REPORTS,
        title="Reports kept",
        description=f"The reports of this many last runs stay, with the earlier ones their figures are in (0–{MAX_KEEP_REPORTS}).",
    )
