"""The ingest step: new labelled batches from the incoming location are checked before they can harm a model.

For each file not seen before (a batch is its content digest, read once), oldest first, in this order: the
format (``tasks.data.batch_format``), leakage (exact and near copies of MNIST test or selection images, or of
the new-data holdout, are dropped), repeats (copies of images already trained on are dropped), drift against
MNIST's training set, and label quality judged by the champion (``tasks.intake.checks``). Every batch gets a
row in the ``batches`` table and a record under ``batches/<digest>/`` in the store; an accepted one gives a
stratified share to the new-data holdout and the rest to training. A quarantined batch never stops the night:
it is kept aside with its reason, and an operator can ``release`` it (or ``quarantine`` an accepted one). The
incoming file is removed once its record is written.

A night takes at most ``max_files_per_night`` files and ``max_images_per_night`` images; the rest wait where
they are, untouched, for a later night. Files the pipeline never reads (names starting with ``.`` or ``_``,
other names, files too large) are removed once they are a day old.

The incoming location is untrusted input: only plain ``*.parquet`` files directly in it are read, each
bounded in size, through a store confined to that location (no path leaves it, no link is followed out).
"""

from __future__ import annotations

import posixpath
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import Annotated, Literal

import numpy as np
import pandas as pd
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from storage import Store, StoreError, UnsafeKey, confine_name, sha256_bytes
from storage.door import NotARegularFile
from storage.files import listed_mtime  # the store's own reading of a listing's time (local or S3)
from storage.tables import schema, write_table
from tasks.data.batch_format import (
    MAX_BATCH_BYTES,
    PIXELS,
    SHA256,
    AcceptedBatch,
    Batch,
    BatchPart,
    BatchRejected,
    DamagedShare,
    parse_untrusted,
    read_share,
    share_bytes,
)
from tasks.data.batch_limits import MAX_BATCH_ROWS
from tasks.data.copy_limits import NEAR_COPY_PIXELS, PIXEL_TOLERANCE
from tasks.data.fetch import DamagedMnist, DatasetRef, load_mnist
from tasks.data.near_copies import ImageIndex, image_hashes, near_copies
from tasks.data.slices import base_training, new_holdout_images, new_training_images
from tasks.data.splits import SLICE_SELECTION, SPLIT_SEED, selection_indices
from tasks.data.training_set import DEFAULT_MAX_TRAINING_IMAGES, choose_batches
from tasks.intake.checks import (
    DIGITS,
    REFERENCE_IMAGES,
    IngestRules,
    drift,
    drift_problems,
    holdout_rows,
    image_statistics,
    label_quality,
    unexplained_disagreements,
)

INCOMING_ENV = "MNIST_INCOMING"
MAX_DAMAGED_RECORDS = 20  # damaged batch records read in one pass before the rest are left (each costs hashing)
LOCK = "ingest"
RECORD = "batch.json"
PARTS = {"incoming": "incoming.parquet", "train": "train.u8", "holdout": "holdout.u8", "drift_plot": "drift.png"}
STALE_SECONDS = 24 * 3600  # a file the pipeline never reads is removed from the incoming location at this age
Log = Callable[[str], None]


# A record is read from the store: every figure bounded, so that summing them (the night's and a source's caps) can
# neither overflow nor turn NaN. A count is of images in one batch; a figure is a rate, a p-value or a count.
Count = Annotated[int, Field(ge=0, le=MAX_BATCH_ROWS)]
Figure = Annotated[float, Field(allow_inf_nan=False, ge=-MAX_BATCH_ROWS, le=MAX_BATCH_ROWS)]


class BatchFigures(BaseModel):
    """What the checks measured: the figures of a ``batches`` row (None where a check did not get that far)."""

    model_config = ConfigDict(extra="forbid")

    rows: Count = 0
    source: str | None = Field(None, max_length=300)
    duplicates: Count | None = None  # exact repeats of an image within the batch, dropped
    leaked_test: Count | None = None
    leaked_selection: Count | None = None
    leaked_holdout: Count | None = None  # copies of images already in the new-data holdout, dropped
    # exact or near copies of images already trained on (base MNIST, accepted batches' training shares) or accepted
    # earlier the same night, dropped; the batches table has no column for it (its schema is storage's): the reason says it
    trained_copies: Count | None = None
    train_rows: Count | None = None
    holdout_rows: Count | None = None
    label_chi2_p: Figure | None = None
    label_shift: Figure | None = None
    mean_intensity: Figure | None = None
    mean_intensity_ks: Figure | None = None
    mean_intensity_p: Figure | None = None
    ink_fraction: Figure | None = None
    ink_fraction_ks: Figure | None = None
    ink_fraction_p: Figure | None = None
    disagreement: Figure | None = None
    confident_disagreement: Figure | None = None
    champion_confident_disagreement: Figure | None = None
    confident_images: Count | None = None  # not in the batches table: kept in batch.json
    excess_disagreements: Figure | None = None  # not in the batches table: kept in batch.json and said in the reason
    # per label 0–9, and what no rate explains (tasks/intake/checks.py): kept in batch.json, what the night's and a
    # source's caps sum
    disagreements_by_label: list[Count] | None = Field(None, max_length=10)
    explained_by_label: list[Figure] | None = Field(None, max_length=10)
    unexplained_disagreements: Figure | None = None
    champion_model_key: str | None = Field(None, max_length=64)


