"""The ingest step: new labelled batches from the incoming location are checked before they can harm a model.

For each file not seen before (a batch is its content digest, read once), in this order: the format
(``tasks.data.batch_format``), leakage (exact copies of MNIST test or selection images are dropped), drift
against MNIST's training set, and label quality judged by the champion (``tasks.intake.checks``). Every
batch gets a row in the ``batches`` table and a record under ``batches/<digest>/`` in the store; an
accepted one gives a stratified share to the new-data holdout and the rest to training. A quarantined
batch never stops the night: it is kept aside with its reason, and an operator can ``release`` it (or
``quarantine`` an accepted one). The incoming file is removed once its record is written.

The incoming location is untrusted input: only plain ``*.parquet`` files directly in it are read, each
bounded in size, through a store confined to that location (no path leaves it, no link is followed out).
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable
from datetime import UTC, datetime
from functools import cached_property
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from storage import Store, StoreError, UnsafeKey, confine_name, sha256_bytes
from storage.tables import schema, write_table
from tasks.data.batch_format import (
    MAX_BATCH_BYTES,
    PIXELS,
    SHA256,
    AcceptedBatch,
    Batch,
    BatchPart,
    BatchRejected,
    parse_untrusted,
    share_bytes,
)
from tasks.data.fetch import DatasetRef, load_mnist
from tasks.data.slices import base_training, new_holdout_images, new_training_images
from tasks.data.splits import SLICE_SELECTION, SPLIT_SEED, selection_indices
from tasks.intake.checks import (
    REFERENCE_IMAGES,
    IngestRules,
    drift,
    drift_problems,
    holdout_rows,
    image_hashes,
    image_statistics,
    label_quality,
)

INCOMING_ENV = "MNIST_INCOMING"
LOCK = "ingest"
RECORD = "batch.json"
PARTS = {"incoming": "incoming.parquet", "train": "train.u8", "holdout": "holdout.u8", "drift_plot": "drift.png"}
Log = Callable[[str], None]


class BatchFigures(BaseModel):
    """What the checks measured: the figures of a ``batches`` row (None where a check did not get that far)."""

    model_config = ConfigDict(extra="forbid")

    rows: int = 0
    source: str | None = Field(None, max_length=300)
    duplicates: int | None = None  # exact repeats of an image within the batch, dropped
    leaked_test: int | None = None
    leaked_selection: int | None = None
    leaked_holdout: int | None = None  # copies of images already in the new-data holdout, dropped
    train_rows: int | None = None
    holdout_rows: int | None = None
    label_chi2_p: float | None = None
    label_shift: float | None = None
    mean_intensity: float | None = None
    mean_intensity_ks: float | None = None
    mean_intensity_p: float | None = None
    ink_fraction: float | None = None
    ink_fraction_ks: float | None = None
    ink_fraction_p: float | None = None
    disagreement: float | None = None
    confident_disagreement: float | None = None
    champion_confident_disagreement: float | None = None
    champion_model_key: str | None = Field(None, max_length=64)


class BatchRecord(BaseModel):
    """``batches/<digest>/batch.json``: what was decided about one batch, and the files it left."""

    digest: str = Field(pattern=SHA256)
    file: str = Field(max_length=255)
    status: Literal["accepted", "quarantined"]
    reason: str = Field(max_length=4000)
    run_id: str = Field(max_length=64)  # the run that ingested it (its rows are in that run's partition of ``batches``)
    decided_at: datetime
    decided_by: Literal["ingest", "operator"] = "ingest"
    incoming: BatchPart  # the file as it arrived
    train: BatchPart | None = None  # None: it could not be read, so it can never be trained on
    holdout: BatchPart | None = None
    drift_plot: BatchPart | None = None
    row: BatchFigures = BatchFigures()

    def files(self) -> dict[str, str]:
        parts = (self.incoming, self.train, self.holdout, self.drift_plot)
        return {p.key: p.sha256 for p in parts if p is not None}


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
    def protected(self) -> dict[str, set[bytes]]:
        """Digests of the images no batch may copy: every MNIST test image, every selection image and every
        image already in the new-data holdout (a copy in training would make them a test of memory)."""
        selection = selection_indices(self.mnist.y_train)
        holdout = new_holdout_images(self.store, self.dataset)
        return {
            "test": set(image_hashes(self.mnist.x_test)),
            "selection": set(image_hashes(self.mnist.x_train[selection])),
            "holdout": set(image_hashes(holdout.x)),
        }

    @cached_property
    def trained(self) -> set[bytes]:
        """Digests of every image a night may train on (MNIST's base training images, every accepted batch's
        training share): a holdout image must be none of them. Held-back and selection images are not."""
        base = self.mnist.x_train[base_training(self.mnist, self.dataset)]
        return set(image_hashes(base)) | set(image_hashes(new_training_images(self.store, self.dataset).x))

    @cached_property
    def reference(self) -> tuple[np.ndarray, np.ndarray]:
        """MNIST's base training images (a fixed sample) and all their labels: what drift is measured against."""
        base = base_training(self.mnist, self.dataset)
        sample = np.random.default_rng(SPLIT_SEED).choice(base, size=min(REFERENCE_IMAGES, len(base)), replace=False)
        return self.mnist.y_train[base], self.mnist.x_train[np.sort(sample)]

    @cached_property
    def champion(self):
        """(champion's model key, Keras model, its predictions on mnist-selection), or None before the first champion."""
        from tasks.champion.promotion import find_champion
        from tasks.evaluation.evaluate import predicted_labels
        from tasks.training.model import load_model

        lookup = find_champion(self.store)
        if lookup.champion is None or lookup.model is None:
            if lookup.problem:
                self.log(lookup.problem)
            return None
        selection = predicted_labels(self.store, self.dataset, lookup.model, SLICE_SELECTION)
        return lookup.champion.model_key, load_model(self.store, lookup.model), selection


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


