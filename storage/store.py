"""The artifact store: the one place that knows where every artifact lives and how it is written.

A store is a local directory or any fsspec URL (``s3://bucket/mnist``, ``memory://x``), so one
bucket can serve several machines. Every write goes to a hidden temporary name in the target
folder and is then renamed, so readers (pyarrow.dataset, pandas, the next run) see either the
old file or the whole new one, never a partial file. Hidden names start with ``.``, which
pyarrow.dataset ignores by default.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import posixpath
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem
from pydantic import BaseModel, Field, ValidationError

from storage.credentials import strip_credentials
from storage.digests import CHUNK, sha256_bytes, sha256_stream
from storage.keys import StoreName, confine_key, confine_name, damage

RefT = TypeVar("RefT")  # a pydantic model describing stored files
LockFactory = Callable[[str], contextlib.AbstractContextManager]  # a lock name → a context manager holding it

DEFAULT_STORE = "artifacts"
STORE_ENV = "MNIST_STORE"
SIDECAR_LIMIT = 1 << 20  # a reference, pointer or record is a few KB: more is not ours
STALE_TMP_SECONDS = 24 * 3600  # a temporary file this old belongs to a writer that was killed
_TMP_NAME = re.compile(r"^\..+\.tmp-[0-9a-f]{32}$")
_log = logging.getLogger("mnist.store")


class StoreError(RuntimeError):
    """The store cannot be used: the message names the store and what to do."""


class WriteConflict(StoreError):
    """Another writer replaced the file after it was read: read it again and decide again."""


class DamagedArtifact(ValueError):
    """A stored file is not what its reference says (digest, size or format): it is not used."""


class CheckpointPointer(BaseModel):
    """A remote checkpoint's ``latest.json``: which folder beside it holds the files of which epoch."""

    epoch: int = Field(ge=0)
    folder: StoreName


