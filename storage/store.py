"""The artifact store: a local directory or any fsspec URL (``s3://bucket/mnist``, ``memory://x``), so one
bucket can serve several machines. ``Store`` is made of three small pieces: ``Layout`` (where each
artifact lives), ``StoreFiles`` (atomic, durable, bounded I/O on confined keys) and ``StoreLocks``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import fsspec
from fsspec.implementations.local import LocalFileSystem

from storage.credentials import strip_credentials
from storage.door import ConfinedLocalFileSystem
from storage.files import STORE_ENV, StoreFiles
from storage.layout import Layout
from storage.locks import LockFactory, StoreLocks

DEFAULT_STORE = "artifacts"
_log = logging.getLogger("mnist.store")


class Store(Layout, StoreFiles, StoreLocks):
    """Layout, atomic I/O and locks for every artifact of the pipeline."""

    def __init__(
        self,
        url: str | os.PathLike[str],
        distributed_lock: LockFactory | None = None,
        warn: Callable[[str], None] | None = None,
        anchor: str | None = None,
    ) -> None:
        """``anchor``: for a local store that is a folder of another store (its ``incoming`` location), that store's
        root: the folders between are walked without following a link (``storage/door.py``)."""
        url = strip_credentials(os.fspath(url))  # a password in the URL goes to fsspec's config, not into logs
        self.distributed_lock = distributed_lock
        self.warn = warn or _log.warning  # where damaged files are reported (a step's run logger)
        self._swept: set[str] = set()
        self.warned: set[str] = set()  # warnings said once per store object (storage/listing.py)
        self.fs, root = fsspec.core.url_to_fs(url)
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self.root = os.path.abspath(root) if self.is_local else root.rstrip("/")
        if self.is_local:  # every local read, write, listing and delete goes through the one door (storage/door.py)
            self.fs = ConfinedLocalFileSystem(self.root, anchor=anchor)
        self.url = self.root if self.is_local else url.rstrip("/")

    @classmethod
    def resolve(cls, url: str | os.PathLike[str] | None = None, **options) -> Store:
        """The store named explicitly, else by ``$MNIST_STORE``, else ``./artifacts``."""
        return cls(url or os.environ.get(STORE_ENV) or DEFAULT_STORE, **options)

    def __repr__(self) -> str:
        return f"Store({self.url!r})"
