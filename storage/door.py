"""The one door to a local store's files: every read, write, listing, rename and delete of a local store goes
through ``ConfinedLocalFileSystem``, which ``Store`` uses as its fsspec filesystem, so pyarrow's dataset
discovery, Parquet reads and writes, locks and sidecars all pass here.

Whoever can write into the store can plant a symbolic link, a named pipe or a folder where the pipeline expects a
file. The door walks every path from the store's root one component at a time with ``openat`` and
``O_NOFOLLOW``, so a link at any component is refused rather than followed (no write lands outside the store, no
read comes from outside it); it opens files with ``O_NONBLOCK`` and checks the open descriptor with ``fstat``, so
a pipe or device is refused instead of waited on. A listing shows links, pipes and sockets as ``type: other``
(pyarrow ignores them) and ``exists`` is false for them: to the pipeline they are misses, and the next write of
that key replaces them. A folder where a file is to be written, or a link where a write needs a folder, is moved
aside to a hidden ``.damaged-…`` name beside it (hidden names are never read as data).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import stat
import uuid
from collections.abc import Iterator
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from storage.keys import UnsafeKey

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
RM_DESCRIPTORS = 64  # folders a removal holds open at once, whatever the depth of what it removes
WALK_DEPTH = 32  # levels a walk (``find``, a prune's listing) descends below its start: our layout needs four


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # os.listdir's surrogate escapes of bytes that are not UTF-8
        return False
    return True


def _set_aside(folder: int, name: str) -> str:
    """Rename what stands at ``name`` in ``folder`` to a hidden ``.damaged-…`` name beside it (never read as data)."""
    aside = f".damaged-{name}-{uuid.uuid4().hex[:8]}"
    os.rename(name, aside, src_dir_fd=folder, dst_dir_fd=folder)
    return aside


class NotARegularFile(OSError):
    """A link, pipe, socket, device or folder stands where a store file was expected: it is not followed or read."""


class ConfinedLocalFileSystem(LocalFileSystem):
    """fsspec's local filesystem, confined to ``root``: no component of any path may be a symbolic link."""

    cachable = False  # one instance per store: its root is part of what it is

    def __init__(self, root: str, anchor: str | None = None, **kwargs: Any) -> None:
        """``anchor``: a trusted folder above ``root`` (the store a location such as ``incoming`` belongs to); the
        folders from it down to ``root`` are store content, so they are walked without following a link too."""
        super().__init__(**kwargs)
        self.root = os.path.abspath(root)
        self.anchor = os.path.abspath(anchor) if anchor else self.root
        if self.anchor != self.root and not self.root.startswith(self.anchor + os.sep):
            raise UnsafeKey(f"{self.root!r} is not inside {self.anchor!r}")
        self.below = [] if self.anchor == self.root else self.root[len(self.anchor) + 1 :].split(os.sep)

    @classmethod
    def store_folder(cls, folder: str) -> ConfinedLocalFileSystem:
        """The door to ``folder`` of a store (Prefect's ``prefect-results``): anchored at the store, so a link
        planted at the folder itself is not followed either."""
        folder = os.path.abspath(cls._strip_protocol(folder))
        return cls(folder, anchor=os.path.dirname(folder))

    # ---- walking: every component opened relative to the last, never through a link ----------------------
    def _parts(self, path: str) -> list[str]:
        path = os.path.abspath(self._strip_protocol(path))
        if path == self.root:
            return []
        if not path.startswith(self.root + os.sep):
            raise UnsafeKey(f"{path[:200]!r} is outside the store {self.root}: not opened")
        parts = path[len(self.root) + 1 :].split(os.sep)
        if any(p in ("", ".", "..") for p in parts):
            raise UnsafeKey(f"{path[:200]!r} is not a plain path inside the store: not opened")
        return parts

    def _open_dir(self, parts: list[str], create: bool = False) -> int:
        """A descriptor of the folder ``parts`` below the root, each component opened without following a link."""
        if create:
            os.makedirs(self.anchor, exist_ok=True)  # the store itself is the worker's own setting: made as named
        fd = os.open(self.anchor, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for part in [*self.below, *parts]:
                try:
                    child = os.open(part, _DIR, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, 0o777, dir_fd=fd)
                    child = os.open(part, _DIR, dir_fd=fd)
                except OSError as exc:
                    if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    if not create:
                        raise NotARegularFile(
                            exc.errno, f"{part!r} in the store is a link or not a folder: not followed", part
                        ) from exc
                    # a write needs the folder: whatever stands there (a planted link) is set aside, never followed
                    _set_aside(fd, part)
                    os.mkdir(part, 0o777, dir_fd=fd)
                    child = os.open(part, _DIR, dir_fd=fd)
                os.close(fd)
                fd = child
            return fd
        except BaseException:
            os.close(fd)
            raise

    @contextlib.contextmanager
    def _parent(self, path: str, create: bool = False) -> Iterator[tuple[int, str]]:
        parts = self._parts(path)
        if not parts:
            raise IsADirectoryError(errno.EISDIR, "the store's root is a folder", self.root)
        fd = self._open_dir(parts[:-1], create=create)
        try:
            yield fd, parts[-1]
        finally:
            os.close(fd)

    def _lstat(self, path: str) -> os.stat_result:
        parts = self._parts(path)
        if not parts:
            fd = self._open_dir([])  # the root itself, reached without a link from the anchor
            try:
                return os.fstat(fd)
            finally:
                os.close(fd)
        with self._parent(path) as (fd, name):
            return os.stat(name, dir_fd=fd, follow_symlinks=False)

    # ---- files --------------------------------------------------------------------------------------------
    def _open(self, path: str, mode: str = "rb", **kwargs: Any):
        """A regular file of the store, opened without following a link and without waiting on a pipe."""
        if "r" in mode and "+" not in mode:
            flags = os.O_RDONLY
        elif "a" in mode:
            flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
        elif "w" in mode or "x" in mode:
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_EXCL if "x" in mode else 0)
        else:
            raise ValueError(f"mode {mode!r} is not one the store uses")
        with self._parent(path, create="r" not in mode) as (parent, name):
            if flags & os.O_TRUNC:  # a new file, never one rewritten in place: a hard link planted here stays as it was
                try:
                    os.unlink(name, dir_fd=parent)
                except FileNotFoundError:
                    pass
                except IsADirectoryError:  # a folder planted where the file goes: set aside
                    _set_aside(parent, name)
                flags = (flags & ~os.O_TRUNC) | os.O_EXCL
            try:
                fd = os.open(name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o666, dir_fd=parent)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
                    raise NotARegularFile(exc.errno, "a link, pipe or folder, not a file: not opened", path) from exc
                raise
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise NotARegularFile(errno.EINVAL, "not a regular file (a pipe, socket or device): not read", path)
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
            return os.fdopen(fd, mode if "b" in mode else mode + "b")
        except BaseException:
            os.close(fd)
            raise

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        with self._open(path, "rb") as f:
            if start:
                f.seek(start)
            return f.read() if end is None else f.read(end - (start or 0))

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kwargs: Any) -> None:
        with self._open(path, "wb") as f:
            f.write(value)

    def put_file(self, lpath: str, rpath: str, callback: Any = None, **kwargs: Any) -> None:
        """Copy a file of this machine (the caller's own, outside the store) into the store."""
        if os.path.isdir(lpath):  # fsspec's recursive put hands folders here too
            self.makedirs(rpath, exist_ok=True)
            return
        with open(lpath, "rb") as source, self._open(rpath, "wb") as target:
            shutil.copyfileobj(source, target)

    def get_file(self, rpath: str, lpath: str, callback: Any = None, **kwargs: Any) -> None:
        if self.isdir(rpath):
            os.makedirs(lpath, exist_ok=True)
            return
        with self._open(rpath, "rb") as source, open(lpath, "wb") as target:
            shutil.copyfileobj(source, target)

    def cp_file(self, path1: str, path2: str, **kwargs: Any) -> None:
        if self.isdir(path1):
            self.makedirs(path2, exist_ok=True)
            return
        with self._open(path1, "rb") as source, self._open(path2, "wb") as target:
            shutil.copyfileobj(source, target)

    def fsync(self, path: str) -> None:
        """Flush a store file's bytes to the disk (before its name is published)."""
        with self._open(path, "rb") as f:
            os.fsync(f.fileno())

    # ---- names ----------------------------------------------------------------------------------------------
    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        st = self._lstat(path)
        kind = "directory" if stat.S_ISDIR(st.st_mode) else "file" if stat.S_ISREG(st.st_mode) else "other"
        return {
            "name": self._strip_protocol(path),
            "size": st.st_size,
            "type": kind,
            "mtime": st.st_mtime,
            "mode": st.st_mode,
            "islink": stat.S_ISLNK(st.st_mode),
            "created": st.st_ctime,
            "ino": st.st_ino,
            "nlink": st.st_nlink,
            "uid": st.st_uid,
            "gid": st.st_gid,
        }

    def exists(self, path: str, **kwargs: Any) -> bool:
        """True for a regular file or folder; a link, pipe or socket is a miss (the next write replaces it)."""
        try:
            return self.info(path)["type"] != "other"
        except (FileNotFoundError, NotARegularFile, NotADirectoryError, UnsafeKey):
            return False

    lexists = exists

    def isfile(self, path: str) -> bool:
        try:
            return self.info(path)["type"] == "file"
        except (OSError, UnsafeKey):
            return False

    def isdir(self, path: str) -> bool:
        try:
            return self.info(path)["type"] == "directory"
        except (OSError, UnsafeKey):
            return False

    def ls(self, path: str, detail: bool = False, **kwargs: Any) -> list:
        path = self._strip_protocol(path).rstrip("/") or "/"
        if self.isfile(path):
            return [self.info(path) if detail else path]
        fd = self._open_dir(self._parts(path))
        try:
            # a name that is not UTF-8 cannot be one of ours, and pyarrow cannot even spell it: not listed
            names = sorted(n for n in os.listdir(fd) if _is_utf8(n))
            entries = []
            for name in names:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                kind = "directory" if stat.S_ISDIR(st.st_mode) else "file" if stat.S_ISREG(st.st_mode) else "other"
                full = f"{path}/{name}"
                entries.append(
                    {
                        "name": full,
                        "size": st.st_size,
                        "type": kind,
                        "mtime": st.st_mtime,
                        "mode": st.st_mode,
                        "islink": stat.S_ISLNK(st.st_mode),
                    }
                )
        finally:
            os.close(fd)
        return entries if detail else [e["name"] for e in entries]

    def walk(self, path: str, maxdepth: int | None = None, topdown: bool = True, on_error: Any = "omit", **kwargs: Any):
        """fsspec's ``walk`` (which ``find`` and ``du`` use), without recursion and at most ``WALK_DEPTH`` levels
        below ``path``: fsspec's own recurses once per level, so a folder planted thousands of levels deep raised
        ``RecursionError`` out of a prune. The store's own layout is at most four levels deep under any folder a
        walk starts from; what lies deeper is not listed (to a prune, a folder that is not empty and stays)."""
        if maxdepth is not None and maxdepth < 1:
            raise ValueError("maxdepth must be at least 1")
        detail = kwargs.pop("detail", False)
        limit = WALK_DEPTH if maxdepth is None else min(maxdepth, WALK_DEPTH)
        pending = [(self._strip_protocol(path).rstrip("/") or "/", 1)]
        visited = []
        while pending:
            folder, depth = pending.pop()
            try:
                listing = self.ls(folder, detail=True, **kwargs)
            except OSError as exc:
                if on_error == "raise":
                    raise
                if callable(on_error):
                    on_error(exc)
                continue
            dirs = {e["name"].rsplit("/", 1)[-1]: e for e in listing if e["type"] == "directory" and e["name"] != folder}
            files = {
                ("" if e["name"] == folder else e["name"].rsplit("/", 1)[-1]): e
                for e in listing
                if not (e["type"] == "directory" and e["name"] != folder)
            }
            step = (folder, dirs, files) if detail else (folder, list(dirs), list(files))
            if topdown:
                yield step  # the caller may remove names from the folders listed: those are not walked
            else:
                visited.append(step)
            if depth < limit:
                pending.extend((dirs[name]["name"], depth + 1) for name in reversed(list(step[1])) if name in dirs)
        yield from reversed(visited)  # each folder after every folder below it, as a bottom-up walk gives them

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        parts = self._parts(path)
        if not exist_ok and self.exists(path):
            raise FileExistsError(errno.EEXIST, "exists", path)
        os.close(self._open_dir(parts, create=True))

    def mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> None:
        self.makedirs(path, exist_ok=True)

    def mv(self, path1: str, path2: str, recursive: bool = False, maxdepth: int | None = None, **kwargs: Any) -> None:
        """Rename within the store (atomic); a folder standing at ``path2`` is first moved aside."""
        with self._parent(path1) as (fd1, name1), self._parent(path2, create=True) as (fd2, name2):
            try:
                os.rename(name1, name2, src_dir_fd=fd1, dst_dir_fd=fd2)
            except (IsADirectoryError, OSError) as exc:
                if exc.errno not in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST):
                    raise
                _set_aside(fd2, name2)
                os.rename(name1, name2, src_dir_fd=fd1, dst_dir_fd=fd2)
            os.fsync(fd2)  # the rename itself is durable

    def rm_file(self, path: str) -> None:
        with self._parent(path) as (fd, name):
            os.unlink(name, dir_fd=fd)

    def _rm_dir(self, parent: int, name: str) -> None:
        """Remove folder ``name`` of ``parent`` and all it holds, every entry reached without following a link.

        Without recursion, and with at most ``RM_DESCRIPTORS`` folders open whatever the depth: a writer can plant a
        folder thousands of levels deep, deeper than Python's recursion limit (a ``RecursionError`` failed the
        train step) or the descriptors a process may hold. Below that many levels, the entries of a folder still
        to empty are renamed up into the deepest open one (a rename inside the store, between folders opened
        without following a link), so each deeper level is lifted once, then emptied there."""
        names = [name]
        folders = [os.open(name, _DIR, dir_fd=parent)]
        try:
            while folders:
                fd = folders[-1]
                full = None  # a folder below ``fd`` that is not empty yet
                for entry in os.listdir(fd):
                    if not stat.S_ISDIR(os.stat(entry, dir_fd=fd, follow_symlinks=False).st_mode):
                        os.unlink(entry, dir_fd=fd)  # a link is removed, never followed
                        continue
                    try:
                        os.rmdir(entry, dir_fd=fd)
                    except OSError as exc:
                        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                            raise
                        full = full or entry
                if full is None:  # ``fd`` is empty now: remove it from the folder above
                    os.close(folders.pop())
                    os.rmdir(names.pop(), dir_fd=folders[-1] if folders else parent)
                    continue
                child = os.open(full, _DIR, dir_fd=fd)
                if len(folders) < RM_DESCRIPTORS:
                    folders.append(child)
                    names.append(full)
                    continue
                try:
                    for inner in os.listdir(child):
                        os.rename(inner, f".rm-{uuid.uuid4().hex}", src_dir_fd=child, dst_dir_fd=fd)
                finally:
                    os.close(child)
        finally:
            for fd in folders:
                os.close(fd)

    def rm(self, path: str | list[str], recursive: bool = False, maxdepth: int | None = None) -> None:
        for one in [path] if isinstance(path, str) else path:
            kind = self.info(one)["type"]
            if kind != "directory":
                self.rm_file(one)
                continue
            if not recursive:
                raise IsADirectoryError(errno.EISDIR, "a folder: remove it with recursive=True", one)
            with self._parent(one) as (parent, name):
                self._rm_dir(parent, name)

    def set_aside(self, path: str) -> str:
        """Move whatever stands at ``path`` (a pipe, a folder) to a hidden name beside it; returns that name."""
        with self._parent(path) as (fd, name):
            return _set_aside(fd, name)

    @contextlib.contextmanager
    def folder_locked(self, path: str) -> Iterator[None]:
        """An flock on folder ``path`` itself (made if missing, reached without following a link), held while the
        caller changes what the folder holds: what serialises the replacement of a lock file (``storage/locks.py``)."""
        fd = self._open_dir(self._parts(path), create=True)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # the flock goes with the descriptor

    def rmdir(self, path: str) -> None:
        """Remove folder ``path`` if it is empty (``OSError`` if not), reached without following a link."""
        with self._parent(path) as (fd, name):
            os.rmdir(name, dir_fd=fd)