def _check(batch: Batch, digest: str, refs: References, rules: IngestRules) -> tuple[dict, list[str], np.ndarray, np.ndarray]:
    """The figures and problems of one readable batch, which rows are kept (not repeated, not leaked), and
    which of the kept rows may join the holdout (images no night could have trained on)."""
    hashes = image_hashes(batch.images)
    protected = refs.protected
    unique = _first_copies(hashes)
    copies = {name: np.array([h in protected[name] for h in hashes], dtype=bool) for name in ("test", "selection", "holdout")}
    copies["selection"] &= ~copies["test"]
    copies["holdout"] &= ~(copies["test"] | copies["selection"])
    leaked = copies["test"] | copies["selection"] | copies["holdout"]
    keep = unique & ~leaked
    row: dict = {"source": batch.source, "duplicates": int((~unique).sum())}
    row |= {f"leaked_{name}": int((mask & unique).sum()) for name, mask in copies.items()}
    problems = []
    share = float(leaked.mean())
    if share > rules.max_leaked_share:
        problems.append(
            f"leakage: {int(leaked.sum())} of its {len(keep)} images are exact copies of MNIST test images "
            f"({row['leaked_test']}), of the selection split ({row['leaked_selection']}) or of the new-data holdout "
            f"({row['leaked_holdout']}): {share:.0%}, more than the {rules.max_leaked_share:.0%} allowed"
        )
    if keep.sum() < rules.min_batch_images:
        problems.append(
            f"too small: {int(keep.sum())} images once repeats and copies are dropped, fewer than the "
            f"{rules.min_batch_images} its statistics need"
        )
    images, labels = batch.images[keep], batch.labels[keep]
    may_hold_out = np.array([h not in refs.trained for h in hashes[keep]], dtype=bool)
    if not len(labels):
        return row, problems, keep, may_hold_out
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
    return row, problems, keep, may_hold_out