class BatchRecord(BaseModel):
    """``batches/<digest>/batch.json``: what was decided about one batch, and the files it left."""

    digest: str = Field(pattern=SHA256)
    file: str = Field(max_length=255)
    status: Literal["accepted", "quarantined"]
    reason: str = Field(max_length=4000)
    run_id: str = Field(max_length=64)  # the run that ingested it (its rows are in that run's partition of ``batches``)
    decided_at: AwareDatetime  # a time without a zone is not ours, and could not be ordered against ours
    decided_by: Literal["ingest", "operator"] = "ingest"
    incoming: BatchPart  # the file as it arrived
    train: BatchPart | None = None  # None: it could not be read, so it can never be trained on
    holdout: BatchPart | None = None
    drift_plot: BatchPart | None = None
    row: BatchFigures = BatchFigures()


class IngestRef(BaseModel):
    """The night's data after ingest: the dataset version to train on, and this night's batches."""

    dataset: DatasetRef
    night: list[BatchRecord] = []

    @property
    def quarantined(self) -> list[BatchRecord]:
        return [b for b in self.night if b.status == "quarantined"]


class BatchNotFound(LookupError):
    """An operator named a batch the store does not hold: the message lists what it holds."""


# ---- what the checks compare with, computed once a night and only if a batch arrived ------------------
class References:
    def __init__(self, store: Store, dataset: DatasetRef, log: Log) -> None:
        self.store, self.dataset, self.log = store, dataset, log

    @cached_property
    def mnist(self):
        return load_mnist(self.store, self.dataset)

    @cached_property
    def protected(self) -> dict[str, ImageIndex]:
        """The images no batch may copy, exactly or nearly: every MNIST test image, every selection image and every
        image already in the new-data holdout (a copy in training would make them a test of memory)."""
        selection = selection_indices(self.mnist.y_train)
        holdout = new_holdout_images(self.store, self.dataset)
        return {
            "test": ImageIndex(self.mnist.x_test, ranked=True, decreasing=True),
            "selection": ImageIndex(self.mnist.x_train[selection], ranked=True, decreasing=True),
            "holdout": ImageIndex(holdout.x, ranked=True, decreasing=True),
        }

    @cached_property
    def trained(self) -> ImageIndex:
        """Every image a night may train on (MNIST's base training images, every accepted batch's training share):
        a copy sent again would count twice in training, and, held out, would be a test of memory."""
        base = self.mnist.x_train[base_training(self.mnist, self.dataset)]
        return ImageIndex(base, new_training_images(self.store, self.dataset).x)

    def remember(self, images: np.ndarray) -> None:
        """A batch accepted tonight (both shares): a later batch of the same night that copies its images has them
        dropped, as copies of an earlier night's are. They are counted with the copies of trained images, not as
        leaked, so tonight's order of arrival does not change which batch counts as leaking."""
        self.trained.add(images)

    @cached_property
    def reference(self) -> tuple[np.ndarray, np.ndarray]:
        """MNIST's base training images (a fixed sample) and all their labels: what drift is measured against."""
        base = base_training(self.mnist, self.dataset)
        sample = np.random.default_rng(SPLIT_SEED).choice(base, size=min(REFERENCE_IMAGES, len(base)), replace=False)
        return self.mnist.y_train[base], self.mnist.x_train[np.sort(sample)]

    @cached_property
    def champion(self):
        """(champion's model key, Keras model, its predictions on mnist-selection), or None before the first champion."""
        from tasks.champion.pointer import find_champion, setting_aside_damaged
        from tasks.evaluation.evaluate import predicted_labels
        from tasks.training.rebuilt import load_model

        lookup, loaded = setting_aside_damaged(
            self.store,
            find_champion(self.store),
            lambda ref: (
                load_model(self.store, ref),
                predicted_labels(
                    self.store, self.dataset, ref, SLICE_SELECTION, self.mnist.y_train[selection_indices(self.mnist.y_train)]
                ),
            ),
        )
        if lookup.champion is None or loaded is None:
            if lookup.problem:
                self.log(lookup.problem)
            return None
        model, selection = loaded
        return lookup.champion.model_key, model, selection


# ---- one batch ----------------------------------------------------------------------------------------
def _part(store: Store, digest: str, part: str, data: bytes, rows: int) -> BatchPart:
    key = store.batch_file(digest, PARTS[part])
    store.write_bytes(key, data)
    return BatchPart(key=key, sha256=sha256_bytes(data), size=len(data), rows=rows)