class Store:
    """Layout and atomic I/O for every artifact of the pipeline."""

    def __init__(
        self,
        url: str | os.PathLike[str],
        distributed_lock: LockFactory | None = None,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        url = strip_credentials(os.fspath(url))  # a password in the URL goes to fsspec's config, not into logs
        self.distributed_lock = distributed_lock
        self.warn = warn or _log.warning  # where damaged files are reported (a step's run logger)
        self._swept: set[str] = set()
        self.fs, root = fsspec.core.url_to_fs(url)
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self.root = os.path.abspath(root) if self.is_local else root.rstrip("/")
        self.url = self.root if self.is_local else url.rstrip("/")

    @classmethod
    def resolve(cls, url: str | os.PathLike[str] | None = None) -> Store:
        """The store named explicitly, else by ``$MNIST_STORE``, else ``./artifacts``."""
        return cls(url or os.environ.get(STORE_ENV) or DEFAULT_STORE)

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    # ---- layout -------------------------------------------------------------------------
    # Every artifact is named by a key relative to the store's root: references and sidecars hold
    # those keys, so a store copied or synced elsewhere (a directory to a bucket, a renamed bucket)
    # keeps every reference, and every cache hit, valid. I/O methods take keys (or, for a local
    # store, absolute paths, which joining leaves as they are).
    def key(self, *parts: str) -> str:
        return posixpath.join(*parts)

    def path(self, *parts: str) -> str:
        """The filesystem path of a key, for fsspec and pyarrow calls made on ``self.fs``.

        The key is confined first (``storage.keys``): whatever a sidecar said, no read, write or
        delete made through a store reaches outside it. A path this store already resolved (one
        that starts with its root) is taken as the key below the root, and confined the same way.
        """
        key = posixpath.join(*parts)
        if key.startswith(self.root + "/"):
            key = key[len(self.root) + 1 :]
        return posixpath.join(self.root, confine_key(key))

    def location(self, key: str) -> str:
        """What to show a person: the local path, or the full URL (``s3://bucket/...``) of a remote one."""
        path = self.path(key)
        return path if self.is_local else self.fs.unstrip_protocol(path)

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

    def checkpoint_dir(self, key: str) -> str:
        """A local directory for Keras' BackupAndRestore, which needs a real filesystem.

        In a local store it lives inside the store. For a remote store it is a working copy in the
        user's cache directory, which ``push_checkpoint`` copies into the store after every epoch, so
        a run killed on one worker resumes on another (``pull_checkpoint``).
        """
        if self.is_local:
            return self.path(self.key("checkpoints", key))
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        return str(cache / "mnist-pipeline" / "checkpoints" / sha256_bytes(self.url.encode())[:12] / key)

    def push_checkpoint(self, key: str, epoch: int) -> None:
        """Publish the working copy of a remote store's checkpoint: its files under a folder of their
        own, then the one small pointer ``latest.json``, replaced last, then the previous folder goes."""
        if self.is_local:
            return  # the checkpoint already lives in the store
        base, folder = self.key("checkpoints", key), f"epoch-{epoch:04d}-{uuid.uuid4().hex[:8]}"
        local = Path(self.checkpoint_dir(key))
        for file in sorted(p for p in local.iterdir() if p.is_file()):
            self.put_file(str(file), self.key(base, folder, file.name))
        previous = self._checkpoint_pointer(key)
        self.write_text(self.key(base, "latest.json"), CheckpointPointer(epoch=epoch, folder=folder).model_dump_json())
        if previous is not None:  # its folder was confined when the pointer was read
            self.remove(self.key(base, previous.folder), recursive=True)

    def pull_checkpoint(self, key: str) -> int | None:
        """Bring the store's checkpoint of ``key`` into the working copy when it is further along
        than the one here (another machine trained it); returns the epoch it holds, if any."""
        pointer = None if self.is_local else self._checkpoint_pointer(key)
        if pointer is None:
            return None
        local = Path(self.checkpoint_dir(key))
        history = local / "history.json"
        here = len(json.loads(history.read_text())) if history.exists() else 0
        if pointer.epoch > here:
            local.mkdir(parents=True, exist_ok=True)
            folder = self.path("checkpoints", key, pointer.folder)
            for remote in self.fs.ls(folder, detail=False):
                self.fs.get_file(remote, str(local / confine_name(posixpath.basename(remote))))
        return pointer.epoch

    def drop_checkpoint(self, key: str) -> None:
        """The model is stored: its resume point is no longer needed, here or in the store."""
        shutil.rmtree(self.checkpoint_dir(key), ignore_errors=True)
        if not self.is_local:
            self.remove(self.key("checkpoints", key), recursive=True)

    def _checkpoint_pointer(self, key: str) -> CheckpointPointer | None:
        """The pointer, if it is one we write; a damaged one (a folder outside the store, say) is
        reported and ignored: training starts afresh and nothing it names is deleted."""
        pointer = self.key("checkpoints", key, "latest.json")
        if not self.exists(pointer):
            return None
        try:
            return CheckpointPointer.model_validate_json(self.read_bytes(pointer, limit=SIDECAR_LIMIT))
        except (ValidationError, StoreError) as exc:
            self.warn(damage(f"The checkpoint pointer {self.location(pointer)}", exc))
            return None

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

    def champion_file(self) -> str:
        """The pointer to the model in use, at the store's root where consumers look for it first."""
        return self.key("champion.json")

    def table_dir(self, table: str) -> str:
        return self.key("tables", table)

    def table_file(self, table: str, run_id: str, part: str = "part-0") -> str:
        """Hive layout: ``tables/<table>/run_id=<id>/<part>.parquet``.

        A run's own rows are ``part-0``; rows added later about that run (a manual promotion of its
        model) get a part of their own, so nothing already published is rewritten.
        """
        return self.key("tables", table, f"run_id={run_id}", f"{part}.parquet")

    def report_dir(self, run_id: str) -> str:
        return self.key("reports", run_id)

    def report_file(self, run_id: str, name: str) -> str:
        return self.key("reports", run_id, name)

    def results_dir(self) -> str:
        """Prefect's result records (the cache): beside the artifacts they point to, shared by every machine.

        The filesystem path (local) or full URL (remote) that ``flows/results.py`` gives Prefect.
        """
        return self.path("prefect-results") if self.is_local else f"{self.url}/prefect-results"

    def result_record(self, cache_key: str) -> str:
        return self.key("prefect-results", confine_name(cache_key))

    def plots_file(self, key: str, name: str) -> str:
        """Rendered figures of one evaluation, shared by every run that reuses it."""
        return self.key("plots", key, name)

    def lock_file(self, name: str) -> str:
        return self.key("locks", f"{name}.lock")

    # ---- reading ------------------------------------------------------------------------
    def exists(self, key: str) -> bool:
        return self.fs.exists(self.path(key))

    def read_bytes(self, key: str, limit: int | None = None) -> bytes:
        """The bytes of ``key``; with ``limit``, reading stops there and a larger file is refused, so a
        file that grew in the store cannot exhaust this worker's memory."""
        if limit is None:
            return self.fs.cat_file(self.path(key))
        with self.fs.open(self.path(key), "rb") as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise StoreError(f"{self.location(key)} is larger than the {limit} bytes expected of it: not read")
        return data

    def verified_bytes(self, key: str, sha256: str, limit: int | None = None) -> bytes:
        """The bytes of ``key`` read once and hashed: what is used is what was checked."""
        data = self.read_bytes(key, limit)
        if sha256_bytes(data) != sha256:
            raise DamagedArtifact(
                f"{self.location(key)} does not match its SHA-256 ({sha256[:12]}…): it was changed or corrupted"
            )
        return data

    @contextlib.contextmanager
    def verified_copy(self, key: str, sha256: str, suffix: str = "") -> Iterator[str]:
        """A private local copy of ``key``, hashed while it is copied, for libraries that insist on a
        filename (Keras' loader). Local stores are copied too: a file checked in place could be
        swapped before the loader opens it."""
        with tempfile.TemporaryDirectory(prefix="mnist-verified-") as tmp:
            local = os.path.join(tmp, "file" + suffix)
            h = hashlib.sha256()
            with self.fs.open(self.path(key), "rb") as source, open(local, "wb") as target:
                while chunk := source.read(CHUNK):
                    h.update(chunk)
                    target.write(chunk)
            if h.hexdigest() != sha256:
                raise DamagedArtifact(
                    f"{self.location(key)} does not match its SHA-256 ({sha256[:12]}…): it was changed or corrupted"
                )
            yield local

    def open(self, key: str, mode: str = "rb"):
        return self.fs.open(self.path(key), mode)

    def digest(self, key: str) -> tuple[str, int]:
        """SHA-256 and size of a stored file."""
        with self.fs.open(self.path(key), "rb") as f:
            return sha256_stream(f)

    def load_ref(self, info_path: str, ref_type: type[RefT], files: Callable[[RefT], dict[str, str]]) -> RefT | None:
        """A reference stored as JSON beside its artifacts, if every file it names (path → SHA-256) is intact.

        This is what lets a cache hit or a second writer trust a stored result: a missing or
        altered file makes it ``None``, and the step runs again.
        """
        if not self.exists(info_path):
            return None
        try:
            ref = ref_type.model_validate_json(self.read_bytes(info_path, limit=SIDECAR_LIMIT))
        except (ValidationError, StoreError) as exc:  # an older shape, or a key outside the store: made again
            self.warn(damage(f"The reference {self.location(info_path)}", exc))
            return None
        try:
            named = files(ref)
        except (KeyError, ValueError) as exc:  # e.g. a file listed without its digest
            self.warn(damage(f"The reference {self.location(info_path)}", exc))
            return None
        for path, sha256 in named.items():
            if not self.exists(path) or self.digest(path)[0] != sha256:
                return None
        return ref

    # ---- writing ------------------------------------------------------------------------
    def _tmp_name(self, path: str) -> str:
        parent, name = posixpath.split(path)
        return posixpath.join(parent, f".{name}.tmp-{uuid.uuid4().hex}")

    def _commit(self, tmp: str, path: str) -> None:
        if self.is_local:
            _fsync(tmp)  # the bytes reach the disk before the name does: no empty file after a power loss
            os.replace(tmp, path)  # atomic on POSIX: readers see the old or the new file
            _fsync(os.path.dirname(path))  # and the rename itself is durable
        else:
            self.fs.mv(tmp, path)  # object stores publish a whole object or nothing

    def _sweep_stale_tmp(self, folder: str) -> None:
        """Remove temporary files older than a day in ``folder`` (writers killed mid-write leave
        them); once per folder and store object, so a write costs one listing at most."""
        if folder in self._swept:
            return
        self._swept.add(folder)
        cutoff = time.time() - STALE_TMP_SECONDS
        try:
            entries = self.fs.ls(folder, detail=True)
        except (FileNotFoundError, OSError):
            return
        for entry in entries:
            name = posixpath.basename(entry["name"].rstrip("/"))
            if entry.get("type") == "file" and _TMP_NAME.match(name) and _mtime(entry) < cutoff:
                with contextlib.suppress(FileNotFoundError, OSError):
                    self.fs.rm_file(entry["name"])

    @contextlib.contextmanager
    def writing(self, key: str) -> Iterator[str]:
        """Yield a hidden temporary filesystem path beside ``key`` to write with ``self.fs``; it becomes
        ``key`` on success."""
        path = self.path(key)
        self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        self._sweep_stale_tmp(posixpath.dirname(path))
        tmp = self._tmp_name(path)
        try:
            yield tmp
            self._commit(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError, OSError):
                self.fs.rm_file(tmp)
            raise

    def write_bytes(self, path: str, data: bytes) -> None:
        with self.writing(path) as tmp:
            with self.fs.open(tmp, "wb") as f:
                f.write(data)

    def write_text(self, path: str, text: str) -> None:
        self.write_bytes(path, text.encode())

    def put_file(self, local: str, path: str) -> None:
        """Copy a local file into the store atomically."""
        with self.writing(path) as tmp:
            self.fs.put_file(local, tmp)

    # ---- read, decide, write: files that several machines replace (the champion pointer) -------------
    @property
    def conditional_writes(self) -> bool:
        """Whether a write can be made conditional on the object read (S3's If-Match / If-None-Match)."""
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        return any(p in ("s3", "s3a") for p in protocols)

    def read_versioned(self, key: str, limit: int = SIDECAR_LIMIT) -> tuple[bytes | None, str | None]:
        """The bytes of ``key`` (None if absent) and the version they are (S3: the object's ETag, which
        s3fs also makes the read conditional on, so bytes and version belong together)."""
        path = self.path(key)
        if not self.conditional_writes:
            return (self.read_bytes(key, limit) if self.exists(key) else None), None
        self.fs.invalidate_cache(path)
        try:
            with self.fs.open(path, "rb") as f:
                data = f.read(limit + 1)
                version = f.details.get("ETag")
        except FileNotFoundError:
            return None, None
        if len(data) > limit:
            raise StoreError(f"{self.location(key)} is larger than the {limit} bytes expected of it: not read")
        return data, version

    def version(self, key: str) -> str | None:
        """The version of ``key`` now (S3: its ETag), without reading it; None where writes are not conditional."""
        if not self.conditional_writes:
            return None
        self.fs.invalidate_cache(self.path(key))
        try:
            return self.fs.info(self.path(key)).get("ETag")
        except FileNotFoundError:
            return None

    def write_if_unchanged(self, key: str, data: bytes, version: str | None) -> None:
        """Replace ``key`` only if it is still the version read (``None``: only if it is still absent).

        On S3 this is one conditional PutObject, atomic across every machine; a losing writer gets
        ``WriteConflict``. Elsewhere the caller's lock (``Store.lock``) is what serialises writers:
        an flock on a local store, the server's concurrency limit for a remote one.
        """
        if not self.conditional_writes:
            self.write_bytes(key, data)
            return
        condition = {"IfMatch": version} if version is not None else {"IfNoneMatch": "*"}
        path = self.path(key)
        try:
            self.fs.pipe_file(path, data, **condition)
        except Exception as exc:  # s3fs turns HTTP 412 (and 409 for concurrent conditional writes) into OSError/ValueError
            text = f"{exc} {getattr(exc, '__cause__', '')}"
            if any(code in text for code in ("412", "PreconditionFailed", "409", "ConditionalRequestConflict")):
                raise WriteConflict(f"{self.location(key)} was replaced by another writer after it was read") from exc
            raise
        finally:
            self.fs.invalidate_cache(path)

    def remove(self, key: str, recursive: bool = False) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self.path(key), recursive=recursive)

    def check_writable(self) -> None:
        """Fail now, with the store's name, rather than after fifteen epochs of training."""
        probe = self.key("locks", f".probe-{uuid.uuid4().hex}")
        try:
            self.write_bytes(probe, b"ok")
            self.fs.rm_file(self.path(probe))
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            hint = "free some space" if exc.errno == errno.ENOSPC else "fix its permissions"
            raise StoreError(
                f"The artifact store {self.url} cannot be written ({reason}). "
                f"Point --store / ${STORE_ENV} at a writable location, or {hint}."
            ) from exc

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """Serialise the writers of one artifact.

        A local store uses an flock in the store, released by the kernel even if the process is
        killed. A remote store uses the lock given to the store (``distributed_lock``: a Prefect
        global concurrency limit, enforced by the server for every worker), else an flock in this
        machine's cache, which serialises only this machine's writers.
        """
        if not self.is_local and self.distributed_lock is not None:
            with self.distributed_lock(f"{sha256_bytes(self.url.encode())[:8]}-{name}"):
                yield
            return
        import fcntl

        path = self.path(self.lock_file(name)) if self.is_local else self._machine_lock_file(name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _machine_lock_file(self, name: str) -> str:
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        return str(cache / "mnist-pipeline" / "locks" / sha256_bytes(self.url.encode())[:12] / f"{name}.lock")


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _mtime(entry: dict) -> float:
    """Modification time of an fsspec listing entry (local: ``mtime``; S3: ``LastModified``), else now."""
    for field in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = entry.get(field)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, (int, float)):
            return float(value)
    return time.time()
