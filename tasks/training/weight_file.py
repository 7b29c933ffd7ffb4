"""The datasets of an HDF5 weight file from the store, found from its structure alone, before any value is read.

An HDF5 file can keep a dataset's values outside itself (external storage at any path on the worker, a virtual
dataset over other files), link to another file or name (external and soft links), pass its bytes through a filter
HDF5 loads as a plugin, or declare a dataset of gigabytes that it never wrote (read whole, it fills memory). Reading
one value of such a file reads outside the store (a pipe there blocks the read forever, past any step's time budget)
or exhausts memory. Keras writes none of that: plain groups, hard links, unfiltered numeric datasets. So a file is
walked link by link without following one (``plain_datasets``), and anything else, or more values than
``values_limit`` bytes, makes it not ours (``ValueError``) before a value is read.
"""

from __future__ import annotations

OBJECTS_LIMIT = 10_000  # groups and datasets: a weight file of ours holds a few hundred (strong's backup: 79 datasets)


def plain_datasets(f, values_limit: int) -> dict:
    """Path → ``h5py.Dataset`` of every dataset in the open ``h5py.File`` ``f``, each a plain numeric array of this
    file's own bytes, all together declaring at most ``values_limit`` bytes; raises ``ValueError`` naming the first
    thing that is not ours. Only metadata is read here; the caller reads values while ``f`` is open."""
    import h5py

    found: dict = {}
    seen = 0
    total = 0
    groups = [f]
    while groups:
        group = groups.pop()
        for name in group:  # the names of its links: none is followed before its kind is known
            seen += 1
            if seen > OBJECTS_LIMIT:
                raise ValueError(f"it holds more than {OBJECTS_LIMIT} objects: not a weight file of ours")
            path = f"{group.name.rstrip('/')}/{name}"
            link = group.get(name, getlink=True)
            if not isinstance(link, h5py.HardLink):  # SoftLink, ExternalLink, a user-defined link
                raise ValueError(f"{path} is a {type(link).__name__}: a weight file of ours holds no links")
            obj = group[name]
            if isinstance(obj, h5py.Group):
                groups.append(obj)
                continue
            if not isinstance(obj, h5py.Dataset):
                raise ValueError(f"{path} is a {type(obj).__name__}, not a group or a dataset")
            if obj.shape is None:
                raise ValueError(f"{path} holds no array")
            if obj.external or obj.is_virtual:
                raise ValueError(f"{path} keeps its values outside this file: not read")
            if obj.id.get_create_plist().get_nfilters():
                raise ValueError(f"{path} passes its values through a filter (compression, a plugin): not read")
            if obj.dtype.kind not in "biuf" or obj.dtype.fields is not None or obj.dtype.itemsize > 8:
                raise ValueError(f"{path} holds {obj.dtype}, not numbers")
            total += obj.size * obj.dtype.itemsize
            if total > values_limit:
                raise ValueError(
                    f"its datasets declare more than {values_limit} bytes (at {path}): more than a network of ours holds"
                )
            found[path] = obj
    return found