def _first_copies(hashes: np.ndarray) -> np.ndarray:
    """True for the first occurrence of each image, False for its exact repeats within the batch."""
    seen: set[bytes] = set()
    first = np.zeros(len(hashes), dtype=bool)
    for i, h in enumerate(hashes):
        first[i] = h not in seen
        seen.add(h)
    return first


def _copies(images: np.ndarray, refs: References) -> dict[str, np.ndarray]:
    """Which images copy, exactly or nearly, a test image, else a selection image, else a holdout image (leaked),
    else an image already trained on: each image counted once, under the first of these it copies."""
    found: dict[str, np.ndarray] = {}
    taken = np.zeros(len(images), dtype=bool)
    for name, index in (*refs.protected.items(), ("trained", refs.trained)):
        found[name] = np.zeros(len(images), dtype=bool)
        found[name][~taken] = near_copies(images[~taken], index)
        taken |= found[name]
    return found


def _check(batch: Batch, digest: str, refs: References, rules: IngestRules) -> tuple[dict, list[str], np.ndarray]:
    """The figures and problems of one readable batch, and which rows are kept: not repeated, not leaked, not a
    copy of an image already trained on (so any kept row may join the holdout)."""
    unique = _first_copies(image_hashes(batch.images))
    copies = _copies(batch.images, refs)
    leaked = copies["test"] | copies["selection"] | copies["holdout"]
    keep = unique & ~leaked & ~copies["trained"]
    row: dict = {"source": batch.source, "duplicates": int((~unique).sum())}
    row |= {f"leaked_{name}": int((copies[name] & unique).sum()) for name in ("test", "selection", "holdout")}
    row["trained_copies"] = int((copies["trained"] & unique).sum())
    problems = []
    share = float(leaked.mean())
    if share > rules.max_leaked_share:
        problems.append(
            f"leakage: {int(leaked.sum())} of its {len(keep)} images are exact copies of MNIST test images, of the "
            f"selection split or of the new-data holdout, or near copies of them (at most {NEAR_COPY_PIXELS} pixels "
            f"differ by more than {PIXEL_TOLERANCE}/255, also once centred): test {row['leaked_test']}, selection "
            f"{row['leaked_selection']}, holdout {row['leaked_holdout']}; {share:.0%}, more than the "
            f"{rules.max_leaked_share:.0%} allowed"
        )
    if keep.sum() < rules.min_batch_images:
        problems.append(
            f"too small: {int(keep.sum())} images once repeats, leaked copies and copies of images already trained on "
            f"are dropped, fewer than the {rules.min_batch_images} its statistics need"
        )
    images, labels = batch.images[keep], batch.labels[keep]
    if not len(labels):
        return row, problems, keep
    reference_labels, reference_images = refs.reference
    figures = drift(labels, images, reference_labels, reference_images)
    row |= figures.model_dump()
    problems += drift_problems(figures, rules)
    champion = refs.champion
    if champion is None:
        refs.log(f"Batch {digest[:12]}: no champion yet, so its labels are not checked against one")
    else:
        from tasks.evaluation.evaluate import predict

        key, model, selection = champion
        probabilities = predict(model, images)
        quality, label_problems = label_quality(
            labels,
            probabilities.argmax(axis=1),
            probabilities.max(axis=1),
            selection["true_label"].to_numpy(),
            selection["predicted_label"].to_numpy(),
            selection["confidence"].to_numpy(),
            rules,
        )
        row |= quality.model_dump() | {"champion_model_key": key}
        problems += label_problems
        if quality.excess_disagreements is None and not rules.accept_unjudged_labels:
            problems.append(
                f"labels not judged: the champion is confident (top probability at least {rules.confident_probability}) "
                f"about {quality.confident_images} of its {len(labels)} images"
                + ("" if quality.champion_confident_disagreement is not None else " and about none of the selection split")
                + ", so nothing says its labels are right; it is not trained on until an operator releases it "
                "(`batches release`), or a run accepts unjudged batches (accept_unjudged_labels)"
            )
    return row, problems, keep


class Waits(Exception):
    """This night has no room for the file: it stays in the incoming location, untouched, for a later night."""


@dataclass
class LabelCount:
    """A group's confident disagreements per label 0–9 and what the champions' own rates explain of them, summed
    over its accepted batches; ``recorded`` adds the positive excess of batches recorded before per-label figures
    were kept (counted whole: nothing says how much of it a rate explains)."""

    disagreements: np.ndarray = field(default_factory=lambda: np.zeros(DIGITS))
    explained: np.ndarray = field(default_factory=lambda: np.zeros(DIGITS))
    recorded: float = 0.0

    def plus(self, row: dict) -> LabelCount:
        by_label, explained = row.get("disagreements_by_label"), row.get("explained_by_label")
        if by_label is not None and explained is not None and len(by_label) == len(explained) == DIGITS:
            return LabelCount(
                self.disagreements + np.asarray(by_label, float), self.explained + np.asarray(explained, float), self.recorded
            )
        return LabelCount(self.disagreements, self.explained, self.recorded + _positive_excess(row))

    def unexplained(self, tolerance: float) -> float:
        return unexplained_disagreements(self.disagreements, self.explained, tolerance) + self.recorded


