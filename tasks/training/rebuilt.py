"""A stored model rebuilt from this checkout's code, with only its weights read from the store.

The store holds weights, never architectures: a ``.keras`` archive also holds a ``config.json`` that Keras'
own loader would instantiate, so whoever can write the store could choose the network that runs (one
``Dense`` applied a thousand times passes ``safe_mode`` and stalls every night). Here the network is built
by ``build_model`` for the name the model's record gives (with its serving views, ``for_serving``), the
archive's config is only compared with what that code builds (read as JSON within a size limit, never
instantiated), the weight file's shapes are compared with the network's before any value is read, and only
then are the weights assigned, and they must all be finite numbers (a NaN or infinite weight makes every prediction
NaN). Whatever fails is a ``DamagedModel``, with one sentence saying why. ``check_archive`` makes the checks that
need no network built, for the training step's cache lookup.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from storage import DamagedArtifact, Store, StoreError
from tasks.training.keras_runtime import import_keras
from tasks.training.model import ModelName, ModelRef, build_model, for_serving
from tasks.training.precision import Precision, dtype_policy
from tasks.training.weight_file import plain_datasets

# the whole .keras file, and all it unpacks to (ours: about 3.3 MB for strong, 0.6 MB for seed); also what bounds the
# zip's directory, which zipfile parses whole
MODEL_LIMIT = 16 << 20
CONFIG_LIMIT = 1 << 20  # config.json: ours are about 31 KB (strong) and 5 KB (seed)
CONFIG_ENTRY, METADATA_ENTRY, WEIGHTS_ENTRY = "config.json", "metadata.json", "model.weights.h5"
KERAS_ARCHIVE_ENTRIES = {CONFIG_ENTRY, METADATA_ENTRY, WEIGHTS_ENTRY}
IGNORED_KEYS = frozenset({"compile_config", "shared_object_id"})  # see canonical_config
POLICIES = {p.value for p in Precision if p is not Precision.auto}  # what a trained model's record may name
# what reading a hostile zip or HDF5 file can raise: each means the file is not a model of ours
UNREADABLE = (
    zipfile.BadZipFile,
    zlib.error,
    EOFError,
    NotImplementedError,
    RuntimeError,
    OSError,
    ValueError,
    KeyError,
    TypeError,
)


class DamagedModel(DamagedArtifact):
    """A stored model this checkout cannot rebuild with its weights (not a .keras archive, a config that is
    not JSON or not the network our code builds, weights of other shapes, too large): it is not used."""


def load_model(store: Store, ref: ModelRef):
    """The network ``ref`` names, built by this checkout's code, with the weights of the stored file.

    The file is copied once (at most ``MODEL_LIMIT`` bytes), hashed while copied, and read from that copy,
    so it cannot change between check and use. Raises ``DamagedModel`` naming the file and what is wrong.
    """
    with _model_copy(store, ref) as (local, where):
        return _rebuilt(local, ref, where)


@contextlib.contextmanager
def _model_copy(store: Store, ref: ModelRef) -> Iterator[tuple[str, str]]:
    """The model file copied once and hashed while copied (at most ``MODEL_LIMIT`` bytes), and where it lies in the
    store; every failure to get it (too large, changed since its digest was recorded, gone, a folder, link or pipe
    put there) a ``DamagedModel``."""
    where = store.location(ref.file_key)
    try:
        with store.verified_copy(ref.file_key, ref.sha256, suffix=".keras", limit=MODEL_LIMIT) as local:
            yield local, where
    except DamagedModel:
        raise
    except DamagedArtifact as exc:
        raise DamagedModel(str(exc)) from exc
    except (OSError, StoreError) as exc:
        raise DamagedModel(f"model {where} cannot be read ({type(exc).__name__}: {exc})") from exc


def check_archive(store: Store, ref: ModelRef) -> None:
    """Raise ``DamagedModel`` unless ``ref``'s file matches its digest, names a network and dtype policy this code
    builds, and is a .keras archive of ours (its three entries within their limits, a ``config.json`` that is JSON).
    No network is built and no weight read: the training step's cache lookup uses it, and a fully cached night imports
    no TensorFlow. Whether the config is the network this code builds, and its weights ours and finite, is checked
    when the model is loaded (``load_model``), and a night whose model fails there trains it again."""
    with _model_copy(store, ref) as (local, where):
        _recipe(ref, where)
        stored_config(local, where)


def _rebuilt(local: str, ref: ModelRef, where: str):
    network, policy = _recipe(ref, where)
    stored = stored_config(local, where)
    model = served_network(network, policy)
    try:
        same = canonical_config(stored) == canonical_config(model_config(model))
    except RecursionError:  # nested deeper than any config of ours
        same = False
    if not same:
        raise DamagedModel(
            f"model {where} is not the {network.value} network this code builds (its config.json differs): "
            "its weights are not loaded; train it again or choose another champion"
        )
    expected = weight_shapes_of(model)
    try:
        with zipfile.ZipFile(local) as archive, archive.open(WEIGHTS_ENTRY) as weights:
            found = _weight_shapes(weights)
    except UNREADABLE as exc:
        raise DamagedModel(f"model {where} has a weight file that cannot be read ({type(exc).__name__}: {exc})") from exc
    wrong = sorted(path for path, shape in expected.items() if found.get(path) != shape)
    if wrong:
        raise DamagedModel(
            f"model {where} does not hold the {network.value} network's weights ({len(wrong)} of {len(expected)} "
            f"missing or of another shape, first {wrong[0]}): not loaded"
        )
    try:
        model.load_weights(local)
    except UNREADABLE as exc:
        raise DamagedModel(f"model {where}: its weights cannot be loaded ({type(exc).__name__}: {exc})") from exc
    check_finite(model, f"model {where}")
    return model


def check_finite(model, what: str) -> None:
    """Raise ``DamagedModel`` if one of ``model``'s weights is NaN or infinite: such a model predicts NaN for every
    image (a checkpoint or a file a writer filled so, or a training that diverged), so it is never used or stored."""
    bad = sum(int(np.size(w) - np.count_nonzero(np.isfinite(w))) for w in model.get_weights())
    if bad:
        raise DamagedModel(f"{what} has {bad} weights that are not finite numbers (NaN or infinite): it is not used")


def _recipe(ref: ModelRef, where: str) -> tuple[ModelName, str]:
    """The network and dtype policy the model's record names, if this code knows them."""
    try:
        network = ModelName(ref.network)
    except ValueError as exc:
        raise DamagedModel(f"model {where} names a network this code does not build ({ref.network[:40]!r})") from exc
    if ref.precision not in POLICIES:
        raise DamagedModel(f"model {where} names a dtype policy this code does not use ({ref.precision[:40]!r})")
    return network, ref.precision


