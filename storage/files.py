"""Reading and writing a store's files: atomic, durable writes, bounded reads, and reads whose bytes are the
ones checked against their digest. Every key is confined to the store before it reaches the filesystem.

Every write goes to a hidden temporary name in the target folder and is then renamed, so readers
(pyarrow.dataset, pandas, the next run) see either the old file or the whole new one, never a partial
file. Hidden names start with ``.``, which pyarrow.dataset ignores by default.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import posixpath
import re
import stat
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any, TypeVar

from fsspec import AbstractFileSystem
from pydantic import ValidationError

from storage.digests import CHUNK, sha256_bytes, sha256_stream
from storage.door import NotARegularFile
from storage.keys import confine_key, damage
from storage.layout import STORE_ENTRIES

RefT = TypeVar("RefT")  # a pydantic model describing stored files
STORE_ENV = "MNIST_STORE"
SIDECAR_LIMIT = 1 << 20  # a reference, pointer or record is a few KB: more is not ours
# The largest file a reference of ours names: a batch's share (100 000 images) or its incoming file.
REFERENCED_FILE_LIMIT = 128 << 20
STALE_TMP_SECONDS = 24 * 3600  # a temporary file this old belongs to a writer that was killed
_TMP_NAME = re.compile(r"^\..+\.tmp-[0-9a-f]{32}$")


class StoreError(RuntimeError):
    """The store cannot be used: the message names the store and what to do."""


class WriteConflict(StoreError):
    """Another writer replaced the file after it was read: read it again and decide again."""


class DamagedArtifact(ValueError):
    """A stored file is not what its reference says (digest, size or format): it is not used."""


class StoreFiles:
    """File I/O on keys (mixed into ``storage.Store``, which sets ``fs``, ``root``, ``url``, ``is_local`` and ``warn``)."""

    fs: AbstractFileSystem
    root: str
    url: str
    is_local: bool
    warn: Callable[[str], None]
    _swept: set[str]

    def path(self, *parts: str) -> str:
        """The filesystem path of a key, for fsspec and pyarrow calls made on ``self.fs``.

        The key is confined first (``storage.keys``): whatever a sidecar said, no read, write or
        delete made through a store reaches outside it; on a local store the door (``storage.door``)
        then refuses a symbolic link at any component. A path this store already resolved (one that
        starts with its root) is taken as the key below the root, and confined the same way.
        """
        key = posixpath.join(*parts)
        if key.startswith(self.root + "/"):
            key = key[len(self.root) + 1 :]
        return posixpath.join(self.root, confine_key(key))  # links inside a local store: storage/door.py

    def location(self, key: str) -> str:
        """What to show a person: the local path, or the full URL (``s3://bucket/...``) of a remote one."""
        path = self.path(key)
        return path if self.is_local else self.fs.unstrip_protocol(path)

    def exists(self, key: str) -> bool:
        return self.fs.exists(self.path(key))

    def matches(self, key: str, sha256: str, size: int | None = None, limit: int | None = None) -> bool:
        """Whether ``key`` is a regular file with these bytes: absent, a folder, a link, a pipe or other bytes all
        mean no, so whatever stands there is a miss and never an error that stops a step. With ``limit``, a file
        larger than that is a miss before a byte of it is hashed (a 20 GiB sparse file is not read for a minute)."""
        if self.kind(key) != "file":
            return False
        try:
            bounds = [b for b in (size, limit) if b is not None]
            if bounds and self.fs.size(self.path(key)) > min(bounds):
                return False
            digest, got = self.digest(key)
        except (OSError, StoreError):
            return False
        return digest == sha256 and (size is None or got == size)

    def kind(self, key: str) -> str | None:
        """What stands at ``key``: ``file``, ``directory``, ``other`` (a link, pipe, socket) or None (nothing)."""
        try:
            return self.fs.info(self.path(key)).get("type")
        except FileNotFoundError:
            return None
        except OSError:  # a link at a folder above it, a name the filesystem refuses: not a file of ours
            return "other"

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

    def read_regular(self, key: str, limit: int) -> bytes:
        """The bytes of ``key`` if it is a regular file, for a location others write (incoming batches): on a
        local filesystem it is opened without following a link and without blocking, and checked to be a
        regular file on the open descriptor, so a name swapped for a link or a pipe after it was listed is
        refused, not followed or waited on."""
        try:
            return self.read_bytes(key, limit)
        except NotARegularFile as exc:
            raise StoreError(f"{self.location(key)} is not a regular file: not read ({exc.strerror})") from exc

    def verified_bytes(self, key: str, sha256: str, limit: int | None = None) -> bytes:
        """The bytes of ``key`` read once and hashed: what is used is what was checked."""
        data = self.read_bytes(key, limit)
        if sha256_bytes(data) != sha256:
            raise DamagedArtifact(
                f"{self.location(key)} does not match its SHA-256 ({sha256[:12]}…): it was changed or corrupted"
            )
        return data

    @contextlib.contextmanager
    def verified_copy(self, key: str, sha256: str, suffix: str = "", limit: int = 1 << 31) -> Iterator[str]:
        """A private local copy of ``key``, hashed while it is copied, for libraries that insist on a
        filename (Keras' loader). Local stores are copied too: a file checked in place could be
        swapped before the loader opens it."""
        with tempfile.TemporaryDirectory(prefix="mnist-verified-") as tmp:
            local = os.path.join(tmp, "file" + suffix)
            h = hashlib.sha256()
            self._copy_bounded(key, local, limit, DamagedArtifact, h.update)
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

    def load_ref(
        self,
        info_path: str,
        ref_type: type[RefT],
        files: Callable[[RefT], dict[str, str]],
        limit: int = REFERENCED_FILE_LIMIT,
    ) -> RefT | None:
        """A reference stored as JSON beside its artifacts, if every file it names (path → SHA-256) is intact.

        This is what lets a cache hit or a second writer trust a stored result: a missing or
        altered file makes it ``None``, and the step runs again. A named file over ``limit`` bytes is not ours and
        is a miss before a byte of it is hashed: a sparse file of terabytes planted under a reference would
        otherwise be read whole, by every night that looks at it, outside any step's budget.
        """
        kind = self.kind(info_path)
        if kind is None:
            return None
        if kind != "file":
            self.warn(f"The reference {self.location(info_path)} cannot be read: it is a {kind}, not a file; not used")
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
            if not self.matches(path, sha256, limit=limit):
                return None
        return ref

    def _tmp_name(self, path: str) -> str:
        parent, name = posixpath.split(path)
        return posixpath.join(parent, f".{name}.tmp-{uuid.uuid4().hex}")

    def _commit(self, tmp: str, path: str) -> None:
        if self.is_local:
            self.fs.fsync(tmp)  # the bytes reach the disk before the name does: no empty file after a power loss
            self.fs.mv(tmp, path)  # atomic rename, then fsync of the folder; a folder planted at ``path`` is set aside
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
            entries = self.listing(folder)
        except (FileNotFoundError, OSError):
            return
        for entry in entries:
            name = posixpath.basename(entry["name"].rstrip("/"))
            if entry.get("type") == "file" and _TMP_NAME.match(name) and listed_mtime(entry) < cutoff:
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
        try:
            self.fs.rm(self.path(key), recursive=recursive)
        except (FileNotFoundError, NotARegularFile):  # a link above it: nothing of ours is there
            pass
        except IsADirectoryError:  # a folder planted where a file of ours was: set aside, never an error
            if not self.is_local:
                raise
            self.warn(f"{self.location(key)} is a folder, not a file: set aside as {self.fs.set_aside(self.path(key))}")

    def check_writable(self) -> None:
        """Fail now, with the store's name, rather than after fifteen epochs of training."""
        probe = self.key("locks", f".probe-{uuid.uuid4().hex}")
        kind = self._root_kind()
        if kind not in (None, "directory"):
            raise StoreError(
                f"The artifact store {self.url} is a {kind}, not a folder: point --store / ${STORE_ENV} at a folder "
                "(a new one is made) or a store's URL."
            )
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

    def _root_kind(self) -> str | None:
        """What stands at the store's own root: ``directory``, ``file``, another kind, or None (nothing yet)."""
        if self.is_local:  # the root as named (a link to a folder is followed, as the door opens it)
            try:
                mode = os.stat(self.root).st_mode
            except (FileNotFoundError, NotADirectoryError):  # nothing there, or a file where a folder above should be
                return None
            return "directory" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode) else "special file"
        try:
            return self.fs.info(self.root).get("type")
        except FileNotFoundError:
            return None

    def check_store(self) -> bool:
        """For a reader: ``StoreError`` with one sentence when nothing is there, when it is a file, or when it is a
        folder holding nothing a store holds (a mistyped ``--store`` must not read as a store where nothing ran yet).
        True when it holds a store's entries, False for an empty folder (a store nothing has written yet)."""
        try:
            kind = self._root_kind()
        except OSError as exc:  # a link where the store should be, a name the filesystem refuses
            raise StoreError(f"{self.url} cannot be read as a store ({exc}).") from None
        fix = f"give --store (or ${STORE_ENV}) the folder or URL that `mnist-pipeline run` writes to"
        if kind is None:
            raise StoreError(f"There is no store at {self.url}: nothing is there; {fix}.")
        if kind != "directory":
            raise StoreError(f"{self.url} is a {'file' if kind == 'file' else kind}, not a store; {fix}.")
        names = [posixpath.basename(entry["name"]) for entry in self.listing(self.root)]
        if names and not set(names) & set(STORE_ENTRIES):
            shown = ", ".join(sorted(names)[:5]) + (", …" if len(names) > 5 else "")
            raise StoreError(f"{self.url} is a folder but not a store: it holds {shown} and none of a store's entries; {fix}.")
        return bool(names)

    def listing(self, folder: str) -> list[dict[str, Any]]:
        """The entries directly in ``folder`` (a path, as ``path`` gives), each name once, in name order: the one
        way the code lists the store, so no caller sees a name twice.

        An object store has no folders, only keys: an object ``a/b`` and an object ``a/b/c`` make s3fs list ``b``
        twice, once as a file and once as a folder (the common prefix). Listed once, that name is the folder (it
        holds what was written below it) and the object beside it is not a second entry."""
        entries: dict[str, dict[str, Any]] = {}
        for entry in self.fs.ls(folder, detail=True):
            name = entry["name"].rstrip("/")
            if name not in entries or entry.get("type") == "directory":
                entries[name] = {**entry, "name": name}
        return [entries[name] for name in sorted(entries)]

    def list_files(self, key: str) -> list[str]:
        """The names of the entries directly in folder ``key`` (files and folders), each once."""
        return [posixpath.basename(entry["name"]) for entry in self.listing(self.path(key))]

    def list_folders(self, key: str) -> list[str]:
        """The names of the folders directly in folder ``key``: a plain file (or object) is not one, even where an
        object store lists a folder of its name beside it (then the folder is listed, once)."""
        return [posixpath.basename(e["name"]) for e in self.listing(self.path(key)) if e.get("type") == "directory"]

    def get_file(self, key: str, local: str, limit: int | None = None) -> int:
        """Copy ``key`` to the local path ``local``; returns the bytes copied. With ``limit``, copying stops there and
        a larger file is refused, so a file grown in the store cannot fill this machine's disk."""
        if limit is None:
            self.fs.get_file(self.path(key), local)
            return os.path.getsize(local)
        return self._copy_bounded(key, local, limit, StoreError)

    def _copy_bounded(
        self, key: str, local: str, limit: int, error: type[Exception], seen: Callable[[bytes], object] | None = None
    ) -> int:
        """Copy ``key`` to ``local`` in chunks, stopping with ``error`` once more than ``limit`` bytes came (a file
        grown in the store never fills this machine's disk); ``seen`` gets each chunk (a digest while copying)."""
        copied = 0
        with self.fs.open(self.path(key), "rb") as source, open(local, "wb") as target:
            while chunk := source.read(CHUNK):
                copied += len(chunk)
                if copied > limit:
                    raise error(f"{self.location(key)} is larger than the {limit} bytes expected of it: not copied")
                if seen is not None:
                    seen(chunk)
                target.write(chunk)
        return copied


def listed_mtime(entry: dict) -> float:
    """Modification time of an fsspec listing entry (local: ``mtime``; S3: ``LastModified``), else now."""
    for field in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = entry.get(field)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, (int, float)):
            return float(value)
    return time.time()