@dataclass
class NightRoom:
    """What a night may still take: files and images left under ``max_files_per_night`` and ``max_images_per_night``,
    and the confident disagreements its accepted batches (and each declared source's) already carry."""

    files: int
    images: int
    limit: int  # max_images_per_night, to say it
    night: LabelCount = field(default_factory=LabelCount)  # batches accepted tonight
    by_source: dict[str, LabelCount] = field(default_factory=dict)  # the same per declared source, over SOURCE_WINDOW

    @classmethod
    def of(cls, rules: IngestRules, records: list[BatchRecord] = (), run_id: str = "", now: datetime | None = None) -> NightRoom:
        """The room left tonight: the caps, less what this run (an earlier attempt of it) and, per source, the last
        ``SOURCE_WINDOW`` of accepted batches already carry."""
        room = cls(files=rules.max_files_per_night, images=rules.max_images_per_night, limit=rules.max_images_per_night)
        since = (now or datetime.now(UTC)) - SOURCE_WINDOW
        for record in records:
            if record.status != "accepted" or record.decided_by != "ingest":
                continue
            row = record.row.model_dump()
            if record.run_id == run_id:
                room.night = room.night.plus(row)
            if record.row.source and record.decided_at >= since:
                room.by_source[record.row.source] = room.by_source.get(record.row.source, LabelCount()).plus(row)
        return room

    def label_problems(self, row: dict, rules: IngestRules) -> list[str]:
        """A batch within the per-batch cap may still carry the night (or its source) over it:
        ``max_excess_disagreements`` bounds what one night, and one declared source in a week, adds to training
        beyond what the champion's own per-digit rates and chance explain for all the images they hold."""
        cap, tolerance = rules.max_excess_disagreements, rules.disagreement_tolerance
        if row.get("disagreements_by_label") is None and _positive_excess(row) == 0:
            return []  # nothing judged, or nothing to add
        problems = []
        night = self.night.plus(row).unexplained(tolerance)
        if night > cap:
            problems.append(
                f"likely mislabelled, counted over the night: with it, tonight's accepted batches would carry "
                f"{night:.0f} confident disagreements beyond what the champion's per-digit rates and chance explain "
                f"for their images, more than the {cap} a night may (max_excess_disagreements)"
            )
        source = row.get("source")
        if source:
            carried = self.by_source.get(source, LabelCount()).plus(row).unexplained(tolerance)
            if carried > cap:
                problems.append(
                    f"likely mislabelled, counted over its source: batches declaring source {source!r} accepted in the "
                    f"last {SOURCE_WINDOW.days} days would carry {carried:.0f} confident disagreements beyond what the "
                    f"champion's per-digit rates and chance explain for their images, more than the {cap} allowed "
                    "(max_excess_disagreements)"
                )
        return problems

    def count_accepted(self, row: dict) -> None:
        self.night = self.night.plus(row)
        if row.get("source"):
            self.by_source[row["source"]] = self.by_source.get(row["source"], LabelCount()).plus(row)

    def take_images(self, n: int) -> None:
        """Count ``n`` images against the night, or raise ``Waits`` saying why they do not fit."""
        if n > self.limit:
            raise Waits(
                f"it holds {n} images, more than the {self.limit} a night takes (max_images_per_night): it waits until "
                "that limit is raised, or split it into smaller files"
            )
        if n > self.images:
            raise Waits(
                f"it holds {n} images and tonight has room for {self.images} more of its {self.limit} "
                "(max_images_per_night): it waits for a later night"
            )
        self.images -= n


SOURCE_WINDOW = timedelta(days=7)  # how far back a declared source's accepted batches count against its cap


def _positive_excess(row: dict) -> float:
    """A batch's confident disagreements beyond the champion's own rate, counted when positive: a batch the champion
    agrees with more than usual earns no credit for a later one (else clean batches would buy room for flips)."""
    excess = row.get("excess_disagreements")
    return max(0.0, float(excess)) if excess is not None else 0.0


def _record_fields(store: Store, name: str, data: bytes, digest: str, run_id: str) -> dict:
    """The fields every record has, the file as it arrived written first."""
    incoming = _part(store, digest, "incoming", data, 0)
    return {"digest": digest, "file": name, "run_id": run_id, "decided_at": datetime.now(UTC), "incoming": incoming}


