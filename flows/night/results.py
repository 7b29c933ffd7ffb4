"""Prefect's result records in the shared store, read as untrusted input: a cache hit never runs code.

Prefect unpickles a record with whatever serializer the record itself names (``pickle``, or a
``json`` serializer whose ``object_decoder`` is any importable function), so anyone who could
write one object under ``<store>/prefect-results/`` could run code on every worker that next hit
that cache key. Here:

* the cached steps write their records with :class:`ReferenceSerializer`: JSON of one of the
  four reference classes, by a fixed short name, decoded with ``json.loads`` and pydantic alone
  (nothing is imported by name, no object hook);
* the result storage blocks below check every record *before* Prefect parses it: a record that
  is not exactly what that serializer writes is refused, which Prefect treats as a cache miss; the
  bytes checked are the bytes handed on;
* ``check_record`` is what ``flows.night.caching`` calls before each cached step, to log such a record
  once (its key and why) and remove it, so the step runs and writes a good one.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from prefect._internal.compatibility.async_dispatch import async_dispatch
from prefect.filesystems import RemoteFileSystem
from prefect.serializers import Serializer
from pydantic import BaseModel, Field, ValidationError, field_validator

from storage import SIDECAR_LIMIT, Store, damage, sha256_bytes
from storage.door import ConfinedLocalFileSystem
from tasks.data.fetch import DatasetRef
from tasks.evaluation.evaluate import EvaluationRef
from tasks.evaluation.plots import PlotsRef
from tasks.training.model import ModelRef

REFERENCES: dict[str, type[BaseModel]] = {cls.__name__: cls for cls in (DatasetRef, ModelRef, EvaluationRef, PlotsRef)}
SERIALIZER_TYPE = "mnist-reference"


class UntrustedRecord(ValueError):
    """A result record that is not one this pipeline writes: a cache miss, never deserialized."""


class ReferenceSerializer(Serializer):
    """JSON of a reference (``{"class": "ModelRef", "data": {...}}``): data only, by construction."""

    type: Literal["mnist-reference"] = Field(default=SERIALIZER_TYPE, frozen=True)

    def dumps(self, obj: BaseModel) -> bytes:
        name = type(obj).__name__
        if REFERENCES.get(name) is not type(obj):
            raise TypeError(f"{name} is not a reference this pipeline caches ({', '.join(REFERENCES)})")
        return json.dumps({"class": name, "data": obj.model_dump(mode="json")}, sort_keys=True).encode()

    def loads(self, blob: bytes) -> BaseModel:
        return parse_reference(blob)


def _json(blob: bytes | str, what: str):
    """Plain ``json.loads`` (no hooks); anything it cannot parse, nested too deep included, is not ours."""
    try:
        return json.loads(blob)
    except (ValueError, RecursionError) as exc:
        raise UntrustedRecord(f"{what} is not JSON (a pickle, or damaged)") from exc


def parse_reference(blob: bytes | str) -> BaseModel:
    """The reference in a record's ``result``, validated (keys confined to the store); else ``UntrustedRecord``."""
    payload = _json(blob, "its result")
    if (
        not isinstance(payload, dict)
        or set(payload) != {"class", "data"}
        or not isinstance(payload["class"], str)
        or payload["class"] not in REFERENCES
        or not isinstance(payload["data"], dict)
    ):
        raise UntrustedRecord(f"its result is not one of the references {', '.join(REFERENCES)}")
    try:
        return REFERENCES[payload["class"]].model_validate(payload["data"])
    except (ValidationError, RecursionError) as exc:
        raise UntrustedRecord(damage("its result", exc)) from exc


RECORD_FIELDS = {"metadata", "result"}
METADATA_FIELDS = {"storage_key", "expiration", "serializer", "prefect_version", "storage_block_id"}


