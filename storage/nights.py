"""Which nights are running on a store: one small marker per night under ``locks/nights/``, read by ``prune``.

A night writes ``locks/nights/<run_id>.json`` before it reads or writes anything else and removes it when it ends
(completed, failed or crashed, by the flow's hooks). A marker is a plain file, so it works the same on a folder and
in a bucket, across machines, where an flock would only cover one machine. A night killed outright (SIGKILL, a
lost machine) leaves its marker; one older than ``NIGHT_HOURS`` is taken as left behind and reported, not obeyed,
since no night of this pipeline runs that long.
"""

from __future__ import annotations

import posixpath
from datetime import UTC, datetime, timedelta

from pydantic import BaseModel, ValidationError

from storage.files import SIDECAR_LIMIT, StoreError
from storage.keys import StoreName, damage, is_run_id
from storage.listing import listed_keys
from storage.store import Store

NIGHT_HOURS = 24  # a marker older than this belongs to a night that was killed: reported, not obeyed
FUTURE_MINUTES = 10  # … and one dated later than this from now (clocks differ by less): not ours, reported


class NightStateUnreadable(StoreError):
    """Whether a night is running cannot be told (a marker or their folder cannot be read): nothing is pruned."""


class NightMarker(BaseModel):
    """What ``locks/nights/<run_id>.json`` holds."""

    run_id: StoreName
    started_at: datetime


def _marker_name(name: str) -> bool:
    """Whether ``name`` is what ``night_marker_file`` names: ``<run id>.json``."""
    run_id, dot, ext = name.rpartition(".")
    return dot == "." and ext == "json" and is_run_id(run_id)


def mark_running(store: Store, run_id: str) -> None:
    """Say that night ``run_id`` runs on this store (a restarted attempt of the same run rewrites it)."""
    marker = NightMarker(run_id=run_id, started_at=datetime.now(UTC))
    store.write_text(store.night_marker_file(run_id), marker.model_dump_json())


def mark_ended(store: Store, run_id: str) -> None:
    """Night ``run_id`` no longer runs on this store."""
    store.remove(store.night_marker_file(run_id))


def running_nights(store: Store, now: datetime | None = None) -> tuple[list[NightMarker], list[NightMarker]]:
    """The nights running now and the markers left behind by killed nights (older than ``NIGHT_HOURS``, or dated
    more than ``FUTURE_MINUTES`` ahead of this machine's clock, which no night that runs can be).

    Fails closed: a marker that cannot be read or is not one of ours, or a folder of markers that cannot be
    listed, raises ``NightStateUnreadable``, since a night it hides could be using what a prune would remove."""
    now = now or datetime.now(UTC)
    markers = store.night_markers_dir()
    folder = store.path(markers)
    try:
        if not store.fs.exists(folder):
            return [], []
        entries = store.listing(folder)
    except (OSError, StoreError) as exc:
        raise NightStateUnreadable(
            f"The running nights' markers in {store.location(markers)} cannot be listed ({exc}): "
            "fix the store's permissions, then prune again."
        ) from exc
    running, stale = [], []
    kinds = {entry["name"]: entry.get("type") for entry in entries}
    hidden = [path for path in kinds if posixpath.basename(path.rstrip("/")).startswith(".")]  # a writer's temporary file
    # a name no night writes (not <run id>.json, or not a key: a#b.json) is no night of ours: skipped with a warning
    ours = listed_keys(store, markers, [p for p in kinds if p not in hidden], "running nights' markers", fits=_marker_name)
    for key, path in ours.items():
        try:
            if kinds[path] != "file":
                raise StoreError(f"it is a {kinds[path]}, not a file")
            marker = NightMarker.model_validate_json(store.read_bytes(key, limit=SIDECAR_LIMIT))
        except (ValidationError, StoreError, OSError) as exc:
            raise NightStateUnreadable(
                damage(f"The night marker {store.location(key)}", exc)
                + ": whether that night still runs cannot be told. Remove the marker if no night is running, then prune again."
            ) from exc
        started = marker.started_at if marker.started_at.tzinfo else marker.started_at.replace(tzinfo=UTC)
        # a marker from the future is not a night that runs now: obeyed, it would stop every prune for good
        old = now - started > timedelta(hours=NIGHT_HOURS) or started - now > timedelta(minutes=FUTURE_MINUTES)
        (stale if old else running).append(marker)
    return running, stale
