"""Serialising the writers of one artifact: an flock on a local store, the lock a remote store is given."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

from storage.digests import sha256_bytes
from storage.door import NotARegularFile

LockFactory = Callable[[str], contextlib.AbstractContextManager]  # a lock name → a context manager holding it


class StoreLocks:
    """Locks of a store (mixed into ``storage.Store``)."""

    distributed_lock: LockFactory | None
    warn: Callable[[str], None]

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

        if self.is_local:  # through the store's door: a link or pipe planted at the lock file is set aside, not opened
            path = self.path(self.lock_file(name))
            try:
                handle = self.fs.open(path, "ab")
            except NotARegularFile:
                self.warn(f"{path} was not a lock file (a link, pipe or folder): set aside as {self.fs.set_aside(path)}")
                handle = self.fs.open(path, "ab")
        else:
            path = self._machine_lock_file(name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            handle = open(path, "a")  # this machine's own cache, not the store
        with handle:
            # Only the pipeline's own user may open a lock file: a consumer given read access to the store could
            # otherwise hold an flock on a read-only descriptor and keep every night waiting on it.
            os.fchmod(handle.fileno(), 0o600)
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _machine_lock_file(self, name: str) -> str:
        return self.cache_dir("locks", f"{name}.lock")