def _ingest_one(
    store: Store, name: str, data: bytes, digest: str, refs: References, rules: IngestRules, run_id: str, room: NightRoom
) -> BatchRecord:
    """Check one new file and write its parts; ``Waits`` (before anything is written) if tonight has no room for it."""
    try:
        batch = parse_untrusted(data)
    except BatchRejected as exc:
        record = _record_fields(store, name, data, digest, run_id)
        return BatchRecord(**record, status="quarantined", reason=f"unreadable: {exc}")
    if refs.champion is None and not rules.accept_unjudged_labels:
        raise Waits(
            "there is no intact champion to judge its labels, so it waits for a night that has one (or a run that "
            "accepts unjudged batches: accept_unjudged_labels)"
        )
    room.take_images(len(batch.labels))
    record = _record_fields(store, name, data, digest, run_id)
    row, problems, keep = _check(batch, digest, refs, rules)
    problems += room.label_problems(row, rules)
    images, labels = batch.images[keep], batch.labels[keep]
    held = np.zeros(len(labels), dtype=bool)
    held[holdout_rows(labels, rules.holdout_share, digest)] = True
    # A holdout image whose near twin (shifted a pixel, or changed by a gamma curve, say) is in the batch's own
    # training share would make the new-data slice a test of memory: it is dropped, counted with the batch's repeats.
    twins = (
        np.flatnonzero(held)[near_copies(images[held], ImageIndex(images[~held], ranked=True))]
        if held.any() and (~held).any()
        else []
    )
    if len(twins):
        images, labels, held = np.delete(images, twins, 0), np.delete(labels, twins), np.delete(held, twins)
        row["duplicates"] += len(twins)
    train = _part(store, digest, "train", share_bytes(images[~held], labels[~held]), int((~held).sum()))
    holdout = _part(store, digest, "holdout", share_bytes(images[held], labels[held]), int(held.sum()))
    row |= {"rows": len(batch.labels), "train_rows": train.rows, "holdout_rows": holdout.rows}
    status = "quarantined" if problems else "accepted"
    reason = "; ".join([*problems, _dropped(row)]) if problems else _passed(row)
    plot = None
    if len(labels):
        from tasks.evaluation.plots import batch_drift, png_bytes

        reference_labels, reference_images = refs.reference
        intensity, reference_intensity = image_statistics(images)[0], image_statistics(reference_images)[0]
        figure = batch_drift(digest[:12], labels, intensity, reference_labels, reference_intensity, status)
        plot = _part(store, digest, "drift_plot", png_bytes(figure), 0)
    figures = BatchFigures(**row)
    if status == "accepted":
        refs.remember(images)
        room.count_accepted(row)
    return BatchRecord(**record, status=status, reason=reason, train=train, holdout=holdout, drift_plot=plot, row=figures)


def _dropped(row: dict) -> str:
    """What was dropped before the checks, in words: the reason is where the count of copies of trained images is kept
    (the batches table has no column for it)."""
    leaked = row["leaked_test"] + row["leaked_selection"] + row["leaked_holdout"]
    return (
        f"dropped: {row['duplicates']} repeats within the batch, {leaked} leaked copies, "
        f"{row['trained_copies']} copies of images already trained on"
    )


def _passed(row: dict) -> str:
    said = [f"{row['rows']} images", _dropped(row)]
    said.append(f"label shift {row['label_shift']:.3f}, intensity drift {row['mean_intensity_ks']:.3f}")
    if row.get("confident_disagreement") is not None and row.get("champion_confident_disagreement") is not None:
        said.append(
            f"champion confidently disagrees with {row['confident_disagreement']:.1%} of labels "
            f"({row['champion_confident_disagreement']:.1%} on the selection split, "
            f"{row['excess_disagreements']:.0f} disagreements beyond that rate, "
            f"{row['unexplained_disagreements']:.0f} beyond what its per-digit rates and chance explain)"
        )
        return "passed every check: " + ", ".join(said)
    if row.get("champion_model_key"):
        said.append("labels not judged (the champion is confident about none of these images, or none of the selection split)")
    else:
        said.append("labels not judged (no champion yet)")
    return "accepted without a label check (accept_unjudged_labels): " + ", ".join(said)


def _safe_name(name: str) -> str:
    """A sender's file name as text we can record and show: valid UTF-8, at most 255 characters."""
    return name.encode("utf-8", "replace").decode("utf-8")[:255]


# ---- the table and the records ------------------------------------------------------------------------
def _table_row(record: BatchRecord) -> pd.DataFrame:
    row = record.row.model_dump()
    row |= {
        "digest": record.digest,
        "file": record.file,
        "decision": record.status,
        "reason": record.reason,
        "decided_by": record.decided_by,
        "decided_at": record.decided_at,
    }
    return pd.DataFrame([row]).reindex(columns=schema("batches").names)  # figures a check did not reach: null


def _publish(store: Store, record: BatchRecord) -> None:
    """The table row (what people read), then the record (what training reads, and what says it was seen):
    a crash between the two leaves the file in incoming, to be ingested again, never a decision without its row."""
    part = f"{record.decided_by}-{record.digest[:16]}-{record.decided_at:%Y%m%dT%H%M%S%f}"
    night = record.run_id if record.decided_by == "ingest" else None  # an operator's decision: no night (run_id null)
    write_table(store, "batches", night, _table_row(record), part=part)
    store.write_text(store.batch_file(record.digest, RECORD), record.model_dump_json(indent=2))


