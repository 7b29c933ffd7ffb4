"""When a new batch is quarantined instead of trained on: the flow's "ingest" parameter group and the near-copy
thresholds its help text quotes. Declared apart from the checks (``tasks/intake/checks.py``, which needs SciPy) so
the command line and the UI's form read them without importing any numerical library; measured in checks.py."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from tasks.data.batch_limits import MAX_BATCH_ROWS
from tasks.data.copy_limits import NEAR_COPY_PIXELS, PIXEL_TOLERANCE, RANKED_COPY_PIXELS

MAX_FILES_PER_NIGHT = 10_000  # the most ``max_files_per_night`` may be set to


class IngestRules(BaseModel):
    """When a new batch is quarantined instead of trained on; the flow's "ingest" parameter group.

    Defaults were chosen from measurements on the scripted week (README, "Nights with new data"): clean
    batches of held-back MNIST images score far inside every threshold, each bad night far outside one.
    """

    model_config = ConfigDict(extra="forbid", title="New-data checks")

    max_leaked_share: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        title="Largest share of leaked images",
        description="Exact copies of MNIST test images or of the selection split, and near copies of them (at most "
        f"{NEAR_COPY_PIXELS} pixels differ by more than {PIXEL_TOLERANCE}/255, also once both are centred, or at most "
        f"{RANKED_COPY_PIXELS} once both are ranked by intensity, which undoes gamma, contrast and border pixels), are "
        "always dropped; a batch with more than this share of them is quarantined (0–1).",
    )
    drift_p: float = Field(
        1e-6,
        gt=0.0,
        le=1.0,
        title="Drift significance",
        description="A label or image-statistics difference from MNIST's training set counts only below this p-value.",
    )
    max_label_shift: float = Field(
        0.15,
        ge=0.0,
        le=1.0,
        title="Largest label shift",
        description="Total variation distance between the batch's label distribution and MNIST's (0–1).",
    )
    max_image_drift: float = Field(
        0.25,
        ge=0.0,
        le=1.0,
        title="Largest image drift",
        description="Kolmogorov–Smirnov statistic of mean intensity or ink fraction per image, against MNIST (0–1).",
    )
    confident_probability: float = Field(
        0.9,
        ge=0.5,
        le=1.0,
        title="Confident prediction",
        description="The champion is confident about an image when its top probability is at least this.",
    )
    max_disagreement_excess: float = Field(
        0.05,
        ge=0.0,
        le=1.0,
        title="Largest excess of confident disagreement",
        description="A batch whose labels the champion confidently contradicts this much more often than it "
        "contradicts the selection split's labels is quarantined as likely mislabelled (0–1).",
    )
    max_excess_disagreements: int = Field(
        50,
        ge=0,
        le=100_000,
        title="Most confident disagreements no rate explains",
        description="Confident disagreements beyond what the champion's own per-digit rates on the selection split "
        "(at their upper 99 % bound, times 1 + the disagreement tolerance) and chance (3 standard deviations) explain "
        "are counted across every batch accepted in one night, and across a week of batches declaring the same "
        "source; a batch that would carry the count over this is quarantined as likely mislabelled, however large it "
        "is. The allowance grows with the images judged, so honest data is not refused for its volume, and this "
        "floor bounds what targeted wrong labels may add beyond it.",
    )
    disagreement_tolerance: float = Field(
        0.5,
        ge=0.0,
        le=100.0,
        title="Tolerance on the champion's own disagreement rate",
        description="New data may be harder for the champion than the selection split: up to (1 + this) times its "
        "own per-digit rate of confident disagreement is explained before any disagreement counts against "
        "max_excess_disagreements (measured: clean deformed digits 1.5–4 times the plain rate, at most 0.97 "
        "times its upper bound).",
    )
    accept_unjudged_labels: bool = Field(
        False,
        title="Accept batches whose labels no champion judged",
        description="Off: a batch whose labels cannot be judged waits in the incoming location while there is no "
        "champion, and is quarantined when the champion is confident about none of its images. On: such a batch is "
        "accepted without a label check (a deployed run may turn this on only where the worker allows looser rules).",
    )
    min_batch_images: int = Field(
        20,
        ge=1,
        le=100_000,
        title="Smallest batch",
        description="A batch with fewer images, once repeats, leaked copies and copies of trained images are dropped, "
        "is quarantined: its label and image statistics would say nothing.",
    )
    holdout_share: float = Field(
        0.2,
        gt=0.0,
        lt=1.0,
        title="New-data holdout share",
        description="Of each accepted batch, this stratified share joins the new-data holdout and is never trained on.",
    )
    max_files_per_night: int = Field(
        20,
        ge=1,
        le=MAX_FILES_PER_NIGHT,
        title="Most batch files a night",
        description="A night takes at most this many new batch files from the incoming location, oldest first; "
        "the rest wait there, untouched, for a later night.",
    )
    max_images_per_night: int = Field(
        MAX_BATCH_ROWS,
        ge=1,
        le=10_000_000,
        title="Most batch images a night",
        description="A night takes batch files, oldest first, while their images fit in this many; a file that "
        "does not fit waits, untouched, for a later night (the default lets any one file fit).",
    )