def _ingest_one(
    store: Store, name: str, data: bytes, digest: str, refs: References, rules: IngestRules, run_id: str
) -> BatchRecord:
    incoming = _part(store, digest, "incoming", data, 0)
    record = {"digest": digest, "file": name, "run_id": run_id, "decided_at": datetime.now(UTC), "incoming": incoming}
    try:
        batch = parse_untrusted(data)
    except BatchRejected as exc:
        return BatchRecord(**record, status="quarantined", reason=f"unreadable: {exc}")
    row, problems, keep, may_hold_out = _check(batch, digest, refs, rules)
    images, labels = batch.images[keep], batch.labels[keep]
    held = np.zeros(len(labels), dtype=bool)
    candidates = np.flatnonzero(may_hold_out)
    held[candidates[holdout_rows(labels[candidates], rules.holdout_share, digest)]] = True
    train = _part(store, digest, "train", share_bytes(images[~held], labels[~held]), int((~held).sum()))
    holdout = _part(store, digest, "holdout", share_bytes(images[held], labels[held]), int(held.sum()))
    row |= {"rows": len(batch.labels), "train_rows": train.rows, "holdout_rows": holdout.rows}
    status = "quarantined" if problems else "accepted"
    reason = "; ".join(problems) if problems else _passed(row)
    plot = None
    if len(labels):
        from tasks.evaluation.plots import batch_drift, png_bytes

        reference_labels, reference_images = refs.reference
        intensity, reference_intensity = image_statistics(images)[0], image_statistics(reference_images)[0]
        figure = batch_drift(digest[:12], labels, intensity, reference_labels, reference_intensity, status)
        plot = _part(store, digest, "drift_plot", png_bytes(figure), 0)
    figures = BatchFigures(**row)
    return BatchRecord(**record, status=status, reason=reason, train=train, holdout=holdout, drift_plot=plot, row=figures)


def _passed(row: dict) -> str:
    dropped = row["duplicates"] + row["leaked_test"] + row["leaked_selection"] + row["leaked_holdout"]
    said = [f"{row['rows']} images, {dropped} repeated or leaked and dropped"]
    said.append(f"label shift {row['label_shift']:.3f}, intensity drift {row['mean_intensity_ks']:.3f}")
    if row.get("confident_disagreement") is not None and row.get("champion_confident_disagreement") is not None:
        said.append(
            f"champion confidently disagrees with {row['confident_disagreement']:.1%} of labels "
            f"({row['champion_confident_disagreement']:.1%} on the selection split)"
        )
    elif row.get("champion_model_key"):
        said.append("labels not checked (the champion is confident about none of these images, or none of the selection split)")
    else:
        said.append("labels not checked (no champion yet)")
    return "passed every check: " + ", ".join(said)


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
    write_table(store, "batches", record.run_id, _table_row(record), part=part)
    store.write_text(store.batch_file(record.digest, RECORD), record.model_dump_json(indent=2))


def batch_record(store: Store, digest: str) -> BatchRecord | None:
    """The record of batch ``digest`` if it and every file it names are intact, else None (with a warning)."""
    try:
        info = store.batch_file(digest, RECORD)
        record = store.load_ref(info, BatchRecord, BatchRecord.files)
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
    return record


def batch_records(store: Store) -> list[BatchRecord]:
    """Every intact batch record in the store, by digest."""
    if not store.exists(store.batch_dir()):
        return []
    records = []
    for name in sorted(store.list_files(store.batch_dir())):
        if len(name) != 64 or any(c not in "0123456789abcdef" for c in name):
            continue  # not a batch folder of ours
        record = batch_record(store, name)
        if record is None:
            store.warn(f"Batch {name[:12]}: its record or one of its files is missing or damaged, so it is not used")
            continue
        records.append(record)
    return records


def _trainable(record: BatchRecord) -> bool:
    return record.status == "accepted" and record.train is not None and record.holdout is not None


def accepted_batches(store: Store) -> list[AcceptedBatch]:
    return [AcceptedBatch(digest=r.digest, train=r.train, holdout=r.holdout) for r in batch_records(store) if _trainable(r)]


def incoming_store(store: Store, url: str | None = None) -> Store:
    """The incoming location, as a store of its own: every key it reads is confined to it."""
    return Store(url or store.incoming_url(), warn=store.warn)