def batch_record(store: Store, digest: str) -> BatchRecord | None:
    """The record of batch ``digest`` if it is whole and, for an accepted batch, its shares are intact, else None
    (with a warning).

    Only what a night uses is read: an accepted batch's two shares, each read once, hashed and parsed. The file as it
    arrived and the drift plot are not (the digest of the one is the batch's name; the report checks the other when
    it shows it), and a quarantined batch's shares are checked when an operator releases it (``set_status``): a
    night's reading of the records costs what the accepted data holds, not what every file ever sent held."""
    try:
        info = store.batch_file(digest, RECORD)
        record = store.load_ref(info, BatchRecord, lambda _: {})
    except (UnsafeKey, StoreError, OSError, ValueError) as exc:  # a link, a folder where a file should be, …
        store.warn(f"The record of batch {digest[:12]} cannot be read ({str(exc)[:200]}): not used")
        return None
    if record is None:
        return None
    expected = {part: store.batch_file(digest, name) for part, name in PARTS.items()}
    named = {part: getattr(record, part) for part in PARTS if getattr(record, part) is not None}
    wrong = [part for part, ref in named.items() if ref.key != expected[part]]
    if record.digest != digest or record.incoming.sha256 != digest or wrong:
        what = f"files of another place ({', '.join(wrong)})" if wrong else f"batch {record.digest[:12]}, not its own"
        store.warn(f"The batch record {store.location(info)} names {what}: not used")
        return None
    for part in ("train", "holdout"):
        ref = named.get(part)
        if ref is not None and ref.size != ref.rows * (PIXELS + 1):
            store.warn(
                f"The batch record {store.location(info)} gives its {part} share a size that does not fit its rows: not used"
            )
            return None
    problem = _damaged_share(store, record) if record.status == "accepted" else None
    if problem is not None:
        store.warn(f"The batch record {store.location(info)} names {problem}: not used")
        return None
    return record


def _damaged_share(store: Store, record: BatchRecord) -> str | None:
    """What is wrong with the record's shares, read and parsed (not only hashed: what trains must parse as a share)."""
    for part in ("train", "holdout"):
        ref = getattr(record, part)
        try:
            if ref is not None:
                read_share(store, ref)
        except DamagedShare as exc:
            return f"a {part} share that is not a share ({exc.__cause__})"
    return None


def batch_records(store: Store) -> list[BatchRecord]:
    """Every intact batch record in the store, by digest, reading at most ``MAX_DAMAGED_RECORDS`` damaged ones.

    An accepted batch's shares are hashed and parsed before it is used (up to 100 000 rows each), so a store holding
    thousands of planted records would cost every night minutes of hashing: after that many
    damaged records the rest are not read that time, with a warning saying so (the night goes on with the intact
    records read so far; an operator removes the damaged ones).

    A batch is its digest, read once: the records are keyed by it, and only folders are batches (an object planted
    at ``batches/<digest>`` beside the folder is not a second one: ``Store.listing`` lists that name once)."""
    if not store.exists(store.batch_dir()):
        return []
    records: dict[str, BatchRecord] = {}
    damaged: list[str] = []
    names = sorted(n for n in store.list_folders(store.batch_dir()) if len(n) == 64 and not set(n) - set("0123456789abcdef"))
    for place, name in enumerate(names):
        record = batch_record(store, name)
        if record is not None:
            records.setdefault(record.digest, record)
            continue
        store.warn(f"Batch {name[:12]}: its record or one of its files is missing or damaged, so it is not used")
        damaged.append(name[:12])
        if len(damaged) >= MAX_DAMAGED_RECORDS and place + 1 < len(names):
            store.warn(
                f"{len(damaged)} batch records in {store.location(store.batch_dir())} are damaged ({', '.join(damaged)}): "
                f"the other {len(names) - place - 1} were not read this time, so their batches are not used. Remove the "
                "damaged batch folders (their records name files that do not match their digests), then run again"
            )
            break
    return list(records.values())


def _trainable(record: BatchRecord) -> bool:
    return record.status == "accepted" and record.train is not None and record.holdout is not None


def accepted_batches(store: Store) -> list[AcceptedBatch]:
    return [AcceptedBatch(digest=r.digest, train=r.train, holdout=r.holdout) for r in batch_records(store) if _trainable(r)]


def incoming_store(store: Store, url: str | None = None) -> Store:
    """The incoming location, as a store of its own: every key it reads is confined to it. The default location is
    a folder of the store, so it is reached from the store's root without following a link (a link planted at
    ``incoming`` is not a way out of the store); ``$MNIST_INCOMING`` is the worker's own setting, opened as named."""
    if url:
        return Store(url, warn=store.warn)
    return Store(store.incoming_url(), warn=store.warn, anchor=store.root if store.is_local else None)