def stored_config(local: str, where: str) -> Any:
    """The archive's ``config.json`` as JSON, every entry's declared size checked first (a zip bomb is refused
    before anything is inflated, and zipfile stops inflating at the declared size)."""
    try:
        with zipfile.ZipFile(local) as archive:
            entries = {info.filename: info for info in archive.infolist()}
            missing = sorted(KERAS_ARCHIVE_ENTRIES - set(entries))
            if missing:
                raise DamagedModel(
                    f"model {where} is not a .keras archive of ours (it lacks {', '.join(missing)}; HDF5 and other formats are refused)"
                )
            if entries[CONFIG_ENTRY].file_size > CONFIG_LIMIT or sum(i.file_size for i in entries.values()) > MODEL_LIMIT:
                raise DamagedModel(f"model {where} unpacks to more than a model of ours could hold: not read")
            text = archive.read(CONFIG_ENTRY)
    except zipfile.BadZipFile as exc:
        raise DamagedModel(f"model {where} is not a .keras archive (HDF5 and other formats are refused)") from exc
    except DamagedModel:
        raise
    except UNREADABLE as exc:
        raise DamagedModel(f"model {where} cannot be unpacked ({type(exc).__name__}: {exc})") from exc
    try:
        return json.loads(text)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise DamagedModel(f"model {where} has a config.json that is not JSON ({exc})") from exc


def served_network(network: ModelName, policy: str):
    """The network as training saves it: built under its dtype policy, then wrapped with its serving views
    outside it (``tasks.training.loop``)."""
    with dtype_policy(policy):
        model = build_model(network)
    return for_serving(network, model)


def model_config(model) -> Any:
    """What Keras writes as ``config.json`` for ``model``, as plain JSON."""
    keras = import_keras()
    return json.loads(json.dumps(keras.saving.serialize_keras_object(model)))


def canonical_config(config: Any) -> Any:
    """A model config with its layer names numbered in order of first appearance, and without its
    ``compile_config`` and ``shared_object_id`` marks: Keras names layers from a per-process counter
    (``conv2d_7``) and marks objects serialised twice with their ``id()``, and we load without compiling, so two
    builds of one network by one code compare equal, and any other network does not."""
    config = _without(config, IGNORED_KEYS)
    names: dict[str, str] = {}
    _collect_names(config, names)
    return _renamed(config, names)


def _without(node: Any, keys: frozenset[str]) -> Any:
    if isinstance(node, dict):
        return {k: _without(v, keys) for k, v in node.items() if k not in keys}
    if isinstance(node, list):
        return [_without(v, keys) for v in node]
    return node


def _collect_names(node: Any, names: dict[str, str]) -> None:
    if isinstance(node, dict):
        inner = node.get("config")
        if "class_name" in node and isinstance(inner, dict) and "DTypePolicy" not in str(node["class_name"]):
            name = inner.get("name")
            if isinstance(name, str) and name not in names:
                names[name] = f"#{len(names)}"
        for value in node.values():
            _collect_names(value, names)
    elif isinstance(node, list):
        for value in node:
            _collect_names(value, names)


def _renamed(node: Any, names: dict[str, str]) -> Any:
    if isinstance(node, dict):
        return {k: _renamed(v, names) for k, v in node.items()}
    if isinstance(node, list):
        return [_renamed(v, names) for v in node]
    return names.get(node, node) if isinstance(node, str) else node


def weight_shapes_of(model) -> dict[str, tuple]:
    """Every dataset Keras writes for ``model``'s weights, path → shape: what a stored weight file must hold."""
    with tempfile.TemporaryDirectory(prefix="mnist-weights-") as tmp:
        path = os.path.join(tmp, "expected.weights.h5")
        model.save_weights(path)
        with open(path, "rb") as f:
            return _weight_shapes(f)


def _weight_shapes(stream) -> dict[str, tuple]:
    """Path → shape of every dataset in an HDF5 file, read from its metadata only (no values), walked without following
    a link: a link, a dataset kept outside the file or more values than ``MODEL_LIMIT`` bytes is refused
    (``ValueError``) before Keras opens it (``tasks.training.weight_file``)."""
    import h5py

    with h5py.File(stream, "r") as f:
        return {path.lstrip("/"): tuple(d.shape) for path, d in plain_datasets(f, MODEL_LIMIT).items()}