def check_record(content: bytes) -> BaseModel:
    """The reference a record holds, if the record is exactly what ``ReferenceSerializer`` writes.

    Checked with ``json.loads`` only, before Prefect sees the bytes: the serializer must be ours
    with no other field (no ``picklelib``, no ``object_decoder``), and the result must validate as a
    reference. Anything else raises ``UntrustedRecord`` with the reason.
    """
    if len(content) > SIDECAR_LIMIT:
        raise UntrustedRecord(f"it is larger than {SIDECAR_LIMIT} bytes")
    record = _json(content, "it")
    if not isinstance(record, dict) or set(record) != RECORD_FIELDS or not isinstance(record["metadata"], dict):
        raise UntrustedRecord("it is not a Prefect result record of the shape this pipeline writes")
    metadata = record["metadata"]
    if not set(metadata) <= METADATA_FIELDS:
        raise UntrustedRecord(
            f"its metadata has fields {sorted(set(metadata) - METADATA_FIELDS)} that this pipeline never writes"
        )
    serializer = metadata.get("serializer")
    if serializer != {"type": SERIALIZER_TYPE}:
        named = serializer.get("type") if isinstance(serializer, dict) else serializer
        raise UntrustedRecord(f"it names the serializer {str(named)[:60]!r}, not {SERIALIZER_TYPE!r}, the only one read here")
    if not isinstance(record["result"], str):
        raise UntrustedRecord("its result is not JSON text")
    return parse_reference(record["result"])


def _checked(content: bytes, path: str) -> bytes:
    try:
        check_record(content)
    except UntrustedRecord as exc:  # Prefect reads a failed read as a cache miss; the step runs
        raise UntrustedRecord(f"Result record {path} refused: {exc}") from None
    return content


class CheckedReads:
    """A result storage block's reads, refusing any record that ``check_record`` refuses (sync and async alike).

    Mixed in before Prefect's own filesystem block; the block supplies ``_resolve_path`` and ``_open``.
    """

    async def aread_path(self, path: str) -> bytes:
        return self.read_path(path, _sync=True)

    @async_dispatch(aread_path)
    def read_path(self, path: str) -> bytes:
        resolved = self._resolve_path(path)
        with self._open(resolved) as f:
            return _checked(f.read(SIDECAR_LIMIT + 1), str(resolved))


class CheckedStoreResults(CheckedReads, RemoteFileSystem):
    """Prefect's result storage in a local store, through the store's door (``storage/door.py``): a link or pipe
    planted at ``prefect-results`` or at a record is never followed, a file planted there is set aside."""

    _block_type_name = "MNIST checked store results"

    @field_validator("basepath")
    def check_basepath(cls, value: str) -> str:  # noqa: N805 (pydantic's validator; replaces the URL-only check)
        """A local store's folder, as an absolute path (Prefect's remote block insists on a URL with a host)."""
        if not value.startswith("/"):
            raise ValueError(f"{value!r}: the results folder of a local store is an absolute path")
        return value

    @property
    def filesystem(self) -> ConfinedLocalFileSystem:
        if not self._filesystem:
            self._filesystem = ConfinedLocalFileSystem.store_folder(self.basepath)
        return self._filesystem

    def _open(self, resolved):
        return self.filesystem.open(resolved, "rb")


class CheckedRemoteResults(CheckedReads, RemoteFileSystem):
    """Prefect's fsspec result storage (a bucket), checked."""

    _block_type_name = "MNIST checked remote results"

    def _open(self, resolved):
        return self.filesystem.open(resolved, "rb")


def result_storage(store: Store) -> RemoteFileSystem:
    """The checked result storage for ``store``, saved under a name derived from the store, as Prefect
    requires of result storage for deployed runs."""
    block: Any = (
        CheckedStoreResults(basepath=store.results_dir())
        if store.is_local
        else CheckedRemoteResults(basepath=store.results_dir())
    )
    block.save(f"mnist-results-{sha256_bytes(store.url.encode())[:12]}", overwrite=True)
    return block