def _listing(incoming: Store) -> list[dict]:
    try:
        return incoming.listing(incoming.root)
    except FileNotFoundError:
        return []
    except NotARegularFile:
        incoming.warn(f"The incoming location {incoming.url} is a link or not a folder: nothing is read from it")
        return []
    except OSError as exc:  # e.g. a sender's write-only drop box: tonight takes no batch, and the night goes on
        incoming.warn(
            f"The incoming location {incoming.url} cannot be listed ({type(exc).__name__}: {str(exc)[:160]}): no batch "
            "is read from it tonight; give the pipeline's user permission to list it"
        )
        return []


def _entry_name(entry: dict) -> str:
    return posixpath.basename(str(entry["name"]).rstrip("/"))


def _batch_name(name: str) -> bool:
    """A name the pipeline reads: ``*.parquet``, not starting with ``.`` or ``_`` (files still being written)."""
    return name.endswith(".parquet") and not name.startswith((".", "_"))


def incoming_files(incoming: Store) -> list[tuple[str, int]]:
    """(name, size) of the batch files waiting, oldest first (by modification time, then name): plain ``*.parquet``
    files directly in the location; names starting with ``.`` or ``_`` are files still being written."""
    found = []
    for entry in _listing(incoming):
        name = _entry_name(entry)
        if not _batch_name(name):
            continue
        if entry.get("islink"):
            incoming.warn(f"Incoming file {name[:80]!r} is a symbolic link: not followed, not read")
            continue
        if entry.get("type") != "file":
            continue
        try:
            incoming.path(confine_name(name))
        except UnsafeKey as exc:
            incoming.warn(f"Incoming file {name[:80]!r} is not read: {exc}")
            continue
        found.append((listed_mtime(entry), name, int(entry.get("size") or 0)))
    return [(name, size) for _, name, size in sorted(found)]


def remove_stale(incoming: Store, log: Log, now: float | None = None) -> list[str]:
    """Remove the files the pipeline never reads (names starting with ``.`` or ``_``, other names, files larger than a
    batch may be) once they are ``STALE_SECONDS`` old: a sender's abandoned upload or stray file must not pile up
    in the incoming location. Links and folders are left alone, and said once they are that old."""
    cutoff = (time.time() if now is None else now) - STALE_SECONDS
    removed = []
    for entry in _listing(incoming):
        name = _entry_name(entry)
        size = int(entry.get("size") or 0)
        if (_batch_name(name) and size <= MAX_BATCH_BYTES) or listed_mtime(entry) >= cutoff:
            continue
        if entry.get("islink") or entry.get("type") != "file":
            log(f"Incoming {name[:80]!r} is not a batch file and is more than a day old: left alone (remove it by hand)")
            continue
        try:
            incoming.remove(confine_name(name))
        except (UnsafeKey, OSError) as exc:
            log(f"Incoming file {name[:80]!r} is never read and more than a day old, but could not be removed ({exc})")
            continue
        removed.append(name)
    if removed:
        shown = ", ".join(repr(n[:80]) for n in removed[:10]) + (", …" if len(removed) > 10 else "")
        log(
            f"Removed {len(removed)} files the pipeline never reads, each more than a day old, from the incoming location: {shown}"
        )
    return removed


def _take(
    store: Store, incoming: Store, name: str, refs: References, rules: IngestRules, run_id: str, log: Log, room: NightRoom
) -> BatchRecord | None:
    """One incoming file: read (regular files only), identified, checked, recorded, removed. None: not ingested
    tonight (already known, unreadable, or no room left: a file without room is left where it is, untouched)."""
    try:
        data = incoming.read_regular(name, limit=MAX_BATCH_BYTES)
    except (StoreError, OSError, UnsafeKey) as exc:
        log(f"Incoming file {name!r} cannot be read ({exc}): left where it is")
        return None
    digest = sha256_bytes(data)
    known = batch_record(store, digest)
    fresh = known is None
    if not fresh:
        # Read and hashed like any file: it counts against max_files_per_night, so a flood of copies of a known
        # file (hard links cost a sender no disk) costs a night what max_files_per_night files cost, and drains.
        room.files -= 1
    if fresh:
        try:
            known = _ingest_one(store, _safe_name(name), data, digest, refs, rules, run_id, room)
        except Waits as exc:
            # Read and parsed all the same: it counts against max_files_per_night, so files that wait (no champion
            # yet, no room for their images) cost a night at most that many parses, however many a sender leaves.
            room.files -= 1
            log(f"Incoming file {name!r} is left where it is: {exc}")
            return None
        except DamagedMnist:  # MNIST changed under the night, not this batch's doing: the night fetches it again
            raise
        except Exception as exc:  # noqa: BLE001 (a batch must not stop the night, whatever went wrong with it)
            reason = f"could not be checked ({type(exc).__name__}: {str(exc)[:300]})"
            incoming_part = _part(store, digest, "incoming", data, 0)
            known = BatchRecord(
                digest=digest, file=_safe_name(name), status="quarantined", reason=reason, run_id=run_id,
                decided_at=datetime.now(UTC), incoming=incoming_part,
            )  # fmt: skip
        room.files -= 1
        _publish(store, known)
        log(f"Batch {digest[:12]} ({known.file}): {known.status.upper()}: {known.reason}")
    else:
        log(f"Incoming file {name!r} is batch {digest[:12]}, already {known.status} (run {known.run_id}): removed")
    try:
        incoming.remove(name)
    except (UnsafeKey, OSError) as exc:
        log(f"Incoming file {name!r} could not be removed ({exc}); it is known by its digest and will not be ingested again")
    return known if fresh else None


