"""Where every artifact lives: the store's keys, built in one place. No I/O here.

Every artifact is named by a key relative to the store's root: references and sidecars hold those
keys, so a store copied or synced elsewhere (a directory to a bucket, a renamed bucket) keeps every
reference, and every cache hit, valid. A key that comes from store content (a model key in the
champion pointer, a cache key) is confined to one name (``storage.keys``) before it is joined.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from pathlib import Path

from storage.digests import sha256_bytes
from storage.keys import confine_name

# What a store holds at its root, whatever wrote it: a folder holding none of these is not a store.
STORE_ENTRIES = (
    "champion.json",
    "tables",
    "models",
    "evaluations",
    "objects",
    "batches",
    "incoming",
    "reports",
    "plots",
    "prefect-results",
    "locks",
    "checkpoints",
)


class Layout:
    """The keys of a store (mixed into ``storage.Store``, which sets ``root``, ``url`` and ``is_local``)."""

    root: str
    url: str
    is_local: bool

    def key(self, *parts: str) -> str:
        return posixpath.join(*parts)

    def unique(self, key: str) -> str:
        """``key`` with a writer's own suffix (``model.keras`` → ``model-1f2e3d4c.keras``).

        Artifacts made of several files are published in one step: each writer writes its files
        under unique names, then replaces the one small sidecar that names them (``model.json``,
        ``evaluation.json``, ``plots.json``). Two writers can never leave a model file of one beside
        the sidecar of the other; a reader follows the sidecar and sees one writer's whole output.
        """
        stem, dot, ext = posixpath.basename(key).partition(".")
        return posixpath.join(posixpath.dirname(key), f"{stem}-{uuid.uuid4().hex[:8]}{dot}{ext}")

    def object_path(self, sha256: str) -> str:
        """Content-addressed blobs: the same bytes are stored once, whoever fetched them."""
        return self.key("objects", "sha256", sha256[:2], sha256)

    def model_file(self, key: str) -> str:
        return self.key("models", confine_name(key), "model.keras")

    def history_file(self, key: str) -> str:
        return self.key("models", confine_name(key), "history.parquet")

    def model_info_file(self, key: str) -> str:
        """Where model ``key``'s reference lives; ``key`` may come from the champion pointer or the
        promotions table, so a key that is not one name is refused (``UnsafeKey``)."""
        return self.key("models", confine_name(key), "model.json")

    def evaluation_file(self, key: str) -> str:
        return self.key("evaluations", key, "predictions.parquet")

    def evaluation_info_file(self, key: str) -> str:
        return self.key("evaluations", key, "evaluation.json")

    def model_predictions_info_file(self, key: str) -> str:
        """Which stored file holds every test image's prediction by one model (by model digest and evaluation
        code): what the gate pairs a champion's predictions from, without loading the champion."""
        return self.key("evaluations", "by-model", confine_name(key), "test_predictions.json")

    def test_predictions_file(self, key: str) -> str:
        """Every test image's prediction: what a champion/challenger comparison pairs image by image."""
        return self.key("evaluations", key, "test_predictions.parquet")

    def slice_predictions_file(self, key: str, slice_name: str) -> str:
        """Every image's prediction on one evaluation slice (``mnist-selection``, ``new-data``, ``mnist-test``)."""
        return self.key("evaluations", confine_name(key), f"{confine_name(slice_name)}.parquet")

    def incoming_url(self) -> str:
        """Where new labelled batches land unless ``$MNIST_INCOMING`` says otherwise: ``<store>/incoming``."""
        return posixpath.join(self.url, "incoming") if not self.is_local else os.path.join(self.root, "incoming")

    def batch_dir(self) -> str:
        """Every batch ever ingested, accepted or quarantined, under its content digest."""
        return self.key("batches")

    def batch_file(self, digest: str, name: str) -> str:
        """One file of the batch ``digest``: its record (``batch.json``), the incoming file as it arrived
        (``incoming.parquet``), its training and holdout shares, its drift plot."""
        return self.key("batches", confine_name(digest), confine_name(name))

    def champion_file(self) -> str:
        """The pointer to the model in use, at the store's root where consumers look for it first."""
        return self.key("champion.json")

    def table_dir(self, table: str) -> str:
        return self.key("tables", table)

    def table_file(self, table: str, run_id: str, part: str = "part-0") -> str:
        """Hive layout: ``tables/<table>/run_id=<id>/<part>.parquet``.

        A run's own rows are ``part-0``; other rows get a part of their own (a batch's decision), so nothing
        already published is rewritten. An operator's decision, which no night made, is written under
        ``run_id=__HIVE_DEFAULT_PARTITION__`` (``storage.tables.NO_RUN``), which every reader reads as a null run id.
        """
        return self.key("tables", table, f"run_id={run_id}", f"{part}.parquet")

    def report_dir(self, run_id: str) -> str:
        return self.key("reports", run_id)

    def report_file(self, run_id: str, name: str) -> str:
        return self.key("reports", run_id, name)

    def report_index(self, run_id: str) -> str:
        """The page a run's report opens with."""
        return self.report_file(run_id, "index.md")

    def results_dir(self) -> str:
        """Prefect's result records (the cache): beside the artifacts they point to, shared by every machine.

        The filesystem path (local) or full URL (remote) that ``flows/night/results.py`` gives Prefect.
        """
        return self.path("prefect-results") if self.is_local else f"{self.url}/prefect-results"

    def result_record(self, cache_key: str) -> str:
        return self.key("prefect-results", confine_name(cache_key))

    def plots_file(self, key: str, name: str) -> str:
        """Rendered figures of one evaluation, shared by every run that reuses it."""
        return self.key("plots", key, name)

    def lock_file(self, name: str) -> str:
        return self.key("locks", f"{name}.lock")

    def night_markers_dir(self) -> str:
        """Where each running night leaves its marker (``storage/nights.py``): what a prune reads first."""
        return self.key("locks", "nights")

    def night_marker_file(self, run_id: str) -> str:
        return self.key("locks", "nights", f"{confine_name(run_id)}.json")

    def checkpoint_key(self, key: str, *parts: str) -> str:
        """A remote store's copy of training ``key``'s checkpoint: ``latest.json`` and its epoch folders."""
        return self.key("checkpoints", confine_name(key), *parts)

    def cache_dir(self, *parts: str) -> str:
        """This machine's own folder for this store (checkpoint working copies, flocks of a remote store)."""
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        return str(cache.joinpath("mnist-pipeline", parts[0], sha256_bytes(self.url.encode())[:12], *parts[1:]))