def incoming_files(incoming: Store) -> list[tuple[str, int]]:
    """(name, size) of the batch files waiting: plain ``*.parquet`` files directly in the location; names
    starting with ``.`` or ``_`` are files still being written."""
    try:
        entries = incoming.fs.ls(incoming.root, detail=True)
    except FileNotFoundError:
        return []
    found = []
    for entry in entries:
        name = posixpath.basename(str(entry["name"]).rstrip("/"))
        if not name.endswith(".parquet") or name.startswith((".", "_")):
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
        found.append((name, int(entry.get("size") or 0)))
    return sorted(found)


def _take(
    store: Store, incoming: Store, name: str, refs: References, rules: IngestRules, run_id: str, log: Log
) -> BatchRecord | None:
    """One incoming file: read (regular files only), identified, checked, recorded, removed. None: left where it is."""
    try:
        data = incoming.read_regular(name, limit=MAX_BATCH_BYTES)
    except (StoreError, OSError, UnsafeKey) as exc:
        log(f"Incoming file {name!r} cannot be read ({exc}): left where it is")
        return None
    digest = sha256_bytes(data)
    known = batch_record(store, digest)
    fresh = known is None
    if fresh:
        try:
            known = _ingest_one(store, _safe_name(name), data, digest, refs, rules, run_id)
        except Exception as exc:  # noqa: BLE001 (a batch must not stop the night, whatever went wrong with it)
            reason = f"could not be checked ({type(exc).__name__}: {str(exc)[:300]})"
            incoming_part = _part(store, digest, "incoming", data, 0)
            known = BatchRecord(
                digest=digest, file=_safe_name(name), status="quarantined", reason=reason, run_id=run_id,
                decided_at=datetime.now(UTC), incoming=incoming_part,
            )  # fmt: skip
        _publish(store, known)
        log(f"Batch {digest[:12]} ({known.file}): {known.status.upper()}: {known.reason}")
    else:
        log(f"Incoming file {name!r} is batch {digest[:12]}, already {known.status} (run {known.run_id}): removed")
    try:
        incoming.remove(name)
    except (UnsafeKey, OSError) as exc:
        log(f"Incoming file {name!r} could not be removed ({exc}); it is known by its digest and will not be ingested again")
    return known if fresh else None


def ingest_batches(
    store: Store, incoming: Store, dataset: DatasetRef, rules: IngestRules, run_id: str, log: Log = print
) -> IngestRef:
    """Check every new batch, record each decision, and return the dataset version to train on. The night's
    batches are every batch this run ingested, also in an attempt that crashed before this one."""
    with store.lock(LOCK):
        refs = References(store, dataset, log)
        for name, size in incoming_files(incoming):
            if size > MAX_BATCH_BYTES:
                log(f"Incoming file {name!r} is {size} bytes, more than a batch may be ({MAX_BATCH_BYTES}): left where it is")
                continue
            _take(store, incoming, name, refs, rules, run_id, log)
        records = batch_records(store)
    night = sorted((r for r in records if r.run_id == run_id and r.decided_by == "ingest"), key=lambda r: r.decided_at)
    accepted = [AcceptedBatch(digest=r.digest, train=r.train, holdout=r.holdout) for r in records if _trainable(r)]
    return IngestRef(dataset=dataset.model_copy(update={"batches": accepted}), night=night)


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


def set_status(store: Store, prefix: str, status: Literal["accepted", "quarantined"]) -> BatchRecord:
    """Release (accept) or quarantine a batch by hand: recorded in ``batches`` as the operator's decision."""
    with store.lock(LOCK):
        record = find_batch(store, prefix)
        if status == "accepted" and record.train is None:
            raise BatchNotFound(f"Batch {record.digest[:12]} cannot be released: it never parsed ({record.reason})")
        if record.status == status:
            raise BatchNotFound(f"Batch {record.digest[:12]} is already {status}: nothing to change")
        changed = record.model_copy(
            update={
                "status": status,
                "reason": f"{'released' if status == 'accepted' else 'quarantined'} by an operator (was: {record.reason})",
                "decided_by": "operator",
                "decided_at": datetime.now(UTC),
            }
        )
        _publish(store, changed)
    return changed
