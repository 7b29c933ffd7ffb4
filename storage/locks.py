"""Serialising the writers of one artifact: an flock on a local store, the lock a remote store is given."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import posixpath
from collections.abc import Callable, Iterator
from typing import IO

from storage.digests import sha256_bytes
from storage.door import NotARegularFile

LockFactory = Callable[[str], contextlib.AbstractContextManager]  # a lock name → a context manager holding it
LOCK_TRIES = 20  # times a lock file is opened again when the one locked was no longer the one at its name


class LockError(OSError):
    """A store's lock could not be taken: its lock file kept being replaced while this process waited on it."""


class StoreLocks:
    """Locks of a store (mixed into ``storage.Store``)."""

    distributed_lock: LockFactory | None
    warn: Callable[[str], None]

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """Serialise the writers of one artifact.

        A local store uses an flock in the store, released by the kernel even if the process is
        killed (``_locked_store_file``). A remote store uses the lock given to the store
        (``distributed_lock``: a Prefect global concurrency limit, enforced by the server for every
        worker), else an flock in this machine's cache, which serialises only this machine's writers.
        """
        if not self.is_local and self.distributed_lock is not None:
            with self.distributed_lock(f"{sha256_bytes(self.url.encode())[:8]}-{name}"):
                yield
            return
        if self.is_local:
            handle = self._locked_store_file(self.path(self.lock_file(name)))
        else:
            path = self._machine_lock_file(name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            handle = open(path, "a")  # this machine's own cache, not the store
            os.fchmod(handle.fileno(), 0o600)
            fcntl.flock(handle, fcntl.LOCK_EX)
        with handle:
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _locked_store_file(self, path: str) -> IO[bytes]:
        """The lock file at ``path``, open and flocked, and still the file at that name once locked.

        Whoever can write the store can replace a lock file with one of their own (another Unix user in the store's
        group: a file the pipeline may not chmod, or may not write). Mutual exclusion needs every worker to flock the
        same file, so the file at the name is used as it is whenever this pipeline's user can open it at all: an
        flock needs no write access, so a file it may only read is opened read-only, and a chmod to 0600 that the
        file's owner alone may make is skipped with a warning. Only a file this user cannot open (or a link, pipe
        or folder) is replaced: set aside to a hidden name and a new one made, while holding an flock on the
        ``locks`` folder and after trying it once more, so two workers never replace it twice (the second would
        set aside the file the first already holds). A worker never replaces a file it or any other worker of the
        pipeline could open, hence never one another worker holds; and a lock counts as taken only when the file
        locked is still the one at the name, so two holders of one lock always hold one file, and flock keeps them
        apart. (All workers of a store run as one user: a lock file of the pipeline's own is 0600.)"""
        for _ in range(LOCK_TRIES):
            try:
                handle = self._open_lock_file(path)
            except FileNotFoundError:  # removed between two tries: made again on the next
                continue
            try:
                self._own_lock_file(handle, path)
                fcntl.flock(handle, fcntl.LOCK_EX)
                held = os.fstat(handle.fileno())
                now = self.fs.info(path)
                if (now["ino"], now["type"]) == (held.st_ino, "file"):
                    return handle
            except (FileNotFoundError, NotARegularFile):  # nothing, or a link, at the name now
                pass
            except BaseException:
                handle.close()
                raise
            handle.close()  # replaced while this process waited on it: the file at the name now is the lock
        raise LockError(
            errno.EAGAIN,
            f"the lock file {path} was replaced {LOCK_TRIES} times while this step waited on it: another writer of "
            "the store is replacing it; stop it, then run again",
        )

    def _open_lock_file(self, path: str, replace: bool = True) -> IO[bytes]:
        try:
            return self.fs.open(path, "ab")  # made if missing (the store's door: a link is never followed)
        except NotARegularFile:
            why = "is a link, pipe or folder, not a lock file"
        except PermissionError:  # another user's file this user may not write: an flock needs only to read it
            try:
                return self.fs.open(path, "rb")
            except NotARegularFile:
                why = "is a link, pipe or folder, not a lock file"
            except PermissionError:
                why = "cannot be opened by this pipeline's user (another user's file)"
        if not replace:
            raise NotARegularFile(errno.EACCES, f"it {why}", path)
        with self.fs.folder_locked(posixpath.dirname(path)):
            try:  # another worker may have replaced it while this one waited for the folder
                return self._open_lock_file(path, replace=False)
            except NotARegularFile:
                aside = self.fs.set_aside(path)
                self.warn(f"The lock file {path} {why}: set aside as {aside}, and a new one made")
                return self.fs.open(path, "ab")

    def _own_lock_file(self, handle: IO[bytes], path: str) -> None:
        """Only the pipeline's own user may open a lock file it made: a consumer given read access to the store could
        otherwise hold an flock on a read-only descriptor and keep every night waiting on it. Another user's file
        cannot be chmodded by this user; it is used as it is, and said."""
        try:
            os.fchmod(handle.fileno(), 0o600)
        except PermissionError:
            self.warn(
                f"The lock file {path} belongs to another user (uid {os.fstat(handle.fileno()).st_uid}): used as it is, "
                "though whoever can read it could hold it; remove it to have the pipeline make its own"
            )

    def _machine_lock_file(self, name: str) -> str:
        return self.cache_dir("locks", f"{name}.lock")
