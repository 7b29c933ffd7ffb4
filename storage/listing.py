"""Which names a listing of the store returned are keys of ours: the one gate between ``fs.ls``/``fs.find`` and any
code that reads, removes or decides by what it lists (the prune's folders and files, the running nights' markers).

A listing is store content, so untrusted: an S3 object may be named ``reports/zzz/../x`` (object keys are literal),
a local file ``reports/zzz/a#b``. Such a name cannot be a key (``storage.keys.confine_key`` refuses it) and was not
written by this pipeline: it is skipped, with one warning per listing naming how many and the first, and never
read, removed or acted on. Raising instead would let one planted name stop every prune for good.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from storage.keys import UnsafeKey, confine_key
from storage.store import Store


class ForeignNames(str):
    """A warning that names in the store were skipped as not ours. Skipping them hides nothing of ours (no night
    writes such a name, so no report, marker or partition of a run is among them): a reader that refuses on any other
    warning, as the prune does, passes this one on instead."""


def listed_keys(
    store: Store, folder: str, paths: Iterable[str], what: str, fits: Callable[[str], bool] = lambda _: True
) -> dict[str, str]:
    """The keys of ``paths`` (what a listing of key ``folder`` returned, as ``fs.ls``/``fs.find`` name them) that lie
    below ``folder``, are keys inside the store and, by their part below ``folder``, fit the layout (``fits``), each
    with the path it was listed as. The others are skipped with one warning saying ``what`` was listed (once per
    store object for the same names: a prune lists some folders twice)."""
    top = store.fs._strip_protocol(store.path(folder)).rstrip("/")
    keys: dict[str, str] = {}
    odd: list[str] = []
    for listed in paths:
        path = store.fs._strip_protocol(listed).rstrip("/")
        if path == top:  # the folder itself (``find(withdirs=True)`` names it)
            continue
        below = path[len(top) + 1 :] if path.startswith(top + "/") else ""
        try:
            key = confine_key(store.key(folder, below) if below else "")
        except UnsafeKey:
            odd.append(below or path)
            continue
        if fits(below):
            keys[key] = listed
        else:
            odd.append(below)
    if odd:
        message = ForeignNames(
            f"Skipping {len(odd)} name(s) in {store.location(folder)} ({what}) that are not keys this pipeline writes, "
            f"first: {odd[0][:200]!r}; they are left as they are, never read or removed. Remove them by hand if they are not wanted."
        )
        if message not in store.warned:
            store.warned.add(message)
            store.warn(message)
    return keys