def _by_age(records: list[BatchRecord]) -> list[AcceptedBatch]:
    """The trainable batches, oldest first: the training-set policy keeps the newest."""
    by_age = sorted(records, key=lambda r: (r.decided_at, r.digest))
    return [AcceptedBatch(digest=r.digest, train=r.train, holdout=r.holdout) for r in by_age if _trainable(r)]


def ingest_batches(
    store: Store,
    incoming: Store,
    dataset: DatasetRef,
    rules: IngestRules,
    run_id: str,
    log: Log = print,
    max_training_images: int = DEFAULT_MAX_TRAINING_IMAGES,
    base_images: int = 0,
) -> IngestRef:
    """Check the new batches, oldest first and as many as the night takes, record each decision, and return the
    dataset version to train on. The night's batches are every batch this run ingested, also in an attempt that
    crashed before this one.

    What a new batch may not copy comes from the store, not from ``dataset``'s batches (the fetch step's dataset
    holds none): the holdout and training shares of the accepted batches a night may train on under
    ``max_training_images`` (with ``base_images`` of MNIST), so the near-copy index is bounded by the same policy
    as training, whatever arrived before."""
    with store.lock(LOCK):
        arrived = incoming_files(incoming)
        known = batch_records(store)  # read once a night (accepted shares checked): tonight's are added below
        chosen = choose_batches(_by_age(known), base_images, max_training_images).chosen
        refs = References(store, dataset.model_copy(update={"batches": chosen}), log)
        room = NightRoom.of(rules, known, run_id)
        waiting, taken = [], []
        for name, size in arrived:
            if size > MAX_BATCH_BYTES:
                log(f"Incoming file {name!r} is {size} bytes, more than a batch may be ({MAX_BATCH_BYTES}): left where it is")
            elif room.files <= 0:
                waiting.append(name)  # not read: a file known already would be removed, and that can wait too
            elif (record := _take(store, incoming, name, refs, rules, run_id, log, room)) is not None:
                taken.append(record)
        if waiting:
            shown = ", ".join(repr(n[:80]) for n in waiting[:10]) + (", …" if len(waiting) > 10 else "")
            log(
                f"{len(waiting)} incoming files wait for a later night, untouched: tonight took the "
                f"{rules.max_files_per_night} files it may (max_files_per_night): {shown}"
            )
        remove_stale(incoming, log)
    records = known + taken  # a record _take wrote is a digest no intact record named
    night = sorted((r for r in records if r.run_id == run_id and r.decided_by == "ingest"), key=lambda r: r.decided_at)
    return IngestRef(dataset=dataset.model_copy(update={"batches": _by_age(records)}), night=night)


# ---- the operator's overrides -------------------------------------------------------------------------
def find_batch(store: Store, prefix: str) -> BatchRecord:
    """The batch whose digest starts with ``prefix`` (at least 8 characters, as the tables show them)."""
    records = batch_records(store)
    matches = [r for r in records if len(prefix) >= 8 and r.digest.startswith(prefix.lower())]
    if len(matches) != 1:
        held = ", ".join(f"{r.digest[:12]} ({r.status}, {r.file})" for r in records) or "none"
        why = "matches several batches" if matches else "matches no batch"
        raise BatchNotFound(f"{prefix!r} {why} in {store.url} (give at least 8 characters of the digest; batches: {held})")
    return matches[0]


def set_status(store: Store, prefix: str, status: Literal["accepted", "quarantined"]) -> tuple[BatchRecord, bool]:
    """Release (accept) or quarantine a batch by hand: recorded in ``batches`` as the operator's decision. Returns
    the batch's record and whether it changed: a batch already so is left as it is, with no row (nothing was decided)."""
    with store.lock(LOCK):
        record = find_batch(store, prefix)
        if record.status == status:
            return record, False
        if status == "accepted" and record.train is None:
            raise BatchNotFound(f"Batch {record.digest[:12]} cannot be released: it never parsed ({record.reason})")
        if status == "accepted" and (problem := _damaged_share(store, record)) is not None:
            raise BatchNotFound(f"Batch {record.digest[:12]} cannot be released: its record names {problem}")
        changed = record.model_copy(
            update={
                "status": status,
                "reason": f"{'released' if status == 'accepted' else 'quarantined'} by an operator (was: {record.reason})",
                "decided_by": "operator",
                "decided_at": datetime.now(UTC),
            }
        )
        _publish(store, changed)
    return changed, True
